"""Tables and figures of the small-batch study (``examples/small_batch_study.py``).

Reads ``<study>/results.csv`` and writes, into ``--assets``:

- ``study_accuracy_vs_batch.png``: test accuracy vs per-process batch, one line per method with
  a band of mean ± sample std over seeds; batch-statistic methods and batch-free methods in
  separate panels, each also as the seed-paired difference to BN;
- ``study_bgn_groups.png``: BGN accuracy vs G at batch 2 and 64 (BGN paper, Table 1), and the
  same against the number of elements per normalization set ``N*D/G``, next to the paper's
  Table 1 on ResNet-50 at 224 px;
- ``study_inference_gap.png``: per batch-statistic method, accuracy vs batch under the four
  inference modes (running statistics, test batches of the training size, recalibrated,
  example weighing);
- ``study_results.csv`` (a copy of the per-cell rows) and ``study_tables.md`` (every table,
  also returned by :func:`main` for the generated blocks of ``docs/reproduction.md``).

Run: ``python examples/small_batch_study_report.py --study runs/reproduction/study --assets docs/assets``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import small_batch_study as study  # noqa: E402

from normlightning import plotting  # noqa: E402
from normlightning.norms.batch_group_norm import bgn_paper_groups  # noqa: E402

BATCH_STAT = ["bn", "ghost", "seqnorm", "bgn", "gbgn", "hn", "sn", "brn", "brn-scaled"]
BATCH_FREE = ["gn", "ln", "in", "pn"]
MODE_LABELS = {
    "acc_running": "running statistics (standard eval)",
    "acc_batch": "batch statistics of test batches of size B",
    "acc_recalibrated": "recalibrated (equal-weight average over the training set at B)",
    "acc_alpha": "example weighing, alpha chosen on validation",
}
#: BGN paper, Table 1: top-1 of ResNet-50 on ImageNet (224 px) per group count G.
PAPER_TABLE1 = {
    128: {
        512: 77.008,
        256: 75.936,
        128: 76.256,
        64: 76.096,
        32: 75.984,
        16: 75.504,
        8: 76.016,
        4: 75.632,
        2: 75.520,
        1: 75.360,
    },
    2: {
        512: 63.968,
        256: 66.000,
        128: 68.160,
        64: 70.064,
        32: 71.856,
        16: 72.832,
        8: 74.928,
        4: 75.120,
        2: 75.968,
        1: 76.096,
    },
}


# ----------------------------------------------------------------------------- statistics
def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample std (``nan`` for one value) and count."""
    n = len(values)
    return statistics.fmean(values), (statistics.stdev(values) if n > 1 else math.nan), n


def group_values(
    rows: Iterable[Mapping[str, Any]], key: Callable[[Mapping[str, Any]], Any], value: str, scale: float = 100.0
) -> dict[Any, list[float]]:
    """``{key(row): [row[value] * scale, ...]}`` over the rows that have ``value``."""
    out: dict[Any, list[float]] = {}
    for row in rows:
        if value in row:
            out.setdefault(key(row), []).append(float(row[value]) * scale)
    return out


def paired_difference(rows: Sequence[Mapping[str, Any]], reference: str = "bn", value: str = "acc_running") -> dict:
    """``{(method, B): [acc - acc_reference of the same seed, ...]}`` in points."""
    ref = {(r["batch_size"], r["seed"]): r[value] for r in rows if r["method"] == reference and value in r}
    out: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        if value in r and (r["batch_size"], r["seed"]) in ref:
            out.setdefault((r["method"], r["batch_size"]), []).append(
                100 * (r[value] - ref[(r["batch_size"], r["seed"])])
            )
    return out


def fmt(values: Sequence[float] | None, digits: int = 1) -> str:
    if not values:
        return "-"
    mean, std, n = mean_std(values)
    return f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}")


