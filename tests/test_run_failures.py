"""Runs that fail loudly and lose nothing (issue 21): a diverging run stops and never saves non-finite
weights, SIGTERM exits 143, no training batch is an error at setup, a rerun does not overwrite another
run's folder, predictions do not replace earlier predictions."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from normlightning.callbacks.divergence import NonFiniteError
from normlightning.cli import EXIT_KEYBOARD_INTERRUPT, EXIT_SIGTERM, build_cli, main
from normlightning.run_folder import RunFolderNotEmptyError

TESTS = Path(__file__).resolve().parent
QUICKSTART = str(TESTS.parent / "configs" / "quickstart.yaml")
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
SYNTHETIC = [
    "--data=normlightning.data.Synthetic",
    "--data.input_shape=[1, 6, 6]",
    "--data.num_classes=3",
    "--data.num_train=16",
    "--data.num_val=8",
    "--data.num_test=8",
    "--data.batch_size=8",
    "--model=normlightning.tasks.ClassificationTask",
    "--model.backbone=small_cnn",
    "--model.backbone_kwargs={width: 4}",
    "--trainer.accelerator=cpu",
    "--trainer.logger.init_args.name=run",
    *QUIET,
]


def _all_finite(checkpoint_path: Path) -> bool:
    state = torch.load(checkpoint_path, weights_only=False)["state_dict"]
    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


# ------------------------------------------------------------------ divergence
def test_diverging_run_stops_at_the_first_nonfinite_step_naming_it_and_the_lr(run_dir) -> None:
    import sys

    sys.path.insert(0, str(TESTS))
    from probe_callbacks import FinitenessProbe

    cli = build_cli(
        [
            "--config",
            QUICKSTART,
            "--model.init_args.optimizer.init_args.lr=1e6",
            *QUIET,
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=8",
            "--trainer.limit_val_batches=1",
        ],
        run=False,
    )
    probe = FinitenessProbe()
    cli.trainer.callbacks.insert(0, probe)  # sees each step before the check does
    with pytest.raises(NonFiniteError, match=r"diverged at step \d+ .*lr 1e\+06.*divergence\.on_nonfinite") as info:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    # the step named is the first at which the probe saw a non-finite loss or non-finite weights
    bad = sorted([s for s, ok in probe.loss_finite if not ok] + [s for s, ok in probe.weights_finite if not ok])
    assert bad and f"step {bad[0]} " in str(info.value)
    assert cli.trainer.global_step == bad[0]  # stopped there: no further step was taken
    assert not list(run_dir.rglob("*.ckpt"))  # no validation had run yet: nothing saved, nothing non-finite


def test_diverged_weights_are_never_checkpointed_and_warn_trains_on(run_dir, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(TESTS))
    poison = '{"class_path": "probe_callbacks.PoisonWeights", "init_args": {"epoch": 1}}'
    with pytest.warns(UserWarning, match=r"diverged at step 2 .*divergence\.on_nonfinite=warn"):
        cli = build_cli(
            [
                "fit",
                *SYNTHETIC,
                "--divergence.on_nonfinite=warn",
                "--trainer.max_epochs=3",
                f"--trainer.callbacks+={poison}",
            ]
        )
    assert cli.trainer.global_step == 6  # trained on to the end
    folder = run_dir / "runs" / "run" / "version_0" / "checkpoints"
    last, (best,) = folder / "last.ckpt", list(folder.glob("best-*.ckpt"))
    # both hold the end of epoch 0 (2 steps), the last finite state
    assert torch.load(last, weights_only=False)["global_step"] == 2 and _all_finite(last)
    assert torch.load(best, weights_only=False)["global_step"] == 2 and _all_finite(best)


# ------------------------------------------------------------------ SIGTERM, Ctrl+C
def test_sigterm_exits_143_with_last_ckpt_and_the_resume_command(run_dir, monkeypatch, capsys) -> None:
    monkeypatch.syspath_prepend(str(TESTS))
    sigterm = '{"class_path": "probe_callbacks.SignalAt", "init_args": {"step": 5, "name": "SIGTERM"}}'
    with pytest.raises(SystemExit) as info:
        main(["fit", *SYNTHETIC, "--trainer.max_epochs=50", f"--trainer.callbacks+={sigterm}"])
    assert info.value.code == EXIT_SIGTERM == 143
    last = run_dir / "runs" / "run" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 4  # the end of epoch 1 (2 steps per epoch)
    assert f"--ckpt_path {last.relative_to(run_dir)}" in capsys.readouterr().err


def test_ctrl_c_exits_130(run_dir, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(TESTS))
    sigint = '{"class_path": "probe_callbacks.SignalAt", "init_args": {"step": 1, "name": "SIGINT"}}'
    handler = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a fresh process: Ctrl+C raises KeyboardInterrupt
    try:
        with pytest.raises(SystemExit) as info:
            main(["fit", *SYNTHETIC, "--trainer.max_epochs=50", f"--trainer.callbacks+={sigint}"])
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores Ctrl+C from its shutdown on
    assert info.value.code == EXIT_KEYBOARD_INTERRUPT == 130


# ------------------------------------------------------------------ no training batch
def test_batch_size_larger_than_the_training_set_with_drop_last_is_an_error(run_dir) -> None:
    with pytest.raises(ValueError, match=r"data\.batch_size=32 is larger than the training set \(16 examples\)"):
        build_cli(["fit", *SYNTHETIC, "--data.batch_size=32", "--data.drop_last=true", "--trainer.max_epochs=1"])
    # without drop_last the one partial batch trains
    cli = build_cli(["fit", *SYNTHETIC, "--data.batch_size=32", "--trainer.max_epochs=1", "--trainer.logger=false"])
    assert cli.trainer.global_step == 1


# ------------------------------------------------------------------ run folders
def test_a_rerun_into_a_used_run_folder_is_refused_unless_it_resumes_or_overwrites(run_dir) -> None:
    fixed = [*SYNTHETIC, "--trainer.logger.init_args.version=0"]
    build_cli(["fit", *fixed, "--trainer.max_epochs=1"])
    folder = run_dir / "runs" / "run" / "version_0"
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with pytest.raises(RunFolderNotEmptyError, match=r"version_0 already holds .*overwrite_run=true"):
        build_cli(["fit", *fixed, "--trainer.max_epochs=1"])
    with pytest.raises(RunFolderNotEmptyError, match="--trainer.logger.init_args.version"):
        build_cli(["validate", *fixed])
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before  # nothing touched
    # resuming that run writes into its folder
    cli = build_cli(["fit", *fixed, "--trainer.max_epochs=2", f"--ckpt_path={folder / 'checkpoints' / 'last.ckpt'}"])
    assert cli.trainer.global_step == 4 and cli.trainer.current_epoch == 2  # epoch 1 added to epoch 0
    build_cli(["validate", *fixed, "--overwrite_run=true"])  # asked for explicitly


# ------------------------------------------------------------------ predictions
def test_predicting_twice_into_one_folder_refuses_before_the_pass(run_dir) -> None:
    out = run_dir / "predictions"
    args = [*SYNTHETIC, f"--predictions.output_dir={out}"]
    build_cli(["predict", *args, "--allow_untrained=true"])
    first = (out / "predictions.csv").read_bytes()
    cli = build_cli(args, run=False)
    with pytest.raises(FileExistsError, match=r"predictions\.csv already exists.*predictions\.output_dir"):
        cli.trainer.predict(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.predict_loop.batch_progress.total.ready == 0  # refused before predicting
    assert (out / "predictions.csv").read_bytes() == first
    build_cli(["predict", *args, "--allow_untrained=true", "--predictions.overwrite=true"])
    assert (out / "predictions.csv").read_bytes() == first  # same model, same predictions, replaced on request


def test_unwritable_prediction_folder_is_an_error_before_the_pass(run_dir) -> None:
    (run_dir / "a_file").write_text("")
    cli = build_cli([*SYNTHETIC, f"--predictions.output_dir={run_dir / 'a_file' / 'out'}"], run=False)
    with pytest.raises(OSError, match=r"cannot write predictions into .*a_file.*predictions\.output_dir"):
        cli.trainer.predict(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.predict_loop.batch_progress.total.ready == 0
