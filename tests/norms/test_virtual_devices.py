"""``virtual_devices = k``: batch statistics per ``k`` equal chunks of the batch, as ``k`` DDP processes.

The reference is the explicit computation: a deep copy of the layer (``virtual_devices=1``) per chunk,
each from the same buffers; outputs concatenated, gradients summed over the copies, running statistics
the mean of the copies' updated buffers.
"""

from __future__ import annotations

import copy

import pytest
import torch
from norm_reference import group_counts
from torch import nn

from normlightning.callbacks.run_hparams import norm_hparams
from normlightning.injection import format_summary, inject, restore_injection, store_injection
from normlightning.injection.rules import InjectionRules
from normlightning.norms import available_norms, build_norm
from normlightning.norms.registry import norm_accepts
from normlightning.training.norm_sync import set_statistics_sync

C = 4
#: Arguments that make each registered method valid (and non-trivial) on ``(N, 4, 3, 3)`` inputs.
ARGS = {
    "gn": {"num_groups": 2},
    "ghost": {"num_groups": 2},
    "seqnorm": {"channel_groups": 2, "batch_groups": 2},
    "bgn": {"num_groups": 6},  # groups of D = 36 that split channels
    "gnflat": {"num_groups": 4},
    "evonorm_s0": {"num_groups": 2},  # divides D = 36 here and 64 in the per-example test
    "gbgn": {"channel_groups": 2},
    "brn": {"r_max_start_step": 0, "r_max_end_step": 1, "d_max_start_step": 0, "d_max_end_step": 1},
}
#: Variants beyond the defaults: hn with a learned std mixture, bn with a cumulative average.
VARIANTS = [("hn", {"mean": "bn", "std": "bn+en:2+in"}), ("bn", {"momentum": None}), ("gbgn", {"momentum": None})]


def _layer(method: str, virtual_devices: int = 1, **kwargs) -> nn.Module:
    kwargs = {**ARGS.get(method, {}), **kwargs}
    return build_norm(method, C, dtype=torch.float64, virtual_devices=virtual_devices, **kwargs)


def _batch_methods() -> list[str]:
    """Every registered method whose layer (built with :data:`ARGS`) keeps batch statistics."""
    methods = []
    for method in available_norms():
        layer = build_norm(method, C, **ARGS.get(method, group_counts(method)))
        if getattr(layer, "uses_batch_statistics", False):
            methods.append(method)
    return methods


def _per_example_methods() -> list[str]:
    return [m for m in available_norms() if m not in _batch_methods()]


def _splitting_methods() -> list[str]:
    """The batch-statistic methods that take ``virtual_devices`` (the others are refused by the injection)."""
    return [m for m in _batch_methods() if norm_accepts(m, "virtual_devices")]


BATCH_CASES = [(m, {}) for m in _splitting_methods()] + VARIANTS


def test_the_batch_methods_are_the_expected_ones():
    assert set(_splitting_methods()) == {"bn", "brn", "ghost", "seqnorm", "bgn", "gbgn", "hn", "sn", "evonorm_b0"}
    # statistics that span iterations (mabn's windows, cbn's past iterations): no per-device meaning defined
    assert set(_batch_methods()) - set(_splitting_methods()) == {"mabn", "cbn"}
    assert {"gn", "ln", "in", "pn", "evonorm_s0", "frn"} <= set(_per_example_methods())


@pytest.mark.parametrize("method", ["mabn", "cbn"])
def test_methods_with_statistics_across_iterations_are_refused(method):
    model = nn.Sequential(nn.Conv2d(3, C, 1), nn.BatchNorm2d(C))
    with pytest.raises(ValueError, match=r"no virtual_devices argument, so norm.virtual_devices=2 cannot apply"):
        inject(
            model,
            method=method,
            virtual_devices=2,
            batch_size=4,
            example_input=torch.randn(4, 3, 3, 3),
            kwargs=group_counts(method),
        )  # neither has group counts; mabn's buffer_size


