"""AdversarialTask: norm-layer modes during the attack (no side effects), metrics, smoke runs."""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from normlightning.attacks import PGDConfig, pgd_attack
from normlightning.callbacks.run_hparams import RunHyperparameters
from normlightning.cli import build_cli
from normlightning.data import Synthetic
from normlightning.norms import build_norm
from normlightning.norms.model_walk import is_norm_layer, statistics_mode
from normlightning.tasks.adversarial import AdversarialTask

SHAPE = (1, 8, 8)


def norm_factory(kind: str):
    """Native ``nn.BatchNorm2d`` or our ``bgn`` (4 groups: divides C*H*W of every layer below)."""
    if kind == "bn":
        return nn.BatchNorm2d
    return lambda channels: build_norm("bgn", channels, num_groups=4)


def tiny_net(kind: str, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    make = norm_factory(kind)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        make(4),
        nn.ReLU(),
        nn.Dropout(0.0),
        nn.Conv2d(4, 4, 3, padding=1),
        make(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 3),
    )


def buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.detach().clone() for name, b in model.named_buffers()}


def batch(seed: int = 1, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *SHAPE, generator=g)
    y = torch.arange(n) % 3
    delta0 = (torch.rand(x.shape, generator=g) * 2 - 1) * 0.1
    return x, y, delta0


ATTACK = dict(eps=0.1, step_size=0.03, steps=3)


def warm_up(model: nn.Module) -> None:
    """A few training forwards so the running statistics are not at their initial values."""
    model.train()
    with torch.no_grad():
        for s in range(3):
            model(torch.rand(6, *SHAPE, generator=torch.Generator().manual_seed(10 + s)))


# ------------------------------------------------------------------ statistics_mode
@pytest.mark.parametrize("kind", ["bn", "bgn"])
@pytest.mark.parametrize("start_training", [True, False])
def test_eval_mode_uses_running_stats_and_leaves_no_trace(kind, start_training):
    model = tiny_net(kind)
    warm_up(model)
    model.train(start_training)
    flags = [m.training for m in model.modules()]
    before = buffers(model)
    x, y, delta0 = batch()
    with statistics_mode(model, "eval"):
        assert all(not m.training for m in model.modules() if is_norm_layer(m))
        assert model[3].training == start_training  # dropout keeps the model's mode
        ours = pgd_attack(model, x, y, **ATTACK, init_delta=delta0)
    # reference: the same attack on a copy put entirely in eval mode (running statistics)
    reference = copy.deepcopy(model).eval()
    ref = pgd_attack(reference, x, y, **ATTACK, init_delta=delta0)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    for name, value in buffers(model).items():
        assert torch.equal(value, before[name]), name
    assert [m.training for m in model.modules()] == flags
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kind", ["bn", "bgn"])
@pytest.mark.parametrize("start_training", [True, False])
def test_train_frozen_uses_batch_stats_and_restores_buffers(kind, start_training):
    model = tiny_net(kind)
    warm_up(model)
    model.train(start_training)
    flags = [m.training for m in model.modules()]
    before = buffers(model)
    x, y, delta0 = batch()
    with statistics_mode(model, "train_frozen"):
        assert all(m.training for m in model.modules() if is_norm_layer(m))
        ours = pgd_attack(model, x, y, **ATTACK, init_delta=delta0)
    # reference: a copy in train mode (batch statistics); its buffers do move
    reference = copy.deepcopy(model).train()
    ref = pgd_attack(reference, x, y, **ATTACK, init_delta=delta0)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    counts = [b for n, b in reference.named_buffers() if n.endswith("num_batches_tracked")]
    assert all(int(c) == 3 + ATTACK["steps"] for c in counts)  # 3 warm-up + one per attack step
    for name, value in buffers(model).items():
        assert torch.equal(value, before[name]), name
    assert [m.training for m in model.modules()] == flags
    # eval-mode outputs unchanged: the attack really left no trace
    assert not torch.equal(ours, pgd_attack(copy.deepcopy(model).eval(), x, y, **ATTACK, init_delta=delta0))


@pytest.mark.parametrize("kind", ["bn", "bgn"])
def test_train_mode_updates_running_stats_like_plain_training_forwards(kind):
    model = tiny_net(kind)
    warm_up(model)
    model.eval()
    x, y, delta0 = batch()
    reference = copy.deepcopy(model).train()
    ref = pgd_attack(reference, x, y, **ATTACK, init_delta=delta0)
    with statistics_mode(model, "train"):
        ours = pgd_attack(model, x, y, **ATTACK, init_delta=delta0)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    after, expected = buffers(model), buffers(reference)
    for name in after:
        assert torch.equal(after[name], expected[name]), name
    means = [n for n in after if n.endswith("running_mean")]
    assert means and all(int(after[n.replace("running_mean", "num_batches_tracked")]) == 3 + 3 for n in means)
    assert all(not m.training for m in model.modules())  # eval mode restored


