"""Every experiment config in configs/ survives a ``fast_dev_run`` on CPU (one training and one
validation batch), with its dataset swapped for ``normlightning.data.Synthetic`` of the same
channel count and class count, so no config can rot unnoticed.

What is changed from the file, and why:

* ``data``: Synthetic images. Their side is the config's image side when the backbone needs it
  small anyway, else a smaller one the backbone accepts (:data:`TEST_SIDE`), to keep the file
  fast; the batch is :data:`BATCH` examples (a RandAugment wrapper keeps wrapping the swapped data).
* ``trainer``: CPU, one device, ``strategy: auto``, no logger, ``fast_dev_run: true``.
* ``norm``: group counts that depend on the batch are adapted to the test batch the way the
  config would be adapted by a user changing ``batch_size``: a fixed ``G_M`` (ghost batches of
  ``ghost``/``seqnorm``) becomes 2; ``auto`` counts and ghost-batch *sizes* are left alone.

Episodic configs (few-shot: ``FewShotTask``) get a synthetic stand-in with the same episode
structure (:func:`episodic_data`): a ``ClassSplitFewShotDataModule`` over Synthetic images with the
config's base classes (count or list), ``n_way`` validation classes where the config validates and
``n_way`` novel classes (or the config's class lists), the config's ``n_way``, ``test_shots``,
``val_shot`` and augmentation, but :data:`EPISODES` (one query per class, one validation episode,
two test episodes per ``K``: the 95% interval needs two). They run ``fit`` with ``fast_dev_run: 2``
(two training batches, the validation episode) and then the episodic ``test`` on the fitted model
(``fast_dev_run`` caps every test loader at two batches, i.e. both episodes of every ``K``), which
must log ``test/acc_{K}shot`` and ``test/ci95_{K}shot`` for every ``K`` of the config.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from normlightning.cli import build_cli

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
BATCH = 4
SYNTHETIC = "normlightning.data.Synthetic"
RANDAUGMENT = "normlightning.data.randaugment.RandAugmented"

#: data class_path -> (channels, classes, real image side from init_args or fixed)
DATASETS: dict[str, tuple[int, int, Any]] = {
    "normlightning.data.CIFAR10": (3, 10, 32),
    "normlightning.data.CIFAR100": (3, 100, 32),
    "normlightning.data.svhn.SVHN": (3, 10, 32),
    "normlightning.data.Digits": (1, 10, 8),
    "normlightning.data.ImageNet": (3, 1000, "image_size"),
    "normlightning.data.caltech256.Caltech256": (3, 256, "image_size"),
    "normlightning.data.flowers102.Flowers102": (3, 102, "image_size"),
    "normlightning.data.cub200.CUB200": (3, 200, "image_size"),
    "normlightning.data.mnist_subset.MNISTSubset": (1, 10, 28),
}
#: image side used in the test, by the real side: 32 px data runs at 16, 224 px (ImageNet-style
#: torchvision backbones, five stride-2 stages: 2x2 at the last stage, so per-example sets such as
#: IN still have more than one element) at 64; 84 px few-shot data (ResNet-12: four 2x2 max-pools,
#: DropBlock in blocks 3-4 in its MetaOptNet variant, whose norm layers then see 8x8 and 4x4 maps) at 32; tiny images
#: as they are.
TEST_SIDE = {32: 16, 84: 32, 224: 64}
EPISODIC_TASKS = ("normlightning.tasks.few_shot.FewShotTask",)
CLASS_SPLIT = "normlightning.data.few_shot.ClassSplitFewShotDataModule"
#: few-shot data class_path -> channels of its images (side: its ``image_size``; base classes: its
#: ``num_base_classes``); ClassSplitFewShotDataModule configs swap their ``source`` instead.
EPISODIC_DATASETS: dict[str, int] = {"normlightning.data.mini_imagenet.MiniImageNet": 3}
#: the episode counts of the smoke run (the shots, n_way and augmentation stay the config's)
EPISODES = {"q_query": 1, "test_episodes": 2, "val_episodes": 1}
#: the config's episode protocol and augmentation, copied to the stand-in when set
EPISODE_KEYS = ("n_way", "test_shots", "val_shot", "episode_seed", "augment", "crop_padding", "color_jitter", "flip")


def _default(class_path: str, name: str = "image_size") -> Any:
    """The DataModule's default for argument ``name`` (read from the signatures, not repeated here).

    The first ``__init__`` along the MRO that declares ``name`` gives it (subclasses pass their
    other arguments on with ``**kwargs``).
    """
    import importlib
    import inspect

    module_name, _, cls_name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        parameter = inspect.signature(init).parameters.get(name) if init is not None else None
        if parameter is not None and parameter.kind is not parameter.VAR_KEYWORD:
            return parameter.default
    raise KeyError(f"test_paper_configs: {class_path} has no argument {name!r}")


def _default_side(class_path: str) -> int:
    """The DataModule's default ``image_size``."""
    return int(_default(class_path))


