"""The injection keeps every option of ``torch.nn.BatchNorm1d/2d/3d`` (eps, momentum incl. None,
affine, track_running_stats) or refuses, naming the layer and the option (issue 28).

The reference is always the original torch module (a deep copy taken before injecting).
"""

from __future__ import annotations

import copy
import io
import itertools

import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from normlightning.injection import inject
from normlightning.injection.apply import apply_spec
from normlightning.injection.fold import fold_norms
from normlightning.injection.spec import CHECKPOINT_KEY
from normlightning.norms import available_norms, build_norm
from normlightning.norms.model_walk import is_batch_statistic_layer
from normlightning.norms.zoo_factory import norm_layer
from normlightning.tasks import BaseTask
from normlightning.training.last_batch import check_last_training_batch
from normlightning.training.norm_sync import set_statistics_sync

C = 4
BN_NAMES = ("bn3", "bn2", "bn1")
#: (affine, track_running_stats, momentum, eps): every combination the test covers.
BN_OPTIONS = list(itertools.product((True, False), (True, False), (0.1, 0.3, None), (1e-5, 1e-2)))


def _options_id(options) -> str:
    affine, track, momentum, eps = options
    return f"affine={affine}-track={track}-momentum={momentum}-eps={eps}"


class ThreeBatchNorms(nn.Module):
    """``BatchNorm3d`` on ``(N, C, 2, 2, 2)``, then ``BatchNorm2d`` on ``(N, C, 4, 2)``, then
    ``BatchNorm1d`` on ``(N, C, 8)``, each built with the same options."""

    def __init__(self, affine: bool, track: bool, momentum: float | None, eps: float) -> None:
        super().__init__()
        options = {"eps": eps, "momentum": momentum, "affine": affine, "track_running_stats": track}
        self.bn3 = nn.BatchNorm3d(C, **options)
        self.bn2 = nn.BatchNorm2d(C, **options)
        self.bn1 = nn.BatchNorm1d(C, **options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        return self.bn1(self.bn2(self.bn3(x).reshape(n, C, 4, 2)).reshape(n, C, 8))


def _model(options) -> ThreeBatchNorms:
    """The model in float64 with non-trivial affine parameters, after one training step (so that a
    tracking model has running statistics and ``num_batches_tracked`` that are not their initial values)."""
    model = ThreeBatchNorms(*options).double()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for bn in (model.bn1, model.bn2, model.bn3):
            if bn.affine:
                bn.weight.copy_(torch.rand(C, generator=generator, dtype=torch.float64) + 0.5)
                bn.bias.copy_(torch.randn(C, generator=generator, dtype=torch.float64))
        model.train()(_batch(0))
    return model


def _batch(seed: int) -> torch.Tensor:
    return torch.randn(4, C, 2, 2, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _statistics(layer: nn.Module) -> dict[str, torch.Tensor | None]:
    return {name: getattr(layer, name) for name in ("running_mean", "running_var", "num_batches_tracked")}


@pytest.mark.parametrize("options", BN_OPTIONS, ids=_options_id)
def test_bn_keeps_every_batchnorm_option(options):
    """Injecting ``bn``: train- and eval-mode outputs, and the running statistics after two more
    training steps (momentum ``None`` weighs by the step count), equal the torch module's."""
    model = _model(options)
    reference = copy.deepcopy(model)
    _, rows = inject(model, method="bn")
    assert [r["layer"] for r in rows] == list(BN_NAMES)
    for seed in (1, 2):
        torch.testing.assert_close(model.train()(_batch(seed)), reference.train()(_batch(seed)))
    for name in BN_NAMES:
        ours, torchs = _statistics(model.get_submodule(name)), _statistics(reference.get_submodule(name))
        for key, value in torchs.items():
            if value is None:  # track_running_stats=False: no buffers, as torch
                assert ours[key] is None, (name, key)
            else:
                torch.testing.assert_close(ours[key], value, msg=f"{name}.{key}")
    torch.testing.assert_close(model.eval()(_batch(3)), reference.eval()(_batch(3)))
    affine, track, momentum, eps = options
    for name, row in zip(BN_NAMES, rows):
        layer = model.get_submodule(name)
        assert (layer.eps, layer.momentum, layer.affine, layer.track_running_stats) == (eps, momentum, affine, track)
        assert ("track_running_stats=False" in row["args"]) is (not track), row["args"]  # shown when not the default
        assert is_batch_statistic_layer(layer) is track


#: (id, method, injection keyword arguments) of every other method; ``hn_per_example`` has no batch set.
OTHER_METHODS = [
    ("gn", "gn", {"num_groups": 2}),
    ("gnflat", "gnflat", {"num_groups": 2}),
    ("ln", "ln", {}),
    ("in", "in", {}),
    ("pn", "pn", {}),
    ("ghost", "ghost", {"num_groups": 2}),
    ("seqnorm", "seqnorm", {"kwargs": {"channel_groups": 2, "batch_groups": 2}}),
    ("bgn", "bgn", {"num_groups": 2}),
    ("gbgn", "gbgn", {"num_groups": 2}),
    ("hn", "hn", {}),
    ("hn_per_example", "hn", {"kwargs": {"mean": "in", "std": "ln"}}),
    ("sn", "sn", {}),
    ("brn", "brn", {}),
    ("frn", "frn", {}),
    ("evonorm_b0", "evonorm_b0", {}),
    ("evonorm_s0", "evonorm_s0", {"num_groups": 2}),
    ("mabn", "mabn", {"kwargs": {"buffer_size": 2}}),
]
#: The methods whose layers keep running statistics: they refuse ``track_running_stats=False``.
RUNNING_STATISTICS = {"ghost", "seqnorm", "bgn", "gbgn", "hn", "sn", "brn", "evonorm_b0", "mabn"}


def test_other_methods_cover_every_registered_method():
    """A new method cannot be left out of the option checks below quietly."""
    # cbn needs a convolution before each layer: its own test below
    assert {method for _, method, _ in OTHER_METHODS} | {"bn", "cbn"} == set(available_norms())


@pytest.mark.parametrize("options", BN_OPTIONS, ids=_options_id)
@pytest.mark.parametrize(("key", "method", "settings"), OTHER_METHODS, ids=[m[0] for m in OTHER_METHODS])
def test_other_methods_keep_the_options_or_refuse(key, method, settings, options):
    """Every other method takes ``eps`` and ``affine``; those with running statistics take a non-default
    ``momentum`` (incl. ``None``) and refuse ``track_running_stats=False`` naming the layer and the option;
    those without compute their statistics from the input at inference, as the untracked BatchNorm did
    (their eval output equals their train output on the same batch)."""
    affine, track, momentum, eps = options
    model = _model(options)
    x = _batch(1)
    if not track and key in RUNNING_STATISTICS:
        with pytest.raises(ValueError, match=r"layer 'bn3' \(BatchNorm3d\) has track_running_stats=False"):
            inject(model, method=method, example_input=x, **settings)
        return
    inject(model, method=method, example_input=x, **settings)
    for name in BN_NAMES:
        layer = model.get_submodule(name)
        assert layer.eps == eps and layer.affine is affine and (layer.weight is None) is (not affine)
        if key in RUNNING_STATISTICS:
            required = {"num_groups": settings["num_groups"]} if method == "bgn" else {}  # bgn has no default G
            default = build_norm(method, C, **required, **settings.get("kwargs", {})).momentum
            assert layer.momentum == (default if momentum == 0.1 else momentum), name
            assert is_batch_statistic_layer(layer)
        else:
            assert not layer.uses_batch_statistics and not hasattr(layer, "running_mean"), name
    if key not in RUNNING_STATISTICS:
        torch.testing.assert_close(model.eval()(x), model.train()(x))


def test_untracked_bn_survives_the_checkpoint_spec():
    """The spec stored in checkpoints (read back with ``weights_only=True``) rebuilds ``bn`` with
    ``track_running_stats=False``: the state dict loads strictly and eval uses batch statistics."""
    options = (True, False, 0.3, 1e-3)
    model = _model(options)
    reference = copy.deepcopy(model)
    spec, _ = inject(model, method="bn")
    checkpoint = {"state_dict": model.state_dict(), CHECKPOINT_KEY: spec}
    buffer = io.BytesIO()  # in memory: nothing is written into the checkout
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    fresh = _model(options)
    assert apply_spec(fresh, loaded[CHECKPOINT_KEY]) == 3
    fresh.load_state_dict(loaded["state_dict"], strict=True)
    assert all(fresh.get_submodule(n).track_running_stats is False for n in BN_NAMES)
    torch.testing.assert_close(fresh.eval()(_batch(3)), reference.eval()(_batch(3)))


def test_untracked_bn_layer_matches_torch_and_has_no_constant_statistics():
    """``BatchNorm(track_running_stats=False)`` on its own: torch's buffers of ``None``, batch statistics
    in eval (``F.batch_norm`` in training mode is the reference), no inference statistics, no alpha."""
    layer = build_norm("bn", C, track_running_stats=False, dtype=torch.float64)
    assert layer.running_mean is None and layer.running_var is None and layer.num_batches_tracked is None
    assert layer.running_stat_names == () and "track_running_stats=False" in repr(layer)
    layer.reset_running_stats()  # nothing to reset, no error
    x = _batch(4)
    expected = nn.functional.batch_norm(x, None, None, layer.weight, layer.bias, training=True, eps=layer.eps)
    torch.testing.assert_close(layer.eval()(x), expected)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        layer.inference_channel_statistics()
    conv_bn = nn.Sequential(nn.Conv2d(C, C, 1), build_norm("bn", C, track_running_stats=False)).eval()
    with pytest.raises(ValueError, match=r"1: BatchNorm with track_running_stats=False"):  # nothing to fold
        fold_norms(conv_bn, torch.randn(2, C, 3, 3))
    with pytest.raises(ValueError, match="track_running_stats=False.*alpha"):
        build_norm("bn", C, track_running_stats=False, alpha=0.5)
    layer.alpha = 0.5
    with pytest.raises(ValueError, match="track_running_stats=False.*alpha"):
        layer(x)
    with pytest.raises(ValueError, match="track_running_stats must be True or False"):
        build_norm("bn", C, track_running_stats="no")


def test_norm_layer_passes_track_running_stats_to_bn_and_refuses_it_for_the_others():
    """torchvision/timm's ``norm_layer(C, track_running_stats=False)``: ``bn`` keeps it, ``ghost`` refuses."""
    layer = norm_layer("bn")(C, track_running_stats=False)
    assert layer.track_running_stats is False and layer.running_mean is None
    with pytest.raises(ValueError, match="track_running_stats=False"):
        norm_layer("ghost", num_groups=2)(C, track_running_stats=False)


def test_untracked_bn_is_synchronized_in_training_and_checked_on_a_last_batch_of_one():
    """Without running statistics the sets still include the batch axis: ``set_statistics_sync`` turns
    on the sync of an untracked ``bn`` (as ``SyncBatchNorm`` converts an untracked BatchNorm), whose
    moments path (no process group: a world of one) gives torch's training output; and the setup check
    of the last training batch covers models whose only batch layer keeps no running statistics."""
    model = _model((True, False, 0.1, 1e-5))
    inject(model, method="bn")
    assert set_statistics_sync(model, True) == 3
    x = _batch(5)
    layer = model.bn3
    expected = nn.functional.batch_norm(x, None, None, layer.weight, layer.bias, training=True, eps=layer.eps)
    torch.testing.assert_close(layer.train()(x), expected)
    mlp = nn.Sequential(nn.Linear(C, C), nn.BatchNorm1d(C, track_running_stats=False))
    loader = DataLoader(TensorDataset(torch.randn(17, C)), batch_size=8)
    with pytest.raises(ValueError, match="drop_last"):
        check_last_training_batch(mlp, loader)


class UntrackedTask(BaseTask):
    """A task whose network's BatchNorm keeps no running statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, C), nn.BatchNorm1d(C, track_running_stats=False), nn.Linear(C, 1))

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).pow(2).mean()


def test_load_from_checkpoint_rebuilds_the_untracked_bn(tmp_path):
    """``load_from_checkpoint`` rebuilds ``bn`` with ``track_running_stats=False`` from the stored spec."""
    task = UntrackedTask()
    inject(task, method="bn")
    trainer = Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(task, train_dataloaders=DataLoader(TensorDataset(torch.rand(8, 2)), batch_size=4))
    trainer.save_checkpoint(tmp_path / "untracked.ckpt")
    loaded = UntrackedTask.load_from_checkpoint(tmp_path / "untracked.ckpt")
    assert loaded.net[1].track_running_stats is False and loaded.net[1].running_mean is None
    x = torch.rand(5, 2)
    torch.testing.assert_close(loaded.eval().net(x), task.eval().net(x))


def test_cbn_refuses_an_untracked_batchnorm_naming_the_option():
    """cbn normalizes with running statistics at inference, so it refuses ``track_running_stats=False``."""
    model = nn.Sequential(nn.Conv3d(C, C, 1), nn.BatchNorm3d(C, track_running_stats=False)).double()
    with pytest.raises(ValueError, match=r"layer '1' \(BatchNorm3d\) has track_running_stats=False"):
        inject(model, method="cbn", example_input=_batch(1))
