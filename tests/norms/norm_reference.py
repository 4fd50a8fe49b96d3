"""Independent reference implementations written from the formulas of docs/methods.md.

Plain torch means/variances over explicit dims and explicit loops over sets; nothing here
calls ``normlightning.norms.functional``. :data:`ALL_SPECS` (the generic tests' configuration of
every method) comes from the registry.
"""

from __future__ import annotations

import torch

from normlightning.norms import available_norms, norm_group_args
from normlightning.norms.registry import norm_factory

EPS = 1e-5


def bvar(t, dims):
    """Biased variance over ``dims`` (keepdim), written out."""
    m = t.mean(dim=dims, keepdim=True)
    return ((t - m) ** 2).mean(dim=dims, keepdim=True)


def normalize(t, dims, eps=EPS):
    m = t.mean(dim=dims, keepdim=True)
    return (t - m) / torch.sqrt(bvar(t, dims) + eps)


def affine(y, w, b):
    """Per-channel affine on (N, C, *)."""
    shape = (1, -1) + (1,) * (y.dim() - 2)
    return y * w.view(shape) + b.view(shape)


def spatial_dims(x):
    return tuple(range(2, x.dim()))


class RunningRef:
    """PyTorch's running-statistics convention, written out."""

    def __init__(self, shape, momentum=0.1, mean0=0.0, var0=1.0):
        self.mean = torch.full(shape, mean0, dtype=torch.float64)
        self.var = torch.full(shape, var0, dtype=torch.float64)
        self.m = momentum

    def update(self, mean, var_biased, n):
        self.mean = (1 - self.m) * self.mean + self.m * mean.double().reshape(self.mean.shape)
        self.var = (1 - self.m) * self.var + self.m * var_biased.double().reshape(self.var.shape) * n / (n - 1)


def bn_train(x):
    dims = (0,) + spatial_dims(x)
    return normalize(x, dims), x.mean(dim=dims), bvar(x, dims).flatten()


def bn_eval(x, rmean, rvar, eps=EPS):
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return (x - rmean.view(shape).to(x.dtype)) / torch.sqrt(rvar.view(shape).to(x.dtype) + eps)


def ghost_train(x, G):
    """Ghost batch j = samples n = j (mod G); returns y, per-ghost means and unbiased vars (G, C)."""
    N = x.shape[0]
    y = torch.empty_like(x)
    dims = (0,) + spatial_dims(x)
    means, uvars = [], []
    for j in range(G):
        idx = torch.arange(j, N, G)
        xj = x[idx]
        y[idx] = normalize(xj, dims)
        n = xj[:, 0].numel()
        means.append(xj.mean(dim=dims))
        uvars.append(bvar(xj, dims).flatten() * n / (n - 1))
    return y, torch.stack(means), torch.stack(uvars)


def gn_ref(x, G, eps=EPS):
    N, C = x.shape[:2]
    xg = x.reshape(N, G, -1)
    return normalize(xg, (2,), eps).reshape(x.shape)


def pn_ref(x, eps=EPS):
    return normalize(x, (1,), eps)


def bgn_train(x, G, eps=EPS):
    N = x.shape[0]
    f = x.reshape(N, -1)
    D = f.shape[1]
    L = D // G
    out = torch.empty_like(f)
    means, vars_ = [], []
    for g in range(G):
        blk = f[:, g * L : (g + 1) * L]
        out[:, g * L : (g + 1) * L] = normalize(blk, (0, 1), eps)
        means.append(blk.mean())
        vars_.append(bvar(blk, (0, 1)).squeeze())
    return out.reshape(x.shape), torch.stack(means), torch.stack(vars_), N * L


def bgn_eval(x, G, rmean, rvar, eps=EPS):
    N = x.shape[0]
    f = x.reshape(N, G, -1)
    return ((f - rmean.view(1, G, 1).to(x.dtype)) / torch.sqrt(rvar.view(1, G, 1).to(x.dtype) + eps)).reshape(x.shape)


