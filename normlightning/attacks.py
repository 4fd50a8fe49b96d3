"""Projected gradient descent (PGD) under the L-inf norm (Madry et al., ICLR 2018), in pixel space.

``delta_{t+1} = P(delta_t + step_size * sign(grad_delta L(f(x + delta_t), y)))`` with
``P(d) = clamp(x + clamp(d, -eps, eps), 0, 1) - x``; gradients are taken w.r.t. ``delta`` only.
The attack runs the model in whatever norm-layer mode it finds and works under ``no_grad`` and
``inference_mode`` (see ``docs/adversarial.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PGDConfig", "pgd_attack"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _summed_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="sum")


def _check_settings(eps: float, step_size: float, steps: int) -> None:
    if not eps >= 0:
        raise ValueError(f"PGD eps must be >= 0 (pixel units, e.g. 8/255), got {eps}.")
    if not step_size >= 0:
        raise ValueError(f"PGD step_size must be >= 0 (pixel units, e.g. 2/255), got {step_size}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"PGD steps must be a non-negative integer, got {steps!r}.")


def _project(x: torch.Tensor, delta: torch.Tensor, eps: float, clamp: tuple[float, float] | None) -> torch.Tensor:
    """``clamp(x + clamp(delta, -eps, eps), lo, hi) - x``."""
    delta = delta.clamp(-eps, eps)
    if clamp is not None:
        delta = (x + delta).clamp(clamp[0], clamp[1]) - x
    return delta


def pgd_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    step_size: float,
    steps: int,
    random_start: bool = True,
    loss_fn: LossFn | None = None,
    clamp: tuple[float, float] | None = (0.0, 1.0),
    generator: torch.Generator | None = None,
    init_delta: torch.Tensor | None = None,
) -> torch.Tensor:
    """L-inf PGD adversarial examples (see the module docstring for the update).

    Args:
        model: maps ``x`` (pixel space) to logits; used in whatever train/eval mode it is in.
        x: clean inputs ``(N, ...)`` inside ``clamp``.
        y: targets for ``loss_fn`` (class indices ``(N,)`` for the default loss).
        eps: L-inf radius in pixel units.
        step_size: size of each signed-gradient step, pixel units.
        steps: number of ascent steps (0 returns the projected start).
        random_start: start from ``U(-eps, eps)``; else from 0. Ignored if ``init_delta`` is given.
        loss_fn: ``loss_fn(logits, y)`` to ascend; a non-scalar result is summed.
            Default: cross-entropy with ``reduction="sum"``.
        clamp: valid pixel range ``(lo, hi)``, or ``None`` for no clamping.
        generator: RNG for the random start (must be on ``x``'s device).
        init_delta: explicit starting perturbation of ``x``'s shape (projected first).

    Returns:
        Detached adversarial inputs of ``x``'s shape and dtype, with
        ``|x_adv - x|_inf <= eps`` and ``x_adv`` inside ``clamp``.
    """
    _check_settings(eps, step_size, steps)
    if clamp is not None and not clamp[0] < clamp[1]:
        raise ValueError(f"PGD clamp must be (lo, hi) with lo < hi, or None; got {clamp!r}.")
    if init_delta is not None and init_delta.shape != x.shape:
        raise ValueError(f"PGD init_delta must have x's shape {tuple(x.shape)}, got {tuple(init_delta.shape)}.")
    if not (x.is_floating_point()):
        raise TypeError(f"PGD needs floating-point inputs, got dtype {x.dtype}.")
    loss_fn = _summed_cross_entropy if loss_fn is None else loss_fn

    with torch.inference_mode(False), torch.enable_grad():
        if any(t.is_inference() for t in (*model.parameters(), *model.buffers())):
            raise RuntimeError(
                "pgd_attack: the model's parameters/buffers are inference tensors (the model was created or "
                "loaded under torch.inference_mode), so no gradient can flow through it. Build the model "
                "outside inference mode, or clone its state outside inference mode."
            )
        x = x.detach()
        if x.is_inference():
            x = x.clone()
        if isinstance(y, torch.Tensor) and y.is_inference():
            y = y.clone()
        if init_delta is not None:
            delta = init_delta.detach().to(device=x.device, dtype=x.dtype).clone()
        elif random_start:
            delta = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * (2 * eps) - eps
        else:
            delta = torch.zeros_like(x)
        delta = _project(x, delta, eps, clamp)

        for _ in range(steps):
            delta.requires_grad_(True)
            loss = loss_fn(model(x + delta), y)
            if loss.dim() != 0:
                loss = loss.sum()
            (grad,) = torch.autograd.grad(loss, delta)
            delta = _project(x, delta.detach() + step_size * grad.sign(), eps, clamp)

        return (x + delta).detach()


@dataclass(frozen=True)
class PGDConfig:
    """PGD settings; ``config(model, x, y, **kw)`` runs :func:`pgd_attack` with them.

    Defaults are the BGN paper's adversarial setting (4 steps of 2/255, radius 0.0157).
    """

    eps: float = 0.0157
    step_size: float = 2 / 255
    steps: int = 4
    random_start: bool = True

    def __post_init__(self) -> None:
        _check_settings(self.eps, self.step_size, self.steps)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        return pgd_attack(model, x, y, **asdict(self), **kwargs)