def test_statistics_mode_rejects_unknown_mode():
    with pytest.raises(ValueError, match="train_frozen"):
        with statistics_mode(tiny_net("bn"), "frozen"):
            pass


# ------------------------------------------------------------------ the task
def make_task(**kwargs) -> AdversarialTask:
    torch.manual_seed(0)
    defaults = dict(
        backbone="small_cnn",
        backbone_kwargs={"width": 4},
        num_classes=3,
        input_shape=SHAPE,
        input_mean=(0.5,),
        input_std=(0.25,),
        train_attack={"eps": 0.1, "step_size": 0.05, "steps": 2},
        eval_attack=PGDConfig(eps=0.1, step_size=0.05, steps=2),
    )
    defaults.update(kwargs)
    return AdversarialTask(**defaults)


def bn_counts(task: nn.Module) -> list[int]:
    return [int(m.num_batches_tracked) for m in task.modules() if isinstance(m, nn.BatchNorm2d)]


@pytest.mark.parametrize(
    ("mode", "weight", "expected"),
    [("eval", 1.0, 1), ("train_frozen", 1.0, 1), ("train", 1.0, 1 + 2), ("eval", 0.5, 2), ("eval", 0.0, 1)],
)
def test_training_step_running_stat_updates(mode, weight, expected):
    """Only the training forwards (1 per clean/adversarial batch) move BN buffers, unless mode='train'."""
    task = make_task(train_attack_norm_mode=mode, adversarial_weight=weight).train()
    x, y, _ = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        loss = task.training_step((x, y), 0)
    assert bn_counts(task) == [expected] * 4
    assert loss.requires_grad and all(p.grad is None for p in task.parameters())
    assert all(m.training for m in task.modules())


def test_training_loss_is_the_weighted_mix():
    task = make_task(
        adversarial_weight=0.25, train_attack={"eps": 0.1, "step_size": 0.05, "steps": 2, "random_start": False}
    )
    x, y, _ = batch()
    reference = copy.deepcopy(task).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = task.train().training_step((x, y), 0)
    # independent: attack with BN in eval mode (copy), then clean and adversarial forwards in train mode
    x_adv = pgd_attack(copy.deepcopy(reference).eval(), x, y, eps=0.1, step_size=0.05, steps=2, random_start=False)
    clean = F.cross_entropy(reference(x), y)
    robust = F.cross_entropy(reference(x_adv), y)
    torch.testing.assert_close(loss, 0.75 * clean + 0.25 * robust)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"adversarial_weight": 1.5}, r"adversarial_weight must be in \[0, 1\]"),
        ({"train_attack_norm_mode": "frozen"}, "train_attack_norm_mode must be one of"),
        ({"eval_attack_norm_mode": "batch"}, "eval_attack_norm_mode must be one of"),
        ({"train_attack": {"eps": -1.0}}, "PGD eps must be >= 0"),
    ],
)
def test_bad_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_task(**kwargs)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(dim=1) == y).float().mean().item()


def tiny_data() -> Synthetic:
    return Synthetic(
        input_shape=SHAPE,
        num_classes=3,
        num_train=32,
        num_val=12,
        num_test=12,
        batch_size=8,
        eval_batch_size=12,
        noise_std=0.3,
    )


def quiet_trainer(**kwargs) -> L.Trainer:
    return L.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kwargs
    )


def test_fit_validate_test_logs_clean_and_robust(run_dir, caplog):
    data = tiny_data()
    task = make_task(train_attack_norm_mode="train_frozen", adversarial_weight=0.5)
    trainer = quiet_trainer(max_epochs=1)  # default inference_mode=True: the attack enables grad itself
    with caplog.at_level(logging.INFO):
        trainer.fit(task, data)
        logged = dict(trainer.logged_metrics)
        (result,) = trainer.test(task, data, verbose=False)
    assert "'train_frozen' mode" in caplog.text and "PGD-2" in caplog.text
    assert task.hparams["train_attack_norm_mode"] == "train_frozen"
    assert task.hparams["train_attack"] == {"eps": 0.1, "step_size": 0.05, "steps": 2, "random_start": True}
    for key in (
        "val/acc1_clean",
        "val/acc1_robust",
        "val/loss_clean",
        "val/loss_robust",
        "train/acc1_clean",
        "train/acc1_robust",
        "train/loss_epoch",
    ):
        assert key in logged, key
    # independent recomputation of the test numbers (one batch of 12, eval mode, the task's seed rule)
    x, y = next(iter(data.test_dataloader()))
    model = copy.deepcopy(task).eval()
    g = torch.Generator().manual_seed(0 + 1_000_003 * 2 + 0)
    x_adv = pgd_attack(model, x, y, eps=0.1, step_size=0.05, steps=2, generator=g)
    with torch.no_grad():
        assert result["test/acc1_clean"] == pytest.approx(accuracy(model(x), y))
        assert result["test/acc1_robust"] == pytest.approx(accuracy(model(x_adv), y))
        assert result["test/loss_robust"] == pytest.approx(F.cross_entropy(model(x_adv), y).item(), rel=1e-5)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in task.parameters())


