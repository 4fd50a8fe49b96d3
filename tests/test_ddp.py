"""DDP through the real command (2 CPU processes, gloo): per-process batch statistics, and `norm.sync`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent
LAYER = "backbone.features.0.1"  # the first norm layer of small_cnn
LAUNCH_VARIABLES = (
    "LOCAL_RANK",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)

CONFIG = f"""
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 2
  strategy: ddp
  max_epochs: 1
  limit_train_batches: 2
  limit_val_batches: 0
  num_sanity_val_steps: 0
  enable_progress_bar: false
  enable_model_summary: false
  logger: false
  callbacks:
    - class_path: probe_callbacks.BatchMeanProbe
      init_args: {{layer: {LAYER}, out_dir: probe}}
model:
  class_path: normlightning.tasks.ClassificationTask
  init_args:
    backbone: small_cnn
    backbone_kwargs: {{width: 4}}
data:
  class_path: normlightning.data.Synthetic
  init_args: {{input_shape: [3, 8, 8], num_classes: 3, num_train: 32, num_val: 8, num_test: 8, batch_size: 8}}
norm:
  method: bgn
  num_groups: auto     # per-process batch 8 -> G = 16 (BGN paper mapping)
checkpoint:
  monitor: null
  save_last: false
  save_top_k: 0
"""


def run_ddp(tmp_path: Path, *extra: str) -> list[dict]:
    (tmp_path / "tiny.yaml").write_text(CONFIG)
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
        PL_DISABLE_FORK="1",
    )
    for launched_by_someone_else in LAUNCH_VARIABLES:  # else Lightning waits for ranks nobody starts
        env.pop(launched_by_someone_else, None)
    cmd = [
        sys.executable,
        "-m",
        "normlightning",
        "fit",
        "--config",
        "tiny.yaml",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        *extra,
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # ~25 s idle
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "NormInjection: replaced 4 layer(s)" in proc.stdout + proc.stderr
    records = sorted(
        (json.loads(p.read_text()) for p in (tmp_path / "probe").glob("rank*.json")), key=lambda r: r["rank"]
    )
    assert [r["rank"] for r in records] == [0, 1] and all(r["world_size"] == 2 for r in records)
    assert all(r["type"] == "BatchGroupNorm" and len(r["used"]) == 16 for r in records)
    return records


def test_ddp_statistics_are_per_process_by_default(tmp_path):
    r0, r1 = run_ddp(tmp_path)
    assert not r0["sync"] and not r1["sync"]
    for r in (r0, r1):  # each rank normalized with its own batch's means
        torch.testing.assert_close(torch.tensor(r["used"]), torch.tensor(r["local"]), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(torch.tensor(r0["used"]), torch.tensor(r1["used"]), atol=1e-3)
    # DDP's default broadcast_buffers=True: before the 2nd forward every rank holds rank 0's running
    # statistics (m * rank 0's batch mean), while the batch statistics themselves stayed local
    for r in (r0, r1):
        torch.testing.assert_close(torch.tensor(r["second"]), 0.1 * torch.tensor(r0["used"]), rtol=1e-4, atol=1e-6)


def test_ddp_sync_all_reduces_the_statistics(tmp_path):
    r0, r1 = run_ddp(tmp_path, "--norm.sync=true")
    assert r0["sync"] and r1["sync"]
    torch.testing.assert_close(torch.tensor(r0["used"]), torch.tensor(r1["used"]), rtol=1e-5, atol=1e-6)
    # equal per-rank batches: the global mean is the average of the two local means
    expected = (torch.tensor(r0["local"]) + torch.tensor(r1["local"])) / 2
    torch.testing.assert_close(torch.tensor(r0["used"]), expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(torch.tensor(r0["local"]), torch.tensor(r1["local"]), atol=1e-3)


def test_ddp_without_buffer_broadcast_keeps_each_rank_running_statistics(tmp_path):
    r0, r1 = run_ddp(
        tmp_path,
        "--trainer.strategy=lightning.pytorch.strategies.DDPStrategy",
        "--trainer.strategy.broadcast_buffers=false",
    )
    assert not torch.allclose(torch.tensor(r0["used"]), torch.tensor(r1["used"]), atol=1e-3)
    # broadcast_buffers=false: before the 2nd forward every rank still holds its own moving average
    for r in (r0, r1):
        torch.testing.assert_close(torch.tensor(r["second"]), 0.1 * torch.tensor(r["used"]), rtol=1e-4, atol=1e-6)
