"""The batch-size sweep runner: grid, LR scaling, config overrides, log parsing, table, resume."""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

from normlightning import sweep
from normlightning.norms import GroupArg, register_norm
from normlightning.norms import registry as norm_registry
from normlightning.sweep import executors

BASE = {
    "seed_everything": 0,
    "trainer": {
        "accelerator": "cpu",
        "devices": 1,
        "log_every_n_steps": 1,
        "limit_train_batches": 2,
        "limit_val_batches": 1,
        "limit_test_batches": 1,
        "callbacks": [],
    },
    "model": {
        "class_path": "normlightning.tasks.ClassificationTask",
        "init_args": {
            "backbone": "small_cnn",
            "backbone_kwargs": {"width": 8},
            "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.2, "momentum": 0.9}},
            "lr_scheduler": {"class_path": "torch.optim.lr_scheduler.CosineAnnealingLR", "init_args": {"T_max": 99}},
        },
    },
    "data": {
        "class_path": "normlightning.data.Synthetic",
        "init_args": {
            "input_shape": [1, 6, 6],
            "num_classes": 4,
            "num_train": 64,
            "num_val": 16,
            "num_test": 16,
            "eval_batch_size": 16,
        },
    },
}


def test_cell_lr_is_scaled_by_the_task(tmp_path) -> None:
    # the cell keeps the base LR and hands the linear rule to the task (lr_base_batch_size)
    config = sweep.cell_config(BASE, sweep.Cell("bn", 8, 0), epochs=1, base_batch_size=32, cell_dir=tmp_path)
    init = config["model"]["init_args"]
    assert init["optimizer"]["init_args"]["lr"] == 0.2 and init["lr_base_batch_size"] == 32
    same = json.loads(json.dumps(BASE))
    same["model"]["init_args"]["lr_base_batch_size"] = 32
    assert sweep.cell_config(same, sweep.Cell("bn", 8, 0), epochs=1, base_batch_size=32, cell_dir=tmp_path) == config
    same["model"]["init_args"]["lr_base_batch_size"] = 64
    with pytest.raises(ValueError, match="lr_base_batch_size=64 .* base_batch_size is 32"):
        sweep.cell_config(same, sweep.Cell("bn", 8, 0), epochs=1, base_batch_size=32, cell_dir=tmp_path)


def test_make_grid_order_and_errors() -> None:
    grid = sweep.make_grid(["bn", "gn"], [2, 8], [0, 1])
    assert [c.name for c in grid] == [
        "bn_b2_s0",
        "bn_b2_s1",
        "bn_b8_s0",
        "bn_b8_s1",
        "gn_b2_s0",
        "gn_b2_s1",
        "gn_b8_s0",
        "gn_b8_s1",
    ]
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        sweep.make_grid(["nope"], [2], [0])
    with pytest.raises(ValueError, match="batch sizes must be ints >= 2"):
        sweep.make_grid(["bn"], [1], [0])
    with pytest.raises(ValueError, match="duplicates"):
        sweep.make_grid(["bn", "bn"], [2], [0])
    with pytest.raises(ValueError, match="misses batch sizes"):
        sweep.run_sweep(BASE, "unused", methods=["bn"], batch_sizes=[2, 8], epochs={2: 1}, log=None)
    assert sweep.parse_epochs(["3"]) == 3 and sweep.parse_epochs(["2=2", "64=30"]) == {2: 2, 64: 30}
    with pytest.raises(ValueError, match="seeds is empty"):
        sweep.make_grid(["bn"], [2], [])


