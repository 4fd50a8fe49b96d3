"""What a run leaves for its user: predictions.csv / .pt, a safe-loadable hparams.yaml naming the
method, the TensorBoard HParams metric, and a console free of avoidable warnings."""

from __future__ import annotations

import csv
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from normlightning.cli import build_cli

REPO = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
SYNTHETIC = [
    "--data=normlightning.data.Synthetic",
    "--data.input_shape=[1, 6, 6]",
    "--data.num_classes=7",
    "--data.num_train=32",
    "--data.num_val=16",
    "--data.num_test=13",
    "--data.batch_size=8",
    "--model=normlightning.tasks.ClassificationTask",
    "--model.backbone=small_cnn",
    "--model.backbone_kwargs={width: 8}",
    "--trainer.accelerator=cpu",
    "--trainer.logger.init_args.name=out",
]


def _test_split(cli) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = cli.datamodule.datasets["test"]
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(xs), torch.as_tensor(ys)


# ------------------------------------------------------------------ predictions
def test_predict_writes_one_csv_row_per_input_and_prints_the_path(run_dir, lightning_info) -> None:
    cli = build_cli(
        ["predict", *SYNTHETIC, *QUIET, "--predictions.top_k=3", "--predictions.format=both", "--allow_untrained=true"]
    )
    folder = run_dir / "runs" / "out" / "version_0"
    path = folder / "predictions.csv"
    assert any(str(path.relative_to(run_dir)) in m and "13 predictions" in m for m in lightning_info), lightning_info
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == [
        "index",
        "target",
        "predicted_class",
        "top1_class",
        "top1_prob",
        "top2_class",
        "top2_prob",
        "top3_class",
        "top3_prob",
    ]
    assert len(rows) == 13 and sorted(int(r["index"]) for r in rows) == list(range(13))  # the whole test split
    # independent recomputation: the trained-as-is model on the test split, in dataset order
    x, y = _test_split(cli)
    with torch.no_grad():
        probabilities = cli.model.eval()(x).softmax(dim=-1)
    for row in rows:
        i = int(row["index"])
        assert int(row["target"]) == int(y[i])
        assert int(row["predicted_class"]) == int(probabilities[i].argmax()) == int(row["top1_class"])
        ranked = probabilities[i].sort(descending=True)
        for k in range(3):
            assert int(row[f"top{k + 1}_class"]) == int(ranked.indices[k])
            assert float(row[f"top{k + 1}_prob"]) == pytest.approx(float(ranked.values[k]), rel=1e-5)
    saved = torch.load(folder / "predictions.pt")
    order = saved["index"].argsort()
    torch.testing.assert_close(saved["probabilities"][order], probabilities)
    assert torch.equal(saved["target"][order], y)


def test_prediction_writer_settings_are_checked() -> None:
    from normlightning.callbacks.prediction_writer import PredictionWriter

    with pytest.raises(ValueError, match="predictions.format"):
        PredictionWriter(format="json")
    with pytest.raises(ValueError, match="predictions.top_k"):
        PredictionWriter(top_k=0)


# ------------------------------------------------------------------ hyperparameters
@pytest.fixture
def injected_run(run_dir) -> Path:
    """Two epochs of BGN (auto groups) with a GN(2) override on the last norm layer; its log folder."""
    build_cli(
        [
            "fit",
            *SYNTHETIC,
            *QUIET,
            "--trainer.max_epochs=2",
            "--trainer.limit_train_batches=2",
            "--trainer.log_every_n_steps=1",
            "--norm.method=bgn",
            "--norm.num_groups=auto",
            "--norm.group_fit=nearest",
            "--norm.overrides=[{pattern: backbone\\.features\\.4\\.1, method: gn, num_groups: 2}]",
        ]
    )
    return run_dir / "runs" / "out" / "version_0"


def test_hparams_yaml_is_safe_loadable_and_names_the_method(injected_run) -> None:
    hparams = yaml.safe_load((injected_run / "hparams.yaml").read_text())
    assert hparams["norm"]["method"] == "bgn+gn"  # the methods of the replaced layers, in model order
    assert hparams["norm"]["layers"] == 4 and hparams["norm"]["num_groups_setting"] == "auto"
    # BGN's auto rule at B=8 asks for G=16, fitted per layer (D = C*H*W); GN's override keeps 2
    assert set(str(hparams["norm"]["groups"]["num_groups"]).split(",")) >= {"2"}
    # every effective argument of the built layers, per method (defaults the settings did not name included)
    args = hparams["norm"]["args"]
    assert args["gn"] == {"num_groups": 2, "eps": 1e-5, "affine": True}
    assert set(args["bgn"]) == {"num_groups", "eps", "momentum", "affine", "virtual_devices"}
    assert args["bgn"]["momentum"] == 0.1 and args["bgn"]["virtual_devices"] == 1
    assert hparams["norm"]["virtual_devices"] == 1  # whole-batch statistics (norm.virtual_devices)
    assert all(1 <= int(g) <= 16 for g in str(args["bgn"]["num_groups"]).split(","))  # auto at B=8 asks 16
    assert hparams["norm"]["overrides"] == [{"pattern": "backbone\\.features\\.4\\.1", "method": "gn", "num_groups": 2}]
    assert hparams["data"] == {"class": "Synthetic", "batch_size": 8, "world_size": 1, "global_batch_size": 8}
    assert hparams["run"] == {"seed": 0, "max_epochs": 2, "max_steps": -1, "lr": 0.1, "lr_scaled": 0.1}
    assert hparams["norm"]["effective"]["eps"] == 1e-5 and hparams["norm"]["effective"]["alpha"] is None
    assert hparams["input_shape"] == [1, 6, 6] and hparams["num_classes"] == 7  # tuples written as lists
    assert hparams["backbone"] == "small_cnn"


