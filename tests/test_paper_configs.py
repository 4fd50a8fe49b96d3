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

Configs whose data is episodic (few-shot: ``FewShotTask``) are checked by their own tests
(``tests/tasks/test_few_shot.py``); here they are listed as not applicable, not silently dropped.
"""

from __future__ import annotations

import copy
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
}
#: image side used in the test, by the real side: 32 px data runs at 16, 224 px (ImageNet-style
#: torchvision backbones, five stride-2 stages) at 32; tiny images as they are.
TEST_SIDE = {32: 16, 224: 32}
EPISODIC_TASKS = ("normlightning.tasks.few_shot.FewShotTask",)


def _default_side(class_path: str) -> int:
    """The DataModule's default ``image_size`` (read from its signature, not repeated here)."""
    import importlib
    import inspect

    module_name, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), name)
    return int(inspect.signature(cls.__init__).parameters["image_size"].default)


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


def smoke_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config to run: synthetic data, CPU fast_dev_run, batch-dependent group counts adapted."""
    out = copy.deepcopy(config)
    out["data"] = synthetic_data(config["data"])
    trainer = out.setdefault("trainer", {})
    trainer.update(accelerator="cpu", devices=1, strategy="auto", logger=False, fast_dev_run=True,
                   enable_progress_bar=False, enable_model_summary=False)
    trainer.pop("num_nodes", None)
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
    if _is_episodic(config):
        # episodic few-shot data has no class-folder stand-in; its configs run in tests/tasks/test_few_shot.py
        assert config["data"]["class_path"] not in DATASETS
        return
    smoke = smoke_config(config)
    smoke_path = run_dir / path.name
    smoke_path.write_text(yaml.safe_dump(smoke))
    cli = build_cli(["fit", "--config", str(smoke_path)])
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    # the run happened: one optimizer step on the swapped data, with the config's model
    assert trainer.global_step == 1
    assert model.hparams.num_classes == smoke["data"]["init_args"].get("num_classes", data.num_classes)
    assert tuple(model.hparams.input_shape) == tuple(data.input_shape)
    assert model.hparams.backbone == config["model"]["init_args"]["backbone"]
    method = (config.get("norm") or {}).get("method")
    if method is not None:  # the injected layers are the configured method's
        from normlightning.norms import build_norm

        expected = type(build_norm(method, 64, **_layer_kwargs(config["norm"]))).__name__
        assert expected in {type(m).__name__ for m in model.modules()}


def _layer_kwargs(norm: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments valid for a 64-channel probe layer of the configured method (type check only)."""
    kwargs = dict(norm.get("kwargs") or {})
    for key in ("channel_groups", "batch_groups"):
        if kwargs.get(key) == "auto":
            kwargs.pop(key)
    return kwargs


def test_every_config_is_covered() -> None:
    """Every config's data class has a synthetic stand-in or the config is episodic (so nothing is skipped)."""
    assert len(CONFIGS) >= 60
    for path in CONFIGS:
        config = yaml.safe_load(path.read_text())
        if not _is_episodic(config):
            synthetic_data(config["data"])  # raises KeyError for an unknown data class
    assert (CONFIG_DIR / "imagenet_bgn.yaml").is_file()
