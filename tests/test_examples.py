"""Each example in examples/ run with tiny settings."""

from __future__ import annotations

import csv
import importlib
import re
import statistics
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]
SYNTHETIC = [
    "--data=normlightning.data.Synthetic",
    "--data.input_shape=[1, 6, 6]",
    "--data.num_classes=4",
    "--data.num_train=32",
    "--data.num_val=8",
    "--data.num_test=8",
    "--data.batch_size=8",
    "--model=normlightning.tasks.ClassificationTask",
    "--model.backbone=small_cnn",
    "--model.backbone_kwargs={width: 8}",
]


EXAMPLE_MODULES = ("custom_norm", "custom_task", "statistics_study", "batch_size_sweep")


@pytest.fixture
def examples():
    """Import the example files as modules (their folder on sys.path, as when run as scripts), afresh for
    each test: importing ``custom_norm`` registers the norm ``rms``, which conftest's restored global state
    removes after the test."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        for name in EXAMPLE_MODULES:
            sys.modules.pop(name, None)
        yield {name: importlib.import_module(name) for name in EXAMPLE_MODULES}
    finally:
        for name in EXAMPLE_MODULES:
            sys.modules.pop(name, None)
        sys.path.remove(str(EXAMPLES))


def _norm_args(method: str) -> list[str]:
    """Select the injected method: the CLI's ``norm:`` section."""
    return [f"--norm.method={method}"]


def _checkpoint(root: Path) -> Path:
    found = sorted(root.rglob("last.ckpt"))
    assert found, f"no last.ckpt under {root}"
    return found[0]


# ---------------------------------------------------------------- custom_norm
def test_rms_norm_matches_formula_and_torch(examples) -> None:
    rms = examples["custom_norm"].RMSLayerNorm
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 2) * 3 + 1
    layer = rms(4, eps=1e-5)
    expected = torch.stack([x[n] / torch.sqrt((x[n] ** 2).mean() + 1e-5) for n in range(3)])
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer(x), F.rms_norm(x, (4, 5, 2), eps=1e-5))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        layer.bias.fill_(0.5)
    torch.testing.assert_close(layer(x), expected * torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1) + 0.5)
    torch.testing.assert_close(rms(4)(x[:, :, 0, 0]), F.rms_norm(x[:, :, 0, 0], (4,), eps=1e-5))  # (N, C) input
    with pytest.raises(ValueError, match="num_features=4"):
        layer(torch.randn(2, 3, 4))


def test_custom_norm_is_registered_and_injected_by_name(examples, run_dir) -> None:
    from normlightning.norms import available_norms, build_norm
    from normlightning.tasks import ClassificationTask

    module = examples["custom_norm"]
    assert "rms" in available_norms()
    assert isinstance(build_norm("rms", 6, eps=1e-3), module.RMSLayerNorm)
    module.main(["fit", *SYNTHETIC, *TINY, *_norm_args("rms")])
    model = ClassificationTask.load_from_checkpoint(_checkpoint(run_dir))
    layers = [m for m in model.modules() if isinstance(m, module.RMSLayerNorm)]
    assert len(layers) == 4  # every BatchNorm2d of small_cnn was replaced
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


# ---------------------------------------------------------------- custom_task
def test_mixup_math(examples) -> None:
    task = examples["custom_task"]
    x = torch.arange(12.0).reshape(3, 4)
    y = torch.tensor([0, 1, 2])
    perm = torch.tensor([2, 0, 1])
    x_mix, y_a, y_b = task.mixup(x, y, 0.25, perm)
    torch.testing.assert_close(x_mix[0], 0.25 * x[0] + 0.75 * x[2])
    assert y_a.tolist() == [0, 1, 2] and y_b.tolist() == [2, 0, 1]
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    log_p = logits.log_softmax(-1)
    hand = -(0.25 * log_p[torch.arange(3), y_a] + 0.75 * log_p[torch.arange(3), y_b]).mean()
    torch.testing.assert_close(task.mixup_loss(logits, y_a, y_b, 0.25), hand)
    with pytest.raises(ValueError, match="lam must be in"):
        task.mixup(x, y, 1.5, perm)


def test_mixup_task_without_mixing_is_plain_cross_entropy(examples) -> None:
    task = examples["custom_task"].MixupClassificationTask(
        mixup_alpha=0.0, backbone="small_cnn", backbone_kwargs={"width": 4}, num_classes=3, input_shape=(1, 6, 6)
    )
    x, y = torch.rand(4, 1, 6, 6), torch.tensor([0, 1, 2, 0])
    task.eval()  # deterministic BN for the comparison
    torch.testing.assert_close(task.training_step((x, y), 0), F.cross_entropy(task(x), y))
    with pytest.raises(ValueError, match="mixup_alpha"):
        examples["custom_task"].MixupClassificationTask(mixup_alpha=-1.0)