# ----------------------------------------------------------------------------- tables
def accuracy_table(grid: Sequence[Mapping[str, Any]], long: Sequence[Mapping[str, Any]]) -> str:
    """Method x batch: test accuracy (running statistics), the seed-paired difference to BN, the long
    batch-64 reference, and the training accuracy of the last epoch (training mode) at the smallest batch."""
    acc = group_values(grid, lambda r: (r["method"], r["batch_size"]), "acc_running")
    diff = paired_difference(grid)
    longs = group_values(long, lambda r: r["method"], "acc_running")
    batches = sorted({r["batch_size"] for r in grid})
    long_epochs = long[0]["epochs"] if long else None
    head = (
        "| method | "
        + " | ".join(f"B={b}" for b in batches)
        + " | "
        + " | ".join(f"Δ vs BN, B={b}" for b in (batches[0], batches[-1]))
    )
    head += f" | B=64, {long_epochs} epochs" if long else ""
    head += f" | training accuracy, last epoch, B={batches[0]} |"
    train = group_values(grid, lambda r: (r["method"], r["batch_size"]), "train_acc1")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for method in study.METHODS:
        if not any(k[0] == method for k in acc):
            continue
        cells = [fmt(acc.get((method, b))) for b in batches]
        cells += [fmt(diff.get((method, b))) if method != "bn" else "0" for b in (batches[0], batches[-1])]
        if long:
            cells.append(fmt(longs.get(method)))
        cells.append(fmt(train.get((method, batches[0]))))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def gap_table(grid: Sequence[Mapping[str, Any]]) -> str:
    """Batch-statistic methods x batch: accuracy under each inference mode (mean ± std over seeds)."""
    lines = [
        "| method | B | running stats | test batches of B | recalibrated | example weighing (α) |",
        "|---|---|---|---|---|---|",
    ]
    for method in BATCH_STAT:
        for b in sorted({r["batch_size"] for r in grid}):
            rows = [r for r in grid if r["method"] == method and r["batch_size"] == b]
            if not rows:
                continue
            cells = [fmt([100 * r[m] for r in rows if m in r]) for m in study.MEASURES]
            alphas = sorted({r["alpha"] for r in rows if "alpha" in r})
            if alphas:
                cells[-1] += " (" + ", ".join(f"{a:g}" for a in alphas) + ")"
            lines.append(f"| {method} | {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def groups_table(groups: Sequence[Mapping[str, Any]], elements: Callable[[Mapping[str, Any]], float]) -> str:
    """G sweep: accuracy per (model, batch) column and G row, with the per-layer G and elements per set."""
    columns = sorted({(r["base_width"], r["batch_size"]) for r in groups}, key=lambda c: (c[0], c[1]))
    acc = group_values(groups, lambda r: (r["base_width"], r["batch_size"], r["groups"]), "acc_running")
    gap = group_values(groups, lambda r: (r["base_width"], r["batch_size"], r["groups"]), "acc_batch")
    head = (
        "| G | "
        + " | ".join(f"width {w}, B={b}: acc (batch-stat acc) [G per layer; elements per set]" for w, b in columns)
        + " |"
    )
    lines = [head, "|---" * (len(columns) + 1) + "|"]
    for g in sorted({r["groups"] for r in groups}):
        cells = []
        for w, b in columns:
            row = next((r for r in groups if (r["base_width"], r["batch_size"], r["groups"]) == (w, b, g)), None)
            if row is None:
                cells.append("-")
                continue
            fitted = sorted(set(json.loads(row["layer_groups"]).values()))
            cells.append(
                f"{fmt(acc.get((w, b, g)))} ({fmt(gap.get((w, b, g)))}) "
                f"[{'/'.join(map(str, fitted))}; {elements(row):,.0f}]"
            )
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- elements per set
def layer_sizes(depth: int, base_width: int) -> dict[str, int]:
    """``{layer name: D = C*H*W}`` of the study's backbone on 1x28x28 inputs (names as injected)."""
    import torch

    from normlightning.injection.plan import probe_input_shapes
    from normlightning.models import build_backbone

    model = build_backbone("cifar_resnet", 10, (1, 28, 28), depth=depth, base_width=base_width)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    shapes = probe_input_shapes(model, torch.zeros(2, 1, 28, 28), names)
    return {f"backbone.{n}": math.prod(s[1:]) for n, s in shapes.items()}


def resnet50_layer_sizes() -> list[int]:
    """``D = C*H*W`` at every BN layer of torchvision's ResNet-50 on a 224x224 input (the paper's model)."""
    import torch
    import torchvision

    from normlightning.injection.plan import probe_input_shapes

    model = torchvision.models.resnet50()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    return [math.prod(s[1:]) for s in probe_input_shapes(model, torch.zeros(1, 3, 224, 224), names).values()]


def geometric_mean(values: Iterable[float]) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def elements_per_set(row: Mapping[str, Any], sizes: Mapping[str, int]) -> float:
    """Geometric mean over the layers of ``N * D / G`` (examples times elements per group)."""
    groups = json.loads(row["layer_groups"])
    return geometric_mean(row["batch_size"] * sizes[name] / g for name, g in groups.items())


# ----------------------------------------------------------------------------- figures
COLORS = {
    "bn": "black",
    "ghost": "tab:blue",
    "seqnorm": "tab:orange",
    "bgn": "tab:red",
    "gbgn": "tab:purple",
    "hn": "tab:green",
    "sn": "tab:brown",
    "brn": "tab:pink",
    "brn-scaled": "deeppink",
    "gn": "tab:olive",
    "ln": "tab:cyan",
    "in": "tab:gray",
    "pn": "gold",
}


def draw_bands(
    ax: Any,
    series: Mapping[str, Mapping[float, Sequence[float]]],
    colors: Mapping[str, str] | None = None,
    styles: Mapping[str, str] | None = None,
) -> None:
    """One line per label through the means, and a band of mean ± sample std over the values at each x."""
    for label, by_x in series.items():
        xs = sorted(by_x)
        stats = [mean_std(by_x[x]) for x in xs]
        means = [s[0] for s in stats]
        stds = [0.0 if math.isnan(s[1]) else s[1] for s in stats]
        color = (colors or {}).get(label)
        (line,) = ax.plot(
            xs, means, (styles or {}).get(label, "-o"), color=color, label=label, markersize=4, linewidth=1.4
        )
        ax.fill_between(
            xs,
            [m - s for m, s in zip(means, stds)],
            [m + s for m, s in zip(means, stds)],
            color=line.get_color(),
            alpha=0.15,
            linewidth=0,
        )


def _log2_axis(ax: Any, ticks: Sequence[int], label: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(ticks))
    ax.set_xticklabels([str(t) for t in ticks])
    ax.set_xlabel(label)
    ax.grid(True, alpha=0.3)


def _save(fig: Any, plt: Any, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plot_accuracy_vs_batch(grid: Sequence[Mapping[str, Any]], path: Path, title: str) -> str:
    """2x2: absolute accuracy and the seed-paired difference to BN, batch-statistic | batch-free methods."""
    plt = plotting.require_matplotlib()
    acc = group_values(grid, lambda r: (r["method"], r["batch_size"]), "acc_running")
    diff = paired_difference(grid)
    batches = sorted({r["batch_size"] for r in grid})
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), sharex=True)
    panels = ((BATCH_STAT, "batch-statistic methods"), (["bn", *BATCH_FREE], "batch-free methods (BN for reference)"))
    for col, (methods, name) in enumerate(panels):
        present = [m for m in methods if any(k[0] == m for k in acc)]
        draw_bands(axes[0][col], {m: {b: acc[(m, b)] for b in batches if (m, b) in acc} for m in present}, COLORS)
        draw_bands(axes[1][col], {m: {b: diff[(m, b)] for b in batches if (m, b) in diff} for m in present}, COLORS)
        axes[0][col].set_title(name)
        axes[0][col].set_ylabel("test top-1 accuracy (%)")
        axes[1][col].set_ylabel("accuracy minus BN's, same seed (points)")
        axes[1][col].axhline(0.0, color="black", linewidth=0.8)
        for row in (0, 1):
            _log2_axis(axes[row][col], batches, "per-process batch size B")
            axes[row][col].legend(fontsize=8, ncol=2, title="line: mean; band: ± std over seeds", title_fontsize=8)
    fig.suptitle(title)
    return _save(fig, plt, path)


