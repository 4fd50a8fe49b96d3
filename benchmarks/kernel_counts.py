"""ATen compute ops dispatched per normalization layer (issue 23): the GPU launch cost, measured on CPU.

For native ``nn.BatchNorm2d`` (first row) and every registered method in the configurations of
``benchmarks/norm_layers.py`` (``method_configs``; a required group count that it does not set
takes the method's first ``auto`` rule, or else the largest divisor of its total at most 32): the
ops of a training forward, of its backward (``fwd+bwd`` = both) and of an eval forward, views
excluded (:func:`normlightning.norms.op_count.count_layer_ops`), and the Python function calls of the same
training forward + backward and eval forward (the host work that no op count shows: on CPU at small batches it,
not the arithmetic, sets a layer's time). Deterministic: no timing.

Usage::

    python benchmarks/kernel_counts.py                      # (16, 64, 28, 28) and (8, 256, 14, 14)
    python benchmarks/kernel_counts.py --methods sn --ops   # and which ops
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from norm_layers import method_configs  # noqa: E402

from normlightning.norms import available_norms, build_norm, norm_group_args  # noqa: E402
from normlightning.norms.group_args import AutoContext, largest_divisor_at_most  # noqa: E402
from normlightning.norms.op_count import count_layer_ops, layer_op_counters  # noqa: E402

SHAPES = ((16, 64, 28, 28), (8, 256, 14, 14))
#: issue 23's targets: compute ops of a training forward + backward, and of an eval forward
TRAIN_TARGET, EVAL_TARGET = 24, 12


def configs(name: str, shape) -> list[dict]:
    """``method_configs`` of the layer benchmark, with every required group count filled in."""
    N, C = shape[:2]
    S = 1
    for s in shape[2:]:
        S *= s
    totals = {"channels": C, "flat": C * S, "batch": N}
    out = []
    for kw in method_configs(name, shape):
        kw = dict(kw)
        for arg in norm_group_args(name):
            if not arg.required or arg.name in kw or any(a in kw for a in arg.alternatives):
                continue
            want = arg.auto_rule()[1](AutoContext(N, C, S)) if arg.auto else 32
            kw[arg.name] = largest_divisor_at_most(totals[arg.divides], want)
        out.append(kw)
    return out


def layers(shape):
    """``(name, config, layer)`` for native BN then every registered method."""
    yield "BatchNorm2d", {}, nn.BatchNorm2d(shape[1])
    for name in available_norms():
        for kw in configs(name, shape):
            yield name, kw, build_norm(name, shape[1], **kw)


def count_rows(shape) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(shape)
    return [
        {"name": name, "kwargs": kw, "counts": count_layer_ops(layer, x), "python": python_calls(layer, x)}
        for name, kw, layer in layers(shape)
    ]


def python_calls(layer: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """Python function calls (``sys.setprofile`` ``call`` events, in the calling thread, where CPU
    autograd runs the backward) of one training forward + backward of an all-ones upstream gradient,
    and of one eval forward under ``no_grad``, each after one unprofiled run of the same (lazy caches
    filled). C functions (ATen ops, builtins) are not counted."""
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        calls += event == "call"

    def train():
        layer.train()
        out = layer(x.detach().requires_grad_(True))
        out.backward(torch.ones_like(out))

    def evaluate():
        layer.eval()
        with torch.no_grad():
            layer(x)

    counts = []
    for run in (train, evaluate):
        run()
        calls = 0
        sys.setprofile(count)
        try:
            run()
        finally:
            sys.setprofile(None)
        counts.append(calls)
    return counts[0], counts[1]


def table(rows, shape) -> str:
    lines = [
        f"`{tuple(shape)}`",
        "",
        "| method | config | train fwd | train bwd | fwd+bwd | eval fwd | met "
        "| Python calls fwd+bwd | Python calls eval |",
        "|---|---|---:|---:|---:|---:|:---:|---:|---:|",
    ]
    for r in rows:
        c = r["counts"]
        cfg = ", ".join(f"{k}={v}" for k, v in r["kwargs"].items()) or "-"
        met = "yes" if c.train <= TRAIN_TARGET and c.eval_forward <= EVAL_TARGET else "no"
        lines.append(
            f"| {r['name']} | {cfg} | {c.train_forward} | {c.train_backward} | {c.train} | {c.eval_forward} | {met} "
            f"| {r['python'][0]} | {r['python'][1]} |"
        )
    return "\n".join(lines)


def op_lists(shape, methods) -> str:
    """Which ops each selected layer dispatches (forward, backward, eval)."""
    x = torch.randn(shape)
    lines = []
    for name, kw, layer in layers(shape):
        if name not in methods:
            continue
        fwd, bwd, ev = layer_op_counters(layer, x)
        for what, c in (("fwd", fwd), ("bwd", bwd), ("eval", ev)):
            lines.append(f"{name} {kw} {what}: {dict(c.ops)}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=4, action="append", help="N C H W (repeatable)")
    p.add_argument("--methods", nargs="+", help="only these rows (BatchNorm2d is always the first)")
    p.add_argument("--ops", action="store_true", help="also list the ops of the selected methods")
    a = p.parse_args(argv)
    for shape in a.shape or SHAPES:
        rows = [r for r in count_rows(shape) if a.methods is None or r["name"] in {"BatchNorm2d", *a.methods}]
        print(table(rows, shape), end="\n\n")
        if a.ops:
            print(op_lists(shape, set(a.methods or available_norms())), end="\n\n")


if __name__ == "__main__":
    main()
