"""Heterologous Normalization: the mean from one set, the variance from another or a learned
mixture of sets (docs/methods.md, section hn)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..group_args import divisors
from .fused_ops import blocks, normalize_affine
from .layout import NormInput, spatial_size
from .moments import combine_moments, lerp_running, row_moments, synced_mean_var, update_running_stats
from .pooled_sets import Const, Own, SetStatistics, Stage, channel_group_part, pooled_set_norm, row_part

_SET_KINDS = ("bn", "in", "ln", "gn", "en")


def parse_set_spec(spec: str, num_channels: int, *, allow_mixture: bool, role: str) -> list[tuple[str, int]]:
    """Parse an HN set spec such as ``"bn"``, ``"gn:8"``, ``"en:1"`` or ``"bn+in+ln"``.

    Returns a list of ``(kind, groups)`` with ``groups`` the number of channel groups of the set:
    ``bn`` -> ``("bn", C)`` (the sets of ``en:C``, kept under its own name), ``in`` -> ``("in", C)``,
    ``ln`` -> ``("ln", 1)``, ``gn:G`` -> ``("gn", G)``, ``en:G`` -> ``("en", G)``.
    Raises ``ValueError`` naming the spec and what is wrong with it (an unknown set or a missing or
    extra ``:G`` also lists the valid sets; a ``G`` that does not divide ``C`` lists its divisors).
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
                raise ValueError(
                    f"HeterologousNorm {role}={spec!r}: {name!r} needs a group count, e.g. '{name}:8'; {valid}."
                )
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