def test_hparams_tab_has_the_best_validation_accuracy(injected_run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    (events,) = injected_run.glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    content = accumulator.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in experiment.metric_infos] == ["hp/best_val/acc1"]
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    values = session.session_start_info.hparams
    assert values["norm/method"].string_value == "bgn+gn"
    # the same keys in every run: the effective values merged over the layers (bgn's fitted counts and gn's 2)
    assert "2" in values["norm/effective/num_groups"].string_value.split(",")
    assert values["norm/effective/momentum"].number_value == 0.1
    assert values["norm/effective/mean"].string_value == "None"  # hn's argument: not in this run, still a column
    assert not [key for key in values if key.startswith(("norm/args/", "norm/groups/"))]
    assert values["run/seed"].number_value == 0 and values["run/max_epochs"].number_value == 2
    assert values["run/lr"].number_value == pytest.approx(0.1) and values["data/global_batch_size"].number_value == 8
    assert values["data/batch_size"].number_value == 8 and values["backbone"].string_value == "small_cnn"
    assert "lr-SGD/default" in accumulator.Tags()["scalars"]  # the tag the README names
    validation = [e.value for e in accumulator.Scalars("val/acc1")]
    assert len(validation) == 2
    # TensorBoard shows a metric's last value: the best validation accuracy so far
    assert accumulator.Scalars("hp/best_val/acc1")[-1].value == pytest.approx(max(validation))


# ------------------------------------------------------------------ warnings and loaders
def _console(*args: str, cwd: Path) -> str:
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        OMP_NUM_THREADS="1",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "normlightning", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_quickstart_console_has_no_avoidable_warnings(tmp_path) -> None:
    config = str(REPO / "configs" / "quickstart.yaml")
    fit = _console("fit", "--config", config, "--trainer.max_epochs=1", cwd=tmp_path)
    checkpoint = tmp_path / "runs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    test = _console("test", "--config", config, f"--ckpt_path={checkpoint}", cwd=tmp_path)
    for output in (fit, test):
        # Python warnings print as "<file>.py:<line>: <message>"
        assert not re.findall(r"^.*\.py:\d+: .*$", output, flags=re.MULTILINE), output
        for known in ("litlogger", "LeafSpec", "pin_memory", "dirpath has changed", "IterableDataset"):
            assert known not in output
    assert "test/acc1" in test


def test_known_warnings_are_filtered_and_listed(recwarn) -> None:
    import warnings

    from normlightning import known_warnings

    known_warnings.install()
    known_warnings.install()  # idempotent
    warnings.warn("Your `IterableDataset` has `__len__` defined. In combination with ...", UserWarning, stacklevel=1)
    warnings.warn("something else", UserWarning, stacklevel=1)
    assert [str(w.message) for w in recwarn] == ["something else"]
    for known in (*known_warnings.KNOWN_WARNINGS, *sum(known_warnings.KNOWN_LOG_MESSAGES.values(), ())):
        assert known.source and known.why_harmless
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    logger.addHandler(handler)
    try:
        logger.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]")
        logger.info("Seed set to 0")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["Seed set to 0"]


def test_pin_memory_only_when_batches_go_to_a_gpu() -> None:
    from lightning.pytorch import Trainer

    from normlightning.data import Synthetic

    data = Synthetic(input_shape=(1, 4, 4), num_train=8, num_val=4, num_test=4, batch_size=4, pin_memory=True)
    data.setup("fit")
    assert data.train_dataloader().pin_memory == torch.cuda.is_available()  # no trainer: where CUDA is
    data.trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert data.train_dataloader().pin_memory is False
    assert Synthetic(input_shape=(1, 4, 4), pin_memory=False).loader_pin_memory() is False


def _hparams_tab(run: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    (events,) = run.glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    content = accumulator.PluginTagToContent("hparams")
    return dict(
        plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info.hparams
    )


def test_every_run_logs_the_same_hparams_keys(run_dir) -> None:
    """TensorBoard takes the HParams columns from the first run it reads: native BN, GN and SeqNorm runs log
    one key set (values null where a setting does not apply), without the optimizer's implementation switches."""
    short = [
        "fit",
        *SYNTHETIC,
        *QUIET,
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=1",
        "--trainer.limit_val_batches=1",
    ]
    settings = {
        "native": [],
        "gn": ["--norm.method=gn", "--norm.num_groups=2"],
        "seqnorm": ["--norm.method=seqnorm", "--norm.kwargs={channel_groups: 2, batch_groups: 2}"],
    }
    keys = {}
    for name, extra in settings.items():
        build_cli([*short, *extra, f"--trainer.logger.init_args.name={name}"])
        values = _hparams_tab(run_dir / "runs" / name / "version_0")
        keys[name] = set(values)
    assert keys["native"] == keys["gn"] == keys["seqnorm"]
    assert {"norm/effective/num_groups", "norm/effective/channel_groups", "run/seed", "run/lr"} <= keys["gn"]
    assert not [
        k
        for k in keys["gn"]
        if k.rsplit("/", 1)[-1] in ("foreach", "fused", "differentiable", "maximize", "capturable")
    ]
    gn = _hparams_tab(run_dir / "runs" / "gn" / "version_0")
    assert (
        gn["norm/effective/num_groups"].number_value == 2 and gn["norm/effective/channel_groups"].string_value == "None"
    )
