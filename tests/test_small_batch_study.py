"""examples/small_batch_study.py (the per-device study) and its report: cells, configs, one real cell, statistics."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest
import yaml

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

TINY = {
    "seed_everything": 0,
    "trainer": {
        "accelerator": "cpu",
        "devices": 1,
        "log_every_n_steps": 1,
        "limit_train_batches": 3,
        "limit_val_batches": 0,
        "callbacks": [],
    },
    "model": {
        "class_path": "normlightning.tasks.ClassificationTask",
        "init_args": {
            "backbone": "cifar_resnet",
            "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.2, "momentum": 0.9}},
            "lr_scheduler": {"class_path": "torch.optim.lr_scheduler.CosineAnnealingLR", "init_args": {"T_max": 1}},
        },
    },
    "data": {
        "class_path": "normlightning.data.Synthetic",
        "init_args": {
            "input_shape": [1, 8, 8],
            "num_classes": 3,
            "num_train": 16,
            "num_val": 6,
            "num_test": 6,
            "eval_batch_size": 6,
        },
    },
}


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import small_batch_study

        yield small_batch_study
    finally:
        sys.path.remove(str(EXAMPLES))


def test_cells_order_and_names(study):
    cells = study.study_cells(
        ["main", "groups", "lr", "ddp", "long"],
        methods=["bn", "gn"],
        per_device=[2, 16],
        seeds=[0, 1, 3],
        epochs=3,
        groups=[4],
        group_seeds=[0, 1],
        lr_seeds=[0],
        long_epochs=9,
        ddp_seeds=[1],
    )
    names = [c.name for c in cells]
    # seed by seed, every part of a seed together; gn (no batch statistics) once per seed, at 16
    assert names[:8] == [
        "main/bn_d2_s0",
        "main/bn_d16_s0",
        "main/gn_d16_s0",
        "groups/bgn-g4_d2_s0",
        "lr/bn-lr0.5_d2_s0",
        "lr/bn-lr2_d2_s0",
        "lr/bgn-lr0.5_d2_s0",
        "lr/bgn-lr2_d2_s0",
    ]
    assert names[8:14] == [
        "main/bn_d2_s1",
        "main/bn_d16_s1",
        "main/gn_d16_s1",
        "groups/bgn-g4_d2_s1",
        "ddp/bn_d2_s1",
        "ddp/bgn_d2_s1",
    ]
    assert names[-4:] == ["long/bn_d2_s0", "long/bn_d16_s0", "long/bgn_d2_s0", "long/bgn_d16_s0"]
    assert len(names) == 14 + 3 + 4 and {c.epochs for c in cells if c.part == "long"} == {9}
    by_name = {c.name: c for c in cells}
    # 16 / 2 = 8 chunks in one process; 16 / (2 processes x 2) = 4 chunks in each DDP process
    assert by_name["main/bn_d2_s0"].virtual_devices == 8 and by_name["main/bn_d16_s0"].virtual_devices == 1
    assert by_name["ddp/bn_d2_s1"].virtual_devices == 4 and by_name["ddp/bn_d2_s1"].processes == 2
    with pytest.raises(ValueError, match="unknown parts"):
        study.study_cells(["nope"])
    with pytest.raises(ValueError, match=r"per-device batches \[3\] do not divide the global batch 16"):
        study.study_cells(["main"], per_device=[3])


def test_cell_config(study, tmp_path):
    main = study.cell_config(TINY, study.StudyCell("main", "bgn", 2, 1, 2), tmp_path)
    assert main["norm"] == {"method": "bgn", "num_groups": "auto", "virtual_devices": 8}
    assert main["data"]["init_args"]["batch_size"] == 16 and main["trainer"]["max_epochs"] == 2
    assert main["model"]["init_args"]["lr_base_batch_size"] == 64  # lr = 0.2 * 16 / 64 at run time
    assert main["model"]["init_args"]["backbone_kwargs"] == {"depth": 8, "base_width": 8}
    assert main["trainer"]["limit_val_batches"] == 1.0  # validation after every epoch: the curves
    groups = study.cell_config(TINY, study.StudyCell("groups", "bgn", 2, 0, 2, groups=16), tmp_path)
    assert groups["norm"] == {"method": "bgn", "num_groups": 16, "group_fit": "nearest", "virtual_devices": 8}
    lr = study.cell_config(TINY, study.StudyCell("lr", "bn", 2, 0, 2, lr_scale=2.0), tmp_path)
    assert lr["model"]["init_args"]["optimizer"]["init_args"]["lr"] == pytest.approx(0.4)
    assert TINY["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 0.2  # the base config is not changed
    ddp = study.cell_config(TINY, study.StudyCell("ddp", "bn", 2, 0, 2, processes=2), tmp_path)
    assert ddp["data"]["init_args"]["batch_size"] == 8 and ddp["norm"]["virtual_devices"] == 4
    assert ddp["trainer"]["devices"] == 2 and ddp["trainer"]["strategy"] == "ddp"


def test_one_cell_runs_and_resumes(study, tmp_path):
    cell = study.StudyCell("main", "bn", 4, 0, 2)
    first = study.run_study(tmp_path, [cell], base_config=TINY, log=None)
    assert first["status"] == {"main/bn_d4_s0": "ran"}
    (row,) = first["rows"]
    assert row["lr"] == pytest.approx(0.2 * 16 / 64) and row["virtual_devices"] == 4
    logged = {}
    with open(tmp_path / "cells" / "main" / "bn_d4_s0" / "logs" / "metrics.csv") as handle:
        for line in csv.DictReader(handle):
            logged.update({k: float(v) for k, v in line.items() if v})
    assert row["test_acc1"] == pytest.approx(logged["test/acc1"])
    assert row["val_acc1"] == pytest.approx(logged["val/acc1"])  # the last epoch's validation
    config = yaml.safe_load((tmp_path / "cells" / "main" / "bn_d4_s0" / "cell.yaml").read_text())
    assert config["norm"]["virtual_devices"] == 4
    curves = study.read_csv(tmp_path / "curves.csv")
    assert [(c["label"], c["epoch"]) for c in curves] == [("bn", 0), ("bn", 1)]
    second = study.run_study(tmp_path, [cell], base_config=TINY, log=None)
    assert second["status"] == {"main/bn_d4_s0": "skipped"} and second["rows"] == first["rows"]
    assert study.read_csv(tmp_path / "results.csv")[0]["per_device"] == 4


def test_t_quantiles_against_the_t_distribution(study):
    """Each tabulated t(0.975, df) leaves 2.5% in each tail of Student's t density, integrated here."""
    import small_batch_study_report as report

    for df, q in report.T975.items():
        norm = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
        steps = 20000
        h = q / steps
        ys = [norm * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(steps + 1)]
        half = h / 3 * (ys[0] + ys[-1] + 4 * sum(ys[1:-1:2]) + 2 * sum(ys[2:-1:2]))  # Simpson on [0, q]
        assert 2 * half == pytest.approx(0.95, abs=2e-4), df


