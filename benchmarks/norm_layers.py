"""Benchmark every normalization method against ``nn.BatchNorm2d`` on the same tensor.

For each method and configuration (the paper-like one, plus ``bgn`` with groups smaller than,
equal to and larger than ``C`` and ``gbgn`` with 2-example groups): forward + backward time in
training mode, the eval-mode forward time (``no_grad``, running statistics) and memory, each as a
ratio to the native ``nn.BatchNorm2d`` baseline measured interleaved with it (baseline, method,
baseline, method, ...) so that machine noise hits both alike; the time ratio is the median of
the per-pair ratios. ``--runs K`` repeats the whole measurement and reports each row's
median-ratio run. On CPU the clock is this process's CPU time (``--clock process``, the default:
on a shared machine it does not count the time other jobs hold the cores), on CUDA wall time
after a device synchronization.

Targets (issue 14): training time within 1.25x of native for bn, bgn (any G), ghost and gn, 1.5x
for every other method; memory within 1.25x; eval forward within 1.1x for the methods with
running statistics.

Memory:
* CUDA: peak allocated bytes during forward + backward above the bytes allocated before
  (``torch.cuda.max_memory_allocated``).
* CPU: PyTorch has no allocator peak counter on CPU, so the column is the activation memory
  a layer *keeps alive for backward*: the distinct storages autograd saves (via
  ``torch.autograd.graph.saved_tensors_hooks``) plus the output, which is what a norm layer
  adds to a network's peak. It does not include transient buffers freed within the op.

Usage::

    python benchmarks/norm_layers.py                  # three CPU-sized shapes
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
from normlightning.norms.model_walk import is_batch_statistic_layer  # noqa: E402

TARGET_125 = {"bn", "bgn", "ghost", "gn"}
#: CPU shapes: a ResNet stage at batch 16, a deep stage at batch 8, and a small-batch case
CPU_SHAPES = ((16, 64, 28, 28), (8, 256, 14, 14), (2, 64, 8, 8))


def method_configs(name: str, shape) -> list[dict]:
    """Paper-like configurations of each method for an input of ``shape`` (several for bgn, gbgn)."""
    N, C = shape[:2]
    if name in ("gn", "evonorm_s0"):
        return [{"num_groups": 32 if C % 32 == 0 else 1}]
    if name == "mabn":  # after warm-up: the moving windows and the clipped r in use
        return [{"buffer_size": 16, "warmup_iters": 0, "renorm_start_step": 0}]
    if name == "bgn":
        # the paper's G for this batch size (nearest listed, fitted to divide C*H*W), then groups of
        # several channels (G < C), one channel (G = C) and channel quarters (G = 4C)
        key = min(BGN_PAPER_GROUPS, key=lambda b: abs(b - N))
        D = C * shape[2] * shape[3]
        paper = max(g for g in range(1, BGN_PAPER_GROUPS[key] + 1) if D % g == 0)
        return [{"num_groups": g} for g in dict.fromkeys((paper, max(1, C // 8), C, 4 * C))]
    if name == "ghost":
        return [{"num_groups": 4 if N % 4 == 0 else 1}]
    if name == "seqnorm":
        return [{"channel_groups": 4, "batch_groups": 4 if N % 4 == 0 else 1}]
    if name == "gbgn":
        Gc = 32 if C % 32 == 0 else 1
        return [{"channel_groups": Gc, "examples_per_group": None}, {"channel_groups": Gc, "examples_per_group": 2}]
    if name == "brn":  # the ramp under way (r_max, d_max > their initial 1, 0), not BN's first steps
        return [{"r_max_start_step": 0, "r_max_end_step": 1, "d_max_start_step": 0, "d_max_end_step": 1}]
    return [{}]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _fwd_bwd(layer, x, g):
    y = layer(x)
    y.backward(g)


def _eval_fwd(layer, x, g):
    with torch.no_grad():
        layer(x)


def _time_once(fn, layer, x, g, device, clock) -> float:
    _sync(device)
    t0 = clock()
    fn(layer, x, g)
    _sync(device)
    return clock() - t0


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


def _paired(fn, base, layer, x, g, device, clock, repeats, warmup) -> tuple[float, float, float]:
    """Median per-pair ratio and median times (method, baseline) of ``fn``, interleaved."""
    for _ in range(warmup):
        fn(base, x, g)
        fn(layer, x, g)
    tb, tm = [], []
    for _ in range(repeats):
        tb.append(_time_once(fn, base, x, g, device, clock))
        tm.append(_time_once(fn, layer, x, g, device, clock))
    return statistics.median(m / b for m, b in zip(tm, tb)), statistics.median(tm), statistics.median(tb)


def run(shape, device, repeats: int, warmup: int, methods, clock) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(shape, device=device, requires_grad=True)
    g = torch.randn(shape, device=device)
    base = nn.BatchNorm2d(shape[1]).to(device)
    rows = []
    for name in methods:
        for kw in method_configs(name, shape):
            layer = build_norm(name, shape[1], **kw).to(device)
            base.train(), layer.train()
            ratio, t_m, t_base = _paired(_fwd_bwd, base, layer, x, g, device, clock, repeats, warmup)
            mb, mm = _memory(base, x, g, device), _memory(layer, x, g, device)
            base.eval(), layer.eval()
            eval_ratio, _, _ = _paired(_eval_fwd, base, layer, x, g, device, clock, repeats, warmup)
            x.grad = None
            target = 1.25 if name in TARGET_125 else 1.5
            eval_target = 1.1 if is_batch_statistic_layer(layer) else None  # eval with running statistics
            met = ratio <= target and mm / mb <= 1.25 and (eval_target is None or eval_ratio <= eval_target)
            rows.append(
                {
                    "name": name,
                    "kwargs": kw,
                    "ms": t_m * 1e3,
                    "base_ms": t_base * 1e3,
                    "time_ratio": ratio,
                    "mem_ratio": mm / mb,
                    "eval_ratio": eval_ratio,
                    "target": target,
                    "eval_target": eval_target,
                    "met": met,
                }
            )
    return rows


def table(rows, shape, device, clock_name) -> str:
    lines = [
        f"shape {tuple(shape)}, device {device}, {torch.get_num_threads()} threads, float32, {clock_name} clock; "
        "ratios to nn.BatchNorm2d in the same run",
        "",
        "| method | config | train fwd+bwd (ms) | BatchNorm2d (ms) | train ratio | target "
        "| memory ratio | eval fwd ratio | eval target | met |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in rows:
        cfg = ", ".join(f"{k}={v}" for k, v in r["kwargs"].items()) or "-"
        eval_target = "-" if r["eval_target"] is None else f"{r['eval_target']:.2f}x"
        lines.append(
            f"| {r['name']} | {cfg} | {r['ms']:.2f} | {r['base_ms']:.2f} | {r['time_ratio']:.2f}x | "
            f"{r['target']:.2f}x | "
            f"{r['mem_ratio']:.2f}x | {r['eval_ratio']:.2f}x | {eval_target} | {'yes' if r['met'] else 'no'} |"
        )
    missed = [
        f"{r['name']} ({', '.join(f'{k}={v}' for k, v in r['kwargs'].items()) or '-'})" for r in rows if not r["met"]
    ]
    lines += ["", f"targets missed: {'; '.join(missed) or 'none'}"]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--shape",
        type=int,
        nargs=4,
        action="append",
        default=None,
        metavar=("N", "C", "H", "W"),
        help="input shape, repeatable (default: three CPU shapes; (32, 64, 56, 56) on CUDA)",
    )
    p.add_argument("--full", action="store_true", help="use the ResNet-50 stem-like shape 32 64 56 56")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--runs", type=int, default=1, help="repeat the whole measurement; report each row's median-ratio run"
    )
    p.add_argument("--methods", nargs="*", default=None, help=f"subset of {available_norms()}")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    p.add_argument(
        "--clock", choices=("process", "wall"), default="process", help="CPU clock: process CPU time or wall time"
    )
    args = p.parse_args(argv)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    clock_name = "wall" if device.type == "cuda" else args.clock
    clock = time.perf_counter if clock_name == "wall" else time.process_time
    if args.shape:
        shapes = [tuple(s) for s in args.shape]
    else:
        shapes = [(32, 64, 56, 56)] if args.full or device.type == "cuda" else list(CPU_SHAPES)
    methods = args.methods or available_norms()
    for shape in shapes:
        runs = [run(shape, device, args.repeats, args.warmup, methods, clock) for _ in range(max(1, args.runs))]
        rows = []
        for i in range(len(runs[0])):  # per row, the run with the median time ratio
            ordered = sorted((r[i] for r in runs), key=lambda row: row["time_ratio"])
            rows.append(ordered[(len(ordered) - 1) // 2])
        print(table(rows, shape, device, clock_name) + "\n", flush=True)


if __name__ == "__main__":
    main()
