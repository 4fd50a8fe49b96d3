"""Callbacks: normalization injection, statistics sync, the CLI's checkpoint, progress bar,
hyperparameters and prediction writer, and research tools."""

from normlightning.callbacks.checkpoint import Checkpoint
from normlightning.callbacks.example_weighing import ExampleWeighingSearch, search_example_weighing
from normlightning.callbacks.median_last_epochs import MedianOfLastEpochs
from normlightning.callbacks.norm_injection import NormInjection
from normlightning.callbacks.norm_stats import NormStatistics
from normlightning.callbacks.norm_sync import NormSync, set_statistics_sync
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
    "NormSync",
    "PredictionWriter",
    "Recalibration",
    "RunHyperparameters",
    "ThrottledProgressBar",
    "recalibrate_statistics",
    "search_example_weighing",
    "set_statistics_sync",
]
