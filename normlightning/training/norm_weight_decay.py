"""Weight decay on normalization affine parameters ("Four Things", Summers & Dinneen 2020, §3).

A norm layer's ``weight`` (gamma) and ``bias`` (beta), shape ``(C,)``, get their own weight decay,
separate from the rest of the model's weights and possibly 0.  Gamma can decay toward **1**
(the authors' code: ``wd * l2_loss(gamma - 1)``, ``l2_loss(v) = sum(v**2) / 2``) instead of 0.

Decay toward 0 is the optimizer's own ``weight_decay`` in a parameter group.  Decay toward 1 is
the same coupled term shifted by 1: after gradients are reduced and clipped (``BaseTask``'s
``configure_gradient_clipping``: the term is never clipped, as the optimizer's own decay is not) and
before the optimizer step,

    grad_gamma <- grad_gamma + wd_gamma * (gamma - 1)

(:func:`add_decay_toward_one`), i.e. exactly the gradient of ``wd/2 * ||gamma - 1||^2``, with
the gamma group's optimizer ``weight_decay`` set to 0 so nothing pulls toward 0 as well.  For SGD
one step is ``gamma <- gamma - lr * (g + wd * (gamma - 1))``.  It is applied to the gradient
rather than added to the loss, so the logged loss stays the data loss; under DDP every process
adds the same term to the same (all-reduced) gradient.  With a decoupled optimizer such as AdamW,
``weight_decay`` of the other groups is decoupled while this term (like ``Adam``'s) goes through
the adaptive update.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from normlightning.norms.model_walk import is_norm_layer

GammaTarget = Literal[0, 1]


def norm_affine_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(gammas, betas)``: the ``weight`` and ``bias`` parameters of every norm layer in ``model``.

    Only trainable ones (``requires_grad``); each parameter appears once even when shared.
    """
    gammas: list[nn.Parameter] = []
    betas: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        if not is_norm_layer(module):
            continue
        for attr, bucket in (("weight", gammas), ("bias", betas)):
            p = getattr(module, attr, None)
            if isinstance(p, nn.Parameter) and p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                bucket.append(p)
    return gammas, betas


def check_norm_decay(gamma_weight_decay: Any, beta_weight_decay: Any, gamma_decay_target: Any) -> None:
    """Raise ``ValueError`` for settings :func:`norm_parameter_groups` cannot use."""
    if gamma_decay_target not in (0, 1):
        raise ValueError(f"gamma_decay_target must be 0 or 1, got {gamma_decay_target!r}")
    for setting, value in (("gamma_weight_decay", gamma_weight_decay), ("beta_weight_decay", beta_weight_decay)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise ValueError(f"{setting} must be a float >= 0 or null, got {value!r}")
    if gamma_decay_target == 1 and gamma_weight_decay is None:
        raise ValueError("gamma_decay_target=1 needs gamma_weight_decay (the strength of the pull toward 1)")


def norm_parameter_groups(
    model: nn.Module,
    *,
    gamma_weight_decay: float | None,
    beta_weight_decay: float | None,
    gamma_decay_target: GammaTarget = 0,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: the other weights, then gamma, then beta (empty groups dropped).

    ``None`` for a decay keeps that parameter kind in the first group (the optimizer's default
    ``weight_decay``).  With ``gamma_decay_target=1`` the gamma group has ``weight_decay=0`` and
    carries ``decay_toward_one=gamma_weight_decay``, which :func:`add_decay_toward_one` applies.
    """
    check_norm_decay(gamma_weight_decay, beta_weight_decay, gamma_decay_target)
    gammas, betas = norm_affine_parameters(model)
    special: set[int] = set()
    groups: list[dict[str, Any]] = []
    if gamma_weight_decay is not None and gammas:
        group: dict[str, Any] = {"params": gammas, "name": "norm_gamma"}
        if gamma_decay_target == 1:
            group.update(weight_decay=0.0, decay_toward_one=float(gamma_weight_decay))
        else:
            group["weight_decay"] = float(gamma_weight_decay)
        groups.append(group)
        special.update(id(p) for p in gammas)
    if beta_weight_decay is not None and betas:
        groups.append({"params": betas, "name": "norm_beta", "weight_decay": float(beta_weight_decay)})
        special.update(id(p) for p in betas)
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in special]
    return ([{"params": rest, "name": "default"}] if rest else []) + groups


@torch.no_grad()
def add_decay_toward_one(optimizer: torch.optim.Optimizer) -> None:
    """``grad += wd * (p - 1)`` for the parameters of every group with a ``decay_toward_one`` entry."""
    for group in optimizer.param_groups:
        wd = group.get("decay_toward_one")
        if not wd:
            continue
        for p in group["params"]:
            if p.grad is not None:
                p.grad.add_(p - 1.0, alpha=wd)