def synthetic_data(data: dict[str, Any]) -> dict[str, Any]:
    """The config's ``data`` section with the dataset replaced by Synthetic (see the module doc)."""
    if data["class_path"] == RANDAUGMENT:
        out = copy.deepcopy(data)
        out["init_args"]["data"] = synthetic_data(data["init_args"]["data"])
        return out
    class_path, init_args = data["class_path"], data.get("init_args") or {}
    if class_path not in DATASETS:
        raise KeyError(f"test_paper_configs: no synthetic stand-in for data class {class_path!r}; add it to DATASETS")
    channels, classes, side = DATASETS[class_path]
    if side == "image_size":
        side = int(init_args.get("image_size", _default_side(class_path)))
    side = TEST_SIDE.get(side, side)
    return {
        "class_path": SYNTHETIC,
        "init_args": {
            "input_shape": [channels, side, side],
            "num_classes": classes,
            "num_train": 2 * BATCH,
            "num_val": BATCH,
            "num_test": BATCH,
            "batch_size": BATCH,
        },
    }


def episodic_data(data: dict[str, Any]) -> dict[str, Any]:
    """An episodic ``data`` section's stand-in: ClassSplitFewShotDataModule over Synthetic (see the module doc)."""
    class_path, init_args = data["class_path"], data.get("init_args") or {}
    if class_path != CLASS_SPLIT and class_path not in EPISODIC_DATASETS:
        raise KeyError(f"test_paper_configs: no synthetic stand-in for episodic data class {class_path!r}")
    protocol = {key: init_args[key] for key in EPISODE_KEYS if key in init_args}
    n_way = int(protocol.get("n_way", _default(class_path, "n_way")))
    validates = int(init_args.get("val_episodes", _default(class_path, "val_episodes"))) > 0
    if class_path == CLASS_SPLIT:
        validates = validates and bool(init_args.get("val_classes"))
        source = synthetic_data(init_args["source"])
        keys = ("base_classes", "val_classes", "novel_classes")
        classes = {key: list(init_args[key]) for key in keys if init_args.get(key)}
        num_classes = source["init_args"]["num_classes"]
    else:
        side = int(init_args.get("image_size", _default_side(class_path)))
        side = TEST_SIDE.get(side, side)
        base = init_args.get("num_base_classes", _default(class_path, "num_base_classes"))
        if base is None:
            raise KeyError(f"test_paper_configs: {class_path} config without num_base_classes; set it")
        num_val = n_way if validates else 0
        num_classes = int(base) + num_val + n_way
        classes = {"base_classes": list(range(base)), "novel_classes": list(range(base + num_val, num_classes))}
        if validates:
            classes["val_classes"] = list(range(base, base + num_val))
        source = {"class_path": SYNTHETIC, "init_args": {"input_shape": [EPISODIC_DATASETS[class_path], side, side]}}
    # every val/novel class needs k_shot + q_query examples; labels are uniform, so pool ~4x that per class
    shots = [*protocol.get("test_shots", _default(class_path, "test_shots"))]
    shots.append(protocol.get("val_shot", _default(class_path, "val_shot")))
    need = (max(int(k) for k in shots) + EPISODES["q_query"]) * num_classes
    source["init_args"].update(
        num_classes=num_classes, num_train=2 * need, num_val=need, num_test=need, batch_size=BATCH
    )
    episodes = dict(EPISODES, val_episodes=EPISODES["val_episodes"] if validates else 0)
    return {
        "class_path": CLASS_SPLIT,
        "init_args": {"source": source, **classes, **protocol, **episodes, "batch_size": BATCH, "num_workers": 0},
    }


