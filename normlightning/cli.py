"""The ``normlightning`` command: a LightningCLI with ``fit``, ``validate``, ``test``, ``predict``.

``--model`` is any subclass of :class:`~normlightning.tasks.BaseTask` and ``--data`` any
``LightningDataModule`` (``class_path`` + ``init_args``, so your own classes work).
The data module's ``num_classes``, ``input_shape``, ``mean`` and ``std`` are passed to the
task's ``num_classes``, ``input_shape``, ``input_mean`` and ``input_std`` after it is built.

Defaults: seed 0, a TensorBoard logger writing to ``runs/<name>/version_<n>`` (under
``trainer.default_root_dir`` when given: a relative logger ``save_dir`` is taken there), a
``checkpoint:`` section (:class:`~normlightning.callbacks.checkpoint.Checkpoint`, a
``ModelCheckpoint`` on the task's ``monitor`` (``val/acc1``), mode max, plus an always up-to-date
``last.ckpt``), a ``norm:`` section (the norm-layer injection),
an ``hparams:`` section (:class:`~normlightning.callbacks.run_hparams.RunHyperparameters`: the
applied normalization and the batch size as hyperparameters, the best ``val/acc1`` as the
HParams metric), a ``predictions:`` section
(:class:`~normlightning.callbacks.prediction_writer.PredictionWriter`: ``predict`` writes
``predictions.csv`` into the run's folder), the learning rate logged every step, the progress
bar (redrawn at most 10 times a second,
:class:`~normlightning.callbacks.throttled_progress_bar.ThrottledProgressBar`), and the resolved
config saved next to the logs (``config.yaml``), a ``divergence:`` section
(:class:`~normlightning.callbacks.divergence.DivergenceCheck`: a NaN or infinite loss or weights
stop the run, naming the step and the learning rate).
At the end, ``fit`` prints the run folder, the best checkpoint (metric value and epoch) and
``last.ckpt``; ``validate``/``test`` print their metrics and where they were logged
(:mod:`normlightning.run_summary`).

A run never writes into a run folder that holds another run's files
(:mod:`normlightning.run_folder`; ``--overwrite_run=true`` to do it anyway, or resume that run
with ``fit --ckpt_path``).

Exit codes of the command (README, "Exit codes"): 0 the subcommand finished; 1 an error (the
package's own errors as one message, ``NORMLIGHTNING_DEBUG=1`` for their traceback; others with theirs);
2 a bad argument (the parser's message); 130 interrupted with
Ctrl+C; 143 (``EXIT_SIGTERM``, 128 + SIGTERM as shells report it) stopped by SIGTERM, e.g. a
batch scheduler's preemption, with the path of ``last.ckpt`` to resume from.
Known harmless warnings are filtered in one place, :mod:`normlightning.known_warnings`.

``--ckpt_path`` is checked before anything is built (:mod:`normlightning.ckpt_path`): ``last`` is the
newest ``last.ckpt`` of the run name, ``best``, a directory, a file not written by a normlightning task and
a ``num_classes`` other than the data's are errors that say what to pass; ``predict`` without a checkpoint
needs ``--allow_untrained=true``. A ``model:`` or ``data:`` section without ``class_path`` is an error that
says so (:class:`NormLightningArgumentParser`).
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any, NoReturn

from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from normlightning import known_warnings
from normlightning.callbacks.checkpoint import CHECKPOINT_DEFAULTS, Checkpoint
from normlightning.callbacks.divergence import DivergenceCheck
from normlightning.callbacks.norm_injection import NormInjection
from normlightning.callbacks.prediction_writer import PredictionWriter
from normlightning.callbacks.run_hparams import RunHyperparameters
from normlightning.callbacks.throttled_progress_bar import with_progress_bar
from normlightning.checkpoint_files import read_checkpoint
from normlightning.ckpt_path import (
    BASE_TASK,
    LIGHTNING_CKPT_NAMES,
    CheckpointPathError,
    best_error,
    check_num_classes,
    check_task_checkpoint,
    directory_error,
    resolve_last,
)
from normlightning.data.base import MissingDataAttributeError
from normlightning.run_folder import check_run_folder
from normlightning.run_summary import evaluation_summary, fit_summary
from normlightning.tasks.base import BaseTask

#: Task arguments filled from the data module after it is instantiated: data attr -> task arg.
DATA_TO_MODEL_LINKS: dict[str, str] = {
    "num_classes": "num_classes",
    "input_shape": "input_shape",
    "mean": "input_mean",
    "std": "input_std",
}

#: Exit code of a run that failed with an error.
EXIT_ERROR = 1
#: Environment variable that makes :func:`main` show the traceback of the package's own errors.
DEBUG_ENV = "NORMLIGHTNING_DEBUG"
#: The package's folder: an error raised by a file under it is one of ours.
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep

#: Exit code of a run stopped by SIGTERM (128 + 15, as a shell reports a process killed by it).
EXIT_SIGTERM = 143
#: Exit code of a run stopped with Ctrl+C (128 + SIGINT).
EXIT_KEYBOARD_INTERRUPT = 130

#: ``trainer.*`` defaults (every one can be overridden in a config or on the command line).
TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "default", "default_hp_metric": False},
    },
    "callbacks": [
        {
            "class_path": "lightning.pytorch.callbacks.LearningRateMonitor",
            "init_args": {"logging_interval": "step"},
        }
    ],
}


def anchor_loggers_at_root_dir(trainer_config: Namespace) -> None:
    """Put every relative logger ``save_dir`` in ``trainer_config`` under ``trainer_config.default_root_dir``.

    ``save_dir: runs`` (our default) with ``default_root_dir: /scratch/exp`` becomes ``/scratch/exp/runs``;
    an absolute ``save_dir``, or no ``default_root_dir``, is left as it is (relative to the working directory).
    """
    root = trainer_config.get("default_root_dir")
    loggers = trainer_config.get("logger")
    if not root or loggers in (None, True, False):
        return
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        init_args = logger.get("init_args") if isinstance(logger, (Namespace, dict)) else None
        save_dir = init_args.get("save_dir") if init_args is not None else None
        if isinstance(save_dir, str) and not os.path.isabs(save_dir) and "://" not in save_dir:
            init_args["save_dir"] = os.path.join(str(root), save_dir)


#: The base classes that jsonargparse uses for a ``model:`` / ``data:`` section without ``class_path``.
SECTION_BASE_CLASSES: dict[str, str] = {
    "model": BASE_TASK,
    "data": "lightning.LightningDataModule",
}


class NormLightningArgumentParser(LightningArgumentParser):
    """The command's parser: a ``model:`` or ``data:`` section without ``class_path`` fails with an
    error that says so (jsonargparse alone reports its arguments as "not accepted" by the base class);
    ``predict`` gets ``--allow_untrained``."""

    @override
    def add_method_arguments(self, theclass: type, themethod: str, *args: Any, **kwargs: Any) -> list[str]:
        """The subcommand's (``Trainer.<themethod>``'s) arguments; for ``predict`` also ``--allow_untrained``,
        which stays out of the returned names (those are passed on to ``Trainer.predict``)."""
        added = super().add_method_arguments(theclass, themethod, *args, **kwargs)
        if themethod == "predict":
            self.add_argument(
                "--allow_untrained",
                type=bool,
                default=False,
                help="predict without --ckpt_path, with the model's initial (untrained) weights",
            )
        return added

    @override
    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        for section, base in SECTION_BASE_CLASSES.items():
            if f"Problem with given class_path '{base}'" in message:
                message = (
                    f"the {section}: section has no class_path (or names the base class {base}): name the class "
                    f"and put its arguments under init_args, e.g.\n  {section}:\n    class_path: "
                    f"{'normlightning.tasks.ClassificationTask' if section == 'model' else 'normlightning.data.Digits'}"
                    f"\n    init_args:\n      ...\n(or --{section}=<class_path> on the command line).\n"
                    f"The parser's message: {message}"
                )
                break
        super().error(message, ex)


class NormLightningCLI(LightningCLI):
    """LightningCLI for normlightning tasks and data modules.

    Top-level config sections that configure an always-present callback are listed in
    :attr:`forced_callbacks` (section name -> callback class, with defaults in
    :attr:`forced_callback_defaults`): ``checkpoint:``, ``norm:``
    (:class:`~normlightning.callbacks.norm_injection.NormInjection`, which rewrites the model's
    normalization layers at setup; ``method: null``, the default, leaves the model unchanged),
    ``hparams:`` (after ``norm:``, whose applied layers it logs), ``predictions:`` and
    ``divergence:``.
    """

    forced_callbacks: dict[str, type] = {
        "checkpoint": Checkpoint,
        "norm": NormInjection,
        "hparams": RunHyperparameters,
        "predictions": PredictionWriter,
        "divergence": DivergenceCheck,
    }
    forced_callback_defaults: dict[str, dict[str, Any]] = {"checkpoint": CHECKPOINT_DEFAULTS}

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for section, callback_class in self.forced_callbacks.items():
            parser.add_lightning_class_args(callback_class, section)
            defaults = self.forced_callback_defaults.get(section, {})
            if defaults:
                parser.set_defaults({f"{section}.{key}": value for key, value in defaults.items()})
        parser.set_defaults({f"trainer.{key}": value for key, value in TRAINER_DEFAULTS.items()})
        parser.add_argument(
            "--overwrite_run",
            type=bool,
            default=False,
            help="write into a run folder (<save_dir>/<name>/<version>) that already holds another run's files "
            "(default: refuse, unless fit resumes from a checkpoint in it)",
        )
        for data_attr, model_arg in DATA_TO_MODEL_LINKS.items():
            parser.link_arguments(f"data.{data_attr}", f"model.init_args.{model_arg}", apply_on="instantiate")

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse ``args`` (``None``: ``sys.argv``), then check a given ``--ckpt_path`` file
        (LightningCLI reads its hyperparameters next, and a missing, empty or truncated file would
        fail there with a bare ``EOFError``).

        Explicit ``args`` replace ``sys.argv`` (a sweep cell or a study builds its CLI inside a
        process that has its own command line), so, unlike LightningCLI, this does not warn when
        both are present.
        """
        if isinstance(args, (dict, Namespace)):
            self.config = parser.parse_object(args)
        else:
            self.config = parser.parse_args(args)
        subcommand = self.config.get("subcommand")
        self._checkpoint_hparams: dict[str, Any] = {}
        if subcommand:
            self._check_ckpt_path(subcommand)

    def _check_ckpt_path(self, subcommand: str) -> None:
        """Resolve ``--ckpt_path last``, and fail early, saying what to pass, on ``best``, a directory, a file
        that is not a normlightning task checkpoint (:mod:`normlightning.ckpt_path`), and on ``predict``
        without a checkpoint unless ``--allow_untrained=true``."""
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path:
            if subcommand == "predict" and not config.get("allow_untrained"):
                raise CheckpointPathError(
                    "predict without --ckpt_path would predict with the model's initial weights (nothing trained). "
                    "Give the checkpoint, e.g. --ckpt_path last or --ckpt_path runs/<name>/version_<n>/checkpoints/"
                    "best-<epoch>-<step>.ckpt, or --allow_untrained=true to predict with the initial weights"
                )
            return
        if ckpt_path == "last":
            config["ckpt_path"] = ckpt_path = resolve_last(config, subcommand)
        elif ckpt_path == "best":
            raise best_error(config)
        if ckpt_path in LIGHTNING_CKPT_NAMES or "://" in str(ckpt_path):
            return
        if os.path.isdir(ckpt_path):
            raise directory_error(ckpt_path)
        checkpoint = read_checkpoint(ckpt_path, what="--ckpt_path")
        check_task_checkpoint(checkpoint, ckpt_path)
        self._checkpoint_hparams = dict(checkpoint.get("hyper_parameters") or {})

    def _subcommand_section(self, config: Namespace, key: str, default: Any = None) -> Any:
        """``config[key]``, under the subcommand's part of ``config`` when there is a subcommand."""
        return config.get(str(self.subcommand), config).get(key, default)

    @override
    def before_instantiate_classes(self) -> None:
        """Resolve a relative logger ``save_dir`` (the default is ``runs``) under
        ``trainer.default_root_dir`` when one is given, so that a run told where to write writes there."""
        trainer_config = self._subcommand_section(self.config, "trainer", default=None)
        if trainer_config is not None:
            anchor_loggers_at_root_dir(trainer_config)

    @override
    def instantiate_classes(self) -> None:
        """Instantiate data, model and trainer; one of the package's own errors raised while building a
        class (e.g. a task argument that the data module should have provided, or a backbone argument the
        backbone rejects) is reported as itself, not wrapped in the parser's "Does not validate against any
        of the Union subtypes". With ``--ckpt_path``, a task ``num_classes`` other than the checkpoint's is an
        error naming both (not a ``size mismatch``)."""
        try:
            super().instantiate_classes()
        except ValueError as err:
            cause = err
            while cause is not None and not (
                isinstance(cause, MissingDataAttributeError) or (cause is not err and raised_by_normlightning(cause))
            ):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            # ``from`` its own cause: that cause is still shown, the parser's wrapping (the context) is not.
            raise cause from cause.__cause__
        if self._checkpoint_hparams:
            check_num_classes(
                self._checkpoint_hparams,
                self.config[self.subcommand]["ckpt_path"],
                getattr(self.datamodule, "num_classes", None),
                self.model.hparams.get("num_classes"),
            )

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer; with ``trainer.logger: false`` the default LearningRateMonitor is dropped (it needs a logger);
        the progress bar, unless the config brings its own or turns it off, is a ``ThrottledProgressBar``."""
        trainer_config = self._subcommand_section(self.config_init, "trainer", default={})
        if trainer_config.get("logger") is False and trainer_config.get("callbacks"):
            trainer_config["callbacks"] = [
                callback for callback in trainer_config["callbacks"] if not isinstance(callback, LearningRateMonitor)
            ]
        trainer_config["callbacks"] = with_progress_bar(
            trainer_config.get("callbacks"), trainer_config.get("enable_progress_bar") is not False
        )
        return super().instantiate_trainer(**kwargs)

    def _point_injection_at_checkpoint(self, subcommand: str) -> None:
        """Tell the ``norm:`` callback which checkpoint this run restores: its stored layers win."""
        ckpt_path = self.config_init[subcommand].get("ckpt_path")
        for callback in self.trainer.callbacks:
            if isinstance(callback, NormInjection):
                callback.checkpoint_path = ckpt_path

    def _check_run_folder(self, subcommand: str) -> None:
        """Refuse to write into another run's folder (:func:`~normlightning.run_folder.check_run_folder`)."""
        config = self.config_init[subcommand]
        check_run_folder(self.trainer, subcommand, config.get("ckpt_path"), bool(config.get("overwrite_run")))

    def before_fit(self) -> None:
        self._check_run_folder("fit")
        self._point_injection_at_checkpoint("fit")

    def before_validate(self) -> None:
        self._check_run_folder("validate")
        self._point_injection_at_checkpoint("validate")

    def before_test(self) -> None:
        self._check_run_folder("test")
        self._point_injection_at_checkpoint("test")

    def before_predict(self) -> None:
        self._check_run_folder("predict")
        self._point_injection_at_checkpoint("predict")

    def _print_summary(self, lines: list[str]) -> None:
        """Print where a finished command's files went (:mod:`normlightning.run_summary`), on global rank 0."""
        if self.trainer.is_global_zero:
            print("\n".join(lines), flush=True)

    def after_fit(self) -> None:
        self._print_summary(fit_summary(self.trainer))

    def after_validate(self) -> None:
        self._print_summary(evaluation_summary(self.trainer, "val"))

    def after_test(self) -> None:
        self._print_summary(evaluation_summary(self.trainer, "test"))


