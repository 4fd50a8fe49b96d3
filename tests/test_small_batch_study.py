"""examples/small_batch_study.py on a one-cell grid: the four inference modes, resume, rows."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
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
        ["grid", "groups", "long"],
        methods=["bn", "bgn"],
        batch_sizes=[2, 64],
        seeds=[0, 1],
        epochs=3,
        long_epochs=9,
        groups={2: [1, 8]},
    )
    names = [c.name for c in cells]
    # seed by seed: grid then G sweep of seed 0, then of seed 1; the long part last, first seed only
    assert names[:6] == [
        "grid/bn_b2_s0",
        "grid/bgn_b2_s0",
        "grid/bn_b64_s0",
        "grid/bgn_b64_s0",
        "groups/bgn-g1_b2_s0",
        "groups/bgn-g8_b2_s0",
    ]
    assert names[6] == "grid/bn_b2_s1" and names[-2:] == ["long/bn_b64_s0", "long/bgn_b64_s0"]
    assert {c.epochs for c in cells if c.part == "long"} == {9}
    with pytest.raises(ValueError, match="unknown parts"):
        study.study_cells(["nope"])


def test_group_cell_config(study, tmp_path):
    cell = study.StudyCell("groups_wide", "bgn", 64, 1, 2, groups=32, base_width=16)
    config = study.cell_config(TINY, cell, tmp_path)
    assert config["norm"] == {"method": "bgn", "num_groups": 32, "group_fit": "nearest"}
    assert config["model"]["init_args"]["backbone_kwargs"] == {"depth": 8, "base_width": 16}
    assert config["model"]["init_args"]["optimizer"]["init_args"]["lr"] == pytest.approx(0.2)  # 0.2 * 64 / 64
    assert config["data"]["init_args"]["batch_size"] == 64 and config["trainer"]["max_epochs"] == 2
    # brn-scaled: the paper's r/d ramps compressed into a run of T = 4 epochs x 2000 // 16 = 500 steps
    brn = study.cell_config(TINY, study.StudyCell("grid", "brn-scaled", 16, 0, 4), tmp_path)["norm"]
    assert brn == {
        "method": "brn",
        "kwargs": {"r_max_start_step": 31, "r_max_end_step": 250, "d_max_start_step": 31, "d_max_end_step": 156},
    }


def test_one_cell_runs_measures_and_resumes(study, tmp_path):
    cell = study.StudyCell("grid", "bn", 2, 0, 1)
    first = study.run_study(tmp_path, [cell], base_config=TINY, log=None)
    assert first["status"] == {"grid/bn_b2_s0": "ran"}
    (row,) = first["rows"]
    # eval-mode accuracy measured by the study == the one Lightning's test loop logged
    assert row["acc_running"] == pytest.approx(row["test_acc1_logged"], abs=1e-6)
    assert row["lr"] == pytest.approx(0.2 * 2 / 64)
    assert json.loads(row["layer_groups"]) and set(study.MEASURES) <= set(row)
    assert 0.0 <= row["alpha"] <= 1.0  # bn supports example weighing
    second = study.run_study(tmp_path, [cell], base_config=TINY, log=None)
    assert second["status"] == {"grid/bn_b2_s0": "skipped"} and second["rows"] == first["rows"]
    rows = study.read_results(tmp_path / "results.csv")
    assert rows[0]["batch_size"] == 2 and rows[0]["acc_running"] == pytest.approx(row["acc_running"])


def test_batch_statistics_accuracy_matches_a_train_mode_forward(study, tmp_path):
    """``acc_batch`` == accuracy of a plain train-mode forward per test batch of B (on a copy), and
    measuring leaves the model's state as it was."""
    from normlightning.cli import build_cli

    config = copy.deepcopy(TINY)
    config["norm"] = {"method": "bn"}
    config["data"]["init_args"]["num_test"] = 12
    config["trainer"].update({"default_root_dir": str(tmp_path), "max_epochs": 1})
    config["checkpoint"] = {"save_top_k": 0, "save_last": False}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    cli = build_cli(["--config", str(tmp_path / "tiny.yaml")], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    cli.datamodule.setup("test")
    before = copy.deepcopy(cli.model.state_dict())
    measured = study.measure_inference_modes(cli.model, cli.datamodule, batch_size=4)
    for key, value in cli.model.state_dict().items():
        torch.testing.assert_close(value, before[key], msg=key)
    reference = copy.deepcopy(cli.model).train()
    correct = 0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(cli.datamodule.test_dataloader().dataset, batch_size=4):
            correct += int((reference(x).argmax(-1) == y).sum())
    assert measured["acc_batch"] == pytest.approx(correct / 12)


def test_report_statistics(study):
    import small_batch_study_report as report

    rows = [
        {"method": m, "batch_size": 2, "seed": s, "acc_running": a}
        for m, s, a in (("bn", 0, 0.90), ("bn", 1, 0.80), ("bgn", 0, 0.85), ("bgn", 1, 0.60))
    ]
    # seed-paired differences to BN in points: (85 - 90, 60 - 80)
    diff = report.paired_difference(rows)[("bgn", 2)]
    assert diff == pytest.approx([-5.0, -20.0])
    assert report.mean_std(diff)[:2] == pytest.approx((-12.5, 10.606601717798213))
    assert report.fmt([93.0]) == "93.0" and report.fmt([]) == "-"
    # elements per set: geometric mean over layers of N * D / G
    row = {"batch_size": 2, "layer_groups": json.dumps({"a": 1, "b": 4})}
    assert report.elements_per_set(row, {"a": 100, "b": 800}) == pytest.approx((200 * 400) ** 0.5)
    sizes = report.layer_sizes(8, 8)
    assert sorted(set(sizes.values())) == [32 * 49, 16 * 196, 8 * 784]  # D = C*H*W of stage 3, 2, 1 and len(sizes) == 9
