"""Resume from last.ckpt through the CLI, and reload for inference without the callback."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from normlightning.cli import build_cli
from normlightning.injection.spec import CHECKPOINT_KEY
from normlightning.norms import BatchGroupNorm, GroupNorm
from normlightning.tasks import ClassificationTask

sys.path.insert(0, str(Path(__file__).resolve().parent))  # probe_callbacks, named by class_path
from probe_callbacks import ResumeProbe  # noqa: E402

STEPS_PER_EPOCH = 4  # 32 training examples, batch 8

CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  limit_val_batches: 1
  num_sanity_val_steps: 0
  enable_progress_bar: false
  enable_model_summary: false
  log_every_n_steps: 1
model:
  class_path: normlightning.tasks.ClassificationTask
  init_args:
    backbone: small_cnn
    backbone_kwargs: {width: 4}
    optimizer:
      class_path: torch.optim.SGD
      init_args: {lr: 0.05, momentum: 0.9, weight_decay: 1.0e-4}
    gamma_weight_decay: 1.0e-3
    gamma_decay_target: 1
    beta_weight_decay: 0.0
data:
  class_path: normlightning.data.Synthetic
  init_args: {input_shape: [3, 8, 8], num_classes: 3, num_train: 32, num_val: 8, num_test: 8, batch_size: 8}
norm:
  method: bgn
  num_groups: 4
  overrides:
    - {pattern: 'backbone\\.features\\.4\\.1', method: gn, num_groups: 2}
checkpoint:
  dirpath: ckpts
  monitor: null
  save_last: true
  save_top_k: 0
"""


def fit(run_dir: Path, *extra: str):
    (run_dir / "tiny.yaml").write_text(CONFIG)
    return build_cli(["fit", "--config", "tiny.yaml", "--trainer.callbacks+=probe_callbacks.ResumeProbe", *extra])


def test_resume_continues_with_injected_layers_and_optimizer_state(run_dir):
    first = fit(run_dir, "--trainer.max_epochs=2")
    last = run_dir / "ckpts" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 2 * STEPS_PER_EPOCH
    assert [r["method"] for r in ckpt[CHECKPOINT_KEY]["layers"]] == ["bgn", "bgn", "bgn", "gn"]

    second = fit(run_dir, "--trainer.max_epochs=3", f"--ckpt_path={last}")
    probe = next(c for c in second.trainer.callbacks if isinstance(c, ResumeProbe))
    assert (probe.epoch, probe.step) == (2, 2 * STEPS_PER_EPOCH)
    assert probe.types["backbone.features.0.1"] is BatchGroupNorm
    assert probe.types["backbone.features.4.1"] is GroupNorm
    assert probe.group_names == ["default", "norm_gamma", "norm_beta"]
    saved = ckpt["optimizer_states"][0]["state"]
    assert saved.keys() == probe.opt_state.keys() and len(saved) > 0
    for k in saved:
        torch.testing.assert_close(probe.opt_state[k]["momentum_buffer"], saved[k]["momentum_buffer"])
    for k, v in ckpt["state_dict"].items():
        torch.testing.assert_close(probe.weights[k], v)
    assert second.trainer.global_step == 3 * STEPS_PER_EPOCH
    del first


def test_load_from_checkpoint_rebuilds_layers_and_outputs_match(run_dir):
    cli = fit(run_dir, "--trainer.max_epochs=1")
    trained = cli.model.eval()
    reloaded = ClassificationTask.load_from_checkpoint(run_dir / "ckpts" / "last.ckpt").eval()
    assert type(reloaded.backbone.features[0][1]) is BatchGroupNorm
    assert type(reloaded.backbone.features[4][1]) is GroupNorm
    x = torch.rand(5, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), trained(x), rtol=0, atol=0)


