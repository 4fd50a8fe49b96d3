"""Methods whose statistics mix sets: Heterologous Normalization (mean from one set, variance
from another or a learned mixture) and Switchable Normalization (learned mixtures of IN, LN and
BN statistics) (docs/methods.md, sections hn, sn)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..group_args import divisors
from .fused_ops import normalize_affine
from .layout import NormInput
from .moments import check_set_size, combine_moments, reduce_mean, row_moments, set_mean_var, update_running_stats


_SET_KINDS = ("bn", "in", "ln", "gn", "en")


def parse_set_spec(spec: str, num_channels: int, *, allow_mixture: bool, role: str) -> list[tuple[str, int]]:
    """Parse an HN set spec such as ``"bn"``, ``"gn:8"``, ``"en:1"`` or ``"bn+in+ln"``.

    Returns a list of ``(kind, groups)`` with ``groups`` the number of channel groups of the set:
    ``bn`` -> ``("en", C)`` is *not* rewritten (kept as ``("bn", C)``), ``in`` -> ``("in", C)``,
    ``ln`` -> ``("ln", 1)``, ``gn:G`` -> ``("gn", G)``, ``en:G`` -> ``("en", G)``.
    Raises ``ValueError`` naming the bad part and the valid syntax.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"HeterologousNorm {role}={spec!r}: expected a set name such as 'bn', 'en:1', 'gn:8'.")
    parts = [p.strip().lower() for p in spec.split("+")]
    if len(parts) > 1 and not allow_mixture:
        raise ValueError(f"HeterologousNorm {role}={spec!r}: a mixture ('+') is only allowed for the std set.")
    if len(set(parts)) != len(parts):
        raise ValueError(f"HeterologousNorm {role}={spec!r}: a set is listed twice.")
    out = []
    valid = "valid sets: bn, in, ln, gn:G, en:G (G divides C), joined by '+' for std mixtures"
    for p in parts:
        name, _, arg = p.partition(":")
        if name not in _SET_KINDS:
            raise ValueError(f"HeterologousNorm {role}={spec!r}: unknown set {p!r}; {valid}.")
        if name in ("gn", "en"):
            if not arg.isdigit() or int(arg) < 1:
                raise ValueError(f"HeterologousNorm {role}={spec!r}: {name!r} needs a group count, e.g. '{name}:8'; {valid}.")
            g = int(arg)
            if num_channels % g != 0:
                raise ValueError(
                    f"HeterologousNorm {role}={spec!r}: {name}:{g} needs G dividing C={num_channels}; "
                    f"valid choices: {divisors(num_channels)}."
                )
        else:
            if arg:
                raise ValueError(f"HeterologousNorm {role}={spec!r}: {name!r} takes no ':' argument; {valid}.")
            g = {"bn": num_channels, "in": num_channels, "ln": 1}[name]
        out.append((name, g))
    return out


def is_batch_set(kind: str) -> bool:
    """Whether an HN set includes the batch axis (``bn``, ``en:G``)."""
    return kind in ("bn", "en")