def _set_stats(x3: Tensor, kind: str, groups: int, process_group, nc_moments):
    """Mean/var/count of an HN set on ``x3 (N, C, S)`` in synchronized training; stats shaped
    ``(N|1, G, 1, 1)``.

    Batch sets (``bn``, ``en:G``) come from all-reduced moments (:func:`synced_mean_var`). A
    per-example set is a union of whole ``(n, c)`` rows, so its statistics are pooled
    (:func:`combine_moments`) from the local per-``(n, c)`` moments ``nc_moments()`` (computed
    once, shared by the mean set and every std set).
    """
    N, C, S = x3.shape
    if is_batch_set(kind):
        return synced_mean_var(x3.reshape(N, groups, C // groups, S), (0, 2, 3), process_group=process_group)
    m_nc, v_nc = nc_moments()
    m, v = combine_moments(m_nc.reshape(N, groups, C // groups), v_nc.reshape(N, groups, C // groups), (2,))
    return m.unsqueeze(-1), v.unsqueeze(-1), (C // groups) * S


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

    Locally (no ``sync``) one autograd node (:func:`~.pooled_sets.pooled_set_norm`): the units
    are channels when every set spans the batch, else ``(example, channel)`` rows.
    """
    if training:
        _check_sets(x, mean_set, std_sets)
    io = NormInput(x, weight, bias)
    if training and sync and any(is_batch_set(k) for k, _ in (mean_set, *std_sets)):
        y = _heterologous_synced(
            io, mean_set, std_sets, std_mix_logits, running_mean, running_vars, factor, eps, process_group
        )
    else:
        y = _heterologous_local(
            io, mean_set, std_sets, std_mix_logits, running_mean, running_vars, training, factor, eps
        )
    return io.output(y)


def _check_sets(x: Tensor, mean_set: tuple[str, int], std_sets: Sequence[tuple[str, int]]) -> None:
    """``ValueError`` for a set of one element in training."""
    N, C, S = x.shape[0], x.shape[1], spatial_size(x)
    for kind, g in [mean_set, *std_sets]:
        size = (N if is_batch_set(kind) else 1) * (C // g) * S
        if size < 2:
            raise ValueError(
                f"HeterologousNorm set {kind}{':' + str(g) if kind in ('gn', 'en') else ''} has one element "
                f"for input of shape {tuple(x.shape)} in training; choose a larger set (e.g. 'en:1' or 'ln') "
                "or a larger input."
            )


def _heterologous_local(
    io: NormInput, mean_set, std_sets, std_mix_logits, running_mean, running_vars, training, factor, eps
) -> Tensor:
    """HN without communication: pooled parts over channel or row units, running statistics as
    constants at inference. (Where every statistic is a constant per channel and no mixture weight
    needs a gradient, the layer normalizes with ``inference_channel_statistics()`` instead.)"""
    x, dt = io.x, io.dtype
    N, C = x.shape[0], x.shape[1]
    S = spatial_size(x)
    channel_units = all(is_batch_set(k) for k, _ in (mean_set, *std_sets))
    consts: list[Tensor] = []

    def part(set_kind: str, groups: int, running: Tensor | None):
        if is_batch_set(set_kind) and not training:  # running statistics: a constant per unit
            per_channel = blocks(running.to(dt), C // groups)
            consts.append(per_channel if channel_units else per_channel.repeat(N))
            return Const(len(consts) - 1)
        if channel_units:
            return channel_group_part(C, groups)
        return row_part(N, C, groups, batch=is_batch_set(set_kind))

    stage = Stage(
        (part(mean_set[0], mean_set[1], running_mean),),
        tuple(part(k, g, rv) for (k, g), rv in zip(std_sets, running_vars)),
    )
    xv = x if channel_units else x.reshape(1, N * C, S)
    out = pooled_set_norm(
        xv,
        io.weight,
        io.bias,
        (1, 1) if channel_units else (N, 1),
        (stage,),
        eps,
        tuple(consts),
        var_logits=std_mix_logits,
    )
    if training:
        _update_hn_running(
            mean_set,
            std_sets,
            stage,
            out.unit_mean,
            out.unit_var,
            out.set_statistics[0],
            running_mean,
            running_vars,
            N,
            C,
            S,
            factor,
        )
    return out.y


def heterologous_channel_statistics(
    mean_set: tuple[str, int],
    std_sets: Sequence[tuple[str, int]],
    std_mix_logits: Tensor | None,
    running_mean: Tensor,
    running_vars: Sequence[Tensor],
    num_channels: int,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """The inference mean and variance per channel ``(C,)`` of an HN layer whose sets are all batch
    sets: each set's running statistic spread to its channels, the variances mixed with
    ``softmax(std_mix_logits)`` (one std set: as is)."""
    C = num_channels
    mean = blocks(running_mean.to(dtype), C // mean_set[1])
    variances = [blocks(rv.to(dtype), C // g) for (_, g), rv in zip(std_sets, running_vars)]
    if std_mix_logits is None:
        return mean, variances[0]
    weights = torch.softmax(std_mix_logits.to(dtype), 0)
    return mean, sum(weights[k] * v for k, v in enumerate(variances))


def _update_hn_running(
    mean_set,
    std_sets,
    stage: Stage,
    m: Tensor,
    v: Tensor,
    statistics: SetStatistics,
    running_mean,
    running_vars,
    N,
    C,
    S,
    factor,
) -> None:
    """Running statistics of the batch sets from the fused node's outputs (all buffers in one update,
    :func:`~.moments.lerp_running`): a part of single units (:class:`~.pooled_sets.Own`) is ``m``/``v``
    itself, a pooled part's set statistics come in part order."""
    buffers, batch_values = [], []
    if is_batch_set(mean_set[0]):
        buffers.append(running_mean)
        batch_values.append(m if isinstance(stage.mean_parts[0], Own) else statistics.means[0])
    pooled_vars = iter(statistics.variances)
    for (kind, groups), part, running_var in zip(std_sets, stage.var_parts, running_vars):
        var = v if isinstance(part, Own) else next(pooled_vars)
        if is_batch_set(kind):
            n = N * (C // groups) * S
            buffers.append(running_var)
            batch_values.append(var * (n / (n - 1)))
    lerp_running(buffers, batch_values, factor)


def _heterologous_synced(
    io: NormInput, mean_set, std_sets, std_mix_logits, running_mean, running_vars, factor, eps, process_group
) -> Tensor:
    """HN in training with ``sync``: batch sets from all-reduced moments (differentiable), the
    per-example sets from the local ``(n, c)`` moments."""
    x3, dt = io.x3, io.dtype
    C = x3.shape[1]
    cache: list[tuple[Tensor, Tensor]] = []

    def nc_moments() -> tuple[Tensor, Tensor]:
        if not cache:
            cache.append(row_moments(x3))
        return cache[0]

    kind, g = mean_set
    m, v, n = _set_stats(x3, kind, g, process_group, nc_moments)
    mu = _per_channel(m, C)
    if is_batch_set(kind):
        update_running_stats(running_mean, None, m, v, n, factor)
    var = None
    weights = None if std_mix_logits is None else torch.softmax(std_mix_logits.to(dt), 0)
    for k, (skind, sg) in enumerate(std_sets):
        m, vk, n = _set_stats(x3, skind, sg, process_group, nc_moments)
        if is_batch_set(skind):
            update_running_stats(None, running_vars[k], m, vk, n, factor)
        vk = _per_channel(vk, C)
        if weights is not None:
            vk = weights[k] * vk
        var = vk if var is None else var + vk
    return normalize_affine(x3, mu, var, io.weight, io.bias, eps)
