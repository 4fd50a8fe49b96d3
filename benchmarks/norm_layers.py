"""Benchmark every normalization method against ``nn.BatchNorm2d`` on the same tensor.

For each method: forward + backward time (median, or best with ``--stat min``, of ``--repeats``
timings measured interleaved with the native ``nn.BatchNorm2d`` baseline so that machine noise
hits both alike; ``--runs K`` repeats the whole measurement and reports the median ratio) and memory,
both as ratios to the baseline in the same run. Prints a markdown table.

Memory:
* CUDA: peak allocated bytes during forward + backward above the bytes allocated before
  (``torch.cuda.max_memory_allocated``).
* CPU: PyTorch has no allocator peak counter on CPU, so the column is the activation memory
  a layer *keeps alive for backward*: the distinct storages autograd saves (via
  ``torch.autograd.graph.saved_tensors_hooks``) plus the output, which is what a norm layer
  adds to a network's peak. It does not include transient buffers freed within the op.

Usage::

    python benchmarks/norm_layers.py                  # CPU-sized ResNet-like shape
    python benchmarks/norm_layers.py --full           # (32, 64, 56, 56), e.g. on CUDA
    python benchmarks/norm_layers.py --shape 16 64 28 28 --repeats 20 --methods bn bgn gn
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from normlightning.norms import BGN_PAPER_GROUPS, available_norms, build_norm  # noqa: E402

TARGET_125 = {"bn", "bgn", "ghost", "gn"}


def method_kwargs(name: str, shape) -> dict:
    """A paper-like configuration of each method for an input of ``shape``."""
    N, C = shape[:2]
    if name == "gn":
        return {"num_groups": 32 if C % 32 == 0 else 1}
    if name == "bgn":
        # the paper's G for this batch size (nearest listed), must divide C*H*W
        key = min(BGN_PAPER_GROUPS, key=lambda b: abs(b - N))
        return {"num_groups": BGN_PAPER_GROUPS[key]}
    if name == "ghost":
        return {"num_groups": 4 if N % 4 == 0 else 1}
    if name == "seqnorm":
        return {"channel_groups": 4, "batch_groups": 4 if N % 4 == 0 else 1}
    if name == "gbgn":
        return {"channel_groups": 32 if C % 32 == 0 else 1, "examples_per_group": max(1, N // 4)}
    return {}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _fwd_bwd(layer, x, g):
    y = layer(x)
    y.backward(g)


def _time_once(layer, x, g, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    _fwd_bwd(layer, x, g)
    _sync(device)
    return time.perf_counter() - t0


def _memory(layer, x, g, device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _fwd_bwd(layer, x, g)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    seen[y.untyped_storage().data_ptr()] = y.untyped_storage().nbytes()
    y.backward(g)
    return sum(seen.values())


def run(shape, device, repeats: int, warmup: int, methods, stat: str = "median") -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(shape, device=device, requires_grad=True)
    g = torch.randn(shape, device=device)
    base = nn.BatchNorm2d(shape[1]).to(device)
    rows = []
    for name in methods:
        kw = method_kwargs(name, shape)
        layer = build_norm(name, shape[1], **kw).to(device)
        for _ in range(warmup):
            _fwd_bwd(base, x, g)
            _fwd_bwd(layer, x, g)
        tb, tm = [], []
        for _ in range(repeats):
            tb.append(_time_once(base, x, g, device))
            tm.append(_time_once(layer, x, g, device))
        mb, mm = _memory(base, x, g, device), _memory(layer, x, g, device)
        x.grad = None
        pick = min if stat == "min" else statistics.median
        t_base, t_m = pick(tb), pick(tm)
        ratio = t_m / t_base
        target = 1.25 if name in TARGET_125 else 2.0
        rows.append({
            "name": name, "kwargs": kw, "ms": t_m * 1e3, "base_ms": t_base * 1e3, "time_ratio": ratio,
            "mem_ratio": mm / mb, "target": target, "met": ratio <= target,
        })
    return rows


def table(rows, shape, device) -> str:
    lines = [
        f"shape {tuple(shape)}, device {device}, {torch.get_num_threads()} threads, float32, forward+backward, ratio to nn.BatchNorm2d in the same run",
        "",
        "| method | config | time (ms) | BatchNorm2d (ms) | time ratio | memory ratio | target | met |",
        "|---|---|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in rows:
        cfg = ", ".join(f"{k}={v}" for k, v in r["kwargs"].items()) or "-"
        lines.append(
            f"| {r['name']} | {cfg} | {r['ms']:.2f} | {r['base_ms']:.2f} | {r['time_ratio']:.2f}x | "
            f"{r['mem_ratio']:.2f}x | {r['target']:.2f}x | {'yes' if r['met'] else 'no'} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=4, default=None, metavar=("N", "C", "H", "W"), help="input shape (default: 16 64 28 28 on CPU)")
    p.add_argument("--full", action="store_true", help="use the ResNet-50 stem-like shape 32 64 56 56")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--stat", choices=("median", "min"), default="median", help="statistic of the repeated timings")
    p.add_argument("--runs", type=int, default=1, help="repeat the whole measurement; report each method's median-ratio run")
    p.add_argument("--methods", nargs="*", default=None, help=f"subset of {available_norms()}")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = tuple(args.shape) if args.shape else ((32, 64, 56, 56) if args.full or device.type == "cuda" else (16, 64, 28, 28))
    methods = args.methods or available_norms()
    runs = [run(shape, device, args.repeats, args.warmup, methods, args.stat) for _ in range(max(1, args.runs))]
    rows = []
    for i in range(len(methods)):  # per method, the run with the median time ratio
        ordered = sorted((r[i] for r in runs), key=lambda row: row["time_ratio"])
        rows.append(ordered[(len(ordered) - 1) // 2])
    print(table(rows, shape, device))
    met = [r["name"] for r in rows if r["met"]]
    missed = [r["name"] for r in rows if not r["met"]]
    print(f"\ntargets met: {', '.join(met) or 'none'}; missed: {', '.join(missed) or 'none'}")


if __name__ == "__main__":
    main()