def _reference_step(reference: nn.Module, x: torch.Tensor, upstream: torch.Tensor, k: int):
    """One training step of ``k`` processes: a copy of ``reference`` per chunk of ``x``, each from
    ``reference``'s buffers. Returns the output, the input gradient and the parameter gradients (summed
    over the copies) and leaves in ``reference`` the mean of the copies' running statistics."""
    x = x.detach().requires_grad_(True)
    copies = [copy.deepcopy(reference) for _ in range(k)]
    out = torch.cat([c(chunk) for c, chunk in zip(copies, x.chunk(k))])
    (out * upstream).sum().backward()
    grads = {n: sum(dict(c.named_parameters())[n].grad for c in copies) for n, _ in reference.named_parameters()}
    statistics = set(reference.running_stat_names)
    with torch.no_grad():
        for name, buf in reference.named_buffers():
            updated = [dict(c.named_buffers())[name] for c in copies]
            if name in statistics:
                buf.copy_(torch.stack(updated).mean(0))
            else:  # counters: each copy advanced them alike
                assert all(torch.equal(u, updated[0]) for u in updated), name
                buf.copy_(updated[0])
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize(
    ("method", "kwargs"), BATCH_CASES, ids=[f"{m}-{'-'.join(map(str, kw.values()))}" for m, kw in BATCH_CASES]
)
def test_every_batch_method_equals_the_per_chunk_computation(method, kwargs, k):
    torch.manual_seed(0)
    layer = _layer(method, virtual_devices=k, **kwargs).train()
    with torch.no_grad():  # non-trivial affine (and mixture weights where the method has them)
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    reference = copy.deepcopy(layer)
    reference.virtual_devices = 1
    whole_batch = copy.deepcopy(reference)  # statistics of the whole batch: other outputs
    first = torch.randn(8, C, 3, 3, dtype=torch.float64)
    assert not torch.allclose(whole_batch(first), copy.deepcopy(layer)(first), atol=1e-3)
    for step in range(3):  # later steps start from averaged buffers (brn's r, d read them)
        x = torch.randn(8, C, 3, 3, dtype=torch.float64) * (1 + step) + step
        upstream = torch.randn_like(x)
        expected, expected_input_grad, expected_grads = _reference_step(reference, x, upstream, k)
        layer.zero_grad()
        x = x.requires_grad_(True)
        out = layer(x)
        (out * upstream).sum().backward()
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(x.grad, expected_input_grad, rtol=1e-9, atol=1e-10)
        for name, p in layer.named_parameters():
            torch.testing.assert_close(p.grad, expected_grads[name], rtol=1e-9, atol=1e-10, msg=name)
        for (name, buf), (_, want) in zip(layer.named_buffers(), reference.named_buffers()):
            torch.testing.assert_close(buf, want, rtol=1e-12, atol=1e-12, msg=name)
    assert int(layer.num_batches_tracked) == 3  # one update per forward, not per chunk
    layer.eval(), reference.eval()
    torch.testing.assert_close(layer(x.detach()), reference(x.detach()), rtol=1e-10, atol=1e-10)


def test_cumulative_average_is_the_mean_of_every_chunk_statistic():
    """momentum=None: after T steps the running mean is the mean over steps and chunks of the chunk means,
    the running variance that of the chunks' unbiased variances."""
    k, layer = 2, _layer("bn", virtual_devices=2, momentum=None).train()
    xs = [torch.randn(6, C, 3, 3, dtype=torch.float64) * (t + 1) + t for t in range(3)]
    for x in xs:
        layer(x)
    chunks = [chunk for x in xs for chunk in x.chunk(k)]
    mean = torch.stack([c.mean(dim=(0, 2, 3)) for c in chunks]).mean(0)
    var = torch.stack([c.transpose(0, 1).reshape(C, -1).var(dim=1, unbiased=True) for c in chunks]).mean(0)
    torch.testing.assert_close(layer.running_mean, mean)
    torch.testing.assert_close(layer.running_var, var)


def test_a_batch_that_does_not_split_is_refused_naming_both_settings():
    layer = _layer("bn", virtual_devices=3).train()
    with pytest.raises(ValueError, match=r"N=8 .*norm\.virtual_devices=3.*data\.batch_size"):
        layer(torch.randn(8, C, 3, 3, dtype=torch.float64))
    assert int(layer.num_batches_tracked) == 0
    layer.eval()(torch.randn(8, C, 3, 3, dtype=torch.float64))  # inference: the whole batch, no split
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    for settings in ({"method": "ghost", "num_groups": "auto"}, {"method": "bn"}):  # auto B/k; or refused at setup
        with pytest.raises(ValueError, match=r"data\.batch_size=10.*norm\.virtual_devices=4"):
            inject(copy.deepcopy(model), batch_size=10, virtual_devices=4, **settings)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="virtual_devices"):
            _layer("bn", virtual_devices=bad)
        with pytest.raises(ValueError, match=r"norm\.virtual_devices"):
            InjectionRules(method="bn", virtual_devices=bad)
    with pytest.raises(ValueError, match=r"set norm\.virtual_devices, not virtual_devices in norm\.kwargs"):
        InjectionRules(method="bn", kwargs={"virtual_devices": 2})