def plot_groups(
    groups: Sequence[Mapping[str, Any]],
    grid: Sequence[Mapping[str, Any]],
    elements: Callable,
    paper_elements: Callable[[int, int], float],
    path: Path,
    title: str,
) -> str:
    """(a) accuracy vs G per (width, B), BN of the grid as dashed lines; (b) difference to the best G
    of each curve vs elements per set, with the paper's Table 1 (ResNet-50, 224 px)."""
    plt = plotting.require_matplotlib()
    fig, axes = plt.subplots(1, 2, figsize=(14, 7.5))
    curves = sorted({(r["base_width"], r["batch_size"]) for r in groups})
    colors = dict(zip(curves, ("tab:red", "tab:blue", "tab:green", "tab:purple")))
    acc = {
        c: group_values(
            [r for r in groups if (r["base_width"], r["batch_size"]) == c], lambda r: r["groups"], "acc_running"
        )
        for c in curves
    }
    labels = {c: f"BGN, ResNet-8 width {c[0]}, B={c[1]}" for c in curves}
    draw_bands(axes[0], {labels[c]: acc[c] for c in curves}, {labels[c]: colors[c] for c in curves})
    for c in curves:
        train_mode = group_values(
            [r for r in groups if (r["base_width"], r["batch_size"]) == c], lambda r: r["groups"], "acc_batch"
        )
        xs = sorted(train_mode)
        axes[0].plot(
            xs,
            [mean_std(train_mode[x])[0] for x in xs],
            ":",
            color=colors[c],
            linewidth=1.2,
            label=f"same, test batches of B={c[1]} with batch statistics",
        )
        paper = bgn_paper_groups(c[1])
        if paper in acc[c]:
            axes[0].plot(
                [paper],
                [mean_std(acc[c][paper])[0]],
                "*",
                color=colors[c],
                markersize=14,
                markeredgecolor="black",
                label=f"paper's mapping at B={c[1]}: G={paper} (width {c[0]})",
            )
    for k, channels in enumerate(sorted({w * 2**i for w, _ in curves for i in range(3)})):
        axes[0].axvline(channels, color="gray", linestyle="-.", linewidth=0.7)
        axes[0].text(
            channels,
            0.03 + 0.05 * (k % 2),
            f" C={channels}",
            transform=axes[0].get_xaxis_transform(),
            fontsize=7,
            color="gray",
        )
    bn = group_values([r for r in grid if r["method"] == "bn"], lambda r: r["batch_size"], "acc_running")
    for c in curves:
        if c[0] == study.MODEL["base_width"] and c[1] in bn:
            axes[0].axhline(
                mean_std(bn[c[1]])[0],
                color=colors[c],
                linestyle="--",
                linewidth=1,
                label=f"BN, width {c[0]}, B={c[1]} (grid)",
            )
    all_g = sorted({g for c in curves for g in acc[c]})
    _log2_axis(axes[0], all_g, "BGN group count G requested (fitted per layer)")
    axes[0].set_ylabel("test top-1 accuracy (%)")
    axes[0].set_title(
        "(a) accuracy vs G; line: mean, band: ± std over seeds;\n"
        "dash-dot: channel counts C of the layers (G < C: groups of several channels)",
        fontsize=10,
    )
    axes[0].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    for c in curves:
        by_g = acc[c]
        best = max(mean_std(v)[0] for v in by_g.values())
        rows = {r["groups"]: r for r in groups if (r["base_width"], r["batch_size"]) == c}
        points = sorted((elements(rows[g]), mean_std(v)[0] - best) for g, v in by_g.items())
        axes[1].plot(
            [p[0] for p in points], [p[1] for p in points], "-o", color=colors[c], label=labels[c], markersize=4
        )
    for batch, table in PAPER_TABLE1.items():
        best = max(table.values())
        points = sorted((paper_elements(batch, g), acc - best) for g, acc in table.items())
        axes[1].plot(
            [p[0] for p in points],
            [p[1] for p in points],
            "--s",
            color="gray" if batch == 2 else "black",
            markersize=4,
            label=f"paper Table 1: ResNet-50, 224 px, B={batch}",
        )
    axes[1].set_xscale("log")
    axes[1].set_xlabel("elements per normalization set N·D/G (geometric mean over layers)")
    axes[1].set_ylabel("accuracy minus the best G of the same curve (points)")
    axes[1].set_title("(b) the same vs the size of the normalization sets")
    axes[1].grid(True, alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    fig.suptitle(title)
    return _save(fig, plt, path)


def plot_inference_gap(grid: Sequence[Mapping[str, Any]], path: Path, title: str) -> str:
    """One panel per batch-statistic method: accuracy vs B under each inference mode."""
    plt = plotting.require_matplotlib()
    methods = [m for m in BATCH_STAT if any(r["method"] == m for r in grid)]
    batches = sorted({r["batch_size"] for r in grid})
    fig, axes = plt.subplots(3, 3, figsize=(13, 11), sharex=True, sharey=True, squeeze=False)
    mode_colors = dict(zip(study.MEASURES, ("black", "tab:red", "tab:blue", "tab:green")))
    for ax, method in zip(axes.flat, methods):
        rows = [r for r in grid if r["method"] == method]
        series = {MODE_LABELS[m]: group_values(rows, lambda r: r["batch_size"], m) for m in study.MEASURES}
        draw_bands(ax, {k: v for k, v in series.items() if v}, {MODE_LABELS[m]: c for m, c in mode_colors.items()})
        ax.set_title(method)
        _log2_axis(ax, batches, "per-process batch size B")
    for ax in axes[:, 0]:
        ax.set_ylabel("test top-1 accuracy (%)")
    for ax in list(axes.flat)[len(methods) :]:
        ax.axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=9, title="line: mean; band: ± std over seeds")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# ----------------------------------------------------------------------------- main