def test_cell_config_overrides(tmp_path) -> None:
    cell = sweep.Cell("bgn", 8, 3)
    config = sweep.cell_config(BASE, cell, epochs=5, base_batch_size=32, cell_dir=tmp_path / "c")
    init = config["model"]["init_args"]
    assert init["lr_scheduler"]["init_args"]["T_max"] == 5
    assert config["data"]["init_args"]["batch_size"] == 8 and config["data"]["init_args"]["drop_last"] is True
    assert config["seed_everything"] == 3 and config["trainer"]["max_epochs"] == 5
    assert config["norm"] == {"method": "bgn", "num_groups": "auto"}
    csv_logger, tensorboard = config["trainer"]["logger"]
    assert csv_logger["init_args"]["save_dir"] == str(tmp_path / "c")
    assert tensorboard["init_args"]["save_dir"] == str(tmp_path / "c" / "logs" / "tensorboard")
    # the base config is not modified
    assert BASE["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 0.2 and "norm" not in BASE
    # the CLI reads the cell config as written: its norm: section becomes the injection callback
    from normlightning.callbacks import NormInjection
    from normlightning.cli import build_cli

    (tmp_path / "cell.yaml").write_text(yaml.safe_dump(config))
    cli = build_cli(["--config", str(tmp_path / "cell.yaml")], run=False)
    (injection,) = [c for c in cli.trainer.callbacks if isinstance(c, NormInjection)]
    assert (injection.rules.method, injection.rules.num_groups) == ("bgn", "auto")
    assert cli.model.lr_base_batch_size == 32 and cli.datamodule.batch_size == 8
    with pytest.raises(ValueError, match="optimizer.init_args.lr"):
        sweep.cell_config(
            {"model": {"init_args": {}}, "data": {"init_args": {}}},
            cell,
            epochs=1,
            base_batch_size=32,
            cell_dir=tmp_path,
        )


def test_method_presets_follow_the_layers_declarations() -> None:
    from normlightning.norms import norm_group_args

    expected = {
        "bn": {"method": "bn"},
        "gn": {"method": "gn", "num_groups": 8},
        "ln": {"method": "ln"},
        "ghost": {"method": "ghost", "num_groups": "auto"},
        "seqnorm": {"method": "seqnorm", "kwargs": {"channel_groups": "auto", "batch_groups": "auto"}},
        "bgn": {"method": "bgn", "num_groups": "auto"},
        "gbgn": {"method": "gbgn", "kwargs": {"channel_groups": 8, "examples_per_group": 16}},
        "hn": {"method": "hn"},
    }
    for method, preset in expected.items():
        assert sweep.method_preset(method) == preset, method
    # the sweep's own choices only fill counts that have no auto rule
    for method, counts in sweep.FIXED_GROUP_COUNTS.items():
        auto = {arg.name for arg in norm_group_args(method) if arg.auto}
        assert not auto & set(counts), method


class HalfGroupNorm(torch.nn.GroupNorm):
    """A plugin: GroupNorm whose ``chunks`` count has one auto rule, ``C // 2`` (records its builds)."""

    group_args = (GroupArg("chunks", "channels", auto={"half": lambda ctx: ctx.num_features // 2}),)
    built: list[tuple[int, int]] = []

    def __init__(self, num_features: int, chunks: int = 1, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__(chunks, num_features, eps=eps, affine=affine)
        HalfGroupNorm.built.append((num_features, chunks))


def test_registered_plugin_gets_its_auto_group_count(tmp_path) -> None:
    register_norm("half_gn_test", HalfGroupNorm)
    try:
        assert sweep.method_preset("half_gn_test") == {"method": "half_gn_test", "kwargs": {"chunks": "auto"}}
        HalfGroupNorm.built.clear()
        result = sweep.run_sweep(
            BASE,
            tmp_path / "s",
            methods=["half_gn_test"],
            batch_sizes=[4],
            seeds=[0],
            epochs=1,
            base_batch_size=16,
            executor="inline",
            plot=False,
            log=None,
        )
        assert result.status == {"half_gn_test_b4_s0": "ran"}
        widths = {c for c, _ in HalfGroupNorm.built}
        assert len(widths) >= 2  # small_cnn with width 8 has layers of different widths
        assert all(chunks == c // 2 for c, chunks in HalfGroupNorm.built)  # the auto rule, per layer
    finally:
        norm_registry._REGISTRY.pop("half_gn_test", None)


def test_read_last_metrics_takes_last_non_empty_value(tmp_path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text(
        "epoch,step,train/loss,val/acc1,test/acc1\n0,9,2.5,,\n0,9,,0.25,\n1,19,1.5,,\n1,19,,0.75,\n1,20,,,0.5\n"
    )
    assert sweep.read_last_metrics(path) == {"train/loss": 1.5, "val/acc1": 0.75, "test/acc1": 0.5}


def test_aggregate_and_table() -> None:
    rows = [
        {"method": "bn", "batch_size": 2, "seed": 0, "test/acc1": 0.5},
        {"method": "bn", "batch_size": 2, "seed": 1, "test/acc1": 0.7},
        {"method": "bn", "batch_size": 2, "seed": 2, "test/acc1": 0.9},
        {"method": "gn", "batch_size": 8, "seed": 0, "test/acc1": 0.8},
    ]
    stats = sweep.aggregate(rows, "test/acc1")
    mean, std, n = stats["bn"][2]
    assert n == 3 and mean == pytest.approx(0.7)
    assert std == pytest.approx(math.sqrt(((0.2) ** 2 + 0 + (0.2) ** 2) / 2))  # sample std, ddof=1
    assert math.isnan(stats["gn"][8][1])
    table = sweep.markdown_table(stats)
    lines = table.strip().splitlines()
    assert lines[0] == "| method | B=2 | B=8 |"
    assert lines[2] == "| bn | 70.0 ± 20.0 (n=3) | - |"
    assert lines[3] == "| gn | - | 80.0 (n=1) |"
    # the figure's title names the data, the model and the epochs
    assert sweep.sweep_title(BASE, {2: 2, 8: 4}, "test/acc1") == (
        "Synthetic, small_cnn: test/acc1 by normalization method (epochs 2 / 4 at batch 2 / 8)"
    )
    assert sweep.sweep_title(BASE, {2: 3, 8: 3}, "val/acc1").endswith("(3 epochs)")


def _mtimes(out: Path) -> dict[str, float]:
    return {p.parent.name: p.stat().st_mtime_ns for p in (out / "cells").glob(f"*/{sweep.RESULT_FILE}")}


def _assert_tensorboard_hparams(folder: Path, method: str, batch_size: int) -> None:
    """The cell's TensorBoard events hold its hparams (method, batch size) and its validation accuracy."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    sessions, scalars = [], set()
    for events in sorted(folder.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        try:
            content = accumulator.PluginTagToContent("hparams")
        except KeyError:  # the events file of the test pass: scalars only
            content = {}
        if "_hparams_/session_start_info" in content:
            sessions.append(plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]))
        scalars.update(accumulator.Tags()["scalars"])
    assert sessions, f"no hparams in the TensorBoard events of {folder}"
    values = sessions[0].session_start_info.hparams
    assert values["norm/method"].string_value == method and values["data/batch_size"].number_value == batch_size
    assert "val/acc1" in scalars and "test/acc1" in scalars


def test_sweep_runs_collects_and_resumes(tmp_path) -> None:
    out = tmp_path / "sweep"
    kwargs = dict(
        methods=["bn", "gn"], batch_sizes=[4, 8], seeds=[0], epochs=1, base_batch_size=16, executor="inline", log=None
    )
    first = sweep.run_sweep(BASE, out, **kwargs)
    assert set(first.status.values()) == {"ran"} and len(first.status) == 4
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4
    for row in rows:
        # the optimizer really started from the linearly scaled LR
        assert float(row["lr"]) == pytest.approx(0.2 * int(row["batch_size"]) / 16)
        assert 0.0 <= float(row["test/acc1"]) <= 1.0
        # the value in results.csv is the last test/acc1 of the cell's own CSV log
        cell_dir = out / "cells" / f"{row['method']}_b{row['batch_size']}_s{row['seed']}"
        logged = [r["test/acc1"] for r in csv.DictReader(open(cell_dir / "logs" / "metrics.csv")) if r.get("test/acc1")]
        assert float(row["test/acc1"]) == pytest.approx(float(logged[-1]))
        config = yaml.safe_load((cell_dir / "cell.yaml").read_text())
        assert config["data"]["init_args"]["batch_size"] == int(row["batch_size"])
        # every result column is filled, train/loss with the last training loss the cell logged
        assert all(row[metric] != "" for metric in sweep.RESULT_METRICS), row
        train_loss = [
            r["train/loss"] for r in csv.DictReader(open(cell_dir / "logs" / "metrics.csv")) if r.get("train/loss")
        ]
        assert float(row["train/loss"]) == pytest.approx(float(train_loss[-1]))
    _assert_tensorboard_hparams(out / "cells" / "gn_b8_s0" / sweep.TENSORBOARD_DIR, "gn", 8)
    table = (out / "table.md").read_text()
    assert "| bn |" in table and "| gn |" in table and "B=4" in table and "B=8" in table
    assert (out / "accuracy_vs_batch.png").stat().st_size > 1000
    before = _mtimes(out)
    assert len(before) == 4

    # second call: nothing re-runs, results unchanged
    second = sweep.run_sweep(BASE, out, **kwargs)
    assert set(second.status.values()) == {"skipped"}
    assert _mtimes(out) == before
    assert len(second.rows) == 4

    # a missing result and a cell whose spec changed (more epochs) run again; the others do not
    (out / "cells" / "gn_b8_s0" / sweep.RESULT_FILE).unlink()
    third = sweep.run_sweep(BASE, out, **{**kwargs, "methods": ["bn", "gn"]})
    assert third.status == {"bn_b4_s0": "skipped", "bn_b8_s0": "skipped", "gn_b4_s0": "skipped", "gn_b8_s0": "ran"}
    after = _mtimes(out)
    assert {k: v for k, v in after.items() if k != "gn_b8_s0"} == {k: v for k, v in before.items() if k != "gn_b8_s0"}
    fourth = sweep.run_sweep(BASE, out, **{**kwargs, "methods": ["bn"], "batch_sizes": [4], "epochs": 2})
    assert fourth.status == {"bn_b4_s0": "ran"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == {"4": 2} and summary["status"] == {"bn_b4_s0": "ran"}


def test_failed_cell_is_reported_and_retried(tmp_path) -> None:
    bad = json.loads(json.dumps(BASE))
    bad["model"]["init_args"]["backbone"] = "no_such_backbone_xyz"
    result = sweep.run_sweep(
        bad,
        tmp_path / "s",
        methods=["bn"],
        batch_sizes=[4],
        seeds=[0],
        epochs=1,
        base_batch_size=16,
        executor="inline",
        plot=False,
        log=None,
    )
    assert result.status == {"bn_b4_s0": "failed"} and result.rows == []
    assert "no_such_backbone_xyz" in (tmp_path / "s" / "cells" / "bn_b4_s0" / "error.txt").read_text()


def test_sweep_with_a_failed_cell_exits_1_printing_the_error_and_its_file(tmp_path, capsys) -> None:
    bad = json.loads(json.dumps(BASE))
    bad["model"]["init_args"]["backbone"] = "no_such_backbone_xyz"
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(bad))
    out = tmp_path / "s"
    with pytest.raises(SystemExit) as info:
        sweep.main(
            [
                "--config",
                str(config),
                "--out",
                str(out),
                "--methods",
                "bn",
                "gn",
                "--batch-sizes",
                "4",
                "--executor",
                "inline",
                "--no-plot",
            ]
        )
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "2 of the cells failed; the first, bn_b4_s0" in err and "no_such_backbone_xyz" in err
    for name in ("bn_b4_s0", "gn_b4_s0"):
        assert str(out / "cells" / name / "error.txt") in err


def test_subprocess_executor_and_cli(tmp_path) -> None:
    config = tmp_path / "base.yaml"
    config.write_text(yaml.safe_dump(BASE))
    out = tmp_path / "s"
    args = [
        "--config",
        str(config),
        "--out",
        str(out),
        "--methods",
        "hn",
        "--batch-sizes",
        "4",
        "--seeds",
        "1",
        "--epochs",
        "1",
        "--base-batch-size",
        "8",
        "--no-plot",
    ]
    result = sweep.main(args)  # default executor: one subprocess per cell
    assert result.status == {"hn_b4_s1": "ran"}
    stored = json.loads((out / "cells" / "hn_b4_s1" / sweep.RESULT_FILE).read_text())
    assert stored["status"] == "ok" and stored["lr"] == pytest.approx(0.2 * 4 / 8)
    assert stored["spec"]["method"] == "hn" and stored["spec"]["seed"] == 1
    assert sweep.main(args).status == {"hn_b4_s1": "skipped"}
    with pytest.raises(SystemExit) as info:
        sweep.main(["--out", str(out)])  # no --config
    assert info.value.code == 2  # argparse's usage error


def test_parallel_workers_run_every_cell_once(tmp_path) -> None:
    out = tmp_path / "p"
    result = sweep.run_sweep(
        BASE,
        out,
        methods=["bn", "ln"],
        batch_sizes=[4],
        seeds=[0],
        epochs=1,
        base_batch_size=16,
        executor="inline",
        workers=2,
        plot=False,
        log=None,
    )
    assert result.status == {"bn_b4_s0": "ran", "ln_b4_s0": "ran"}
    assert sorted(r["method"] for r in result.rows) == ["bn", "ln"]
    with pytest.raises(ValueError, match="workers must be a positive int"):
        sweep.run_sweep(BASE, out, methods=["bn"], batch_sizes=[4], workers=0, log=None)


def test_submitit_local_cluster_runs_and_resumes(tmp_path, monkeypatch) -> None:
    """Two cells as submitit jobs on this machine; a rerun skips both (the same resume as inline)."""
    pytest.importorskip("submitit")  # the `cluster` extra, part of `dev`
    repo = Path(__file__).resolve().parents[1]
    # the jobs are fresh interpreters: they import this checkout's normlightning
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])))
    out = tmp_path / "s"
    kwargs = dict(
        methods=["bn", "gn"],
        batch_sizes=[4],
        seeds=[0],
        epochs=1,
        base_batch_size=16,
        executor="submitit",
        cluster=sweep.ClusterSettings(cluster="local", time_limit_min=10),
        plot=False,
        log=None,
    )
    first = sweep.run_sweep(BASE, out, **kwargs)
    assert first.status == {"bn_b4_s0": "ran", "gn_b4_s0": "ran"}
    assert sorted(r["method"] for r in first.rows) == ["bn", "gn"]
    jobs = sorted((out / "jobs").glob("*_0_log.out"))
    assert len(jobs) == 2  # one submitit job per cell, with its own log
    for row in first.rows:
        assert float(row["lr"]) == pytest.approx(0.2 * 4 / 16)
        cell_dir = out / "cells" / f"{row['method']}_b4_s0"
        logged = [r["test/acc1"] for r in csv.DictReader(open(cell_dir / "logs" / "metrics.csv")) if r.get("test/acc1")]
        assert float(row["test/acc1"]) == pytest.approx(float(logged[-1]))
    before = _mtimes(out)
    second = sweep.run_sweep(BASE, out, **kwargs)
    assert second.status == {"bn_b4_s0": "skipped", "gn_b4_s0": "skipped"}
    assert _mtimes(out) == before and len(sorted((out / "jobs").glob("*_0_log.out"))) == 2  # nothing submitted
    # cells finished by another executor count as finished too
    assert sweep.run_sweep(BASE, out, **{**kwargs, "executor": "inline"}).status == second.status


def test_cluster_settings_and_gpu_cells(tmp_path) -> None:
    settings = sweep.ClusterSettings(cluster="slurm", partition="gpu", gpus_per_cell=16, nodes_per_cell=2)
    assert (settings.devices, settings.processes) == (8, 16)
    config = sweep.cell_config(
        BASE,
        sweep.Cell("bn", 8, 0),
        epochs=1,
        base_batch_size=32,
        cell_dir=tmp_path,
        gpus=settings.gpus_per_cell,
        nodes=settings.nodes_per_cell,
    )
    trainer = config["trainer"]
    assert (trainer["accelerator"], trainer["devices"], trainer["num_nodes"], trainer["strategy"]) == (
        "gpu",
        8,
        2,
        "ddp",
    )
    cpu = sweep.cell_config(BASE, sweep.Cell("bn", 8, 0), epochs=1, base_batch_size=32, cell_dir=tmp_path)
    assert cpu["trainer"]["accelerator"] == "cpu" and "strategy" not in cpu["trainer"]
    # a CPU cell's spec does not depend on the executor's settings: resume works across executors
    assert sweep.cell_spec(sweep.Cell("bn", 8, 0), cpu) == sweep.cell_spec(
        sweep.Cell("bn", 8, 0),
        sweep.cell_config(BASE, sweep.Cell("bn", 8, 0), epochs=1, base_batch_size=32, cell_dir=tmp_path / "elsewhere"),
    )
    with pytest.raises(ValueError, match="multiple of nodes_per_cell"):
        sweep.ClusterSettings(gpus_per_cell=3, nodes_per_cell=2)
    with pytest.raises(ValueError, match="nodes_per_cell > 1 needs GPUs"):
        sweep.ClusterSettings(nodes_per_cell=2)
    with pytest.raises(ValueError, match="cluster must be"):
        sweep.ClusterSettings(cluster="pbs")
    with pytest.raises(ValueError, match="cannot run inline"):
        sweep.run_cells(
            [tmp_path],
            "inline",
            threads=1,
            workers=1,
            cluster=sweep.ClusterSettings(gpus_per_cell=2),
            jobs_dir=tmp_path,
            log=print,
        )
    with pytest.raises(SystemExit) as info:
        sweep.main(["--config", "x.yaml", "--gpus-per-cell", "3", "--nodes-per-cell", "2"])
    assert info.value.code == 2


def test_submitit_missing_names_the_extra(monkeypatch) -> None:
    from normlightning.sweep import executors

    monkeypatch.setitem(sys.modules, "submitit", None)  # `import submitit` raises ImportError
    with pytest.raises(ImportError, match=r'pip install "normlightning\[cluster\]"'):
        executors.import_submitit()


def test_sweep_figure_fits_with_one_batch_size_and_shares_the_y_axis(tmp_path) -> None:
    """One batch size, long legend entries (group counts) and a long title: every text of the figure lies inside
    it, and the saved PNG's border is blank (nothing cut off at an edge)."""
    plt = pytest.importorskip("matplotlib.pyplot")
    stats = {"bn": {8: (0.9, 0.01, 3)}, "gn": {8: (0.85, 0.02, 3)}, "gbgn": {8: (0.8, 0.05, 3)}}
    title = sweep.sweep_title(BASE, {8: 2}, "test/acc1")
    fig = sweep.sweep_figure(stats, title=title)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (legend,) = fig.legends
    texts = [fig._suptitle, legend, *(ax.title for ax in fig.axes), *(ax.yaxis.label for ax in fig.axes)]
    inside = fig.bbox.padded(0.5)
    for artist in texts:
        box = artist.get_window_extent(renderer)
        assert inside.containsx(box.x0) and inside.containsx(box.x1), (artist, box, fig.bbox)
        assert inside.containsy(box.y0) and inside.containsy(box.y1), (artist, box, fig.bbox)
    names = [text.get_text() for text in legend.get_texts()]
    assert "gn (num_groups=8)" in names and "gbgn (channel_groups=8, examples_per_group=16)" in names
    assert len({ax.get_ylim() for ax in fig.axes}) == 1  # one y range: the panels compare
    plt.close(fig)
    path = sweep.plot_sweep(stats, tmp_path / "one.png", title=title)
    pixels = plt.imread(path)[..., :3]
    border = [pixels[:2], pixels[-2:], pixels[:, :2], pixels[:, -2:]]
    assert all((edge > 0.99).all() for edge in border)  # white: no text or line reaches an edge


def test_waiting_for_jobs_prints_progress_until_each_finishes() -> None:
    class Job:
        def __init__(self, polls: int) -> None:
            self.polls, self.state = polls, "RUNNING"

        def done(self) -> bool:
            self.polls -= 1
            return self.polls < 0

    jobs = {Path("a"): Job(6), Path("b"): Job(12)}
    lines: list[str] = []
    finished = list(executors.wait_for_jobs(jobs, 0.01, 0.03, lambda line, flush: lines.append(line)))
    assert [(done, str(cell)) for done, cell, _ in finished] == [(1, "a"), (2, "b")]
    assert any(line.startswith("[sweep] 0/2 cells done; 2 running (") for line in lines), lines
    assert any(line.startswith("[sweep] 1/2 cells done; 1 running (") for line in lines), lines
