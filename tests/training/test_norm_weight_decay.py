"""Weight decay on norm gamma / beta ("Four Things" §3) and linear LR scaling, against hand computations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normlightning.norms import BatchNorm
from normlightning.training.lr_scaling import linear_lr_factor, scale_learning_rates
from normlightning.training.norm_weight_decay import add_decay_toward_one, norm_affine_parameters, norm_parameter_groups


def model_with_norms() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), BatchNorm(3), nn.Linear(3, 2), nn.LayerNorm(2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([2.0, 0.5, 1.0]))
        model[1].bias.copy_(torch.tensor([0.3, -0.2, 0.1]))
    return model


def one_sgd_step(model, groups, lr=0.1, default_wd=0.01):
    opt = torch.optim.SGD(groups, lr=lr, weight_decay=default_wd)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(1))
    model(x).pow(2).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    add_decay_toward_one(opt)
    opt.step()
    return before, grads, dict(model.named_parameters())


def test_groups_split_gamma_beta_and_rest():
    model = model_with_norms()
    gammas, betas = norm_affine_parameters(model)
    assert [id(p) for p in gammas] == [id(model[1].weight), id(model[3].weight)]
    assert [id(p) for p in betas] == [id(model[1].bias), id(model[3].bias)]
    groups = norm_parameter_groups(model, gamma_weight_decay=0.0, beta_weight_decay=None)
    assert [g["name"] for g in groups] == ["default", "norm_gamma"]
    assert groups[1]["weight_decay"] == 0.0
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.parameters()} - {id(p) for p in gammas}


def test_gamma_toward_one_matches_hand_computed_sgd_step():
    lr, wd_gamma, wd_default = 0.1, 0.5, 0.01
    model = model_with_norms()
    groups = norm_parameter_groups(model, gamma_weight_decay=wd_gamma, beta_weight_decay=0.0, gamma_decay_target=1)
    before, g, after = one_sgd_step(model, groups, lr, wd_default)
    for name in ("1.weight", "3.weight"):  # gamma: pulled toward 1, nothing toward 0
        expected = before[name] - lr * (g[name] + wd_gamma * (before[name] - 1.0))
        torch.testing.assert_close(after[name], expected)
    for name in ("1.bias", "3.bias"):  # beta: no decay at all
        torch.testing.assert_close(after[name], before[name] - lr * g[name])
    for name in ("0.weight", "0.bias", "2.weight"):  # the rest: the optimizer's default decay
        torch.testing.assert_close(after[name], before[name] - lr * (g[name] + wd_default * before[name]))


def test_gamma_toward_zero_is_the_optimizer_decay():
    lr, wd_gamma = 0.1, 0.5
    model = model_with_norms()
    groups = norm_parameter_groups(model, gamma_weight_decay=wd_gamma, beta_weight_decay=0.2, gamma_decay_target=0)
    before, g, after = one_sgd_step(model, groups, lr)
    torch.testing.assert_close(
        after["1.weight"], before["1.weight"] - lr * (g["1.weight"] + wd_gamma * before["1.weight"])
    )
    torch.testing.assert_close(after["1.bias"], before["1.bias"] - lr * (g["1.bias"] + 0.2 * before["1.bias"]))


def test_decay_toward_one_equals_gradient_of_the_penalty():
    """grad += wd (gamma - 1) is the gradient of wd/2 ||gamma - 1||^2 (the authors' l2_loss form)."""
    gamma = torch.tensor([2.0, 0.5, 1.0], requires_grad=True)
    (0.5 * 0.3 * (gamma - 1).pow(2).sum()).backward()
    expected = gamma.grad.clone()
    gamma.grad = torch.zeros(3)
    opt = torch.optim.SGD([{"params": [gamma], "decay_toward_one": 0.3, "weight_decay": 0.0}], lr=1.0)
    add_decay_toward_one(opt)
    torch.testing.assert_close(gamma.grad, expected)


def test_bad_weight_decay_settings():
    model = model_with_norms()
    with pytest.raises(ValueError, match="gamma_decay_target"):
        norm_parameter_groups(model, gamma_weight_decay=0.1, beta_weight_decay=None, gamma_decay_target=2)
    with pytest.raises(ValueError, match="needs gamma_weight_decay"):
        norm_parameter_groups(model, gamma_weight_decay=None, beta_weight_decay=None, gamma_decay_target=1)
    with pytest.raises(ValueError, match="beta_weight_decay"):
        norm_parameter_groups(model, gamma_weight_decay=None, beta_weight_decay=-1.0)


def test_linear_lr_scaling():
    assert linear_lr_factor(32, 8, 256) == 1.0  # Goyal et al.: 8 GPUs x 32 = 256
    assert linear_lr_factor(2, 8, 256) == 16 / 256
    opt = torch.optim.SGD(
        [{"params": [nn.Parameter(torch.zeros(1))], "lr": 0.2}, {"params": [nn.Parameter(torch.zeros(1))]}], lr=0.1
    )
    assert scale_learning_rates(opt, linear_lr_factor(64, 2, 256)) == pytest.approx([0.1, 0.05])
    with pytest.raises(ValueError, match="world_size"):
        linear_lr_factor(32, 0, 256)


def test_task_scales_lr_before_the_scheduler(tmp_path, lightning_info):
    from functools import partial

    from lightning.pytorch import Trainer

    from normlightning.data import Synthetic
    from normlightning.tasks import ClassificationTask

    data = Synthetic(input_shape=(3, 8, 8), num_classes=3, num_train=16, num_val=8, num_test=8, batch_size=8)
    task = ClassificationTask(
        backbone="small_cnn",
        backbone_kwargs={"width": 4},
        num_classes=3,
        input_shape=(3, 8, 8),
        optimizer=partial(torch.optim.SGD, lr=0.4, momentum=0.9),
        lr_scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=10),
        gamma_weight_decay=0.0,
        lr_base_batch_size=256,
    )
    trainer = Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(task, data)
    # 0.4 * 8 * 1 / 256 = 0.0125 for both groups (default, norm_gamma); the scheduler starts from it
    assert trainer.lr_scheduler_configs[0].scheduler.base_lrs == pytest.approx([0.0125, 0.0125])
    assert [g["name"] for g in trainer.optimizers[0].param_groups] == ["default", "norm_gamma"]
    assert "linear LR scaling: x0.03125 = 8 x 1 / 256 -> lr [0.0125, 0.0125]" in lightning_info


