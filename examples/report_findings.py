"""The findings of sections 2 and 3 of docs/reproduction.md, as markdown bullets computed from the runs' files,
so that the numbers in the prose cannot drift from the CSVs.

* :func:`sweep_findings` reads a Digits batch-size sweep's folder (``results.csv``: one row per cell,
  ``summary.json``: its epochs per batch size) and states, per claim of the papers, the numbers that test it.
* :func:`stats_findings` reads the HN §4.6 statistics study's ``hn_fluctuation.csv`` (the fluctuation, i.e. the
  std over the last steps, of each BN layer's input statistics per batch size).

Rounding, the one rule of both: every number is computed from the unrounded values of the files (float64) and
rounded once, when printed, by Python's string formatting (the nearest decimal of the exact value, exact ties to
even): accuracies, their differences and their stds to 0.1 points, fluctuations to 4 decimals (as in the page's
table), ratios to 0.1. A range ``a-b`` is the rounded minimum and maximum of its values.

The verdict words follow from one comparison of means each, written out in the bullet next to the verdict.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from statistics_study import layer_label

from normlightning.sweep.report import aggregate

__all__ = ["stats_findings", "sweep_findings"]

#: The methods of the sweep as the papers name them.
LABELS = {
    "bn": "BN",
    "gn": "GN",
    "ln": "LN",
    "in": "IN",
    "pn": "PN",
    "ghost": "Ghost",
    "seqnorm": "SeqNorm",
    "bgn": "BGN",
    "gbgn": "GBGN",
    "hn": "HN",
}
#: Methods that normalize each example on its own (no batch statistics).
PER_EXAMPLE = ("gn", "ln", "in", "pn")
#: Hybrids that keep BN's batch mean.
BATCH_MEAN_HYBRIDS = ("ghost", "hn", "seqnorm")
METRIC = "test/acc1"
Value = Callable[[float], str]


def points(value: float) -> str:
    """An accuracy (or difference, std) in points, to 0.1."""
    return f"{value:.1f}"


def fluctuation(value: float) -> str:
    """A fluctuation, to 4 decimals."""
    return f"{value:.4f}"


def ratio(value: float) -> str:
    """A ratio, to 0.1, with its ``x``."""
    return f"{value:.1f}x"


def span(values: Iterable[float], fmt: Value = points) -> str:
    """``"a-b"``: the rounded minimum and maximum of ``values``; one number when they print alike."""
    values = list(values)
    low, high = fmt(min(values)), fmt(max(values))
    if low == high:
        return low
    if fmt is ratio:  # one "x" for the range
        return f"{low[:-1]}-{high}"
    return f"{low}-{high}"


def listing(items: Sequence[str]) -> str:
    """``"a"``, ``"a and b"``, ``"a, b and c"``."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# ---------------------------------------------------------------- section 2: the Digits sweep
