"""Process body of the 2-process gloo test of synchronized statistics (importable by spawned children)."""

from __future__ import annotations

import os

import torch


def synced_training_worker(
    rank: int, world: int, init_file: str, cases: list, xs: list, ws: list, out_dir: str
) -> None:
    """For every case ``(label, name, spec, state)``: a layer ``build_norm(name, C, **spec)`` in float64 with
    ``state`` loaded and ``sync_statistics=True`` trains on this rank's rows of every step's batch:
    forward, ``sum(y * w).backward()``. Saves, per label, the outputs and input gradients of every step,
    the parameter gradients summed over the steps and the final state dict to ``out_dir/{rank}.pt``.

    ``xs[s]``/``ws[s]`` hold the rows of rank 0, then those of rank 1 (``chunk(world)[rank]``)."""
    from normlightning.norms import build_norm

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for label, name, spec, state in cases:
            layer = build_norm(name, state["weight"].numel(), **spec).double()
            layer.load_state_dict(state)
            layer.sync_statistics = True
            layer.train()
            ys, gxs = [], []
            for x, w in zip(xs, ws):
                x_local = x.chunk(world)[rank].clone().requires_grad_()
                y = layer(x_local)
                (y * w.chunk(world)[rank]).sum().backward()
                ys.append(y.detach())
                gxs.append(x_local.grad)
            grads = {k: p.grad for k, p in layer.named_parameters()}
            results[label] = {"y": ys, "gx": gxs, "grads": grads, "state": layer.state_dict()}
        torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
        torch.distributed.barrier()  # both ranks done with collectives before the group is torn down
    finally:
        torch.distributed.destroy_process_group()