# Mutation-testing survivors (docs/mutation.md): the settings each error names, the values each check refuses,
# frozen / shared / missing affine parameters, the default decay target and a model with only norm parameters.


@pytest.mark.parametrize(
    ("args", "setting"),
    [((0, 1, 256), "batch_size"), ((32, 0, 256), "world_size"), ((32, 1, 0), "lr_base_batch_size")],
)
def test_linear_lr_factor_names_the_bad_setting(args, setting):
    with pytest.raises(ValueError, match=rf"^linear LR scaling: {setting} must be a positive int"):
        linear_lr_factor(*args)


@pytest.mark.parametrize("bad", [2.0, True])
def test_linear_lr_factor_refuses_floats_and_bools(bad):
    """An int-valued float and a bool are not batch sizes (bool is an int subclass)."""
    with pytest.raises(ValueError, match=r"^linear LR scaling: batch_size must be a positive int"):
        linear_lr_factor(bad, 1, 256)


@pytest.mark.parametrize("factor", [0.0, -0.5])
def test_scale_learning_rates_refuses_a_factor_that_is_not_positive(factor):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=r"LR scale factor must be > 0"):
        scale_learning_rates(opt, factor)


def test_scale_learning_rates_scales_the_schedulers_initial_lr():
    """A scheduler made before scaling stores ``initial_lr`` per group; it is scaled with ``lr`` (0.2 * 0.25)."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.2)
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    keys = set(opt.param_groups[0])
    assert scale_learning_rates(opt, 0.25) == pytest.approx([0.05])
    assert opt.param_groups[0]["initial_lr"] == pytest.approx(0.05)
    assert set(opt.param_groups[0]) == keys


@pytest.mark.parametrize("setting", ["gamma_weight_decay", "beta_weight_decay"])
@pytest.mark.parametrize("bad", [-1.0, True, "0.1"])
def test_bad_decay_value_names_its_setting(setting, bad):
    kwargs = {"gamma_weight_decay": None, "beta_weight_decay": None, setting: bad}
    with pytest.raises(ValueError, match=rf"^{setting} must be a float >= 0 or null, got"):
        norm_parameter_groups(model_with_norms(), **kwargs)


def test_decay_toward_one_without_strength_names_the_setting():
    with pytest.raises(ValueError, match=r"^gamma_decay_target=1 needs gamma_weight_decay"):
        norm_parameter_groups(model_with_norms(), gamma_weight_decay=None, beta_weight_decay=None, gamma_decay_target=1)


def test_affine_parameters_skip_frozen_missing_and_shared_ones():
    class PluginNorm(nn.Module):  # a plugin norm layer (declares uses_batch_statistics) with no weight or bias
        uses_batch_statistics = False

    model = nn.Sequential(BatchNorm(3), BatchNorm(3), BatchNorm(3, affine=False), BatchNorm(3), PluginNorm())
    model[1].weight = model[0].weight  # shared gamma: listed once
    model[3].bias.requires_grad_(False)  # frozen beta: not listed
    gammas, betas = norm_affine_parameters(model)
    assert [id(p) for p in gammas] == [id(model[0].weight), id(model[3].weight)]
    assert [id(p) for p in betas] == [id(model[0].bias), id(model[1].bias)]


def test_gamma_decay_target_defaults_to_zero():
    groups = norm_parameter_groups(model_with_norms(), gamma_weight_decay=0.5, beta_weight_decay=None)
    assert groups[1]["name"] == "norm_gamma"
    assert groups[1]["weight_decay"] == 0.5
    assert "decay_toward_one" not in groups[1]


def test_model_with_only_norm_parameters_has_no_default_group():
    groups = norm_parameter_groups(nn.Sequential(BatchNorm(3)), gamma_weight_decay=0.1, beta_weight_decay=0.0)
    assert [g["name"] for g in groups] == ["norm_gamma", "norm_beta"]