def build_cli(args: ArgsType = None, run: bool = True) -> NormLightningCLI:
    """Parse ``args``, instantiate the classes and (``run=True``) run the subcommand.

    Args:
        args: command line arguments (``None``: ``sys.argv[1:]``), e.g.
            ``["fit", "--config", "configs/quickstart.yaml", "--trainer.fast_dev_run=true"]``.
        run: run a subcommand (``False``: only parse and instantiate; ``args`` then has no
            subcommand).

    Returns:
        The CLI object (``.trainer``, ``.model``, ``.datamodule``, ``.config``).
        ``--help`` and ``--print_config`` raise ``SystemExit(0)``; a bad argument
        ``SystemExit(2)`` after printing the parser's message; a run stopped by SIGTERM
        ``SystemExit(EXIT_SIGTERM)`` (143), by Ctrl+C ``SystemExit(EXIT_KEYBOARD_INTERRUPT)`` (130).

    Installs the filters of :mod:`normlightning.known_warnings` first.
    """
    known_warnings.install()
    try:
        return NormLightningCLI(
            model_class=BaseTask,
            datamodule_class=LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            parser_class=NormLightningArgumentParser,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )
    except SIGTERMException:  # Lightning exits 0 after SIGTERM; the checkpoint callback said where to resume
        raise SystemExit(EXIT_SIGTERM) from None
    except SystemExit as exit_:  # Lightning exits 1 after Ctrl+C
        if isinstance(exit_.__context__, KeyboardInterrupt):
            raise SystemExit(EXIT_KEYBOARD_INTERRUPT) from None
        raise


