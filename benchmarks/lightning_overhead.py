"""What a ``normlightning fit`` training epoch costs over a bare PyTorch loop doing the same work.

Both sides use one model, data loader and optimizer, built by the ``normlightning`` command from
the same config (``--config``, default ``configs/quickstart.yaml``: ``small_cnn`` on the 8x8
digits): the fit runs the CLI's trainer (its callbacks, logger, progress bar and the task's
per-step metrics and logging); the bare loop runs ``zero_grad``, forward, the task's loss,
``backward`` and ``step`` over the same loader, and steps the LR scheduler once per epoch.
Validation is off on both sides (``limit_val_batches=0``): the comparison is the training epoch.

Epoch times: the fit's epochs are timed from one ``on_train_epoch_start`` to the next (so the
epoch-end work, e.g. writing ``last.ckpt``, is inside); the first epoch is a warm-up and is not
counted. The bare loop is timed the same way, and the two alternate (fit, loop, fit, loop, ...)
so that machine noise hits both alike. The clock is this process's CPU time by default
(``--clock process``: on a shared machine it does not count the time other jobs hold the cores;
the data loader runs in this process, ``num_workers=0``), or wall time (``--clock wall``). The
table gives median and minimum epoch times, their ratios, and the fit's start-up time
(everything before its first epoch).

Usage::

    python benchmarks/lightning_overhead.py                     # batch 2 and 64, one thread
    python benchmarks/lightning_overhead.py --batches 64 --epochs 4 --rounds 3
    python benchmarks/lightning_overhead.py --fit-arg=--trainer.enable_progress_bar=false
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from lightning.pytorch import Callback

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from normlightning.cli import build_cli  # noqa: E402

CLOCKS = {"process": time.process_time, "wall": time.perf_counter}
clock = time.process_time


class EpochTimer(Callback):
    """Records the time of every ``on_train_epoch_start`` and of the end of ``fit``."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.end = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.starts.append(clock())

    def on_fit_end(self, trainer, pl_module) -> None:
        self.end = clock()


def _cli(config: str, batch: int, epochs: int, workdir: str, extra: list[str]):
    args = [
        "--config", config,
        f"--data.init_args.batch_size={batch}",
        f"--trainer.max_epochs={epochs}",
        "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0",
        f"--trainer.default_root_dir={workdir}",
        f"--trainer.logger.init_args.save_dir={workdir}",
        *extra,
    ]
    return build_cli(args, run=False)


def fit_epochs(config: str, batch: int, epochs: int, extra: list[str]) -> tuple[list[float], float]:
    """Epoch times of one ``fit`` (the first, warm-up epoch dropped) and its start-up time."""
    with tempfile.TemporaryDirectory() as workdir:
        cli = _cli(config, batch, epochs + 1, workdir, extra)
        timer = EpochTimer()
        cli.trainer.callbacks.append(timer)
        t0 = clock()
        cli.trainer.fit(cli.model, cli.datamodule)
        stamps = timer.starts + [timer.end]
    durations = [b - a for a, b in zip(stamps, stamps[1:])]
    startup = (stamps[0] - t0)
    return durations[1:], startup


def loop_epochs(config: str, batch: int, epochs: int, extra: list[str]) -> list[float]:
    """Epoch times of the bare loop (the first, warm-up epoch dropped) on the CLI's objects."""
    with tempfile.TemporaryDirectory() as workdir:
        cli = _cli(config, batch, epochs + 1, workdir, extra)
        task, data = cli.model, cli.datamodule
        # the same model surgery the fit does at setup (the norm: section), then the same optimizer
        for callback in cli.trainer.callbacks:
            if type(callback).__name__ == "NormInjection":
                callback.setup(cli.trainer, task, "fit")
        data.setup("fit")
        loader = data.train_dataloader()
        configured = task.configure_optimizers()
        optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
        scheduler = configured["lr_scheduler"]["scheduler"] if isinstance(configured, dict) else None
        task.train()
        stamps = []
        for epoch in range(epochs + 1):
            stamps.append(clock())
            if hasattr(loader.sampler, "set_epoch"):
                loader.sampler.set_epoch(epoch)
            for x, y in loader:
                optimizer.zero_grad(set_to_none=True)
                loss = task.training_loss(task(x), (x, y))
                loss.backward()
                optimizer.step()
            if scheduler is not None:
                scheduler.step()
        stamps.append(clock())
    durations = [b - a for a, b in zip(stamps, stamps[1:])]
    return durations[1:]


def measure(config: str, batch: int, epochs: int, rounds: int, extra: list[str]) -> dict:
    fit, loop, startups = [], [], []
    for _ in range(rounds):
        f, s = fit_epochs(config, batch, epochs, extra)
        fit += f
        startups.append(s)
        loop += loop_epochs(config, batch, epochs, extra)
    return {
        "batch": batch, "fit_med": statistics.median(fit), "loop_med": statistics.median(loop),
        "fit_min": min(fit), "loop_min": min(loop), "startup": statistics.median(startups), "epochs": len(fit),
    }


def table(rows) -> str:
    lines = [
        "| batch | fit epoch (s, median) | bare loop epoch (s, median) | overhead (median) | overhead (min) | fit start-up (s) | epochs timed |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['fit_med']:.3f} | {r['loop_med']:.3f} | {100 * (r['fit_med'] / r['loop_med'] - 1):+.1f}% | "
            f"{100 * (r['fit_min'] / r['loop_min'] - 1):+.1f}% | {r['startup']:.2f} | {r['epochs']} + {r['epochs']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    p.add_argument("--batches", type=int, nargs="*", default=[2, 64])
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per fit (after one warm-up epoch)")
    p.add_argument("--rounds", type=int, default=3, help="alternations of fit and bare loop")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=sorted(CLOCKS), default="process", help="CPU time of this process, or wall time")
    p.add_argument("--fit-arg", action="append", default=[], help="extra normlightning argument (both sides), repeatable")
    args = p.parse_args(argv)
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    rows = [measure(args.config, b, args.epochs, args.rounds, args.fit_arg) for b in args.batches]
    extra = " ".join(args.fit_arg) or "none"
    print(f"config {Path(args.config).name}, {torch.get_num_threads()} thread(s), {args.clock} clock, training epochs "
          f"without validation; extra arguments: {extra}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
