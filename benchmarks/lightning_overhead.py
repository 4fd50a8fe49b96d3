"""What a ``normlightning fit`` training epoch costs over a bare PyTorch loop doing the same work.

Both sides use one model, data loader and optimizer, built by the ``normlightning`` command from
the same config (``--config``, default ``configs/quickstart.yaml``: ``small_cnn`` on the 8x8
digits; ``--fit-arg`` adds command-line arguments to both): the fit runs the CLI's trainer (its
callbacks, logger, progress bar, ``last.ckpt`` and the task's per-step metrics and logging); the
bare loop runs ``zero_grad``, forward, the task's loss, ``backward`` and ``step`` over the same
loader and steps the LR scheduler once per epoch. Validation is off on both sides
(``limit_val_batches=0``): the comparison is the training epoch.

Both sides record the time at the start of every batch (the fit: ``on_train_batch_start``) and
of every epoch. A *step* is the time from one batch start to the next within an epoch (loading
the batch included); the *epoch tail* is the rest of the epoch (its last step, the epoch-end
work such as writing ``last.ckpt``, and the next epoch's start), less one median step. The
first epoch is a warm-up and is not counted; fit and loop alternate (``--rounds``) so that
machine noise hits both alike. The clock is this process's CPU time (``--clock process``: on a
shared machine it does not count the time other jobs hold the cores; the data loader runs in
this process, ``num_workers=0``) or wall time (``--clock wall``).

The table gives the median step of each side, the per-step overhead, the extra epoch tail, the
measured overhead of whole epochs, and that overhead projected to an epoch of ``--project``
steps (default 782: CIFAR's 50,000 images at batch 64).

Usage::

    python benchmarks/lightning_overhead.py                     # batch 2 and 64, one thread
    python benchmarks/lightning_overhead.py --batches 64 --epochs 3 --rounds 3
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


class StepTimer(Callback):
    """Records ``(epoch, time)`` at every batch start and the time of every epoch start."""

    def __init__(self, clock) -> None:
        self.clock = clock
        self.batch_starts: list[tuple[int, float]] = []
        self.epoch_starts: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.epoch_starts.append(self.clock())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch_starts.append((trainer.current_epoch, self.clock()))

    def on_fit_end(self, trainer, pl_module) -> None:
        self.epoch_starts.append(self.clock())


def _cli(config: str, batch: int, epochs: int, workdir: str, extra: list[str]):
    args = [
        "--config",
        config,
        f"--data.init_args.batch_size={batch}",
        f"--trainer.max_epochs={epochs}",
        "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0",
        f"--trainer.default_root_dir={workdir}",
        f"--trainer.logger.init_args.save_dir={workdir}",
        *extra,
    ]
    return build_cli(args, run=False)


def _summarize(timer: StepTimer) -> dict:
    """Steps and epoch tails of every epoch after the first."""
    steps, tails = [], []
    for epoch in range(1, len(timer.epoch_starts) - 1):
        starts = [t for e, t in timer.batch_starts if e == epoch]
        steps += [b - a for a, b in zip(starts, starts[1:])]
        tails.append(timer.epoch_starts[epoch + 1] - starts[-1] + (starts[0] - timer.epoch_starts[epoch]))
    epochs = [b - a for a, b in zip(timer.epoch_starts[1:], timer.epoch_starts[2:])]
    return {"steps": steps, "tails": tails, "epochs": epochs}


def run_fit(config: str, batch: int, epochs: int, extra: list[str], clock) -> dict:
    """One ``fit`` of ``epochs`` timed epochs after a warm-up epoch."""
    with tempfile.TemporaryDirectory() as workdir:
        cli = _cli(config, batch, epochs + 1, workdir, extra)
        timer = StepTimer(clock)
        cli.trainer.callbacks.append(timer)
        cli.trainer.fit(cli.model, cli.datamodule)
    return _summarize(timer)


def run_loop(config: str, batch: int, epochs: int, extra: list[str], clock) -> dict:
    """The bare loop on the CLI's objects, timed like :func:`run_fit`."""
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
        timer = StepTimer(clock)
        for epoch in range(epochs + 1):
            timer.epoch_starts.append(clock())
            if hasattr(loader.sampler, "set_epoch"):
                loader.sampler.set_epoch(epoch)
            for x, y in loader:
                timer.batch_starts.append((epoch, clock()))
                optimizer.zero_grad(set_to_none=True)
                loss = task.training_loss(task(x), (x, y))
                loss.backward()
                optimizer.step()
            if scheduler is not None:
                scheduler.step()
        timer.epoch_starts.append(clock())
    return _summarize(timer)


def measure(config: str, batch: int, epochs: int, rounds: int, extra: list[str], clock) -> dict:
    fit: dict = {"steps": [], "tails": [], "epochs": []}
    loop: dict = {"steps": [], "tails": [], "epochs": []}
    for _ in range(rounds):
        for side, run in ((fit, run_fit), (loop, run_loop)):
            for key, values in run(config, batch, epochs, extra, clock).items():
                side[key] += values
    med = statistics.median
    return {
        "batch": batch,
        "fit_step": med(fit["steps"]),
        "loop_step": med(loop["steps"]),
        "fit_tail": med(fit["tails"]) - med(fit["steps"]),
        "loop_tail": med(loop["tails"]) - med(loop["steps"]),
        "fit_epoch": med(fit["epochs"]),
        "loop_epoch": med(loop["epochs"]),
        "steps_per_epoch": round(len(fit["steps"]) / max(1, len(fit["epochs"]))) + 1,
        "epochs": len(fit["epochs"]),
    }


def table(rows, project: int) -> str:
    lines = [
        "| batch | steps/epoch | fit step (ms) | bare step (ms) | per-step overhead | extra epoch tail (ms) "
        f"| whole-epoch overhead (measured) | projected, {project} steps/epoch | epochs timed |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        per_step = r["fit_step"] / r["loop_step"] - 1
        extra_tail = r["fit_tail"] - r["loop_tail"]
        projected = (project * (r["fit_step"] - r["loop_step"]) + extra_tail) / (project * r["loop_step"])
        lines.append(
            f"| {r['batch']} | {r['steps_per_epoch']} | {1e3 * r['fit_step']:.2f} | {1e3 * r['loop_step']:.2f} | "
            f"{100 * per_step:+.1f}% | {1e3 * extra_tail:.1f} | {100 * (r['fit_epoch'] / r['loop_epoch'] - 1):+.1f}% | "
            f"{100 * projected:+.1f}% | {r['epochs']} + {r['epochs']} |"
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
    p.add_argument("--project", type=int, default=782, help="steps per epoch of the projected column")
    p.add_argument(
        "--fit-arg", action="append", default=[], help="extra normlightning argument (both sides), repeatable"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    rows = [measure(args.config, b, args.epochs, args.rounds, args.fit_arg, CLOCKS[args.clock]) for b in args.batches]
    extra = " ".join(args.fit_arg) or "none"
    print(
        f"config {Path(args.config).name}, {torch.get_num_threads()} thread(s), {args.clock} clock, training epochs "
        f"without validation; extra arguments: {extra}\n"
    )
    print(table(rows, args.project))


if __name__ == "__main__":
    main()