def smoke_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config to run: synthetic data, CPU fast_dev_run, batch-dependent group counts adapted."""
    out = copy.deepcopy(config)
    out["data"] = episodic_data(config["data"]) if _is_episodic(config) else synthetic_data(config["data"])
    trainer = out.setdefault("trainer", {})
    trainer.update(
        accelerator="cpu",
        devices=1,
        strategy="auto",
        logger=False,
        fast_dev_run=True,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.pop("num_nodes", None)
    if _is_episodic(config):  # two test episodes per K (see the module doc)
        trainer["fast_dev_run"] = EPISODES["test_episodes"]
    norm = out.get("norm") or {}
    if norm.get("method") == "ghost" and isinstance(norm.get("num_groups"), int):
        norm["num_groups"] = 2
    kwargs = norm.get("kwargs") or {}
    if norm.get("method") == "seqnorm" and isinstance(kwargs.get("batch_groups"), int):
        kwargs["batch_groups"] = 2
    return out


def _is_episodic(config: dict[str, Any]) -> bool:
    return config.get("model", {}).get("class_path") in EPISODIC_TASKS


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_fast_dev_run(path: Path, run_dir: Path) -> None:
    config = yaml.safe_load(path.read_text())
    episodic = _is_episodic(config)
    smoke = smoke_config(config)
    smoke_path = run_dir / path.name
    smoke_path.write_text(yaml.safe_dump(smoke))
    cli = build_cli(["fit", "--config", str(smoke_path)])
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    # the run happened: fast_dev_run optimizer steps on the swapped data, with the config's model
    assert trainer.global_step == (EPISODES["test_episodes"] if episodic else 1)
    losses = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/loss")}
    assert losses and all(math.isfinite(v) for v in losses.values()), losses  # the step's loss was logged, finite
    num_classes = smoke["data"]["init_args"].get("num_classes", data.num_classes)
    if episodic:  # the base classes: the config's list or count
        data_args = config["data"]["init_args"]
        num_classes = len(data_args["base_classes"]) if "base_classes" in data_args else data_args["num_base_classes"]
    assert model.hparams.num_classes == data.num_classes == num_classes
    assert tuple(model.hparams.input_shape) == tuple(data.input_shape)
    assert model.hparams.backbone == config["model"]["init_args"]["backbone"]
    assert (model.hparams.get("backbone_kwargs") or {}) == (config["model"]["init_args"].get("backbone_kwargs") or {})
    method = (config.get("norm") or {}).get("method")
    if method is not None:  # the injected layers are the configured method's
        from normlightning.norms import build_norm

        expected = type(build_norm(method, 64, **_layer_kwargs(config["norm"]))).__name__
        assert expected in {type(m).__name__ for m in model.modules()}
    if episodic:
        _check_episodes(config, smoke, cli)


def _check_episodes(config: dict[str, Any], smoke: dict[str, Any], cli: Any) -> None:
    """Validation episodes ran during fit; the episodic test of the fitted model logs every K's accuracy and
    interval."""

    from normlightning.tasks.few_shot import FewShotTask

    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    assert isinstance(model, FewShotTask)
    if data.val_episodes:
        assert {"val/acc1", "val/loss"} <= set(trainer.callback_metrics)
    data_args, class_path = config["data"]["init_args"], config["data"]["class_path"]
    shots = [int(k) for k in data_args.get("test_shots", _default(class_path, "test_shots"))]
    assert data.test_shots == shots and data.n_way == data_args.get("n_way", _default(class_path, "n_way"))
    trainer.test(model, datamodule=data)
    metrics = trainer.callback_metrics
    for k in shots:
        assert len(model.test_episode_accuracies[k]) == smoke["data"]["init_args"]["test_episodes"]
        acc, ci95 = float(metrics[f"test/acc_{k}shot"]), float(metrics[f"test/ci95_{k}shot"])
        assert math.isfinite(acc) and 0.0 <= acc <= 1.0, (k, acc)
        assert math.isfinite(ci95) and 0.0 <= ci95 <= 1.0, (k, ci95)
        assert acc == pytest.approx(float(model.test_episode_accuracies[k].double().mean()), abs=1e-6)


def _layer_kwargs(norm: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments valid for a 64-channel probe layer of the configured method (type check only)."""
    from normlightning.norms import norm_group_args

    kwargs = dict(norm.get("kwargs") or {})
    for key in ("channel_groups", "batch_groups"):
        if kwargs.get(key) == "auto":
            kwargs.pop(key)
    for arg in norm_group_args(norm["method"]):  # counts without a default (bgn, seqnorm): any valid one will do
        if arg.required and not any(isinstance(kwargs.get(name), int) for name in (arg.name, *arg.alternatives)):
            kwargs[arg.name] = 1
    return kwargs


def test_every_config_is_covered() -> None:
    """Every config's data class has a synthetic (classification or episodic) stand-in, so nothing is skipped."""
    assert len(CONFIGS) >= 60
    episodic = 0
    for path in CONFIGS:
        config = yaml.safe_load(path.read_text())
        if _is_episodic(config):
            episodic += 1
            assert episodic_data(config["data"])["class_path"] == CLASS_SPLIT  # KeyError for an unknown data class
        else:
            synthetic_data(config["data"])  # raises KeyError for an unknown data class
    assert episodic >= 7  # miniimagenet_imprint_* and mnist_subset_imprint_bn
    assert (CONFIG_DIR / "imagenet_bgn.yaml").is_file()