def test_report_statistics(study):
    import small_batch_study_report as report

    # mean 2, s = 1, n = 3: 2 ± 4.303 / sqrt(3)
    i = report.interval([1.0, 2.0, 3.0])
    assert (i.mean, i.low, i.high, i.n) == pytest.approx((2.0, 2 - 4.303 / 3**0.5, 2 + 4.303 / 3**0.5, 3))
    assert str(i) == "2.0 [-0.5, 4.5]" and not i.excludes_zero and report.interval([1.0, 1.2, 1.1]).excludes_zero
    with pytest.raises(ValueError, match="T975 holds t quantiles for 2 to 11 values"):
        report.interval([0.0] * 12)
    assert report.paired({0: 90.0, 1: 80.0, 2: 70.0}, {0: 85.0, 1: 60.0}) == [5.0, 20.0]


def _rows(study, accuracy):
    """Result rows of a synthetic main part: ``accuracy(method, per_device, seed)`` in [0, 1]."""
    rows = []
    for seed in range(3):
        for b in (2, 16):
            for m in ("bn", "bgn", "gn"):
                if m == "gn" and b != 16:
                    continue
                rows.append(
                    {
                        "part": "main",
                        "method": m,
                        "label": m,
                        "per_device": b,
                        "seed": seed,
                        "epochs": 12,
                        "test_acc1": accuracy(m, b, seed),
                        "cpu_s": 60.0,
                    }
                )
    return rows


def test_report_answers_from_the_rows(study, tmp_path):
    import small_batch_study_report as report

    # bn loses 2 points (+-0.1 by seed) at per-device 2; bgn holds exactly; gn 1 point below bn at 16
    def accuracy(m, b, seed):
        base = {"bn": 0.95, "bgn": 0.94, "gn": 0.94}[m]
        return base - (0.02 + 0.001 * (seed - 1) if (m, b) == ("bn", 2) else 0.0)

    rows = _rows(study, accuracy)
    text = report.answer(rows)
    assert "BN at per-device 2 minus BN at 16 (same seed): -2.0 [-2.2, -1.8] points: BN degrades." in text
    assert "BGN (paper G) at per-device 2 minus BGN at 16: 0.0 [0.0, 0.0] points: no difference resolved" in text
    assert "BGN (paper G) minus BN at per-device 2: 1.0 [0.8, 1.2] points: BGN is above BN." in text
    # gn ran at 16 only and stands for every per-device batch: 94 - 93 at 2
    assert "gn minus BN at per-device 2: 1.0 [0.8, 1.2] points: gn is above BN." in text
    table = report.accuracy_table(rows).splitlines()
    assert table[0] == "| method | per-device 2 | per-device 16 |"
    assert table[2] == "| bn | 93.0 [92.8, 93.2] | 95.0 [95.0, 95.0] |"
    assert table[4] == "| gn | 94.0 [94.0, 94.0] | 94.0 [94.0, 94.0] |"
    assert report.degradation_table(rows).splitlines()[2] == "| bn | -2.0 [-2.2, -1.8] |"


def test_report_main_writes_every_block_and_figure(study, tmp_path):
    import small_batch_study_report as report

    rows = _rows(study, lambda m, b, seed: 0.9 + 0.01 * seed)
    rows += [
        {**r, "part": "groups", "label": "bgn-g4", "groups": 4}
        for r in rows
        if r["label"] == "bgn" and r["per_device"] == 2
    ]
    curves = [
        {
            "part": "main",
            "label": r["label"],
            "per_device": r["per_device"],
            "seed": r["seed"],
            "epoch": e,
            "step": e,
            "val_acc1": 0.5 + 0.1 * e,
        }
        for r in rows
        if r["part"] == "main"
        for e in range(3)
    ]
    study.write_csv(tmp_path / "results.csv", study.ROW_FIELDS, rows)
    study.write_csv(tmp_path / "curves.csv", study.CURVE_FIELDS, curves)
    tables = report.main(["--study", str(tmp_path), "--assets", str(tmp_path / "assets")])
    assert {"study-accuracy", "study-answer", "study-groups", "study-cost"} <= set(tables)
    assert tables["study-cost"].startswith("18 cells;") and "total 18.0 min" in tables["study-cost"]
    assert tables["study-setting"].startswith("12 epochs (1,500 steps at global batch 16), 3 seeds")
    for figure in ("study_curves.png", "study_accuracy_vs_per_device.png", "study_bgn_groups.png"):
        assert (tmp_path / "assets" / figure).stat().st_size > 10_000
