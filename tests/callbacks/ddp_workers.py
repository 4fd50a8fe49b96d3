"""Process bodies of the 2-process gloo tests of callbacks (importable by spawned children)."""

from __future__ import annotations

import os

import torch


def average_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Rank r holds BN statistics mean = [r, r+1, r+2], var = [1.5 + r, ...]; average them."""
    from normlightning.callbacks.recalibration import average_running_statistics

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
        bn = model[1]
        with torch.no_grad():
            bn.running_mean.copy_(torch.arange(3.0) + rank)
            bn.running_var.copy_(torch.arange(3.0) + 1.5 + rank)
            bn.num_batches_tracked.fill_(7 + rank)

        def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
            torch.distributed.all_reduce(t)
            return t / world

        assert average_running_statistics(model, mean_over_ranks) == 2
        torch.save(
            {"mean": bn.running_mean, "var": bn.running_var, "count": bn.num_batches_tracked},
            os.path.join(out_dir, f"{rank}.pt"),
        )
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()
