"""Tables, figures and the numbers of the prose of the per-device small-batch study
(``examples/small_batch_study.py``).

Reads ``<study>/results.csv`` and ``<study>/curves.csv`` and writes, into ``--assets``:

- ``study_curves.png``: validation accuracy per epoch, mean over seeds, one panel per per-device
  batch on a shared y-axis (BN drawn last, dashed, so it stays visible where lines coincide);
- ``study_accuracy_vs_per_device.png``: test accuracy vs per-device batch with 95% t-intervals,
  and the seed-paired difference to the same method at per-device batch 16;
- ``study_bgn_groups.png``: BGN's test accuracy vs G at per-device batch 2, BN's interval beside it;
- ``study_results.csv``, ``study_curves.csv`` (copies) and ``study_tables.md`` (every block, also
  returned by :func:`main` for the generated blocks of ``docs/reproduction.md``).

Intervals: over ``n`` seeds, ``mean ± t(0.975, n - 1) · s / sqrt(n)`` with ``s`` the sample standard
deviation; a difference is seed-paired (the two cells of one seed share the seed) and gets the
interval of the per-seed differences.

Run: ``python examples/small_batch_study_report.py --study runs/reproduction/study --assets docs/assets``.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import small_batch_study as study  # noqa: E402

from normlightning import plotting  # noqa: E402

#: two-sided 95% quantile of Student's t, t(0.975, df), for df = 1..10 (standard tables)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
COLORS = {
    "bn": "black",
    "bgn": "tab:red",
    "gn": "tab:olive",
    "seqnorm": "tab:purple",
    "hn": "tab:blue",
    "sn": "tab:green",
}
Row = Mapping[str, Any]


# ----------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values and its 95% t-interval ``[low, high]`` (``nan`` bounds for one value)."""

    mean: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        if self.n < 2:
            return f"{self.mean:.1f} (n=1)"
        return f"{self.mean:.1f} [{self.low:.1f}, {self.high:.1f}]"

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies on one side of 0 (the difference is resolved at 95%)."""
        return self.n >= 2 and (self.low > 0 or self.high < 0)


def interval(values: Sequence[float]) -> Interval:
    """Mean and ``mean ± t(0.975, n-1) s / sqrt(n)`` of ``values``."""
    n = len(values)
    if n == 0:
        raise ValueError("interval of no values")
    mean = statistics.fmean(values)
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1)
    if n - 1 not in T975:
        raise ValueError(f"interval: {n} values; T975 holds t quantiles for 2 to {max(T975) + 1} values")
    half = T975[n - 1] * statistics.stdev(values) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def by_seed(rows: Iterable[Row], value: str = "test_acc1") -> dict[int, float]:
    """``{seed: 100 * row[value]}`` (points) of rows that each have one seed."""
    out: dict[int, float] = {}
    for row in rows:
        if row["seed"] in out:
            raise ValueError(f"two rows of seed {row['seed']} in one series: {row.get('label')}")
        out[row["seed"]] = 100.0 * float(row[value])
    return out


def paired(a: Mapping[int, float], b: Mapping[int, float]) -> list[float]:
    """``a[s] - b[s]`` for the seeds ``s`` both have."""
    return [a[s] - b[s] for s in sorted(set(a) & set(b))]


def select(rows: Iterable[Row], **fields: Any) -> list[Row]:
    """The rows whose fields equal ``fields``."""
    return [r for r in rows if all(r.get(k) == v for k, v in fields.items())]


# ----------------------------------------------------------------------------- tables
def _per_device(main: Sequence[Row]) -> list[int]:
    return sorted({r["per_device"] for r in main})


def _methods(main: Sequence[Row]) -> list[str]:
    present = {r["method"] for r in main}
    return [m for m in study.METHODS if m in present]


def series(main: Sequence[Row], method: str, per_device: int) -> dict[int, float]:
    """Test accuracy per seed of ``method`` at ``per_device``; a method without batch statistics ran
    once per seed (at the global batch), which stands for every per-device batch."""
    rows = select(main, method=method, per_device=per_device) or select(main, method=method)
    if rows and any(r["per_device"] != per_device for r in rows) and study.has_batch_statistics(method):
        return {}
    return by_seed(rows)


def accuracy_table(main: Sequence[Row]) -> str:
    """Method x per-device batch: test accuracy (%), mean [95% interval] over seeds."""
    sizes = _per_device(main)
    lines = [
        "| method | " + " | ".join(f"per-device {b}" for b in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for m in _methods(main):
        cells = [series(main, m, b) for b in sizes]
        lines.append(f"| {m} | " + " | ".join(str(interval(list(c.values()))) if c else "-" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def degradation_table(main: Sequence[Row]) -> str:
    """Per batch-statistic method: accuracy at per-device ``b`` minus at per-device 16, same seed."""
    sizes = [b for b in _per_device(main) if b != study.GLOBAL_BATCH]
    lines = [
        "| method | " + " | ".join(f"{b} minus 16" for b in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for m in _methods(main):
        if not study.has_batch_statistics(m):
            continue
        ref = series(main, m, study.GLOBAL_BATCH)
        cells = [str(interval(paired(series(main, m, b), ref))) for b in sizes]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def versus_bn_table(main: Sequence[Row]) -> str:
    """Per method other than BN: accuracy minus BN's at the same per-device batch, same seed."""
    sizes = _per_device(main)
    lines = [
        "| method | " + " | ".join(f"per-device {b}" for b in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for m in _methods(main):
        if m == "bn":
            continue
        cells = [str(interval(paired(series(main, m, b), series(main, "bn", b)))) for b in sizes]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def groups_table(groups: Sequence[Row], main: Sequence[Row]) -> str:
    """BGN at the smallest per-device batch per G (G = 1: the paper mapping's ``main`` cells): accuracy and
    the seed-paired difference to BN there."""
    b = min(_per_device(main))
    bn = series(main, "bn", b)
    rows = [(1, "1 (paper mapping)", series(main, "bgn", b))]
    rows += [(g, str(g), by_seed(select(groups, groups=g))) for g in sorted({r["groups"] for r in groups})]
    lines = [f"| G at per-device {b} | test accuracy (%) | minus BN (points) |", "|---|---|---|"]
    for _, name, values in rows:
        lines.append(f"| {name} | {interval(list(values.values()))} | {interval(paired(values, bn))} |")
    return "\n".join(lines) + "\n"


def lr_table(lr: Sequence[Row], main: Sequence[Row]) -> str:
    """BN and BGN at the smallest per-device batch per lr scale, over the seeds of the lr part, and
    BGN minus BN at each lr."""
    b = min(_per_device(main))
    seeds = sorted({r["seed"] for r in lr})
    scales = sorted({r["lr_scale"] for r in lr} | {1.0})

    def at(method: str, scale: float) -> dict[int, float]:
        rows = select(main, method=method, per_device=b) if scale == 1.0 else select(lr, method=method, lr_scale=scale)
        return {s: v for s, v in by_seed(rows).items() if s in seeds}

    lines = [
        "| lr (x 0.05) | bn | bgn (paper G) | bgn minus bn (points) |",
        "|---|---|---|---|",
    ]
    for scale in scales:
        bn, bgn = at("bn", scale), at("bgn", scale)
        both = (interval(list(bn.values())), interval(list(bgn.values())), interval(paired(bgn, bn)))
        lines.append(f"| {scale:g} | " + " | ".join(map(str, both)) + " |")
    return "\n".join(lines) + "\n"


def ddp_table(ddp: Sequence[Row], main: Sequence[Row]) -> str:
    """Per method and seed of the ddp part: one process with virtual devices vs 2 DDP processes."""
    b = min(_per_device(main))
    lines = [
        f"| method | seed | 1 process, {study.GLOBAL_BATCH // b} virtual devices | "
        f"{study.DDP_PROCESSES} DDP processes x {study.GLOBAL_BATCH // (b * study.DDP_PROCESSES)} | difference |",
        "|---|---|---|---|---|",
    ]
    for m in [m for m in study.DDP_METHODS if select(ddp, method=m)]:
        real, virtual = by_seed(select(ddp, method=m)), series(main, m, b)
        for s in sorted(set(real) & set(virtual)):
            lines.append(f"| {m} | {s} | {virtual[s]:.2f} | {real[s]:.2f} | {real[s] - virtual[s]:+.2f} |")
    return "\n".join(lines) + "\n"


def long_table(long: Sequence[Row], main: Sequence[Row]) -> str:
    """The long cells next to the ``main`` cells of the same method, per-device batch and seed."""
    lines = [
        "| method | per-device | epochs (main) | test acc. | epochs (long) | test acc. |",
        "|---|---|---|---|---|---|",
    ]
    for r in long:
        short = select(main, method=r["method"], per_device=r["per_device"], seed=r["seed"])
        if short:
            lines.append(
                f"| {r['method']} | {r['per_device']} | {short[0]['epochs']} | {100 * short[0]['test_acc1']:.2f} | "
                f"{r['epochs']} | {100 * r['test_acc1']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def _direction(diff: Interval, below: str, above: str) -> str:
    if not diff.excludes_zero:
        return "no difference resolved (the interval contains 0)"
    return below if diff.high < 0 else above


def answer(main: Sequence[Row]) -> str:
    """The study's answers, with their numbers, as generated sentences."""
    sizes = _per_device(main)
    small, full = min(sizes), study.GLOBAL_BATCH
    bn_small, bn_full = series(main, "bn", small), series(main, "bn", full)
    bgn_small = series(main, "bgn", small)
    bn_drop = interval(paired(bn_small, bn_full))
    bgn_drop = interval(paired(bgn_small, series(main, "bgn", full)))
    bgn_vs_bn = interval(paired(bgn_small, bn_small))
    lines = [
        f"- BN at per-device {small} minus BN at {full} (same seed): {bn_drop} points: "
        + _direction(bn_drop, "BN degrades.", "BN improves."),
        f"- BGN (paper G) at per-device {small} minus BGN at {full}: {bgn_drop} points: "
        + _direction(bgn_drop, "BGN degrades.", "BGN improves."),
        f"- BGN (paper G) minus BN at per-device {small}: {bgn_vs_bn} points: "
        + _direction(bgn_vs_bn, "BGN is below BN.", "BGN is above BN."),
    ]
    for m in _methods(main):
        if m in ("bn", "bgn"):
            continue
        diff = interval(paired(series(main, m, small), bn_small))
        lines.append(
            f"- {m} minus BN at per-device {small}: {diff} points: "
            + _direction(diff, f"{m} is below BN.", f"{m} is above BN.")
        )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- figures
def describe(rows: Sequence[Row]) -> str:
    """``12 epochs (1,500 steps at global batch 16), 5 seeds``: the budget of ``rows``."""
    epochs = sorted({r["epochs"] for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    steps = "/".join(f"{e * (study.TRAIN_IMAGES // study.GLOBAL_BATCH):,}" for e in epochs)
    return (
        f"{'/'.join(map(str, epochs))} epochs ({steps} steps at global batch {study.GLOBAL_BATCH}), "
        f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''}"
    )


def _save(fig: Any, plt: Any, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _draw_order(methods: Iterable[str]) -> list[str]:
    """BN last, so that its dashed line stays visible over lines that coincide with it."""
    return sorted(methods, key=lambda m: m == "bn")


def _style(method: str) -> dict[str, Any]:
    if method == "bn":
        return {"color": "black", "linestyle": "--", "linewidth": 2.0, "zorder": 5}
    return {"color": COLORS.get(method), "linewidth": 1.3}


def plot_curves(curves: Sequence[Row], main: Sequence[Row], path: Path) -> str:
    """Validation accuracy per epoch, mean over seeds; one panel per per-device batch, shared y-axis."""
    plt = plotting.require_matplotlib()
    sizes = _per_device(main)
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.2 * len(sizes), 4.2), sharey=True, squeeze=False)
    for ax, b in zip(axes[0], sizes):
        for m in _draw_order(_methods(main)):
            b_m = b if study.has_batch_statistics(m) else study.GLOBAL_BATCH
            rows = select(curves, part="main", label=m, per_device=b_m)
            epochs = sorted({r["epoch"] for r in rows})
            if not epochs:
                continue
            means = [100 * statistics.fmean(r["val_acc1"] for r in rows if r["epoch"] == e) for e in epochs]
            ax.plot([e + 1 for e in epochs], means, label=m, **_style(m))
        ax.set_title(f"per-device batch {b}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation accuracy (%), mean over seeds")
        ax.tick_params(labelleft=True)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Training curves: {describe(main)}")
    return _save(fig, plt, path)


def _errorbar(ax: Any, xs: Sequence[float], intervals: Sequence[Interval], **style: Any) -> None:
    means = [i.mean for i in intervals]
    below = [0.0 if math.isnan(i.low) else i.mean - i.low for i in intervals]
    above = [0.0 if math.isnan(i.high) else i.high - i.mean for i in intervals]
    ax.errorbar(xs, means, yerr=[below, above], marker="o", markersize=4, capsize=3, **style)


def plot_accuracy_vs_per_device(main: Sequence[Row], path: Path) -> str:
    """(a) test accuracy vs per-device batch, 95% intervals; (b) minus the same method at 16, same seed."""
    plt = plotting.require_matplotlib()
    sizes = _per_device(main)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for m in _draw_order(_methods(main)):
        offset = 1.0 + 0.03 * (_methods(main).index(m) - 2)  # spread the error bars of one x apart
        xs = [b * offset for b in sizes]
        _errorbar(axes[0], xs, [interval(list(series(main, m, b).values())) for b in sizes], label=m, **_style(m))
        if study.has_batch_statistics(m):
            ref = series(main, m, study.GLOBAL_BATCH)
            diffs = [interval(paired(series(main, m, b), ref)) for b in sizes]
            _errorbar(axes[1], xs, diffs, label=m, **_style(m))
    axes[0].set_ylabel("test accuracy (%), mean and 95% t-interval")
    axes[1].set_ylabel("minus the same method at per-device 16 (points)")
    axes[1].axhline(0.0, color="gray", linewidth=0.8)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(b) for b in sizes])
        ax.set_xlabel(f"per-device batch (global batch {study.GLOBAL_BATCH})")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Test accuracy vs per-device batch: {describe(main)}")
    return _save(fig, plt, path)


def plot_groups(groups: Sequence[Row], main: Sequence[Row], path: Path) -> str:
    """BGN's test accuracy vs G at the smallest per-device batch, BN's interval as a band."""
    plt = plotting.require_matplotlib()
    b = min(_per_device(main))
    gs = [1, *sorted({r["groups"] for r in groups})]
    values = [series(main, "bgn", b), *(by_seed(select(groups, groups=g)) for g in gs[1:])]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    bn = interval(list(series(main, "bn", b).values()))
    ax.axhspan(bn.low, bn.high, color="black", alpha=0.12, label="BN, 95% interval")
    ax.axhline(bn.mean, color="black", linestyle="--", linewidth=1.5)
    _errorbar(ax, gs, [interval(list(v.values())) for v in values], color="tab:red", label="BGN")
    ax.set_xscale("log", base=2)
    ax.set_xticks(gs)
    ax.set_xticklabels([str(g) for g in gs])
    ax.set_xlabel(f"G (requested; fitted per layer), per-device batch {b}")
    ax.set_ylabel("test accuracy (%), mean and 95% t-interval")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"BGN's G at per-device {b}: {describe(groups)}", fontsize=10)
    return _save(fig, plt, path)