def gbgn_train(x, Gc, E, eps=EPS):
    """Authors' math with contiguous example groups of nearly equal size."""
    N, C = x.shape[:2]
    k = -(-N // E)
    base, extra = divmod(N, k)
    sizes = [base + 1] * extra + [base] * (k - extra)
    Cg = C // Gc
    out = torch.empty_like(x)
    start = 0
    for s in sizes:
        for g in range(Gc):
            blk = x[start : start + s, g * Cg : (g + 1) * Cg]
            mu = blk.mean()
            var = torch.clamp((blk * blk).mean() - mu * mu, min=0)
            out[start : start + s, g * Cg : (g + 1) * Cg] = (blk - mu) / torch.sqrt(var + eps)
        start += s
    return out


def example_weighted(x, pop_mean, pop_ex2, alpha, eps=EPS):
    """Inference example weighing (docs/methods.md) on (N, K, L) with pop stats (K,)."""
    mu_ex = x.mean(dim=2, keepdim=True)
    ex2 = (x**2).mean(dim=2, keepdim=True)
    mu = (1 - alpha) * pop_mean.view(1, -1, 1).to(x.dtype) + alpha * mu_ex
    s = (1 - alpha) * pop_ex2.view(1, -1, 1).to(x.dtype) + alpha * ex2
    var = torch.clamp(s - mu**2, min=0)
    return (x - mu) / torch.sqrt(var + eps)


def sn_train(x, wm, wv, eps=EPS):
    N, C = x.shape[:2]
    x3 = x.reshape(N, C, -1)
    mu_in = x3.mean(2, keepdim=True)
    var_in = bvar(x3, (2,))
    temp = var_in + mu_in**2
    mu_ln = mu_in.mean(1, keepdim=True)
    var_ln = temp.mean(1, keepdim=True) - mu_ln**2
    mu_bn = mu_in.mean(0, keepdim=True)
    var_bn = temp.mean(0, keepdim=True) - mu_bn**2
    a, b = torch.softmax(wm, 0), torch.softmax(wv, 0)
    mu = a[0] * mu_in + a[1] * mu_ln + a[2] * mu_bn
    var = b[0] * var_in + b[1] * var_ln + b[2] * var_bn
    return ((x3 - mu) / torch.sqrt(var + eps)).reshape(x.shape), mu_bn.flatten(), var_bn.flatten()


#: Settings without a default that are not group counts: a method refuses to build without them.
REQUIRED_SETTINGS = {"mabn": {"buffer_size": 2}}


def group_counts(name: str, count: int = 2) -> dict[str, int]:
    """Every group count that the method ``name`` declares (``group_args``) set to ``count`` (2 divides
    ``C = 4`` (``channels``), ``D = C * S`` (``flat``) and the test batches (``batch``)), plus the
    method's :data:`REQUIRED_SETTINGS`."""
    return {**{arg.name: count for arg in norm_group_args(name)}, **REQUIRED_SETTINGS.get(name, {})}


#: Settings that make the generic tests exercise a method's harder code path (on top of its
#: declared group counts).
SPECIAL_SPECS = {
    "gnflat": {"num_groups": 6},  # groups of D/G = 10 values: parts of a channel
    "bgn": {"num_groups": 6},  # groups straddle channels (unfused affine path)
    "gbgn": {"examples_per_group": 2},
    "hn": {"mean": "bn", "std": "bn+en:1"},
    "brn": {"r_max_start_step": 0, "r_max_end_step": 0, "d_max_start_step": 0, "d_max_end_step": 0},
    "frn": {"learnable_eps": True},
    "evonorm_b0": {},
    "evonorm_s0": {"num_groups": 2},
    "mabn": {"buffer_size": 2, "warmup_iters": 0, "renorm_start_step": 0},
    "cbn": {"window": 2},  # without a convolution attached: BN's statistics
}

#: One small configuration per registered method (C = 4), used by the generic tests: derived from
#: the registry, so a new method (in-tree or an installed plugin) is never skipped.
ALL_SPECS = {name: {**group_counts(name), **SPECIAL_SPECS.get(name, {})} for name in available_norms()}

#: The methods whose layers declare inference example weighing (``supports_example_weighing``).
WEIGHING = [
    name for name in sorted(ALL_SPECS) if getattr(norm_factory(name), "supports_example_weighing", False) is True
]


def sync_bn_worker(rank, world, init_file, x, out_dir):
    """Process body of the 2-process gloo test (lives here so that spawn can import it)."""
    import os

    from normlightning.norms import BatchNorm

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        layer = BatchNorm(3).double()
        layer.sync_statistics = True
        xs = x.chunk(world)[rank].clone().requires_grad_()
        y = layer(xs)
        (y * torch.arange(y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        torch.save(
            {"y": y.detach(), "g": xs.grad, "rm": layer.running_mean, "rv": layer.running_var},
            os.path.join(out_dir, f"{rank}.pt"),
        )
        torch.distributed.barrier()  # both ranks done with collectives before the group is torn down
    finally:
        torch.distributed.destroy_process_group()