def _set_stats(x3: Tensor, kind: str, groups: int, sync: bool, process_group, nc_moments):
    """Mean/var/count of an HN set on ``x3 (N, C, S)``; stats shaped ``(N|1, G, 1, 1)``.

    Every HN set is a union of whole ``(n, c)`` rows, so locally its statistics are pooled
    (:func:`combine_moments`) from the per-``(n, c)`` moments ``nc_moments()`` (computed once,
    shared by the mean set and every std set). Synced batch sets use the moments path.
    """
    N, C, S = x3.shape
    batch = is_batch_set(kind)
    if sync and batch:
        return set_mean_var(x3.reshape(N, groups, C // groups, S), (0, 2, 3), sync=True, process_group=process_group)
    m_nc, v_nc = nc_moments()
    dims = (0, 2) if batch else (2,)
    m, v = combine_moments(m_nc.reshape(N, groups, C // groups), v_nc.reshape(N, groups, C // groups), dims)
    return m.unsqueeze(-1), v.unsqueeze(-1), (N if batch else 1) * (C // groups) * S


def _per_channel(t: Tensor, C: int) -> Tensor:
    """``(B, G, 1, 1)`` group statistics -> ``(B, C, 1)`` per channel."""
    B, G = t.shape[0], t.shape[1]
    return t.reshape(B, G, 1).repeat_interleave(C // G, dim=1) if G != C else t.reshape(B, C, 1)


def heterologous_norm(
    x: Tensor,
    mean_set: tuple[str, int],
    std_sets: Sequence[tuple[str, int]],
    std_mix_logits: Tensor | None,
    running_mean: Tensor | None,
    running_vars: Sequence[Tensor | None],
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    factor: float = 0.1,
    eps: float = 1e-5,
    sync: bool = False,
    process_group=None,
) -> Tensor:
    """Heterologous Normalization: ``x_hat = (x - mu_S) / sqrt(var_S' + eps)``.

    ``var_S'`` is the variance of the elements of ``S'`` about ``S'``'s own mean; a std mixture
    uses ``var = sum_k softmax(std_mix_logits)_k var_k``. Batch sets (``bn``: per channel,
    ``en:G``: per channel group) use batch statistics in training and their running buffers
    (``running_mean`` for the mean set, ``running_vars[k]`` for std component ``k``; ``None``
    for per-example sets) at inference; per-example sets are computed from the input.
    """
    io = NormInput(x, weight, bias)
    x3, dt = io.x3, io.dtype
    N, C, S = x3.shape
    cache: list[tuple[Tensor, Tensor]] = []

    def nc_moments() -> tuple[Tensor, Tensor]:
        if not cache:
            cache.append(row_moments(x3))
        return cache[0]

    # mean
    kind, g = mean_set
    if is_batch_set(kind) and not training:
        mu = _per_channel(running_mean.to(dt).view(1, g, 1, 1), C)
    else:
        m, v, n = _set_stats(x3, kind, g, sync, process_group, nc_moments)
        mu = _per_channel(m, C)
        if training and is_batch_set(kind):
            update_running_stats(running_mean, None, m, v, n, factor)
    # std
    var = None
    weights = None if std_mix_logits is None else torch.softmax(std_mix_logits.to(dt), 0)
    for k, (skind, sg) in enumerate(std_sets):
        if is_batch_set(skind) and not training:
            vk = running_vars[k].to(dt).view(1, sg, 1, 1)
        else:
            m, vk, n = _set_stats(x3, skind, sg, sync, process_group, nc_moments)
            if training and is_batch_set(skind):
                update_running_stats(None, running_vars[k], m, vk, n, factor)
        vk = _per_channel(vk, C)
        if weights is not None:
            vk = weights[k] * vk
        var = vk if var is None else var + vk
    return io.output(normalize_affine(x3, mu, var, io.weight, io.bias, eps))


def switchable_norm(
    x: Tensor,
    mean_logits: Tensor,
    var_logits: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    factor: float = 0.1,
    eps: float = 1e-5,
    sync: bool = False,
    process_group=None,
) -> Tensor:
    """Switchable Normalization (Luo et al. 2019): the official code's formulas with biased
    variances and PyTorch's running-statistics convention (docs/methods.md, section "Where we
    deviate from official implementations, and why", Switchable Normalization).

    Per ``(n, c)``: ``mu_in, var_in`` over ``S`` (biased); ``mu_ln = mean_c mu_in``,
    ``var_ln = mean_c(var_in + mu_in^2) - mu_ln^2``; ``mu_bn = mean_n mu_in``,
    ``var_bn = mean_n(var_in + mu_in^2) - mu_bn^2`` (both clamped at 0). Mixed with
    ``softmax(mean_logits)`` / ``softmax(var_logits)`` over (IN, LN, BN). Running stats for the
    BN term only (eval uses them for that term).
    """
    if training:
        check_set_size(x.shape[0] * x[0, 0].numel(), "SwitchableNorm input (BN term)", "Use a batch with N * S > 1.")
    io = NormInput(x, weight, bias)
    x3, dt = io.x3, io.dtype
    N, C, S = x3.shape
    mu_in, var_in = row_moments(x3)
    temp = var_in + mu_in * mu_in
    mu_ln = mu_in.mean(1, keepdim=True)
    var_ln = (temp.mean(1, keepdim=True) - mu_ln * mu_ln).clamp_min(0.0)
    if training:
        (mu_bn, t_bn), n_ex = reduce_mean([mu_in, temp], (0,), sync=sync, process_group=process_group)
        var_bn = (t_bn - mu_bn * mu_bn).clamp_min(0.0)
        update_running_stats(running_mean, running_var, mu_bn, var_bn, n_ex * S, factor)
    else:
        mu_bn = running_mean.to(dt).view(1, C, 1)
        var_bn = running_var.to(dt).view(1, C, 1)
    wm = torch.softmax(mean_logits.to(dt), 0)
    wv = torch.softmax(var_logits.to(dt), 0)
    mu = wm[0] * mu_in + wm[1] * mu_ln + wm[2] * mu_bn
    var = wv[0] * var_in + wv[1] * var_ln + wv[2] * var_bn
    return io.output(normalize_affine(x3, mu, var, io.weight, io.bias, eps))
