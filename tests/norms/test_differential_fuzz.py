"""Seeded randomized differential test: every registered method against float64 formulas.

Each case draws, from one seeded generator: a shape (``(N, C)`` and 1 to 3 spatial dims, sizes
of 1 included), the method's group counts, the memory layout of the input (contiguous, channels
last, size-1 dims moved, a random dim order, or a strided view) and of the upstream gradient (often
a pair that PyTorch's batch-norm backward misreads), the dtype (float32/float64), train (with or
without synchronized statistics on the local batch) or eval, random affine / mixture parameters and
running statistics, and data offset by 100 standard deviations or constant within each ``(n, c)``
(zero-variance sets). The output, the input gradient and every parameter gradient are compared with the float64
formulas of docs/methods.md written out below (their gradients by autograd of plain tensor ops).

The methods come from the registry: a registered name without a reference here fails the test.
"""

from __future__ import annotations

import importlib
import math
import random

import pytest
import torch
from norm_reference import EPS, example_weighted

from normlightning.norms import available_norms, build_norm
from normlightning.norms.group_args import divisors

#: The module of SeqNorm's math (the package attribute of that name is the function).
SEQNORM_MATH = importlib.import_module("normlightning.norms.functional.sequential_norm")

D64 = torch.float64
SEED = 20
CASES_PER_METHOD = 30
#: ``max |ours - ref| <= TOL * scale`` per tensor, plus float32's own conditioning (see ``_check``)
TOL = {torch.float32: 1e-4, torch.float64: 1e-9}


# ---------------------------------------------------------------- the formulas, in float64