def describe(rows: Sequence[Mapping[str, Any]]) -> str:
    seeds = sorted({r["seed"] for r in rows})
    epochs = sorted({r["epochs"] for r in rows})
    widths = " and ".join(str(w) for w in sorted({r["base_width"] for r in rows}))
    return (
        f"MNIST-5k (2,000 training images), ResNet-8 (width {widths}), {'/'.join(map(str, epochs))} epochs per cell, "
        f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''}"
    )


def main(argv: Sequence[str] | None = None) -> dict[str, str]:
    """Write the figures and tables; return the tables ``{block name: markdown}`` of docs/reproduction.md."""
    parser = argparse.ArgumentParser(description="Tables and figures of the small-batch study")
    parser.add_argument("--study", default="runs/reproduction/study")
    parser.add_argument("--assets", default="docs/assets")
    args = parser.parse_args(argv)
    rows = study.read_results(Path(args.study) / "results.csv")
    parts = {p: [r for r in rows if r["part"] == p] for p in study.PARTS}
    assets = Path(args.assets)
    assets.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(args.study) / "results.csv", assets / "study_results.csv")
    sizes = {w: layer_sizes(study.MODEL["depth"], w) for w in {r["base_width"] for r in rows}}
    r50 = resnet50_layer_sizes()

    def elements(row: Mapping[str, Any]) -> float:
        return elements_per_set(row, sizes[row["base_width"]])

    def paper_elements(batch: int, g: int) -> float:
        return geometric_mean(batch * d / g for d in r50)

    groups = parts["groups"] + parts["groups_wide"]
    tables = {
        "study-accuracy": f"Test accuracy in % ({describe(parts['grid'])}), mean ± sample std over seeds\n\n"
        + accuracy_table(parts["grid"], parts["long"]),
        "study-gap": gap_table(parts["grid"]),
    }
    files = {"results": str(assets / "study_results.csv")}
    if parts["grid"]:
        files["accuracy"] = plot_accuracy_vs_batch(
            parts["grid"], assets / "study_accuracy_vs_batch.png", f"Test accuracy vs batch: {describe(parts['grid'])}"
        )
        files["gap"] = plot_inference_gap(
            parts["grid"],
            assets / "study_inference_gap.png",
            f"Train/inference gap of batch-statistic methods: {describe(parts['grid'])}",
        )
    if groups:
        tables["study-groups"] = groups_table(groups, elements)
        files["groups"] = plot_groups(
            groups,
            parts["grid"],
            elements,
            paper_elements,
            assets / "study_bgn_groups.png",
            f"BGN group count G: {describe(groups)}",
        )
    cost = {p: round(sum(r["cpu_s"] for r in part) / 60, 1) for p, part in parts.items()}
    tables["study-cost"] = (
        f"{len(rows)} cells; CPU time (sum over cells, one torch thread each): "
        + ", ".join(f"{p} {m} min" for p, m in cost.items())
        + f"; total {sum(cost.values()):.1f} min.\n"
    )
    (assets / "study_tables.md").write_text("\n".join(f"<!-- {k} -->\n{v}" for k, v in tables.items()))
    files["tables"] = str(assets / "study_tables.md")
    print("\n".join(tables.values()))
    return tables


if __name__ == "__main__":
    main()