def test_validation_with_and_without_inference_mode_agree(run_dir):
    data = tiny_data()
    task = make_task()
    before = buffers(task)
    results = [quiet_trainer(inference_mode=mode).validate(task, data, verbose=False)[0] for mode in (True, False)]
    assert results[0] == results[1]
    assert set(results[0]) >= {"val/acc1_clean", "val/acc1_robust", "val/loss_clean", "val/loss_robust"}
    for name, value in buffers(task).items():  # eval-mode attacks in validation leave the buffers alone
        assert torch.equal(value, before[name]), name


def test_cli_fit_with_tiny_config(run_dir: Path):
    config = {
        "seed_everything": 0,
        "trainer": {"fast_dev_run": True, "enable_progress_bar": False},
        "model": {
            "class_path": "normlightning.tasks.adversarial.AdversarialTask",
            "init_args": {
                "backbone": "small_cnn",
                "backbone_kwargs": {"width": 4},
                "train_attack": {"eps": 0.1, "step_size": 0.05, "steps": 1},
                "eval_attack": {"eps": 0.1, "step_size": 0.05, "steps": 2},
                "train_attack_norm_mode": "train",
                "adversarial_weight": 1.0,
                "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.01}},
            },
        },
        "data": {
            "class_path": "normlightning.data.Synthetic",
            "init_args": {
                "input_shape": [1, 8, 8],
                "num_classes": 3,
                "num_train": 16,
                "num_val": 8,
                "num_test": 8,
                "batch_size": 8,
            },
        },
    }
    path = run_dir / "adv.yaml"
    path.write_text(yaml.safe_dump(config))
    fit = build_cli(["fit", "--config", str(path)])
    # no checkpoint.monitor in the config: the checkpoint and the HParams metric follow the task's monitor
    assert fit.trainer.checkpoint_callback.monitor == AdversarialTask.monitor == "val/acc1_robust"
    (hparams,) = [c for c in fit.trainer.callbacks if isinstance(c, RunHyperparameters)]
    assert hparams.tag == "hp/best_val/acc1_robust"
    cli = build_cli(["test", "--config", str(path)])
    metrics = cli.trainer.callback_metrics
    assert {"test/acc1_clean", "test/acc1_robust", "test/loss_clean", "test/loss_robust"} <= set(metrics)
    assert cli.model.train_attack == PGDConfig(eps=0.1, step_size=0.05, steps=1)
    assert cli.model.eval_attack.steps == 2 and cli.model.train_attack_norm_mode == "train"


CONFIGS = Path(__file__).resolve().parents[2] / "configs"
#: config suffix -> (method, num_groups): the paper's GN with G = 128 runs as ``gnflat`` (docs/methods.md, gnflat)
PAPER_NORMS = {
    "bn": ("bn", None),
    "in": ("in", None),
    "ln": ("ln", None),
    "gn": ("gnflat", 128),
    "pn": ("pn", None),
    "bgn": ("bgn", 128),
}


@pytest.mark.parametrize("method", sorted(PAPER_NORMS))
def test_paper_configs(method, run_dir):
    """configs/cifar10_pgd_*.yaml carry the BGN paper's Table 5 settings."""
    from normlightning.callbacks.norm_injection import NormInjection

    cli = build_cli(["--config", str(CONFIGS / f"cifar10_pgd_{method}.yaml")], run=False)
    task = cli.model
    assert isinstance(task, AdversarialTask)
    paper_pgd = PGDConfig(eps=0.0157, step_size=2 / 255, steps=4, random_start=True)
    assert task.train_attack == paper_pgd and task.eval_attack == paper_pgd
    assert task.adversarial_weight == 1.0
    assert task.hparams["backbone"] == "wide_resnet"
    assert task.hparams["backbone_kwargs"] == {"depth": 10, "widen_factor": 2, "dropout": 0.0}
    assert task.num_classes == 10 and tuple(task.hparams["input_shape"]) == (3, 32, 32)
    optimizer = task.optimizer_factory([nn.Parameter(torch.zeros(1))])
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["lr"] == 0.01
    assert cli.trainer.max_epochs == 200
    (injection,) = [c for c in cli.trainer.callbacks if isinstance(c, NormInjection)]
    assert (injection.rules.method, injection.rules.num_groups) == PAPER_NORMS[method]