def _moments(t: torch.Tensor, dims) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance over ``dims`` (keepdim), two passes."""
    m = t.mean(dims, keepdim=True)
    return m, ((t - m) ** 2).mean(dims, keepdim=True)


def _set_stats(x3: torch.Tensor, kind: str, groups: int):
    """Mean and variance per set of an HN set kind on ``(N, C, S)``, as ``(N|1, C, 1)``."""
    N, C, S = x3.shape
    x4 = x3.reshape(N, groups, C // groups, S)
    dims = (0, 2, 3) if kind in ("bn", "en") else (2, 3)
    m, v = _moments(x4, dims)
    return tuple(t.expand(-1, -1, C // groups, 1).reshape(t.shape[0], C, 1) for t in (m, v))


def _per_channel(t: torch.Tensor, C: int) -> torch.Tensor:
    """Running statistics of ``G`` groups ``(G,)`` spread to ``(1, C, 1)``."""
    return t.to(D64).repeat_interleave(C // t.shape[0]).view(1, C, 1)


def _batch_stats_norm(x3, p, training, alpha=0.0):
    """bn: per channel over ``(N, S)`` in training; running statistics (with example weighing) in eval."""
    if training:
        m, v = _moments(x3, (0, 2))
        return (x3 - m) / torch.sqrt(v + EPS)
    rm, rv = p["running_mean"].to(D64), p["running_var"].to(D64)
    if alpha:
        return example_weighted(x3, rm, rv + rm * rm, alpha)
    return (x3 - rm.view(1, -1, 1)) / torch.sqrt(rv.view(1, -1, 1) + EPS)


def _ghost(x3, G, p, training, alpha=0.0):
    """Ghost batch ``j``: examples ``n = j (mod G)``; eval as bn."""
    if not training:
        return _batch_stats_norm(x3, p, False, alpha)
    parts = [_batch_stats_norm(x3[j::G], p, True) for j in range(G)]
    order = torch.cat([torch.arange(j, x3.shape[0], G) for j in range(G)])
    return torch.cat(parts)[torch.argsort(order)]


def _groups(x3, G):
    N, C, S = x3.shape
    m, v = _moments(x3.reshape(N, G, C // G * S), (2,))
    return ((x3.reshape(N, G, -1) - m) / torch.sqrt(v + EPS)).reshape(N, C, S)


def ref_bn(x3, p, cfg, training):
    return _batch_stats_norm(x3, p, training, cfg.get("alpha", 0.0))


def ref_gn(x3, p, cfg, training):
    return _groups(x3, cfg["num_groups"])


def ref_ln(x3, p, cfg, training):
    return _groups(x3, 1)


def ref_in(x3, p, cfg, training):
    return _groups(x3, x3.shape[1])


def ref_pn(x3, p, cfg, training):
    m, v = _moments(x3, (1,))
    return (x3 - m) / torch.sqrt(v + EPS)


def ref_gnflat(x3, p, cfg, training):
    """Per example, ``D = C*S`` (channel-major) cut into ``G`` contiguous groups."""
    N, G = x3.shape[0], cfg["num_groups"]
    f = x3.reshape(N, G, -1)
    m, v = _moments(f, (2,))
    return ((f - m) / torch.sqrt(v + EPS)).reshape(x3.shape)


def ref_frn(x3, p, cfg, training):
    """``x / sqrt(mean_S x^2 + eps + |eps_learned|)`` (the TLU after the affine: :func:`_reference`)."""
    eps = cfg["eps"] + (p["eps_learned"].abs() if "eps_learned" in p else 0.0)
    return x3 / torch.sqrt(x3.square().mean(dim=2, keepdim=True) + eps)


def ref_evonorm_b0(x3, p, cfg, training):
    """``x / max(sqrt(var_b + eps), v x + sqrt(var_i + eps))``: batch variance over ``(N, S)`` (running at
    inference), instance variance over ``S``, both biased."""
    var_b = _moments(x3, (0, 2))[1] if training else p["running_var"].to(D64).view(1, -1, 1)
    var_i = _moments(x3, (2,))[1]
    v = p["v"].view(1, -1, 1)
    return x3 / torch.maximum(torch.sqrt(var_b + EPS), v * x3 + torch.sqrt(var_i + EPS))


def ref_evonorm_s0(x3, p, cfg, training):
    """``x sigmoid(v x) / sqrt(var_g + eps)`` with GN's sets (``G`` channel groups)."""
    N, C, S = x3.shape
    G = cfg["num_groups"]
    var = _moments(x3.reshape(N, G, -1), (2,))[1].repeat_interleave(C // G, dim=1)
    return x3 * torch.sigmoid(p["v"].view(1, -1, 1) * x3) / torch.sqrt(var + EPS)


def ref_mabn(x3, p, cfg, training):
    """The first training step is in MABN's warm-up: ``x / sqrt(mean_{N,S} x^2 + eps)`` of the batch,
    with the exact gradient; at inference the running second moment. (Later steps average windows of
    past iterations: tests/norms/test_mabn.py follows them against their formulas.)"""
    x2 = x3.square().mean(dim=(0, 2), keepdim=True) if training else p["running_x2"].to(D64).view(1, -1, 1)
    return x3 / torch.sqrt(x2 + EPS)


def ref_cbn(x3, p, cfg, training):
    """A layer with no past iterations and no convolution attached normalizes as ``bn`` (its window holds
    the current batch only); later steps are followed by tests/norms/test_cbn.py."""
    return _batch_stats_norm(x3, p, training)


def ref_ghost(x3, p, cfg, training):
    return _ghost(x3, cfg["num_groups"], p, training, cfg.get("alpha", 0.0))


def ref_seqnorm(x3, p, cfg, training):
    return _ghost(_groups(x3, cfg["channel_groups"]), cfg["batch_groups"], p, training)


def ref_bgn(x3, p, cfg, training):
    N, G = x3.shape[0], cfg["num_groups"]
    f = x3.reshape(N, G, -1)
    if training:
        m, v = _moments(f, (0, 2))
    else:
        m, v = p["running_mean"].to(D64).view(1, G, 1), p["running_var"].to(D64).view(1, G, 1)
    return ((f - m) / torch.sqrt(v + EPS)).reshape(x3.shape)


def ref_gbgn(x3, p, cfg, training):
    N, C, S = x3.shape
    Gc = cfg["channel_groups"]
    if not training:
        m1 = p["moving_x"].to(D64).view(Gc, -1).mean(1)
        m2 = p["moving_x2"].to(D64).view(Gc, -1).mean(1)
        if cfg.get("alpha", 0.0):
            return example_weighted(x3.reshape(N, Gc, -1), m1, m2, cfg["alpha"]).reshape(N, C, S)
        var = torch.clamp(m2 - m1 * m1, min=0)
        return ((x3.reshape(N, Gc, -1) - m1.view(1, -1, 1)) / torch.sqrt(var.view(1, -1, 1) + EPS)).reshape(N, C, S)
    E = cfg["examples_per_group"] or N
    k = -(-N // E)
    base, extra = divmod(N, k)
    sizes = [base + 1] * extra + [base] * (k - extra)
    chunks = []
    for chunk in torch.split(x3, sizes):
        blocks = chunk.reshape(chunk.shape[0], Gc, -1)
        m, v = _moments(blocks, (0, 2))
        chunks.append(((blocks - m) / torch.sqrt(v + EPS)).reshape(chunk.shape))
    return torch.cat(chunks)


def _hn_parse(spec: str, C: int):
    out = []
    for part in spec.split("+"):
        kind, _, g = part.partition(":")
        out.append((kind, int(g) if g else {"bn": C, "in": C, "ln": 1}[kind]))
    return out


def ref_hn(x3, p, cfg, training):
    C = x3.shape[1]
    ((mkind, mg),) = _hn_parse(cfg["mean"], C)
    stds = _hn_parse(cfg["std"], C)
    batch = ("bn", "en")
    if mkind in batch and not training:
        mu = _per_channel(p["running_mean"], C)
    else:
        mu = _set_stats(x3, mkind, mg)[0]
    variances = []
    for k, (kind, g) in enumerate(stds):
        if kind in batch and not training:
            variances.append(_per_channel(p["running_var" if len(stds) == 1 else f"running_var_{k}"], C))
        else:
            variances.append(_set_stats(x3, kind, g)[1])
    if len(stds) == 1:
        var = variances[0]
    else:
        w = torch.softmax(p["std_weight"], 0)
        var = sum(w[k] * v for k, v in enumerate(variances))
    return (x3 - mu) / torch.sqrt(var + EPS)


def ref_sn(x3, p, cfg, training):
    mu_in, var_in = _moments(x3, (2,))
    mu_ln, var_ln = _moments(x3, (1, 2))
    if training:
        mu_bn, var_bn = _moments(x3, (0, 2))
    else:
        mu_bn, var_bn = p["running_mean"].to(D64).view(1, -1, 1), p["running_var"].to(D64).view(1, -1, 1)
    a, b = torch.softmax(p["mean_weight"], 0), torch.softmax(p["var_weight"], 0)
    mu = a[0] * mu_in + a[1] * mu_ln + a[2] * mu_bn
    var = b[0] * var_in + b[1] * var_ln + b[2] * var_bn
    return (x3 - mu) / torch.sqrt(var + EPS)


def ref_brn(x3, p, cfg, training):
    if not training:
        return _batch_stats_norm(x3, p, False)
    m, v = _moments(x3, (0, 2))
    sigma = torch.sqrt(v + EPS)
    rm, rv = p["running_mean"].to(D64).view(1, -1, 1), p["running_var"].to(D64).view(1, -1, 1)
    sigma_run = torch.sqrt(rv + EPS)
    r = (sigma / sigma_run).clamp(cfg.get("r_min", 1 / cfg["r_max"]), cfg["r_max"]).detach()
    d = ((m - rm) / sigma_run).clamp(-cfg["d_max"], cfg["d_max"]).detach()
    return (x3 - m) / sigma * r + d


REFERENCES = {
    "bn": ref_bn,
    "gn": ref_gn,
    "ln": ref_ln,
    "in": ref_in,
    "pn": ref_pn,
    "ghost": ref_ghost,
    "seqnorm": ref_seqnorm,
    "bgn": ref_bgn,
    "gbgn": ref_gbgn,
    "hn": ref_hn,
    "sn": ref_sn,
    "brn": ref_brn,
    "gnflat": ref_gnflat,
    "frn": ref_frn,
    "evonorm_b0": ref_evonorm_b0,
    "evonorm_s0": ref_evonorm_s0,
    "mabn": ref_mabn,
    "cbn": ref_cbn,
}


# ---------------------------------------------------------------- drawing the cases


def _hn_spec(rng: random.Random, C: int, count: int) -> str:
    menu = ["bn", "in", "ln"] + [f"{k}:{g}" for k in ("gn", "en") for g in divisors(C)]
    return "+".join(rng.sample(menu, count))


def _draw_config(
    name: str, rng: random.Random, N: int, C: int, S: int, training: bool, spatial_dims: int = 1
) -> dict | None:
    """The method's arguments for this input (``spatial_dims`` positions axes of size ``S`` in all), or ``None``
    when training would have a set of one value (an error by design, tested elsewhere) or the method does not
    take the input's rank."""
    eval_alpha = {} if training or rng.random() < 0.6 else {"alpha": round(rng.uniform(0.1, 0.9), 2)}
    if name == "bn":
        return None if training and N * S < 2 else eval_alpha
    if name in ("gn", "ln", "in"):
        G = {"gn": rng.choice(divisors(C)), "ln": 1, "in": C}[name]
        if training and C // G * S < 2:
            return None
        return {"num_groups": G} if name == "gn" else {}
    if name == "pn":
        return None if training and C < 2 else {}
    if name == "ghost":
        G = rng.randint(1, N)
        return None if training and N // G * S < 2 else {"num_groups": G, **eval_alpha}
    if name == "seqnorm":
        Gc, Gm = rng.choice(divisors(C)), rng.randint(1, N)
        if training and (C // Gc * S < 2 or N // Gm * S < 2):
            return None
        return {"channel_groups": Gc, "batch_groups": Gm}
    if name == "bgn":
        G = rng.choice(divisors(C * S))
        return None if training and N * (C * S // G) < 2 else {"num_groups": G}
    if name == "frn":
        return {"eps": EPS, "tlu": rng.random() < 0.7, "learnable_eps": rng.random() < 0.5}
    if name == "evonorm_b0":
        return None if spatial_dims == 0 or (training and S < 2) else {"eps": EPS}
    if name == "evonorm_s0":
        G = rng.choice(divisors(C))
        return None if spatial_dims == 0 or (training and C // G * S < 2) else {"num_groups": G, "eps": EPS}
    if name == "mabn":
        return None if training and N * S < 2 else {"buffer_size": rng.randint(1, 3), "eps": EPS}
    if name == "cbn":
        return None if training and N * S < 2 else {"window": rng.randint(1, 3), "eps": EPS}
    if name == "gnflat":
        G = rng.choice(divisors(C * S))
        return None if training and C * S // G < 2 else {"num_groups": G}
    if name == "gbgn":
        Gc, E = rng.choice(divisors(C)), rng.choice([None] + list(range(1, N + 1)))
        smallest = N // -(-N // (E or N))
        if training and smallest * (C // Gc) * S < 2:
            return None
        return {"channel_groups": Gc, "examples_per_group": E, **eval_alpha}
    if name == "hn":
        mean, std = _hn_spec(rng, C, 1), _hn_spec(rng, C, rng.randint(1, 3))
        for kind, g in _hn_parse(mean, C) + _hn_parse(std, C):
            if training and (N if kind in ("bn", "en") else 1) * (C // g) * S < 2:
                return None
        return {"mean": mean, "std": std}
    if name == "sn":
        return None if training and N * S < 2 else {}
    if name == "brn":
        if training and N * S < 2:
            return None
        steps = {k: 0 for k in ("r_max_start_step", "r_max_end_step", "d_max_start_step", "d_max_end_step")}
        return {"r_max": round(rng.uniform(1.0, 3.0), 2), "d_max": round(rng.uniform(0.0, 3.0), 2), **steps}
    raise AssertionError(f"no case drawer for {name!r}")


def _dense_in_order(t: torch.Tensor, order) -> torch.Tensor:
    """``t``'s values, dense with its dims laid out in ``order`` (outermost first)."""
    inverse = [order.index(d) for d in range(t.dim())]
    return t.permute(*order).contiguous().permute(*inverse)


#: Dim orders (outermost first) of a dense layout: ``size-1-outer`` / ``size-1-inner`` are
#: channels_last with the size-1 dims (whose strides are free) moved outermost / innermost, which
#: PyTorch's CPU batch-norm backward misreads against a contiguous partner (``PARTNER``).
LAYOUTS = ("contiguous", "channels-last", "size-1-outer", "size-1-inner", "random")
PARTNER = {
    "contiguous": ("size-1-outer", "size-1-inner"),
    "size-1-outer": ("contiguous",),
    "size-1-inner": ("contiguous",),
    "channels-last": ("random",),
    "random": ("contiguous",),
}


def _layout_kinds(rng: random.Random) -> tuple[str, str]:
    """Layout kinds of the input and of the upstream gradient (often a mismatched pair)."""
    x_kind = rng.choice(LAYOUTS + ("view",))
    if x_kind != "view" and rng.random() < 0.5:
        return x_kind, rng.choice(PARTNER[x_kind])
    return x_kind, rng.choice(LAYOUTS)


def _laid_out(rng: random.Random, t: torch.Tensor, kind: str) -> torch.Tensor:
    """``t``'s values in the layout ``kind`` (``view``: every other element of a larger tensor)."""
    if kind == "view":
        big = torch.zeros(*t.shape, 2, dtype=t.dtype)
        big[..., 0] = t
        return big[..., 0]
    order = list(range(t.dim()))
    if kind != "contiguous":
        order = [0] + order[2:] + [1]
    if kind in ("size-1-outer", "size-1-inner"):
        ones, others = [d for d in order if t.shape[d] == 1], [d for d in order if t.shape[d] != 1]
        order = ones + others if kind == "size-1-outer" else others + ones
    elif kind == "random":
        rng.shuffle(order)
    return _dense_in_order(t, order)


def _draw_case(name: str, rng: random.Random):
    while True:
        N, C = rng.randint(1, 6), rng.choice([1, 2, 3, 4, 6, 6])
        spatial = [rng.choice([1, 2, 3]) for _ in range(rng.choice([0, 1, 2, 2, 3]))]
        training = rng.random() < 0.5
        cfg = _draw_config(name, rng, N, C, math.prod(spatial), training, spatial_dims=len(spatial))
        if cfg is not None:
            break
    dtype = rng.choice([torch.float32, torch.float64])
    data = rng.choice(["plain", "offset", "constant-rows"])
    return dict(
        name=name,
        shape=(N, C, *spatial),
        cfg=cfg,
        training=training,
        dtype=dtype,
        data=data,
        fused=rng.random() < 0.5,
        layouts=_layout_kinds(rng),
        sync=training and rng.random() < 0.3,
    )


#: The registry at collection, before any test registers (and removes) a plugin of its own.
REGISTERED = available_norms()


def _cases():
    cases = []
    for name in REGISTERED:  # a generator per method: a new method does not change the others' cases
        rng = random.Random(f"{SEED}:{name}")
        cases += [_draw_case(name, rng) for _ in range(CASES_PER_METHOD)] if name in REFERENCES else []
    return cases


# ---------------------------------------------------------------- the test


def _randomize(layer, gen: torch.Generator) -> None:
    """Random affine, mixture weights and running statistics (positive variances, gbgn's
    ``moving_x2 = moving_x^2 + var``)."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5 + (1.0 if name == "weight" else 0.0))
        buffers = dict(layer.named_buffers())
        for name, b in buffers.items():
            if name.startswith("running_mean") or name == "moving_x":
                b.copy_(torch.randn(b.shape, generator=gen, dtype=b.dtype))
            elif name.startswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen, dtype=b.dtype) + 0.5)
        if "moving_x" in buffers:  # gbgn
            m1 = buffers["moving_x"]
            buffers["moving_x2"].copy_(m1**2 + torch.rand(m1.shape, generator=gen, dtype=m1.dtype) + 0.5)


def _data(case, gen: torch.Generator) -> torch.Tensor:
    shape = case["shape"]
    x = torch.randn(shape, generator=gen, dtype=D64) * (0.5 + torch.rand((), generator=gen, dtype=D64) * 1.5)
    if case["data"] == "offset":  # mean 100 standard deviations away from 0
        x = x + 100.0 * x.std(correction=0).clamp_min(0.1)
    elif case["data"] == "constant-rows" and len(shape) > 2:  # every (n, c) constant over its positions
        x = x.flatten(2)[..., :1].expand(shape[0], shape[1], math.prod(shape[2:])).reshape(shape).clone()
    return x.to(case["dtype"])


def _reference(case, state, x, grad):
    """Output, input gradient and parameter gradients of the formula, evaluated in ``x``'s dtype."""
    name, cfg, dtype = case["name"], case["cfg"], x.dtype
    layer_params = {k for k, v in state.items() if v.requires_grad}
    params = {k: v.detach().to(dtype).requires_grad_() for k, v in state.items() if k in layer_params}
    p = {**{k: v.detach() for k, v in state.items()}, **params}
    x = x.detach().clone().requires_grad_()
    N, C = x.shape[0], x.shape[1]
    y3 = REFERENCES[name](x.reshape(N, C, -1), p, cfg, case["training"])
    if "weight" in params:
        y3 = y3 * params["weight"].view(1, -1, 1) + params["bias"].view(1, -1, 1)
    if "tau" in params:  # frn's TLU, after the affine
        y3 = torch.maximum(y3, params["tau"].view(1, -1, 1))
    y = y3.reshape(x.shape)
    y.backward(grad.to(dtype))
    return {"output": y.detach(), "input gradient": x.grad, **{f"gradient of {k}": v.grad for k, v in params.items()}}


def _natural_scales(grad: torch.Tensor, weight: torch.Tensor | None) -> dict:
    """What a tensor's error is relative to when its reference is near 0 (a set of one value has
    exactly 0 input gradient, reached through terms of size ``|w g| / sqrt(eps)``): the size of the
    output, input and parameter gradients of a normalization of unit variance."""
    g = grad.abs().max().item()
    w = 1.0 if weight is None else max(1.0, weight.abs().max().item())
    return {"output": 1.0, "input gradient": g * w, "param": g * grad[:, 0].numel()}


def _check(name: str, ours: dict, ref64: dict, ref32: dict | None, scales: dict) -> None:
    """``max |ours - ref64| <= TOL * max(max |ref64|, natural scale)``; in float32 plus 10x the error
    of the same formula in plain float32 autograd (``ref32``): what float32 arithmetic allows on
    the case (a set of two values, say, whose exact gradient is near 0 from cancellation)."""
    dtype = torch.float32 if ref32 is not None else torch.float64
    for what, ref in ref64.items():
        err = (ours[what].double() - ref).abs().max().item()
        scale = max(ref.abs().max().item(), scales.get(what, scales["param"]))
        conditioning = 0.0 if ref32 is None else (ref32[what].double() - ref).abs().max().item()
        assert err <= TOL[dtype] * scale + 10 * conditioning, (
            f"{name}: {what} off by {err:.3g} (scale {scale:.3g}, plain float32 formula off by {conditioning:.3g})"
        )


def _case_id(case) -> str:
    cfg = ",".join(f"{k}={v}" for k, v in case["cfg"].items() if "step" not in k)
    mode = "train" if case["training"] else "eval"
    layouts = "/".join(case["layouts"])
    mode += "-sync" if case["sync"] else ""
    return f"{case['name']}[{cfg}]-{tuple(case['shape'])}-{layouts}-{mode}-{str(case['dtype'])[6:]}-{case['data']}"


CASES = _cases()


def test_every_registered_method_has_a_reference():
    missing = sorted(set(REGISTERED) - set(REFERENCES))
    assert not missing, f"add a float64 formula reference (and a case drawer) for {missing}"
    assert {c["name"] for c in CASES} == set(REGISTERED)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[_case_id(c) for c in CASES])
def test_against_float64_formula(index, monkeypatch):
    case = CASES[index]
    name, cfg, training, dtype = case["name"], case["cfg"], case["training"], case["dtype"]
    if case["fused"]:  # SeqNorm's one-node path at any size
        monkeypatch.setattr(SEQNORM_MATH, "SEQNORM_FUSED_MIN_NUMEL", 0)
    gen = torch.Generator().manual_seed(SEED * 1000 + index)
    rng = random.Random(SEED * 1000 + index)
    layer = build_norm(name, case["shape"][1], **cfg).to(dtype)
    layer.sync_statistics = case["sync"]  # no process group: the all-reduce path on the local batch
    _randomize(layer, gen)
    layer.train(training)
    state = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in layer.state_dict(keep_vars=True).items()}
    if name == "brn":  # the clip limits as the layer computes them (0-d float32 tensors)
        r_max, d_max = layer.current_limits()
        cfg = {**cfg, "r_max": float(r_max), "r_min": float(1.0 / r_max), "d_max": float(d_max)}
        case = {**case, "cfg": cfg}
    x = _data(case, gen)
    grad = torch.randn(case["shape"], generator=gen, dtype=D64).to(dtype)

    x_in = _laid_out(rng, x, case["layouts"][0]).requires_grad_()
    y = layer(x_in)
    y.backward(_laid_out(rng, grad, case["layouts"][1]))
    ours = {"output": y.detach(), "input gradient": x_in.grad}
    ours.update({f"gradient of {k}": p.grad for k, p in layer.named_parameters()})

    if not training:  # inference proper: no gradients (a method may take a path without autograd)
        with torch.no_grad():
            ours_no_grad = layer(_laid_out(rng, x, case["layouts"][0]))

    state64 = {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in state.items()}
    ref32 = _reference(case, state, x, grad) if dtype == torch.float32 else None
    ref64 = _reference(case, state64, x.double(), grad)
    scales = _natural_scales(grad, state.get("weight"))
    _check(name, ours, ref64, ref32, scales)
    if not training:
        only_output = {"output": ref64["output"]}, None if ref32 is None else {"output": ref32["output"]}
        _check(f"{name} (no_grad)", {"output": ours_no_grad}, *only_output, scales)