# ----------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> dict[str, str]:
    """Write the figures and tables; return ``{block name: markdown}`` for docs/reproduction.md."""
    parser = argparse.ArgumentParser(description="Tables and figures of the small-batch study")
    parser.add_argument("--study", default="runs/reproduction/study")
    parser.add_argument("--assets", default="docs/assets")
    args = parser.parse_args(argv)
    source, assets = Path(args.study), Path(args.assets)
    rows = study.read_csv(source / "results.csv")
    curves = study.read_csv(source / "curves.csv")
    parts = {p: select(rows, part=p) for p in study.PARTS}
    main_rows = parts["main"]
    assets.mkdir(parents=True, exist_ok=True)
    shutil.copy(source / "results.csv", assets / "study_results.csv")
    shutil.copy(source / "curves.csv", assets / "study_curves.csv")
    tables = {
        "study-setting": f"{describe(main_rows)}; test accuracy on the 2,000 test images in eval mode.\n",
        "study-accuracy": accuracy_table(main_rows),
        "study-degradation": degradation_table(main_rows),
        "study-versus-bn": versus_bn_table(main_rows),
        "study-answer": answer(main_rows),
    }
    plot_curves(curves, main_rows, assets / "study_curves.png")
    plot_accuracy_vs_per_device(main_rows, assets / "study_accuracy_vs_per_device.png")
    if parts["groups"]:
        tables["study-groups"] = groups_table(parts["groups"], main_rows)
        plot_groups(parts["groups"], main_rows, assets / "study_bgn_groups.png")
    if parts["lr"]:
        tables["study-lr"] = lr_table(parts["lr"], main_rows)
    if parts["ddp"]:
        tables["study-ddp"] = ddp_table(parts["ddp"], main_rows)
    if parts["long"]:
        tables["study-long"] = long_table(parts["long"], main_rows)
    cost = {p: round(sum(r["cpu_s"] for r in part) / 60, 1) for p, part in parts.items()}
    tables["study-cost"] = (
        f"{len(rows)} cells; CPU time (sum over cells, one torch thread per process): "
        + ", ".join(f"{p} {m} min" for p, m in cost.items())
        + f"; total {sum(cost.values()):.1f} min.\n"
    )
    (assets / "study_tables.md").write_text("\n".join(f"<!-- {k} -->\n{v}" for k, v in tables.items()))
    print("\n".join(tables.values()))
    return tables


if __name__ == "__main__":
    main()