def test_mixup_task_trains_on_the_mixed_batch_through_the_hooks(examples) -> None:
    module = examples["custom_task"]
    task = module.MixupClassificationTask(
        mixup_alpha=0.4, backbone="small_cnn", backbone_kwargs={"width": 4}, num_classes=3, input_shape=(1, 6, 6)
    )
    x, y = torch.rand(4, 1, 6, 6), torch.tensor([0, 1, 2, 0])
    task.eval()  # deterministic BN for the comparison
    torch.manual_seed(5)
    loss = task.training_step((x, y), 0)
    torch.manual_seed(5)  # the same lam and permutation, drawn by hand
    alpha = torch.tensor(0.4)
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(4)
    logits = task(lam * x + (1 - lam) * x[perm])
    expected = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
    torch.testing.assert_close(loss, expected)
    # the inherited step still fed train/acc1 (the mixed batch's logits against y)
    accuracy = (logits.argmax(-1) == y).float().mean()
    assert float(task.train_metrics.compute()["train/acc1"]) == pytest.approx(float(accuracy))


def test_custom_task_from_config_by_class_path(examples, run_dir) -> None:
    module = examples["custom_task"]
    config = EXAMPLES / "configs" / "custom_task.yaml"
    assert "class_path: custom_task.MixupClassificationTask" in config.read_text()
    module.main(
        ["fit", "--config", str(config), *TINY, "--data.batch_size=16", "--trainer.logger.init_args.save_dir=runs"]
    )
    model = module.MixupClassificationTask.load_from_checkpoint(_checkpoint(run_dir))
    assert type(model).__name__ == "MixupClassificationTask"
    assert model.mixup_alpha == 0.4 and model.hparams.mixup_alpha == 0.4
    metrics = next((run_dir / "runs").rglob("events.out.tfevents*"), None)
    assert metrics is not None  # logged through the config's TensorBoard logger