@pytest.mark.parametrize("method", _per_example_methods() + ["hn-per-example"])
def test_per_example_methods_are_unchanged(method):
    """No batch statistics, nothing to split: the injection leaves virtual_devices out, and any N works."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, C, 1), nn.BatchNorm2d(C))
    settings = (
        {"method": "hn", "kwargs": {"mean": "in", "std": "ln"}}
        if method == "hn-per-example"
        else {"method": method, **({"num_groups": ARGS[method]["num_groups"]} if method in ARGS else {})}
    )
    plain = copy.deepcopy(model)
    x = torch.randn(3, 3, 4, 4)  # N = 3 does not split into 2: no error, no split
    spec, _ = inject(model, virtual_devices=2, batch_size=3, example_input=x, **settings)
    inject(plain, example_input=x, **settings)
    assert "virtual_devices" not in spec["layers"][0]["kwargs"]
    torch.testing.assert_close(model.train()(x), plain.train()(x), rtol=0, atol=0)


def test_auto_group_counts_use_the_per_device_batch():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
    example = torch.zeros(1, 3, 6, 6)  # D = 8 * 4 * 4 = 128
    overrides = [{"pattern": "3", "method": "ghost", "num_groups": "auto"}]
    whole, _ = inject(
        copy.deepcopy(model), method="bgn", num_groups="auto", batch_size=64, example_input=example, overrides=overrides
    )
    split, rows = inject(
        copy.deepcopy(model),
        method="bgn",
        num_groups="auto",
        batch_size=64,
        example_input=example,
        overrides=overrides,
        virtual_devices=32,
    )
    assert [r["kwargs"]["num_groups"] for r in whole["layers"]] == [128, 4]  # B = 64: bgn 256 fitted to D; ghost 4
    assert [r["kwargs"]["num_groups"] for r in split["layers"]] == [1, 1]  # B = 2 per device: bgn 1; ghost 1
    assert all(r["kwargs"]["virtual_devices"] == 32 for r in split["layers"])
    assert "num_groups auto->1 (B=2)" in rows[0]["args"] and "virtual_devices=32" in rows[0]["args"]


class _Task(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, C, 3, padding=1), nn.BatchNorm2d(C), nn.Conv2d(C, C, 1), nn.BatchNorm2d(C)
        )

    def forward(self, x):
        return self.net(x)


def test_spec_round_trip_summary_and_hparams_show_the_count(tmp_path):
    model = _Task()
    overrides = [{"pattern": r"net\.3", "method": "gn", "num_groups": 2}]
    rules = InjectionRules(method="bgn", num_groups=4, overrides=overrides, virtual_devices=2)
    spec, rows = inject(model, rules, example_input=torch.zeros(1, 3, 5, 5))
    assert spec["layers"][0]["kwargs"]["virtual_devices"] == 2 and "virtual_devices" not in spec["layers"][1]["kwargs"]
    assert "virtual_devices=2" in format_summary(rows).splitlines()[2]
    assert norm_hparams(model, spec, rules)["virtual_devices"] == 2
    assert norm_hparams(_Task(), None, None)["virtual_devices"] == 1
    checkpoint = {"state_dict": model.state_dict()}
    store_injection(model, checkpoint)
    torch.save(checkpoint, tmp_path / "model.ckpt")
    loaded = torch.load(tmp_path / "model.ckpt", weights_only=True)
    fresh = _Task()
    assert restore_injection(fresh, loaded) == 2
    fresh.load_state_dict(loaded["state_dict"])
    assert fresh.net[1].virtual_devices == 2 and "virtual_devices=2" in repr(fresh.net[1])
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(fresh.train()(x), model.train()(x), rtol=0, atol=0)


def test_synchronized_statistics_are_refused_with_virtual_devices():
    model = _Task()
    inject(model, method="bn", virtual_devices=2)
    with pytest.raises(ValueError, match=r"norm\.sync.*norm\.virtual_devices=2.*norm\.sync: false"):
        set_statistics_sync(model, True)
    assert not model.net[1].sync_statistics
    model.net[1].sync_statistics = True  # set by hand: the layer refuses at its training forward
    with pytest.raises(ValueError, match=r"norm\.virtual_devices=2 together with synchronized statistics"):
        model.train()(torch.randn(4, 3, 5, 5))


def test_two_gloo_processes_equal_two_virtual_devices(tmp_path):
    """2 DDP processes (per-process statistics, gradients averaged, running statistics averaged after every
    step) end 3 SGD steps with the parameters and buffers of one process with virtual_devices=2 on the same
    global batches; with 2 virtual devices in each of the 2 processes, with those of virtual_devices=4."""
    import torch.multiprocessing as mp
    from virtual_device_workers import batches, ddp_worker, small_model, train

    mp.spawn(ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), 8), nprocs=2, join=True)
    for per_process, in_one_process in ((1, 2), (2, 4)):
        ddp_state = torch.load(tmp_path / f"virtual{per_process}.pt")
        single = train(small_model(virtual_devices=in_one_process), batches(8))
        for name, value in single.state_dict().items():
            torch.testing.assert_close(value, ddp_state[name], rtol=1e-9, atol=1e-10, msg=name)
    # the statistics' batch changes the training: whole batch of 8, 4 per process, 2 per virtual device
    weights = [train(small_model(virtual_devices=1), batches(8)).state_dict()["0.weight"]]
    weights += [torch.load(tmp_path / f"virtual{k}.pt")["0.weight"] for k in (1, 2)]
    assert not torch.allclose(weights[0], weights[1], atol=1e-6) and not torch.allclose(
        weights[1], weights[2], atol=1e-6
    )
