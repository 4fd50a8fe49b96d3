"""Methods whose statistics mix sets: Heterologous Normalization (mean from one set, variance
from another or a learned mixture) and Switchable Normalization (learned mixtures of IN, LN and
BN statistics) (docs/methods.md, sections hn, sn)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..group_args import divisors
from .fused_ops import blocks, normalize_affine
from .layout import NormInput, spatial_size
from .moments import check_set_size, combine_moments, pooled_moments, row_moments, synced_mean_var, update_running_stats
from .native import native_batch_norm
from .pooled_sets import channel_group_part, pooled_set_norm, row_part

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


def _heterologous_local(
    io: NormInput, mean_set, std_sets, std_mix_logits, running_mean, running_vars, training, factor, eps
) -> Tensor:
    """HN without communication: pooled parts over channel or row units, running statistics as
    constants at inference (one native eval-mode batch norm when every statistic is a constant)."""
    x, dt = io.x, io.dtype
    N, C = x.shape[0], x.shape[1]
    S = spatial_size(x)
    channel_units = all(is_batch_set(k) for k, _ in (mean_set, *std_sets))
    consts: list[Tensor] = []

    def part(kind: str, set_kind: str, groups: int, running: Tensor | None):
        if is_batch_set(set_kind) and not training:  # running statistics: a constant per unit
            per_channel = blocks(running.to(dt), C // groups)
            consts.append(per_channel if channel_units else per_channel.repeat(N))
            return ("const", len(consts) - 1)
        if channel_units:
            return channel_group_part(kind, C, groups)
        return row_part(kind, N, C, groups, batch=is_batch_set(set_kind))

    if not training and channel_units and std_mix_logits is None:  # constants per channel: one native pass
        mean, var = heterologous_channel_statistics(mean_set, std_sets, None, running_mean, running_vars, C, dt)
        return native_batch_norm(x, mean, var, io.weight, io.bias, False, 0.0, eps)
    mean_parts = (part("pool", mean_set[0], mean_set[1], running_mean),)
    var_parts = tuple(part("tv", k, g, rv) for (k, g), rv in zip(std_sets, running_vars))
    xv = x if channel_units else x.reshape(1, N * C, S)
    y, m, v, stats = pooled_set_norm(
        xv,
        io.weight,
        io.bias,
        (1, 1) if channel_units else (N, 1),
        ((mean_parts, var_parts),),
        eps,
        tuple(consts),
        var_logits=std_mix_logits,
    )
    if training:
        _update_hn_running(
            mean_set, std_sets, mean_parts, var_parts, m, v, stats, running_mean, running_vars, N, C, S, factor
        )
    return y


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
    mean_set, std_sets, mean_parts, var_parts, m, v, stats, running_mean, running_vars, N, C, S, factor
) -> None:
    """Running statistics of the batch sets from the fused node's outputs: a part of single
    units (``own``) is ``m``/``v`` itself, a pooled part's set statistics come in part order."""
    it = iter(stats)
    kind = mean_set[0]
    mean = m if mean_parts[0][0] == "own" else next(it)
    if is_batch_set(kind):
        update_running_stats(running_mean, None, mean, None, 0, factor)
    for (kind, groups), part, running_var in zip(std_sets, var_parts, running_vars):
        var = v if part[0] == "own" else next(it)
        if is_batch_set(kind):
            update_running_stats(None, running_var, None, var, N * (C // groups) * S, factor)


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

    Locally (no ``sync``) one autograd node over ``(example, channel)`` row units
    (:func:`~.pooled_sets.pooled_set_norm`, which forms ``var_ln``, ``var_bn`` without cancellation
    as ``mean var_in + mean (mu_in - mu)^2``); the BN term's running statistics are constants at
    inference.
    """
    if training:
        check_set_size(x.shape[0] * spatial_size(x), "SwitchableNorm input (BN term)", "Use a batch with N * S > 1.")
    io = NormInput(x, weight, bias)
    if training and sync:
        return io.output(
            _switchable_synced(io, mean_logits, var_logits, running_mean, running_var, factor, eps, process_group)
        )
    x, dt = io.x, io.dtype
    N, C = x.shape[0], x.shape[1]
    S = spatial_size(x)
    layer, batch = ("pool", (N, C), (1,)), ("pool", (N, C), (0,))
    consts: tuple[Tensor, ...] = ()
    if training:
        mean_parts = (("own",), layer, batch)
        var_parts = (("own",), ("tv",) + layer[1:], ("tv",) + batch[1:])
    else:
        consts = (running_mean.to(dt).repeat(N), running_var.to(dt).repeat(N))
        mean_parts = (("own",), layer, ("const", 0))
        var_parts = (("own",), ("tv",) + layer[1:], ("const", 1))
    y, _, _, stats = pooled_set_norm(
        x.reshape(1, N * C, S),
        io.weight,
        io.bias,
        (N, 1),
        ((mean_parts, var_parts),),
        eps,
        consts,
        mean_logits=mean_logits,
        var_logits=var_logits,
    )
    if training:  # stats: the layer and batch set means, then the layer and batch set variances
        update_running_stats(running_mean, running_var, stats[1], stats[3], N * S, factor)
    return io.output(y)


def _switchable_synced(
    io: NormInput, mean_logits, var_logits, running_mean, running_var, factor, eps, process_group
) -> Tensor:
    """SN in training with ``sync``: the BN term pooled across processes (differentiably,
    :func:`pooled_moments`), the LN term from the local rows (:func:`combine_moments`)."""
    x3, dt = io.x3, io.dtype
    S = x3.shape[2]
    mu_in, var_in = row_moments(x3)
    mu_ln, var_ln = combine_moments(mu_in, var_in, (1,))
    mu_bn, var_bn, n_ex = pooled_moments(mu_in, var_in, (0,), sync=True, process_group=process_group)
    update_running_stats(running_mean, running_var, mu_bn, var_bn, n_ex * S, factor)
    wm = torch.softmax(mean_logits.to(dt), 0)
    wv = torch.softmax(var_logits.to(dt), 0)
    mu = wm[0] * mu_in + wm[1] * mu_ln + wm[2] * mu_bn
    var = wv[0] * var_in + wv[1] * var_ln + wv[2] * var_bn
    return normalize_affine(x3, mu, var, io.weight, io.bias, eps)