def read_sweep(sweep_dir: Path) -> tuple[dict, dict, dict, dict]:
    """``(stats, seeds, lr, epochs)`` of a sweep folder, accuracies in %:

    * ``stats[method][batch] = (mean, sample std, n)`` over seeds (:func:`normlightning.sweep.report.aggregate`);
    * ``seeds[method][batch] = {seed: accuracy}``; ``lr[batch]``: the lr of the cells at that batch;
    * ``epochs[batch]``: from ``summary.json``.
    """
    with open(sweep_dir / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    stats = {
        method: {batch: (100 * mean, 100 * std, n) for batch, (mean, std, n) in by_batch.items()}
        for method, by_batch in aggregate(rows, METRIC).items()
    }
    seeds: dict = {}
    lr: dict = {}
    for row in rows:
        batch = int(row["batch_size"])
        seeds.setdefault(row["method"], {}).setdefault(batch, {})[int(row["seed"])] = 100 * float(row[METRIC])
        lr.setdefault(batch, set()).add(float(row["lr"]))
    summary = json.loads((sweep_dir / "summary.json").read_text())
    epochs = {int(batch): count for batch, count in summary["epochs"].items()}
    return stats, seeds, {batch: values.pop() for batch, values in lr.items() if len(values) == 1}, epochs


def _batches_text(batches: Sequence[int]) -> str:
    return "B = " + listing([str(b) for b in batches])


def sweep_findings(sweep_dir: Path) -> str:
    """The bullets of section 2 ("What held and what did not") from a sweep folder, as markdown.

    ``B_lo``/``B_hi`` are the sweep's smallest and largest batch; a method's loss is its mean at ``B_hi`` minus
    its mean at ``B_lo``. Verdict rules: BN "degrades at very small batches" when its mean at ``B_lo`` is below
    a per-example method's; a method "is stable" when it loses no more than BN; a method is "at least as good
    as BN" at a batch when its mean there is >= BN's.
    """
    stats, seeds, lr, epochs = read_sweep(Path(sweep_dir))
    batches = sorted({b for by_batch in stats.values() for b in by_batch})
    missing = [m for m in LABELS if set(stats.get(m, {})) != set(batches)]
    if missing or len(batches) < 2:
        raise ValueError(
            f"{Path(sweep_dir) / 'results.csv'}: the findings compare the methods {', '.join(LABELS)} at >= 2 batch "
            f"sizes; missing at some of the batch sizes {batches}: {', '.join(missing) or '-'}. Run the whole grid "
            "(batch_size_sweep.py's defaults) first."
        )
    lo, hi = batches[0], batches[-1]

    def mean(method: str, batch: int) -> float:
        return stats[method][batch][0]

    def std(method: str, batch: int) -> float:
        return stats[method][batch][1]

    def with_std(method: str, batch: int) -> str:
        return f"{points(mean(method, batch))} ± {points(std(method, batch))}"

    def loss(method: str) -> float:
        return mean(method, hi) - mean(method, lo)

    def row(method: str) -> str:
        return " / ".join(points(mean(method, b)) for b in batches)

    def at_least_bn(method: str) -> tuple[list[int], list[int]]:
        good = [b for b in batches if mean(method, b) >= mean("bn", b)]
        return good, [b for b in batches if b not in good]

    per_example = [m for m in PER_EXAMPLE if m in stats]
    hybrids = [m for m in BATCH_MEAN_HYBRIDS if m in stats]
    names = {m: LABELS.get(m, m) for m in stats}
    bullets = []

    # 1. BN at the smallest batch, against the per-example methods
    degrades = any(mean("bn", lo) < mean(m, lo) for m in per_example)
    best = sorted(stats, key=lambda m: -mean(m, lo))[:4]
    below_all = all(loss(m) > 0 for m in stats)
    bullets.append(
        f'**"BN degrades at very small batches" (BGN Fig. 1, HN, GN), i.e. falls below the batch-independent '
        f"methods there: {'holds' if degrades else 'not seen'}.** At B = {lo}, BN reaches {with_std('bn', lo)} %, "
        + listing([points(mean("bn", b) - mean("bn", lo)) for b in batches[1:]])
        + f" points below its {_batches_text(batches[1:])} mean{'s' if len(batches) > 2 else ''} ("
        + listing([points(mean("bn", b)) for b in batches[1:]])
        + f" %); the per-example methods ({listing([names[m] for m in per_example])}) reach "
        f"{span(mean(m, lo) for m in per_example)} %. The best four means at B = {lo}: "
        + ", ".join(f"{names[m]} {with_std(m, lo)}" for m in best)
        + f". {'Every' if below_all else 'Not every'} method is below its B = {hi} mean at B = {lo}; from "
        f"B = {hi} to B = {lo} BN loses {points(loss('bn'))} points, {listing([names[m] for m in hybrids])} "
        f"{span(loss(m) for m in hybrids)}, "
        + ", ".join(f"{names[m]} {points(loss(m))}" for m in ("gbgn", "bgn") if m in stats)
        + f" and the per-example methods {span(loss(m) for m in per_example)}."
    )

    # 2. the per-example methods' stability
    stable = [m for m in per_example if loss(m) <= loss("bn")]
    unstable = [m for m in per_example if m not in stable]
    if not stable:
        verdict = f"not seen: each loses more than BN from B = {hi} to B = {lo}"
    elif not unstable:
        verdict = f"holds: none loses more than BN from B = {hi} to B = {lo}"
    else:
        verdict = (
            f"holds for {listing([names[m] for m in stable])}, not for {listing([names[m] for m in unstable])}, "
            f"which lose more than BN from B = {hi} to B = {lo}"
        )
    lr_text = f"the linear-scaling lr ({lr[lo]:g} at B = {lo}) and " if lo in lr else ""
    bullets.append(
        f'**"GN (and LN, IN, PN) is stable across batch sizes", i.e. loses no more than BN as the batch shrinks: '
        f"{verdict}.** With {lr_text}{epochs[lo]} epochs at B = {lo}, they lose "
        f"{span(loss(m) for m in per_example)} points ("
        + ", ".join(f"{names[m]} {with_std(m, lo)}" for m in per_example)
        + f" % at B = {lo}), BN {points(loss('bn'))}. At B = {hi} they reach "
        + ", ".join(f"{names[m]} {points(mean(m, hi))}" for m in per_example)
        + f" % against BN's {points(mean('bn', hi))} %. This budget does not tell whether they would catch up "
        "with more epochs."
    )

    # 3. BGN against BN
    if "bgn" in stats:
        good, bad = at_least_bn("bgn")
        parts = []
        if good:
            parts.append(
                f"holds at {_batches_text(good)} ("
                + ", ".join(f"{points(mean('bgn', b))} vs {points(mean('bn', b))}" for b in good)
                + ")"
            )
        for b in bad:
            paired = [s for s in seeds["bgn"][b] if s in seeds["bn"][b]]
            lower = sum(seeds["bgn"][b][s] < seeds["bn"][b][s] for s in paired)
            parts.append(
                f"not at B = {b} ({with_std('bgn', b)} vs {with_std('bn', b)}, lower in {lower} of {len(paired)} seeds)"
            )
        bullets.append(
            '**"BGN is at least as good as BN at every batch size", i.e. its mean is >= BN\'s: '
            + "; ".join(parts)
            + ".**"
        )

    # 4. the hybrids and GBGN, against BN
    lines = [f"BN {row('bn')}"]
    for method in [*hybrids, "gbgn"]:
        if method not in stats:
            continue
        good, bad = at_least_bn(method)
        text = f"{names[method]} {row(method)}"
        if good:
            text += f", >= BN at {_batches_text(good)}"
        if bad:
            text += f", below BN at {_batches_text(bad)}"
        lines.append(text)
    spreads = ", ".join(
        f"{names[m]} ± {points(std(m, lo))}" for m in ["bn", *hybrids, "gbgn"] if m in stats and m != "ghost"
    )
    identical = []
    if "ghost" in stats:
        for b in batches:
            same = sum(seeds["ghost"][b].get(s) == value for s, value in seeds["bn"][b].items())
            identical.append(f"{same} of {len(seeds['bn'][b])} seeds at B = {b}")
    gbgn_text = ""
    if "gbgn" in stats and "gn" in stats:
        low_ref, high_ref = sorted(("bn", "gn"), key=lambda m: mean(m, lo))
        where = (
            "between BN and GN"
            if mean(low_ref, lo) <= mean("gbgn", lo) <= mean(high_ref, lo)
            else ("above both BN and GN" if mean("gbgn", lo) > mean(high_ref, lo) else "below both BN and GN")
        )
        gbgn_text = (
            f" At B = {lo}, GBGN ({with_std('gbgn', lo)}) is {where} "
            f"(GN {with_std('gn', lo)}, BN {with_std('bn', lo)})."
        )
    bullets.append(
        f"**The hybrids against BN** (means in % at {_batches_text(batches)}): "
        + "; ".join(lines)
        + f". Seed std at B = {lo}: {spreads}."
        + (f" Ghost's accuracy equals BN's in {listing(identical)}." if identical else "")
        + gbgn_text
    )

    # 5. the largest batch
    top = max(stats, key=lambda m: mean(m, hi))
    close = [m for m in stats if mean(top, hi) - mean(m, hi) <= std("bn", hi)]
    bullets.append(
        f"**At B = {hi}** the {len(stats)} methods' means span {span(mean(m, hi) for m in stats)} %; "
        f"{len(close)} of them ({listing([names[m] for m in close])}) lie within BN's seed std "
        f"(± {points(std('bn', hi))}) of the best mean ({names[top]}, {points(mean(top, hi))} %)."
    )

    # 6. the seed spread
    others = [m for m in stats if m not in per_example]
    more = min(std(m, lo) for m in per_example) > max(std(m, lo) for m in others)
    bullets.append(
        f"**Spread:** at B = {lo} the per-example methods' seed std is ± {span(std(m, lo) for m in per_example)}, "
        f"the other methods' ± {span(std(m, lo) for m in others)}"
        + (" (every per-example method spreads more than every other method)" if more else "")
        + f"; at {_batches_text(batches[1:])} every method's is at most ± "
        f"{points(max(std(m, b) for m in stats for b in batches[1:]))}."
    )

    # in short
    robust = ["bn", *hybrids]
    fragile = [*per_example, *(["bgn"] if "bgn" in stats else [])]
    separated = max(loss(m) for m in robust) < min(loss(m) for m in fragile)
    summary = (
        f"In short, on Digits 8x8 with the 4-layer CNN and these epochs: BN "
        f"{'falls' if degrades else 'does not fall'} below the per-example methods at B = {lo}. "
        f"From B = {hi} to B = {lo}, BN and the hybrids that keep its batch mean "
        f"({listing([names[m] for m in hybrids])}) lose {span(loss(m) for m in robust)} points, the "
        f"per-example methods and BGN {span(loss(m) for m in fragile)}"
        + (": each of the first loses less than each of the second." if separated else ".")
    )
    return "\n".join(f"- {b}" for b in bullets) + "\n\n" + summary + "\n"


# ---------------------------------------------------------------- section 3: the statistics study
STATISTICS = {"bn_mean": "BN_mean", "bn_std": "BN_std", "en_mean": "EN_mean", "en_std": "EN_std"}


def read_fluctuation(path: Path) -> dict[int, dict[str, dict[str, float]]]:
    """``{batch: {layer label: {statistic: fluctuation}}}`` of ``hn_fluctuation.csv``, layers in the file's order."""
    out: dict[int, dict[str, dict[str, float]]] = {}
    with open(path, newline="") as handle:
        for r in csv.DictReader(handle):
            out.setdefault(int(r["batch_size"]), {})[layer_label(r["layer"])] = {
                key: float(r[f"{key}_fluct"]) for key in STATISTICS
            }
    return out


def layers_text(labels: Sequence[str]) -> str:
    """``["layer 2", "layer 3", "layer 4"]`` -> ``"layers 2-4"``; ``["layer 1", "layer 3"]`` -> ``"layers 1 and 3"``."""
    numbers = [re.fullmatch(r"layer (\d+)", label) for label in labels]
    if not all(numbers):
        return listing(list(labels))
    ints = [int(m.group(1)) for m in numbers]
    if len(ints) == 1:
        return f"layer {ints[0]}"
    if ints == list(range(ints[0], ints[-1] + 1)):
        return f"layers {ints[0]}-{ints[-1]}"
    return "layers " + listing([str(i) for i in ints])


def stats_findings(path: Path) -> str:
    """The bullets of section 3 ("What held") from ``hn_fluctuation.csv``, as markdown.

    ``small``/``large`` are the smallest and largest batch; a factor is a fluctuation at ``small`` over the same
    at ``large``. Verdict rules: "the noise is mainly in the std" holds in a layer when BN_std's factor exceeds
    BN_mean's; "EN_std fluctuates less than BN_std" holds at a batch when it does in every layer; "the first
    layer fluctuates most" holds for a statistic and batch when layer 1's fluctuation is the largest.
    """
    fluct = read_fluctuation(Path(path))
    if len(fluct) != 2 or len({tuple(layers) for layers in fluct.values()}) != 1:
        raise ValueError(
            f"{path}: the findings compare two batch sizes over the same layers; found batch sizes {sorted(fluct)} "
            "with layers " + "; ".join(f"{b}: {', '.join(layers)}" for b, layers in fluct.items())
        )
    small, large = min(fluct), max(fluct)
    layers = list(fluct[small])

    def factor(layer: str, key: str) -> float:
        return fluct[small][layer][key] / fluct[large][layer][key]

    def values(batch: int, key: str, chosen: Sequence[str]) -> str:
        return span((fluct[batch][layer][key] for layer in chosen), fluctuation)

    bullets = []
    # 1. the std, not the mean
    held = [layer for layer in layers if factor(layer, "bn_std") > factor(layer, "bn_mean")]
    failed = [layer for layer in layers if layer not in held]
    verdict = "holds in every layer" if not failed else ("not seen" if not held else f"holds in {layers_text(held)}")
    if held and failed:
        verdict += f", not in {layers_text(failed)}"
    text = (
        f'**"The small-batch noise is mainly in the std, not the mean", i.e. from batch {large} to {small} '
        f"BN_std's fluctuation grows by a larger factor than BN_mean's: {verdict}.**"
    )
    if held:
        text += (
            f" In {layers_text(held)}, at batch {small} BN_std fluctuates by {values(small, 'bn_std', held)}, "
            f"{span((factor(layer, 'bn_std') for layer in held), ratio)} its batch-{large} value "
            f"({values(large, 'bn_std', held)}), BN_mean by {values(small, 'bn_mean', held)}, "
            f"{span((factor(layer, 'bn_mean') for layer in held), ratio)} its batch-{large} value "
            f"({values(large, 'bn_mean', held)}); at batch {small}, BN_std fluctuates "
            + span((fluct[small][layer]["bn_std"] / fluct[small][layer]["bn_mean"] for layer in held), ratio)
            + " more than BN_mean."
        )
    if failed:
        text += (
            f" In {layers_text(failed)} the factors are "
            f"{span((factor(layer, 'bn_std') for layer in failed), ratio)} for BN_std and "
            f"{span((factor(layer, 'bn_mean') for layer in failed), ratio)} for BN_mean."
        )
    bullets.append(text)

    # 2. EN_std against BN_std
    parts = []
    for batch in (small, large):
        ratios = [fluct[batch][layer]["bn_std"] / fluct[batch][layer]["en_std"] for layer in layers]
        word = "holds" if min(ratios) > 1 else "not in every layer"
        parts.append(f"{word} at batch {batch} (BN_std / EN_std: {span(ratios, ratio)} per layer)")
    bullets.append(
        '**"EN_std fluctuates much less than BN_std" (why HN takes its std from EN), tested as: less in every layer: '
        + "; ".join(parts)
        + f".** At batch {small}: EN_std {values(small, 'en_std', layers)}, BN_std {values(small, 'bn_std', layers)}."
    )

    # 3. the first layer
    first = layers[0]
    pairs = [(batch, key) for batch in (small, large) for key in STATISTICS]
    most = [(b, k) for b, k in pairs if fluct[b][first][k] >= max(fluct[b][layer][k] for layer in layers)]
    if len(most) == len(pairs):
        verdict = f"holds, for all {len(STATISTICS)} statistics at both batch sizes"
    else:
        misses = [f"{STATISTICS[k]} at batch {b}" for b, k in pairs if (b, k) not in most]
        verdict = f"holds for {len(most)} of the {len(pairs)} statistics and batch sizes, not for {listing(misses)}"
    bullets.append(f'**"The first layer fluctuates most": {verdict}.**')

    # 4. EN_std across batch sizes
    higher = [layer for layer in layers if fluct[large][layer]["en_std"] > fluct[small][layer]["en_std"]]
    if higher:
        bullets.append(
            f"EN_std fluctuates more at batch {large} than at batch {small} in {layers_text(higher)} "
            f"({values(large, 'en_std', higher)} against {values(small, 'en_std', higher)})."
        )
    return "\n".join(f"- {b}" for b in bullets) + "\n"
