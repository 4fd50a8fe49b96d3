"""Synchronized statistics over 2 real gloo processes, for every method that synchronizes them.

Each process trains a layer with ``sync_statistics=True`` on its half of the batch; the result must
be one process training the same layer on the whole batch: outputs, input gradients, parameter
gradients (summed over the processes, as DDP's all-reduce does up to its 1/world factor) and the
running statistics of every process, after two steps. (A one-process "world" cannot tell a missing
all-reduce from a present one: ``tests/norms/test_norm_dtypes_state_sync.py`` checks only that.)

Rows of the whole batch (N = 16) go to the processes in blocks of 2, alternately: rank ``r`` holds
rows ``4j + 2r + {0, 1}``. Then ghost batch ``j = n mod 2`` of a process is the same residue class of
the whole batch, and GBGN's example group ``j`` (2 rows per process) pooled across the processes is
the whole batch's group ``j`` of 4 rows: docs/methods.md, "A ghost batch or example group ``j`` is
pooled with group ``j`` of every other process".
"""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from sync_workers import synced_training_worker

from normlightning.norms import build_norm

WORLD, N, C, SHAPE = 2, 16, 4, (3, 2)  # S = 6, C * S = 24
BRN = {"r_max_start_step": 0, "r_max_end_step": 0, "d_max_start_step": 0, "d_max_end_step": 0}  # r, d clip at once

#: label -> (registry name, per-process spec, whole-batch spec)
CASES = {
    "ghost": ("ghost", {"num_groups": 2}, {"num_groups": 2}),
    "seqnorm": ("seqnorm", {"channel_groups": 2, "batch_groups": 2}, {"channel_groups": 2, "batch_groups": 2}),
    "bgn_one_channel": ("bgn", {"num_groups": 4}, {"num_groups": 4}),  # a group = a channel (per-channel kernel)
    "bgn_two_channels": ("bgn", {"num_groups": 2}, {"num_groups": 2}),  # a group = 2 whole channels (12 values)
    "bgn_straddling": ("bgn", {"num_groups": 6}, {"num_groups": 6}),  # groups of 4 values across channels
    "gbgn": ("gbgn", {"channel_groups": 2, "examples_per_group": 2}, {"channel_groups": 2, "examples_per_group": 4}),
    "hn": ("hn", {"mean": "bn", "std": "bn+en:1"}, {"mean": "bn", "std": "bn+en:1"}),
    "sn": ("sn", {}, {}),
    "brn": ("brn", BRN, BRN),
}


def rank_rows(rank: int) -> torch.Tensor:
    """Rows of the whole batch that process ``rank`` holds (blocks of 2, alternately)."""
    return torch.tensor([4 * j + 2 * rank + k for j in range(N // 4) for k in range(2)])


def initial_state(name: str, spec: dict) -> dict[str, torch.Tensor]:
    """The layer's state with random parameters (gamma near 1, beta, mixture logits), float64."""
    layer = build_norm(name, C, **spec).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p is layer.weight else 0.0))
    return layer.state_dict()


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """One spawn of 2 gloo processes that train every case of :data:`CASES` (2 steps each); returns the
    inputs, output weights, initial states and each rank's results."""
    out = tmp_path_factory.mktemp("sync")
    torch.manual_seed(0)
    order = torch.cat([rank_rows(r) for r in range(WORLD)])  # rank 0's rows, then rank 1's
    xs = [
        torch.randn(N, C, *SHAPE, dtype=torch.float64) * (1.5 + s) + torch.arange(C).view(1, C, 1, 1) - s
        for s in range(2)
    ]
    ws = [torch.randn(N, C, *SHAPE, dtype=torch.float64) for _ in range(2)]
    states = {label: initial_state(name, spec) for label, (name, spec, _) in CASES.items()}
    cases = [(label, name, spec, states[label]) for label, (name, spec, _) in CASES.items()]
    mp.spawn(
        synced_training_worker,
        args=(WORLD, str(out / "init"), cases, [x[order] for x in xs], [w[order] for w in ws], str(out)),
        nprocs=WORLD,
        join=True,
    )
    return xs, ws, states, [torch.load(out / f"{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("label", list(CASES))
def test_synced_statistics_over_two_processes_equal_one_process_on_the_whole_batch(label, two_process_run):
    xs, ws, states, ranks = two_process_run
    name, _, whole_spec = CASES[label]
    ref = build_norm(name, C, **whole_spec).double()
    ref.load_state_dict(states[label])
    ref.train()
    for step, (x, w) in enumerate(zip(xs, ws)):
        xr = x.clone().requires_grad_()
        y = ref(xr)
        (y * w).sum().backward()
        for r, got in enumerate(ranks):
            rows = rank_rows(r)
            torch.testing.assert_close(got[label]["y"][step], y.detach()[rows], msg=f"step {step} rank {r} output")
            torch.testing.assert_close(got[label]["gx"][step], xr.grad[rows], msg=f"step {step} rank {r} input grad")
    for k, p in ref.named_parameters():
        torch.testing.assert_close(sum(got[label]["grads"][k] for got in ranks), p.grad, msg=f"grad of {k}")
    for r, got in enumerate(ranks):
        assert got[label]["state"].keys() == ref.state_dict().keys()
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(got[label]["state"][k], v, msg=f"rank {r} {k}")