# ---------------------------------------------------------------- statistics_study
def test_statistics_study_tiny(examples, tmp_path, capsys) -> None:
    study = examples["statistics_study"]
    window = 4
    summary = study.run_study(
        tmp_path / "st", epochs={128: 1, 4: 1}, window=window, data="synthetic", limit_train_batches=6
    )
    assert set(summary["test_acc1"]) == {128, 4}
    # progress: a line before and after each run, Lightning's bar in between, one closing line
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("[statistics study]")]
    assert lines[0] == "[statistics study] run 1/2: batch 128, 1 epochs"
    assert lines[1].startswith("[statistics study] batch 128: 6 steps, test acc1 ")
    assert lines[2] == "[statistics study] run 2/2: batch 4, 1 epochs"
    assert lines[-1].startswith("[statistics study] done in ") and str(tmp_path / "st") in lines[-1]
    assert "Epoch 0: 100%" in out
    for name in ("hn_fluctuation.png", "hn_evolution.png", "hn_fluctuation.csv", "summary.json"):
        assert (tmp_path / "st" / name).stat().st_size > 0
    layers = [f"backbone.layers.{i}.bn" for i in range(4)]
    for b in (128, 4):
        assert list(summary["fluctuation"][b]) == layers
        # the EN-mean fluctuation is the population std of the recorded EN means (independent recomputation)
        with open(tmp_path / "st" / f"b{b}" / "norm_stats_history.csv", newline="") as handle:
            rows = [r for r in csv.DictReader(handle) if r["layer"] == layers[0]]
        assert len(rows) == window  # 6 steps recorded, the last `window` kept
        expected = statistics.pstdev(float(r["en_mean"]) for r in rows)
        assert summary["fluctuation"][b][layers[0]]["en_mean"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    with pytest.raises(ValueError, match="data must be"):
        study.study_args(
            4, 1, tmp_path, base_lr=0.1, base_batch_size=128, window=4, data="cifar", limit_train_batches=None, seed=0
        )


# ---------------------------------------------------------------- batch_size_sweep
def test_batch_size_sweep_wrapper(examples, tmp_path) -> None:
    wrapper = examples["batch_size_sweep"]
    assert wrapper.REPORT_METHODS == ["bn", "gn", "ln", "in", "pn", "ghost", "seqnorm", "bgn", "gbgn", "hn"]
    out = tmp_path / "s"
    result = wrapper.main(
        ["--out", str(out), "--methods", "ghost", "--batch-sizes", "32", "--seeds", "0", "--epochs", "1", "--no-plot"]
    )
    assert result.status == {"ghost_b32_s0": "ran"}
    (row,) = result.rows
    assert row["lr"] == pytest.approx(0.1 * 32 / 64)  # lr of sweep_digits.yaml at batch 64, scaled
    assert 0.0 <= row["test/acc1"] <= 1.0


# ---------------------------------------------------------------- reproduce_report
def test_report_generated_blocks(examples, tmp_path) -> None:
    report = importlib.import_module("reproduce_report")
    text = "intro\n<!-- BEGIN GENERATED: t -->\nold\nlines\n<!-- END GENERATED: t -->\nprose\n"
    assert report.replace_block(text, "t", "new\n") == (
        "intro\n<!-- BEGIN GENERATED: t -->\nnew\n<!-- END GENERATED: t -->\nprose\n"
    )
    with pytest.raises(ValueError, match="no generated block named 'missing'"):
        report.replace_block(text, "missing", "x")
    path = tmp_path / "f.csv"
    path.write_text(
        "batch_size,layer,bn_mean_fluct,bn_std_fluct,en_mean_fluct,en_std_fluct\n"
        "4,backbone.layers.0.bn,1.5,0.25,0.125,0.0625\n"
    )
    assert report.fluctuation_table(path).splitlines()[-1] == "| 4 | layer 1 | 1.5000 | 0.2500 | 0.1250 | 0.0625 |"
    # the report page has every block the script fills in
    doc = (EXAMPLES.parent / "docs" / "reproduction.md").read_text()
    assert set(report.BLOCKS) >= {"timing", "sweep-table", "sweep-findings", "stats-table", "stats-findings"}
    for name in report.BLOCKS:
        assert f"<!-- BEGIN GENERATED: {name} -->" in doc and f"<!-- END GENERATED: {name} -->" in doc


#: Hand-made sweep: test accuracy in % of seeds 0 and 1 at B = 2 and B = 64, per method.
SWEEP_ACC = {
    "bn": ((97, 98), (99, 99)),
    "gn": ((90, 92), (99, 99)),
    "ln": ((88, 90), (98, 98)),
    "in": ((80, 84), (99, 99)),
    "pn": ((89, 91), (98, 98)),
    "ghost": ((97, 98), (99, 100)),
    "seqnorm": ((98, 98), (99, 99)),
    "bgn": ((92, 91), (99, 100)),
    "gbgn": ((95, 95), (98, 99)),
    "hn": ((98, 99), (99, 99)),
}


def _write_sweep(folder: Path, acc: dict) -> Path:
    """A sweep folder as ``batch_size_sweep`` leaves it: results.csv, summary.json (epochs) and table.md."""
    folder.mkdir()
    lines = ["method,batch_size,seed,lr,wall_s,test/acc1"]
    for method, per_batch in acc.items():
        for batch, lr, values in zip((2, 64), (0.003125, 0.1), per_batch):
            lines += [f"{method},{batch},{seed},{lr},1.0,{value / 100}" for seed, value in enumerate(values)]
    (folder / "results.csv").write_text("\n".join(lines) + "\n")
    (folder / "summary.json").write_text('{"epochs": {"2": 2, "64": 16}}')
    (folder / "table.md").write_text("sweep table\n")
    return folder


def test_report_sweep_findings(examples, tmp_path) -> None:
    """The bullets of section 2 against values computed by hand: mean of 2 seeds, sample std |a - b| / sqrt(2)
    (1 point -> 0.7, 2 -> 1.4, 4 -> 2.8), loss = mean at B = 64 - mean at B = 2."""
    findings = importlib.import_module("report_findings")
    text = findings.sweep_findings(_write_sweep(tmp_path / "sweep", SWEEP_ACC))
    flipped = findings.sweep_findings(_write_sweep(tmp_path / "flipped", {**SWEEP_ACC, "bn": ((80, 82), (99, 99))}))
    bullets, short = text.split("\n\n")
    assert bullets.splitlines() == [
        '- **"BN degrades at very small batches" (BGN Fig. 1, HN, GN), i.e. falls below the batch-independent '
        "methods there: not seen.** At B = 2, BN reaches 97.5 ± 0.7 %, 1.5 points below its B = 64 mean (99.0 %); "
        "the per-example methods (GN, LN, IN and PN) reach 82.0-91.0 %. The best four means at B = 2: "
        "HN 98.5 ± 0.7, SeqNorm 98.0 ± 0.0, BN 97.5 ± 0.7, Ghost 97.5 ± 0.7. Every method is below its B = 64 mean "
        "at B = 2; from B = 64 to B = 2 BN loses 1.5 points, Ghost, HN and SeqNorm 0.5-2.0, GBGN 3.5, BGN 8.0 and "
        "the per-example methods 8.0-17.0.",
        '- **"GN (and LN, IN, PN) is stable across batch sizes", i.e. loses no more than BN as the batch shrinks: '
        "not seen: each loses more than BN from B = 64 to B = 2.** With the linear-scaling lr (0.003125 at B = 2) "
        "and 2 epochs at B = 2, they lose 8.0-17.0 points (GN 91.0 ± 1.4, LN 89.0 ± 1.4, IN 82.0 ± 2.8, "
        "PN 90.0 ± 1.4 % at B = 2), BN 1.5. At B = 64 they reach GN 99.0, LN 98.0, IN 99.0, PN 98.0 % against "
        "BN's 99.0 %. This budget does not tell whether they would catch up with more epochs.",
        '- **"BGN is at least as good as BN at every batch size", i.e. its mean is >= BN\'s: holds at B = 64 '
        "(99.5 vs 99.0); not at B = 2 (91.5 ± 0.7 vs 97.5 ± 0.7, lower in 2 of 2 seeds).**",
        "- **The hybrids against BN** (means in % at B = 2 and 64): BN 97.5 / 99.0; Ghost 97.5 / 99.5, >= BN at "
        "B = 2 and 64; HN 98.5 / 99.0, >= BN at B = 2 and 64; SeqNorm 98.0 / 99.0, >= BN at B = 2 and 64; "
        "GBGN 95.0 / 98.5, below BN at B = 2 and 64. Seed std at B = 2: BN ± 0.7, HN ± 0.7, SeqNorm ± 0.0, "
        "GBGN ± 0.0. Ghost's accuracy equals BN's in 2 of 2 seeds at B = 2 and 1 of 2 seeds at B = 64. At B = 2, "
        "GBGN (95.0 ± 0.0) is between BN and GN (GN 91.0 ± 1.4, BN 97.5 ± 0.7).",
        "- **At B = 64** the 10 methods' means span 98.0-99.5 %; 2 of them (Ghost and BGN) lie within BN's seed "
        "std (± 0.0) of the best mean (Ghost, 99.5 %).",
        "- **Spread:** at B = 2 the per-example methods' seed std is ± 1.4-2.8, the other methods' ± 0.0-0.7 "
        "(every per-example method spreads more than every other method); at B = 64 every method's is at most "
        "± 0.7.",
    ]
    assert short == (
        "In short, on Digits 8x8 with the 4-layer CNN and these epochs: BN does not fall below the per-example "
        "methods at B = 2. From B = 64 to B = 2, BN and the hybrids that keep its batch mean (Ghost, HN and "
        "SeqNorm) lose 0.5-2.0 points, the per-example methods and BGN 8.0-17.0: each of the first loses less "
        "than each of the second.\n"
    )
    # BN at 81.0 % at B = 2, below every per-example method, losing 18.0 points: both verdicts turn
    assert "there: holds.** At B = 2, BN reaches 81.0 ± 1.4 %" in flipped
    assert "shrinks: holds: none loses more than BN from B = 64 to B = 2.**" in flipped
    assert "BN falls below the per-example methods at B = 2." in flipped
    assert flipped.endswith("lose 0.5-18.0 points, the per-example methods and BGN 8.0-17.0.\n")
    partial = _write_sweep(tmp_path / "partial", {m: v for m, v in SWEEP_ACC.items() if m != "hn"})
    with pytest.raises(ValueError, match=r"results.csv: the findings compare .* missing .*: hn\. Run the whole grid"):
        findings.sweep_findings(partial)


def _write_fluctuation(folder: Path) -> Path:
    """A statistics-study folder: hn_fluctuation.csv (3 layers, batch 128 and 4) and summary.json."""
    folder.mkdir()
    rows = {
        128: ((0.4, 0.2, 0.05, 0.1), (0.1, 0.05, 0.01, 0.025), (0.08, 0.04, 0.02, 0.05)),
        4: ((2.0, 0.8, 0.1, 0.4), (0.05, 0.25, 0.01, 0.02), (0.04, 0.3, 0.2, 0.03)),
    }
    lines = ["batch_size,layer,bn_mean_fluct,bn_std_fluct,en_mean_fluct,en_std_fluct"]
    for batch, layers in rows.items():
        lines += [f"{batch},backbone.layers.{i}.bn," + ",".join(map(str, v)) for i, v in enumerate(layers)]
    (folder / "hn_fluctuation.csv").write_text("\n".join(lines) + "\n")
    (folder / "summary.json").write_text('{"test_acc1": {"128": 0.9375, "4": 0.8125}}')
    return folder


def test_report_stats_findings(examples, tmp_path) -> None:
    """The bullets of section 3 against ratios computed by hand: batch-4 over batch-128 factors of layer 1
    0.8 / 0.2 = 4.0 (BN_std) < 2.0 / 0.4 = 5.0 (BN_mean), of layers 2-3 0.25 / 0.05 = 5.0 and 0.3 / 0.04 = 7.5
    (BN_std) > 0.5 (BN_mean); layer 3's EN_mean at batch 4 (0.2) is above layer 1's (0.1)."""
    findings = importlib.import_module("report_findings")
    text = findings.stats_findings(_write_fluctuation(tmp_path / "stats") / "hn_fluctuation.csv")
    assert findings.layers_text(["layer 1", "layer 3"]) == "layers 1 and 3"
    one_batch = tmp_path / "one.csv"
    lines = (tmp_path / "stats" / "hn_fluctuation.csv").read_text().splitlines()
    one_batch.write_text("\n".join(line for line in lines if not line.startswith("4,")) + "\n")
    with pytest.raises(ValueError, match=r"one.csv: the findings compare two batch sizes .* found batch sizes \[128\]"):
        findings.stats_findings(one_batch)
    assert text.splitlines() == [
        '- **"The small-batch noise is mainly in the std, not the mean", i.e. from batch 128 to 4 BN_std\'s '
        "fluctuation grows by a larger factor than BN_mean's: holds in layers 2-3, not in layer 1.** In layers 2-3, "
        "at batch 4 BN_std fluctuates by 0.2500-0.3000, 5.0-7.5x its batch-128 value (0.0400-0.0500), BN_mean by "
        "0.0400-0.0500, 0.5x its batch-128 value (0.0800-0.1000); at batch 4, BN_std fluctuates 5.0-7.5x more "
        "than BN_mean. In layer 1 the factors are 4.0x for BN_std and 5.0x for BN_mean.",
        '- **"EN_std fluctuates much less than BN_std" (why HN takes its std from EN), tested as: less in every '
        "layer: holds at batch 4 (BN_std / EN_std: 2.0-12.5x per layer); not in every layer at batch 128 "
        "(BN_std / EN_std: 0.8-2.0x per layer).** At batch 4: EN_std 0.0200-0.4000, BN_std 0.2500-0.8000.",
        '- **"The first layer fluctuates most": holds for 7 of the 8 statistics and batch sizes, not for EN_mean '
        "at batch 4.**",
        "- EN_std fluctuates more at batch 128 than at batch 4 in layers 2-3 (0.0250-0.0500 against 0.0200-0.0300).",
    ]


def test_report_fills_sections_2_and_3(examples, tmp_path) -> None:
    """``fill_sweep_and_statistics`` (what ``main`` calls) writes the four blocks of sections 2-3 of the page."""
    report = importlib.import_module("reproduce_report")
    sweep = _write_sweep(tmp_path / "sweep", SWEEP_ACC)
    stats = _write_fluctuation(tmp_path / "stats")
    doc = (EXAMPLES.parent / "docs" / "reproduction.md").read_text()
    text = report.fill_sweep_and_statistics(doc, sweep, stats)
    blocks = {
        name: re.search(rf"<!-- BEGIN GENERATED: {name} -->\n(.*?)<!-- END GENERATED: {name} -->", text, re.S)[1]
        for name in ("sweep-table", "sweep-findings", "stats-table", "stats-findings")
    }
    assert blocks["sweep-table"] == "sweep table\n"
    assert blocks["sweep-findings"].startswith('- **"BN degrades at very small batches"')
    assert blocks["stats-table"].endswith(
        "| 4 | layer 3 | 0.0400 | 0.3000 | 0.2000 | 0.0300 |\n\nTest accuracy: batch 128: 93.8%, batch 4: 81.2%\n"
    )
    assert blocks["stats-findings"].startswith('- **"The small-batch noise is mainly in the std')
