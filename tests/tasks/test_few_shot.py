"""FewShotTask: batch-statistics (transductive) mode, the LR schedule, and training + episodic testing via the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from normlightning.cli import build_cli
from normlightning.models import register_backbone
from normlightning.norms import build_norm
from normlightning.norms.model_walk import statistics_mode
from normlightning.tasks.few_shot import FewShotTask
from normlightning.training.piecewise_lr import PiecewiseConstantLR

# ---------------------------------------------------------------- batch statistics mode


def _stateful_layers() -> nn.Sequential:
    """Native BN, our bn, our bgn (4 groups of C*H*W = 3*4*4) with non-trivial running statistics, in eval mode."""
    model = nn.Sequential(nn.BatchNorm2d(3), build_norm("bn", 3), build_norm("bgn", 3, num_groups=4))
    torch.manual_seed(0)
    model.train()
    for _ in range(3):  # fill running statistics
        model(torch.randn(6, 3, 4, 4) * 2 + 1)
    with torch.no_grad():
        for layer in model:
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-0.5, 0.5)
    return model.eval()


def _batch_norm_by_hand(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + layer.eps) * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)


def test_transductive_statistics_uses_batch_moments_and_restores_everything() -> None:
    model = _stateful_layers()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 3, 4, 4) * 3 - 2
    native, ours = model[0], model[1]
    eval_out = native(x)
    with torch.no_grad(), statistics_mode(model, "train_frozen", sync=False) as switched:
        assert switched == 3
        torch.testing.assert_close(native(x), _batch_norm_by_hand(x, native))
        torch.testing.assert_close(ours(x), _batch_norm_by_hand(x, ours))
        model(x)
        model(x)
    after = model.state_dict()
    for key, value in before.items():  # running stats, num_batches_tracked, bgn's spatial record
        assert torch.equal(after[key], value), key
    assert not any(m.training for m in model.modules())
    assert all("forward" not in vars(m) for m in model.modules())
    running = (x - native.running_mean.view(1, -1, 1, 1)) / torch.sqrt(
        native.running_var.view(1, -1, 1, 1) + native.eps
    )
    torch.testing.assert_close(native(x), running * native.weight.view(1, -1, 1, 1) + native.bias.view(1, -1, 1, 1))
    torch.testing.assert_close(native(x), eval_out)


def test_transductive_statistics_leaves_dropout_in_eval_and_restores_after_error() -> None:
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Dropout(0.5)).eval()
    with pytest.raises(RuntimeError, match="boom"), statistics_mode(model, "train_frozen", sync=False):
        assert not model[1].training
        raise RuntimeError("boom")
    assert "forward" not in vars(model[0])
    x = torch.randn(3, 4)
    torch.testing.assert_close(model(x), x / math.sqrt(1 + model[0].eps))  # fresh running stats: mean 0, var 1


# ---------------------------------------------------------------- LR schedule


def test_piecewise_constant_lr_gives_the_paper_values() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = PiecewiseConstantLR(opt, milestones=[20, 40, 50], factors=[0.06, 0.012, 0.0024])
    lrs = []
    for _ in range(60):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.1] * 20 + [0.006] * 20 + [0.0012] * 10 + [0.00024] * 10
    assert lrs == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="one factor per milestone"):
        PiecewiseConstantLR(opt, milestones=[1, 2], factors=[0.1])
    with pytest.raises(ValueError, match="increasing"):
        PiecewiseConstantLR(opt, milestones=[2, 1], factors=[0.1, 0.01])


# ---------------------------------------------------------------- task construction


def test_task_replaces_head_with_cosine_classifier_and_checks_settings() -> None:
    task = FewShotTask(backbone="small_cnn", backbone_kwargs={"width": 4}, num_classes=3, input_shape=(1, 8, 8))
    head = task.backbone.classifier
    assert type(head).__name__ == "CosineClassifier" and head.weight.shape == (3, 8)
    assert float(head.scale) == 10.0 and isinstance(head.scale, nn.Parameter)
    x = torch.rand(2, 1, 8, 8)
    f = task.embed(x)
    torch.testing.assert_close(task(x), 10.0 * F.normalize(f, dim=1) @ F.normalize(head.weight, dim=1).T)
    with pytest.raises(ValueError, match="test_norm_statistics"):
        FewShotTask(backbone="small_cnn", num_classes=3, input_shape=(1, 8, 8), test_norm_statistics="train")
    register_backbone(
        "fewshot_test_plain", lambda num_classes, input_shape: nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))
    )
    with pytest.raises(TypeError, match="features"):
        FewShotTask(backbone="fewshot_test_plain", num_classes=3, input_shape=(1, 8, 8))
    with pytest.raises(TypeError, match="episodes"):
        task.validation_step((torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)), 0)


# ---------------------------------------------------------------- end to end through the CLI

CONFIG = {
    "seed_everything": 0,
    "trainer": {
        "max_epochs": 2,
        "accelerator": "cpu",
        "devices": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": 1,
        "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
    },
    "model": {
        "class_path": "normlightning.tasks.few_shot.FewShotTask",
        "init_args": {
            "backbone": "small_cnn",
            "backbone_kwargs": {"width": 8},
            "optimizer": {
                "class_path": "torch.optim.SGD",
                "init_args": {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5.0e-4},
            },
            "lr_scheduler": {
                "class_path": "normlightning.training.piecewise_lr.PiecewiseConstantLR",
                "init_args": {"milestones": [1], "factors": [0.1]},
            },
        },
    },
    "data": {
        "class_path": "normlightning.data.few_shot.ClassSplitFewShotDataModule",
        "init_args": {
            "source": {
                "class_path": "normlightning.data.Synthetic",
                "init_args": {
                    "input_shape": [3, 12, 12],
                    "num_classes": 10,
                    "num_train": 200,
                    "num_val": 50,
                    "num_test": 50,
                },
            },
            "base_classes": [0, 1, 2, 3],
            "val_classes": [4, 5, 6],
            "novel_classes": [7, 8, 9],
            "n_way": 3,
            "test_shots": [1, 2],
            "q_query": 3,
            "test_episodes": 5,
            "val_shot": 1,
            "val_episodes": 3,
            "batch_size": 32,
        },
    },
}


def _episode_accuracy_by_hand(task: FewShotTask, batch: dict) -> float:
    """Imprint by the formula (normalized mean of normalized support embeddings) and score the queries."""
    n, k, q = batch["n_way"], batch["k_shot"], batch["q_query"]
    with torch.no_grad():
        mean, std = task.normalize.mean.view(1, -1, 1, 1), task.normalize.std.view(1, -1, 1, 1)
        feats = task.backbone.features((batch["image"] - mean) / std)
    feats = feats / feats.norm(dim=1, keepdim=True)
    support, query = feats[: n * k].view(n, k, -1), feats[n * k :]
    weights = support.mean(dim=1)
    weights = weights / weights.norm(dim=1, keepdim=True)
    predicted = (query @ weights.T).argmax(dim=1)
    truth = torch.arange(n).repeat_interleave(q)
    assert batch["label"][: n * k].view(n, k).unique(dim=1).shape == (n, 1)  # support grouped by class
    return float((predicted == truth).float().mean())


def test_fit_then_test_through_cli(run_dir: Path) -> None:
    config = run_dir / "fewshot.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    fit = build_cli(["fit", "--config", str(config)])
    assert {"train/loss", "train/acc1", "val/acc1", "val/loss"} <= set(fit.trainer.callback_metrics)
    last = next(run_dir.glob("runs/**/last.ckpt"))

    test = build_cli(["test", "--config", str(config), "--ckpt_path", str(last)])
    task, metrics = test.model, test.trainer.callback_metrics
    state = {k: v.clone() for k, v in task.state_dict().items()}
    for k in (1, 2):
        accs = task.test_episode_accuracies[k].double().numpy()
        assert len(accs) == 5 and np.all((accs >= 0) & (accs <= 1))
        assert float(metrics[f"test/acc_{k}shot"]) == pytest.approx(accs.mean(), abs=1e-6)
        ci = 1.96 * np.std(accs, ddof=1) / math.sqrt(len(accs))
        assert float(metrics[f"test/ci95_{k}shot"]) == pytest.approx(ci, abs=1e-6)

    # episode 0 of the 2-shot set, recomputed by hand (eval mode: running statistics)
    task.eval()
    loader = test.datamodule.test_dataloader()[1]
    first = next(iter(loader))
    assert first["episode"] == 0 and first["image"].shape == (3 * 2 + 3 * 3, 3, 12, 12)
    assert _episode_accuracy_by_hand(task, first) == pytest.approx(float(task.test_episode_accuracies[2][0]))

    # the same episodes on every pass (seeded episode set)
    second = next(iter(loader))
    assert torch.equal(second["label"], first["label"]) and torch.equal(second["image"], first["image"])

    # transductive statistics: running buffers untouched by testing
    trans = build_cli(
        [
            "test",
            "--config",
            str(config),
            "--ckpt_path",
            str(last),
            "--model.init_args.test_norm_statistics=transductive",
        ]
    )
    assert trans.model.test_norm_statistics == "transductive"  # the command line wins over the checkpoint
    assert "test_norm_statistics" not in trans.model.hparams
    for key, value in trans.model.state_dict().items():
        assert torch.equal(value.cpu(), state[key].cpu()), key
    assert len(trans.model.test_episode_accuracies[1]) == 5


def test_resnet12_episode_in_both_norm_modes() -> None:
    """The paper's backbone (tiny widths): eval and transductive episodes; the latter leaves every buffer as it was."""
    torch.manual_seed(0)
    task = FewShotTask(
        backbone="resnet12", backbone_kwargs={"widths": [4, 4, 4, 8]}, num_classes=4, input_shape=(3, 16, 16)
    )
    task.train()
    task(torch.rand(8, 3, 16, 16))  # some running statistics and a DropBlock step
    task.eval()
    batch = {
        "image": torch.rand(6, 3, 16, 16),
        "label": torch.tensor([5, 7, 9, 5, 7, 9]),
        "n_way": 3,
        "k_shot": 1,
        "q_query": 1,
    }
    before = {k: v.clone() for k, v in task.state_dict().items()}
    with torch.no_grad():
        eval_logits, query_y = task.episode_logits(batch)
        task.test_norm_statistics = "transductive"
        trans_logits, _ = task.episode_logits(batch)
    assert eval_logits.shape == trans_logits.shape == (3, 3) and torch.equal(query_y, torch.arange(3))
    assert not torch.allclose(eval_logits, trans_logits)  # batch statistics differ from running ones
    assert all(torch.equal(v, before[k]) for k, v in task.state_dict().items())
    assert not any(m.training for m in task.modules())


def test_gather_episodes_pads_uneven_shares(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes with 3 and 2 episodes (7 episodes would give 4/3; here episodes 0,2,4 and 1,3).

    ``all_gather`` is replaced by a stand-in that stacks this process's tensor with the other
    process's (as torch.distributed would), so the padding and filtering logic is checked on CPU.
    """
    from types import SimpleNamespace

    task = FewShotTask(backbone="small_cnn", backbone_kwargs={"width": 4}, num_classes=3, input_shape=(1, 8, 8))
    task._trainer = SimpleNamespace(world_size=2)
    other = iter([torch.tensor(2), torch.tensor([0.25, 0.75, 0.0]), torch.tensor([1, 3, -1])])  # rank 1, padded
    monkeypatch.setattr(task, "all_gather", lambda t: torch.stack([t, next(other)]))
    accs, ids = task.gather_episodes(torch.tensor([1.0, 0.5, 0.0]), torch.tensor([0, 2, 4]))
    assert ids.tolist() == [0, 1, 2, 3, 4]
    assert accs.tolist() == [1.0, 0.25, 0.5, 0.75, 0.0]