def test_test_with_ckpt_path_installs_the_checkpoints_layers_before_the_config(run_dir):
    """The checkpoint's stored spec wins: a norm: section that cannot be built for this model (gn with
    its default 32 groups on 4/8 channels) does not stop `test --ckpt_path`, the mismatch is warned
    about, and the setup table lists the layers that actually run."""
    fit(run_dir, "--trainer.max_epochs=1")
    last = run_dir / "ckpts" / "last.ckpt"
    with pytest.warns(UserWarning, match="cannot be built for this model.*using the layers stored in the checkpoint"):
        cli = build_cli(
            [
                "test",
                "--config",
                "tiny.yaml",
                "--norm.method=gn",
                "--norm.num_groups=3",
                "--norm.overrides=[]",
                f"--ckpt_path={last}",
            ]
        )
    (injection,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "NormInjection"]
    assert [r["new"].split(" ")[0] for r in injection.summary_rows] == ["BatchGroupNorm"] * 3 + ["GroupNorm"]
    assert type(cli.model.backbone.features[0][1]) is BatchGroupNorm
    assert "test/acc1" in cli.trainer.callback_metrics


def test_empty_or_truncated_checkpoint_is_a_clear_error(run_dir):
    (run_dir / "tiny.yaml").write_text(CONFIG)
    empty = run_dir / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"--ckpt_path '.*empty\.ckpt' is empty \(0 bytes\)"):
        build_cli(["test", "--config", "tiny.yaml", f"--ckpt_path={empty}"])
    with pytest.raises(ValueError, match=r"empty\.ckpt' is empty"):
        ClassificationTask.load_from_checkpoint(empty)
    fit(run_dir, "--trainer.max_epochs=1")
    data = (run_dir / "ckpts" / "last.ckpt").read_bytes()
    truncated = run_dir / "truncated.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated\.ckpt' \(\d+ bytes\) is truncated"):
        build_cli(["test", "--config", "tiny.yaml", f"--ckpt_path={truncated}"])
    with pytest.raises(ValueError, match="is truncated"):
        ClassificationTask.load_from_checkpoint(truncated)


EXACT_CONFIG = """
seed_everything: 3
trainer:
  accelerator: cpu
  devices: 1
  max_epochs: 3
  num_sanity_val_steps: 2
  enable_progress_bar: false
  enable_model_summary: false
  logger: false
model:
  class_path: normlightning.tasks.ClassificationTask
  init_args:
    backbone: wide_resnet
    backbone_kwargs: {depth: 10, widen_factor: 1, dropout: 0.3}
    optimizer:
      class_path: torch.optim.SGD
      init_args: {lr: 0.05, momentum: 0.9}
data:
  class_path: normlightning.data.Synthetic
  init_args: {input_shape: [3, 8, 8], num_classes: 3, num_train: 40, num_val: 8, num_test: 8, batch_size: 8}
norm:
  method: bgn
  num_groups: 4
checkpoint:
  monitor: null
  save_last: true
  save_top_k: 0
"""


class KilledAfterEpoch(Exception):
    pass


def test_resume_at_an_epoch_boundary_is_bit_exact(run_dir):
    """Kill a fit right after epoch 1's checkpoint, resume it from last.ckpt: the final weights equal an
    uninterrupted run's exactly (data order, dropout and every other draw continue where they stopped)."""
    from lightning.pytorch import Callback

    class Kill(Callback):
        def on_train_epoch_start(self, trainer, pl_module):  # right after epoch 1's checkpoint
            if trainer.current_epoch == 2:
                raise KilledAfterEpoch

    (run_dir / "exact.yaml").write_text(EXACT_CONFIG)
    whole = build_cli(["fit", "--config", "exact.yaml", "--checkpoint.dirpath=whole"])
    with pytest.raises(KilledAfterEpoch):
        cli = build_cli(["--config", "exact.yaml", "--checkpoint.dirpath=killed"], run=False)
        cli.trainer.callbacks.append(Kill())
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    saved = torch.load(run_dir / "killed" / "last.ckpt", weights_only=True)
    assert saved["epoch"] == 1 and saved["global_step"] == 10
    resumed = build_cli(
        [
            "fit",
            "--config",
            "exact.yaml",
            "--checkpoint.dirpath=resumed",
            f"--ckpt_path={run_dir / 'killed' / 'last.ckpt'}",
        ]
    )
    assert resumed.trainer.global_step == whole.trainer.global_step == 15
    final_whole, final_resumed = whole.model.state_dict(), resumed.model.state_dict()
    assert final_whole.keys() == final_resumed.keys()
    for key in final_whole:
        assert torch.equal(final_whole[key], final_resumed[key]), key
