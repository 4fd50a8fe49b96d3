"""Process body of the 2-process gloo DDP run that virtual devices are compared with (importable by
spawned children: tests/norms/conftest.py puts this folder on ``sys.path``)."""

from __future__ import annotations

import os

import torch
from torch import nn

from normlightning.norms import build_norm

#: Layers of :func:`small_model`: ``(method, kwargs)``; ``brn`` renormalizes from the first step, so its
#: training outputs read the running statistics (the buffers the ranks average after every step).
LAYERS = (
    ("bn", {}),
    ("brn", {"r_max_start_step": 0, "r_max_end_step": 1, "d_max_start_step": 0, "d_max_end_step": 1}),
    ("bgn", {"num_groups": 4}),
)
STEPS = 3
LR = 0.1


def small_model(virtual_devices: int) -> nn.Sequential:
    """conv -> (norm, relu) per :data:`LAYERS` -> pool -> linear, float64, the same weights for a seed of 0."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for method, kwargs in LAYERS:
        layers += [
            nn.Conv2d(3 if not layers else 4, 4, 3, padding=1, dtype=torch.float64),
            build_norm(method, 4, dtype=torch.float64, virtual_devices=virtual_devices, **kwargs),
            nn.ReLU(),
        ]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3, dtype=torch.float64))


def batches(global_batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:data:`STEPS` global batches ``(x (global_batch, 3, 5, 5), y)``, the same in every process."""
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(global_batch, 3, 5, 5, generator=g, dtype=torch.float64) * 2 + 0.5,
            torch.randint(0, 3, (global_batch,), generator=g),
        )
        for _ in range(STEPS)
    ]


def train(model: nn.Module, data, step_end=lambda: None) -> nn.Module:
    """SGD on the mean cross entropy of each batch; ``step_end()`` after every step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model.train()
    for x, y in data:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        step_end()
    return model


def ddp_worker(rank: int, world: int, init_file: str, out_dir: str, global_batch: int) -> None:
    """Rank ``r`` trains on examples ``[r N/world, (r+1) N/world)`` of every global batch under DDP
    (gradients averaged, per-process batch statistics, no buffer broadcast before a forward) and averages
    the running statistics over the ranks after every step. It trains twice: with ``virtual_devices`` 1
    and 2 in each process; rank 0 saves the final ``state_dict`` of each as ``virtual<k>.pt``."""
    from torch.nn.parallel import DistributedDataParallel

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        local = global_batch // world
        mine = slice(rank * local, (rank + 1) * local)
        data = [(x[mine], y[mine]) for x, y in batches(global_batch)]
        for virtual_devices in (1, 2):
            model = small_model(virtual_devices)
            ddp = DistributedDataParallel(model, forward_sync_buffers=False)  # no buffer broadcast before a forward

            def average_running_statistics(model: nn.Module = model) -> None:
                with torch.no_grad():
                    for layer in model.modules():
                        for name in getattr(layer, "running_stat_names", ()):
                            torch.distributed.all_reduce(getattr(layer, name))
                            getattr(layer, name).div_(world)

            train(ddp, data, step_end=average_running_statistics)
            if rank == 0:
                torch.save(model.state_dict(), os.path.join(out_dir, f"virtual{virtual_devices}.pt"))
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()
