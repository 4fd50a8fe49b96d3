"""Training-time mechanisms checked through real ``Trainer`` steps, against hand-computed updates.

Each test fits a tiny task for 1-3 steps on CPU and compares the trained weights (and buffers)
with a reference copy of the task updated by the formula written out in the test: plain SGD
without momentum, ``p <- p - lr * (g + ...)`` with ``g`` the data gradient of the same batch.
The unit tests of the helpers (``test_norm_weight_decay.py``, ``test_adversarial.py``) do not
show that training calls them; these do.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from normlightning.attacks import pgd_attack
from normlightning.norms import BatchNorm
from normlightning.tasks.adversarial import AdversarialTask
from normlightning.tasks.base import BaseTask
from normlightning.training.piecewise_lr import PiecewiseConstantLR

GAMMA0 = [3.0, 0.5, 1.0, 2.0]
BETA0 = [0.3, -0.2, 0.1, 0.0]


class TinyTask(BaseTask):
    """``Linear(3, 4) -> BatchNorm(4)``, loss ``mean((f(x) - t)^2)``; gamma starts at :data:`GAMMA0`."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 4), BatchNorm(4))
        with torch.no_grad():
            self.net[1].weight.copy_(torch.tensor(GAMMA0))
            self.net[1].bias.copy_(torch.tensor(BETA0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def data_loss(self, batch) -> torch.Tensor:
        x, t = batch
        return (self(x) - t).pow(2).mean()

    def training_step(self, batch, batch_idx):
        return self.data_loss(batch)


class TinyData(LightningDataModule):
    """8 fixed examples ``(x (3,), t (4,))``, not shuffled: step ``k`` sees batch ``k mod (8 / batch_size)``."""

    def __init__(self, batch_size: int = 4) -> None:
        super().__init__()
        self.batch_size = batch_size
        g = torch.Generator().manual_seed(1)
        self.x, self.t = torch.randn(8, 3, generator=g), torch.randn(8, 4, generator=g)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.t), batch_size=self.batch_size, shuffle=False)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = slice((step % (len(self.x) // self.batch_size)) * self.batch_size, None)
        return self.x[rows][: self.batch_size], self.t[rows][: self.batch_size]


def fit(task, data, steps: int, tmp_path, **trainer_kwargs) -> Trainer:
    trainer = Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        **trainer_kwargs,
    )
    trainer.fit(task, data)
    assert trainer.global_step == steps
    return trainer


Update = Callable[[str, torch.Tensor, torch.Tensor, int], torch.Tensor]


def reference_fit(task: BaseTask, data: TinyData, steps: int, update: Update) -> dict[str, torch.Tensor]:
    """Train ``task`` (a copy taken before the fit) by hand: per step the data gradient ``g`` of the
    step's batch, then ``p <- update(name, p, g, step)`` for every parameter. Returns the state dict."""
    task.train()
    for step in range(steps):
        params = dict(task.named_parameters())
        grads = torch.autograd.grad(task.data_loss(data.batch(step)), list(params.values()))
        with torch.no_grad():
            for (name, p), g in zip(params.items(), grads):
                p.copy_(update(name, p.detach().clone(), g, step))
    return task.state_dict()


def assert_same_state(task: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = task.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, msg=key)


def sgd(lr: float, **kwargs):
    return partial(torch.optim.SGD, lr=lr, momentum=0.0, **kwargs)


# ------------------------------------------------------------------ norm weight decay
def test_decay_toward_one_after_one_trainer_step(tmp_path):
    """gamma <- gamma - lr (g + wd_gamma (gamma - 1)): gamma_0 = 3 moves by -lr * wd_gamma * (3 - 1) = -0.1
    more than the data gradient alone would move it."""
    lr, wd, wd_gamma = 0.1, 0.01, 0.5
    task = TinyTask(optimizer=sgd(lr, weight_decay=wd), gamma_weight_decay=wd_gamma, gamma_decay_target=1)
    data = TinyData()

    def update(name, p, g, step):
        if name == "net.1.weight":
            return p - lr * (g + wd_gamma * (p - 1.0))
        return p - lr * (g + wd * p)  # beta_weight_decay=None: beta keeps the optimizer's decay

    expected = reference_fit(copy.deepcopy(task), data, 1, update)
    no_pull = copy.deepcopy(task)
    reference_fit(no_pull, data, 1, lambda name, p, g, step: p - lr * (g + (0.0 if name == "net.1.weight" else wd) * p))
    fit(task, data, 1, tmp_path)
    assert_same_state(task, expected)
    # gamma_0 = 3: the pull toward 1 is visible (and is not a decay toward 0, which would give -0.15)
    shift = task.net[1].weight.detach() - no_pull.net[1].weight.detach()
    torch.testing.assert_close(shift, -lr * wd_gamma * (torch.tensor(GAMMA0) - 1.0))


def test_norm_weight_decay_groups_after_two_trainer_steps(tmp_path):
    """gamma decays toward 0 with its own wd, beta with its own, the Linear weights with the optimizer's."""
    lr, wd, wd_gamma, wd_beta = 0.1, 0.01, 0.3, 0.2
    task = TinyTask(optimizer=sgd(lr, weight_decay=wd), gamma_weight_decay=wd_gamma, beta_weight_decay=wd_beta)
    data = TinyData()
    decay = {"net.1.weight": wd_gamma, "net.1.bias": wd_beta, "net.0.weight": wd, "net.0.bias": wd}
    expected = reference_fit(copy.deepcopy(task), data, 2, lambda name, p, g, step: p - lr * (g + decay[name] * p))
    trainer = fit(task, data, 2, tmp_path)
    assert [g["name"] for g in trainer.optimizers[0].param_groups] == ["default", "norm_gamma", "norm_beta"]
    assert_same_state(task, expected)


# ------------------------------------------------------------------ gradient clipping
@pytest.mark.parametrize(("algorithm", "clip"), [("norm", 0.05), ("value", 0.02)])
def test_gradient_clipping_leaves_the_decay_toward_one_unclipped(algorithm, clip, tmp_path):
    """Lightning clips the data gradient only; the pull toward 1 is added after clipping, as the
    optimizer's own weight decay is (it acts inside ``optimizer.step``):
    ``p <- p - lr * (clip(g) + wd_gamma (gamma - 1))`` and ``p <- p - lr * (clip(g) + wd * p)``."""
    lr, wd, wd_gamma = 0.1, 0.01, 0.5
    task = TinyTask(optimizer=sgd(lr, weight_decay=wd), gamma_weight_decay=wd_gamma, gamma_decay_target=1)
    data = TinyData()
    ref = copy.deepcopy(task).train()
    params = dict(ref.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(ref.data_loss(data.batch(0)), list(params.values()))))
    if algorithm == "norm":  # torch.nn.utils.clip_grad_norm_: g * min(1, clip / (||g||_2 + 1e-6)) over all grads
        total = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
        assert total > 2 * clip  # the clipping is active
        clipped = {n: g * (clip / (total + 1e-6)) for n, g in grads.items()}
    else:
        assert max(g.abs().max() for g in grads.values()) > 2 * clip
        clipped = {n: g.clamp(-clip, clip) for n, g in grads.items()}
    with torch.no_grad():
        for name, p in params.items():
            pull = wd_gamma * (p - 1.0) if name == "net.1.weight" else wd * p
            p.sub_(lr * (clipped[name] + pull))
    fit(task, data, 1, tmp_path, gradient_clip_val=clip, gradient_clip_algorithm=algorithm)
    assert_same_state(task, ref.state_dict())


class ManualTask(TinyTask):
    """:class:`TinyTask` with manual optimization: backward, value clipping, then ``optimizer.step()``."""

    def __init__(self, clip: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.clip = clip

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(self.data_loss(batch))
        self.clip_gradients(optimizer, gradient_clip_val=self.clip, gradient_clip_algorithm="value")
        optimizer.step()


def test_manual_optimization_decays_toward_one_after_the_tasks_clipping(tmp_path):
    lr, clip, wd_gamma = 0.1, 0.02, 0.5
    task = ManualTask(clip, optimizer=sgd(lr), gamma_weight_decay=wd_gamma, gamma_decay_target=1)
    data = TinyData()

    def update(name, p, g, step):
        return p - lr * (g.clamp(-clip, clip) + (wd_gamma * (p - 1.0) if name == "net.1.weight" else 0.0))

    expected = reference_fit(copy.deepcopy(task), data, 2, update)
    fit(task, data, 2, tmp_path)
    assert_same_state(task, expected)


# ------------------------------------------------------------------ learning rates
def test_linear_lr_scaling_sets_the_step_size(tmp_path):
    """lr_base_batch_size=16 with batch 4 on one process: every step uses 0.4 * 4 * 1 / 16 = 0.1."""
    base_lr, scaled = 0.4, 0.4 * 4 * 1 / 16
    task = TinyTask(optimizer=sgd(base_lr), lr_base_batch_size=16)
    data = TinyData(batch_size=4)
    expected = reference_fit(copy.deepcopy(task), data, 2, lambda name, p, g, step: p - scaled * g)
    fit(task, data, 2, tmp_path)
    assert_same_state(task, expected)


def test_piecewise_lr_per_step_after_three_trainer_steps(tmp_path):
    """Milestones (1, 2), factors (0.5, 0.1), interval step: the steps use lr 0.2, 0.1, 0.02."""
    schedule = partial(PiecewiseConstantLR, milestones=[1, 2], factors=[0.5, 0.1])
    task = TinyTask(optimizer=sgd(0.2), lr_scheduler=schedule, lr_scheduler_interval="step")
    data = TinyData()
    lrs = [0.2, 0.2 * 0.5, 0.2 * 0.1]
    expected = reference_fit(copy.deepcopy(task), data, 3, lambda name, p, g, step: p - lrs[step] * g)
    fit(task, data, 3, tmp_path)
    assert_same_state(task, expected)


# ------------------------------------------------------------------ attack-time norm modes
SHAPE = (1, 8, 8)
ATTACK = {"eps": 0.1, "step_size": 0.05, "steps": 2, "random_start": False}


@pytest.mark.parametrize("mode", ["eval", "train", "train_frozen"])
def test_attack_norm_mode_in_a_trainer_step(mode, tmp_path):
    """One adversarial step (weight 1): PGD on a copy of the model whose BN layers are in ``mode``
    (``train``: the model itself, so the attack's forwards move its running statistics), then
    ``p <- p - lr * grad CE(f(x_adv), y)``; weights and running statistics compared."""
    lr = 0.1
    torch.manual_seed(0)
    task = AdversarialTask(
        backbone="small_cnn",
        backbone_kwargs={"width": 4},
        num_classes=3,
        input_shape=SHAPE,
        input_mean=(0.5,),
        input_std=(0.25,),
        train_attack=ATTACK,
        eval_attack=ATTACK,
        train_attack_norm_mode=mode,
        adversarial_weight=1.0,
        optimizer=sgd(lr),
    )
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(8, *SHAPE, generator=g), torch.arange(8) % 3
    ref = copy.deepcopy(task).train()
    attacker = {"eval": copy.deepcopy(ref).eval(), "train": ref, "train_frozen": copy.deepcopy(ref).train()}[mode]
    x_adv = pgd_attack(attacker, x, y, eps=0.1, step_size=0.05, steps=2, random_start=False)
    params = dict(ref.named_parameters())
    grads = torch.autograd.grad(F.cross_entropy(ref(x_adv), y), list(params.values()))
    with torch.no_grad():
        for p, grad in zip(params.values(), grads):
            p.sub_(lr * grad)
    trainer = Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(task, DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False))
    assert_same_state(task, ref.state_dict())
    counts = {k: int(v) for k, v in task.state_dict().items() if k.endswith("num_batches_tracked")}
    assert counts and set(counts.values()) == {1 + 2 if mode == "train" else 1}  # + the attack's 2 forwards