def raised_by_normlightning(err: BaseException) -> bool:
    """Whether ``err`` is one of the package's own errors: an ``Exception`` raised by a line of normlightning
    (the innermost frame of its traceback), whose message names the setting and the fix. Errors raised inside
    torch, Lightning or a user's class are not."""
    frames = traceback.extract_tb(err.__traceback__)
    return isinstance(err, Exception) and bool(frames) and os.path.abspath(frames[-1].filename).startswith(PACKAGE_DIR)


def main(args: ArgsType = None) -> None:
    """Entry point of ``normlightning`` and ``python -m normlightning`` (see :func:`build_cli`).

    One of the package's own errors (:func:`raised_by_normlightning`) is printed as one message, without the
    traceback, and exits with ``EXIT_ERROR`` (1); ``NORMLIGHTNING_DEBUG=1`` in the environment raises it
    with its traceback instead. Any other error keeps its traceback (exit code 1 as well).
    """
    try:
        build_cli(args)
    except Exception as err:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0") or not raised_by_normlightning(err):
            raise
        print(
            f"normlightning: error: {type(err).__name__}: {err}\n(the traceback: run again with {DEBUG_ENV}=1)",
            file=sys.stderr,
        )
        raise SystemExit(EXIT_ERROR) from None


if __name__ == "__main__":
    main()
