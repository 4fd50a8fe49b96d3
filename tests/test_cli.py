"""The `normlightning` command: subcommands, defaults, links, checkpoints, user classes by class_path."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from normlightning.cli import build_cli, main
from normlightning.data import Digits
from normlightning.data.base import MissingDataAttributeError
from normlightning.models import build_backbone
from normlightning.tasks import ClassificationTask

QUICKSTART = "configs/quickstart.yaml"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
SYNTHETIC = [
    "--data=normlightning.data.Synthetic",
    "--data.input_shape=[1, 6, 6]",
    "--data.num_classes=5",
    "--data.num_train=32",
    "--data.num_val=16",
    "--data.num_test=16",
    "--data.batch_size=8",
    "--model=normlightning.tasks.ClassificationTask",
    "--model.backbone=small_cnn",
    "--model.backbone_kwargs={width: 4}",
]


@pytest.fixture
def quickstart(run_dir, request) -> str:
    return str(request.config.rootpath / QUICKSTART)


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict"])
def test_main_runs_every_subcommand(quickstart, subcommand) -> None:
    untrained = ["--allow_untrained=true"] if subcommand == "predict" else []  # no checkpoint: initial weights
    main([subcommand, "--config", quickstart, "--trainer.fast_dev_run=true", *QUIET, *untrained])


def test_fit_without_logger(quickstart) -> None:
    cli = build_cli(["fit", "--config", quickstart, "--trainer.fast_dev_run=true", "--trainer.logger=false", *QUIET])
    assert cli.trainer.loggers == [] and cli.trainer.state.finished


def test_help_and_print_config(quickstart, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["fit", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "--model" in text and "--data" in text and "--checkpoint.monitor" in text
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", quickstart, "--print_config"])
    assert info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["class_path"] == "normlightning.tasks.ClassificationTask"
    assert config["data"]["class_path"] == "normlightning.data.Digits"
    assert config["checkpoint"]["monitor"] == "task" and config["checkpoint"]["save_last"] is True
    assert config["seed_everything"] == 0


def test_bad_argument_exits_with_parser_error(quickstart, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", quickstart, "--model.init_args.label_smoothing=lots"])
    assert info.value.code == 2
    assert "label_smoothing" in capsys.readouterr().err


def test_data_attributes_are_linked_into_the_task(quickstart) -> None:
    cli = build_cli(["--config", quickstart], run=False)
    assert isinstance(cli.datamodule, Digits) and isinstance(cli.model, ClassificationTask)
    assert cli.model.num_classes == 10 and cli.model.hparams["input_shape"] == (1, 8, 8)
    assert torch.allclose(cli.model.normalize.mean, torch.tensor(Digits.MEAN))
    assert torch.allclose(cli.model.normalize.std, torch.tensor(Digits.STD))
    assert not cli.trainer.fast_dev_run and cli.trainer.max_epochs == 10


def test_fit_writes_events_config_checkpoints_and_reloads(run_dir) -> None:
    args = [
        "fit",
        *SYNTHETIC,
        *QUIET,
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=2",
        "--trainer.logger.init_args.name=tiny",
        "--trainer.accelerator=cpu",
        "--model.optimizer=torch.optim.Adam",
        "--model.optimizer.lr=0.01",
    ]
    cli = build_cli(args)
    version = run_dir / "runs" / "tiny" / "version_0"
    assert list(version.glob("events.out.tfevents.*"))
    saved = yaml.safe_load((version / "config.yaml").read_text())
    assert saved["model"]["init_args"]["backbone"] == "small_cnn" and saved["trainer"]["max_epochs"] == 2
    last = version / "checkpoints" / "last.ckpt"
    assert last.is_file() and len(list((version / "checkpoints").glob("best-*.ckpt"))) == 1
    assert cli.trainer.checkpoint_callback.monitor == "val/acc1"

    reloaded = ClassificationTask.load_from_checkpoint(last).eval()
    checkpoint = torch.load(last, weights_only=False)
    assert checkpoint["global_step"] == cli.trainer.global_step == 4  # last.ckpt is the final state
    stored = checkpoint["hyper_parameters"]
    assert stored["optimizer"]["class_path"] == "torch.optim.Adam" and stored["optimizer"]["init_args"]["lr"] == 0.01
    assert stored["num_classes"] == 5 and tuple(stored["input_shape"]) == (1, 6, 6)  # linked values are stored
    assert isinstance(cli.trainer.optimizers[0], torch.optim.Adam)
    rebuilt = reloaded.configure_optimizers()  # the reloaded task builds the same optimizer
    assert isinstance(rebuilt, torch.optim.Adam) and rebuilt.param_groups[0]["lr"] == 0.01
    x = torch.rand(4, 1, 6, 6)
    with torch.no_grad():
        assert torch.equal(reloaded(x), cli.model.eval()(x))

    # the checkpoint also feeds the CLI again
    main(["validate", *SYNTHETIC, *QUIET, f"--ckpt_path={last}", "--trainer.logger=false", "--trainer.callbacks=[]"])


def test_user_task_subclass_by_class_path(run_dir, monkeypatch) -> None:
    (run_dir / "my_tasks.py").write_text(
        textwrap.dedent('''
        from normlightning.tasks import ClassificationTask

        class SmoothedTask(ClassificationTask):
            """A user's task: a constant extra term in the loss."""

            def __init__(self, *, extra: float = 0.0, **kwargs) -> None:
                super().__init__(**kwargs)
                self.extra = extra

            def training_step(self, batch, batch_idx):
                return super().training_step(batch, batch_idx) + self.extra
    ''')
    )
    monkeypatch.syspath_prepend(str(run_dir))
    args = [
        "fit",
        *SYNTHETIC,
        "--model=my_tasks.SmoothedTask",
        "--model.extra=0.5",
        "--model.backbone=mlp",
        "--trainer.fast_dev_run=true",
        *QUIET,
    ]
    cli = build_cli(args)
    assert type(cli.model).__name__ == "SmoothedTask" and cli.model.extra == 0.5
    assert cli.model.num_classes == 5


def test_python_dash_m_entry_point(run_dir) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "normlightning", "fit", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "--trainer.max_epochs" in result.stdout


def test_plain_lightning_datamodule_by_class_path(run_dir, monkeypatch) -> None:
    (run_dir / "my_data.py").write_text(
        textwrap.dedent('''
        import torch
        from lightning.pytorch import LightningDataModule
        from torch.utils.data import DataLoader, TensorDataset

        class PlainData(LightningDataModule):
            """A user's data module with num_classes only (no input_shape, mean, std)."""

            def __init__(self, num_classes: int = 3) -> None:
                super().__init__()
                self.num_classes = num_classes

            def train_dataloader(self):
                x, y = torch.rand(8, 3, 8, 8), torch.randint(self.num_classes, (8,))
                return DataLoader(TensorDataset(x, y), batch_size=4)
    ''')
    )
    monkeypatch.syspath_prepend(str(run_dir))
    cli = build_cli(
        [
            "fit",
            "--data=my_data.PlainData",
            "--data.num_classes=4",
            "--model=normlightning.tasks.ClassificationTask",
            "--model.backbone=small_cnn",
            "--model.input_shape=[3, 8, 8]",
            "--trainer.fast_dev_run=true",
            *QUIET,
        ]
    )
    assert cli.model.num_classes == 4 and cli.model.backbone.classifier.out_features == 4
    assert torch.equal(cli.model.normalize.mean, torch.zeros(3)) and torch.equal(cli.model.normalize.std, torch.ones(3))


def test_data_module_without_num_classes_or_input_shape_is_a_clear_error(run_dir, monkeypatch) -> None:
    """No silent 1000-way head on an assumed (3, 224, 224) input: the error lists what a DataModule provides."""
    (run_dir / "bare_data.py").write_text(
        textwrap.dedent("""
        import torch
        from lightning.pytorch import LightningDataModule
        from torch.utils.data import DataLoader, TensorDataset

        class BareData(LightningDataModule):
            def train_dataloader(self):
                return DataLoader(TensorDataset(torch.rand(8, 3, 8, 8), torch.randint(3, (8,))), batch_size=4)
    """)
    )
    monkeypatch.syspath_prepend(str(run_dir))
    with pytest.raises(
        MissingDataAttributeError, match=r"num_classes is not set.*input_shape.*batch_size.*--model\.num_classes"
    ):
        build_cli(
            [
                "fit",
                "--data=bare_data.BareData",
                "--model=normlightning.tasks.ClassificationTask",
                "--model.backbone=small_cnn",
                "--trainer.fast_dev_run=true",
                *QUIET,
            ]
        )
    with pytest.raises(MissingDataAttributeError, match="input_shape is not set"):
        build_cli(
            [
                "fit",
                "--data=bare_data.BareData",
                "--model=normlightning.tasks.ClassificationTask",
                "--model.backbone=small_cnn",
                "--model.num_classes=3",
                "--trainer.fast_dev_run=true",
                *QUIET,
            ]
        )


def test_default_root_dir_holds_the_default_logger_runs(run_dir, tmp_path_factory) -> None:
    """``--trainer.default_root_dir`` moves the default ``runs/`` logger folder under it; nothing is written
    into the working directory (a relative ``save_dir`` is taken under the root, an absolute one is kept)."""
    root = tmp_path_factory.mktemp("root")
    short = [
        "fit",
        *SYNTHETIC,
        *QUIET,
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=1",
        "--trainer.limit_val_batches=1",
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={root}",
    ]
    build_cli(short)
    assert (root / "runs" / "default" / "version_0" / "config.yaml").is_file()
    assert not (run_dir / "runs").exists()
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    build_cli([*short, f"--trainer.logger.init_args.save_dir={elsewhere}"])
    assert (elsewhere / "default" / "version_0" / "config.yaml").is_file()


def test_our_errors_print_one_message_and_exit_1_with_the_traceback_behind_a_switch(
    quickstart, capsys, monkeypatch
) -> None:
    """A typo in ``norm.method`` and a group count that does not divide: the message alone on stderr, exit 1;
    ``NORMLIGHTNING_DEBUG=1`` raises the error itself (its traceback)."""
    cases = {
        "--norm.method=bgm": r"(norm.method: )?Unknown normalization .bgm.; valid names: .*bgn",
        "--norm.num_groups=5": r"layer 'backbone.features.0.1': num_groups=5 does not divide C=32",
    }
    for setting, message in cases.items():
        extra = [setting] if "method" in setting else ["--norm.method=gn", setting]
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", quickstart, *QUIET, *extra])
        assert exit_info.value.code == 1
        err = capsys.readouterr().err
        assert re.search(rf"^normlightning: error: ValueError: {message}", err, re.M), err
        assert "Traceback" not in err and "NORMLIGHTNING_DEBUG=1" in err
    monkeypatch.setenv("NORMLIGHTNING_DEBUG", "1")
    with pytest.raises(ValueError, match="Unknown normalization 'bgm'"):
        main(["fit", "--config", quickstart, *QUIET, "--norm.method=bgm"])


def test_errors_raised_outside_the_package_keep_their_traceback() -> None:
    from normlightning.cli import raised_by_normlightning

    try:
        torch.zeros(2) + torch.zeros(3)
    except RuntimeError as err:
        assert not raised_by_normlightning(err)
    try:
        build_backbone("small_cnn", num_classes=0)
    except ValueError as err:
        assert raised_by_normlightning(err)


def test_a_backbone_argument_error_is_reported_as_itself_not_as_the_parsers_union_error(quickstart) -> None:
    with pytest.raises(ValueError, match=r"backbone 'resnet18' does not accept backbone_kwargs.width=32"):
        build_cli(["--config", quickstart, "--model.init_args.backbone=resnet18"], run=False)
