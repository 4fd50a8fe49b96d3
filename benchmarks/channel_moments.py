"""Ways to compute per-channel moments on this device, as ratios to native BatchNorm2d's training forward.

The op-count work of issue 23 moved some statistics (``brn``'s batch moments, ``evonorm_b0``'s instance moments)
from three ops (a mean, the squared deviations, a mean) to one, the native batch-norm statistics kernel
(``torch.batch_norm_update_stats``, :func:`normlightning.norms.functional.moments.native_channel_moments`). One op is
one kernel launch on a GPU, but on CPU that kernel can be slower than the three ops. This script times, on
``x (N, C, H, W)`` viewed as ``(N, C, S)``:

* batch moments (sets over ``(N, S)``, per channel): the statistics kernel on ``(N, C, S)``, and a mean, the
  squared deviations and a mean;
* instance moments (sets over ``S``, per example and channel): the statistics kernel on the view ``(1, N·C, S)``,
  the three ops over ``S``, and ``native_layer_norm`` on ``(N·C, S)`` (which also writes the normalized values);

each interleaved with ``nn.BatchNorm2d``'s training forward on the same ``x`` (whose statistics are the same
kernel's), median of the per-round ratios, this process's CPU time (wall time after a synchronization on CUDA).

Usage::

    python benchmarks/channel_moments.py                      # four CPU shapes, one thread
    python benchmarks/channel_moments.py --shape 32 64 56 56 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import Tensor, nn

SHAPES = ((2, 64, 32, 32), (16, 64, 16, 16), (64, 64, 8, 8), (16, 128, 8, 8))


def three_op_moments(x3: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Mean and biased variance over ``dims`` in three ops: a mean, the squared deviations, a mean."""
    mean = x3.mean(dim=dims, keepdim=True)
    return mean, (x3 - mean).square_().mean(dim=dims, keepdim=True)


def candidates(x: Tensor) -> dict:
    n, c = x.shape[:2]
    x3 = x.view(n, c, -1)
    s = x3.shape[2]
    return {
        "batch: statistics kernel": lambda: torch.batch_norm_update_stats(x3, None, None, 0.0),
        "batch: mean, sq. dev., mean": lambda: three_op_moments(x3, (0, 2)),
        "instance: statistics kernel on (1, N·C, S)": lambda: torch.batch_norm_update_stats(
            x3.view(1, n * c, s), None, None, 0.0
        ),
        "instance: mean, sq. dev., mean": lambda: three_op_moments(x3, (2,)),
        "instance: native_layer_norm on (N·C, S)": lambda: torch.native_layer_norm(
            x3.reshape(n * c, s), (s,), None, None, 1e-5
        ),
    }


def timed(fn, clock, sync) -> float:
    sync()
    t0 = clock()
    fn()
    sync()
    return clock() - t0


def measure(shape, device, repeats: int, warmup: int) -> dict[str, tuple[float, float]]:
    """``{name: (median microseconds, median ratio to BatchNorm2d's training forward)}``."""
    torch.manual_seed(0)
    x = torch.randn(shape, device=device) + 3.0
    bn = nn.BatchNorm2d(shape[1]).to(device)
    cuda = x.device.type == "cuda"
    clock = time.perf_counter if cuda else time.process_time
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    out = {}
    with torch.no_grad():
        for name, fn in candidates(x).items():
            for _ in range(warmup):
                bn(x), fn()
            base, mine = [], []
            for _ in range(repeats):
                base.append(timed(lambda: bn(x), clock, sync))
                mine.append(timed(fn, clock, sync))
            out[name] = (statistics.median(mine) * 1e6, statistics.median([m / b for m, b in zip(mine, base)]))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=4, action="append", help="N C H W (repeatable)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    print("| shape | moments | time (µs) | ratio to BatchNorm2d training forward |")
    print("|---|---|---:|---:|")
    for shape in a.shape or SHAPES:
        for name, (us, ratio) in measure(tuple(shape), a.device, a.repeats, a.warmup).items():
            print(f"| `{tuple(shape)}` | {name} | {us:.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
