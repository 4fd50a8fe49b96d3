"""Callbacks: normalization injection, the CLI's checkpoint, progress bar, hyperparameters, prediction
writer and divergence check, and research tools (statistics monitor, recalibration, example weighing,
median of the last epochs). Helpers they share live in :mod:`normlightning.evaluation`; the statistics
sync plugin in :mod:`normlightning.training`."""

from normlightning.callbacks.checkpoint import Checkpoint
from normlightning.callbacks.example_weighing import ExampleWeighingSearch, search_example_weighing
from normlightning.callbacks.median_last_epochs import MedianOfLastEpochs
from normlightning.callbacks.norm_injection import NormInjection
from normlightning.callbacks.norm_stats import NormStatistics
from normlightning.callbacks.prediction_writer import PredictionWriter
from normlightning.callbacks.recalibration import Recalibration, recalibrate_statistics
from normlightning.callbacks.run_hparams import RunHyperparameters
from normlightning.callbacks.throttled_progress_bar import ThrottledProgressBar

__all__ = [
    "Checkpoint",
    "ExampleWeighingSearch",
    "MedianOfLastEpochs",
    "NormInjection",
    "NormStatistics",
    "PredictionWriter",
    "Recalibration",
    "RunHyperparameters",
    "ThrottledProgressBar",
    "recalibrate_statistics",
    "search_example_weighing",
]
