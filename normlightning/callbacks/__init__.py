"""Callbacks: normalization injection, statistics sync, the CLI's checkpoint and progress bar, and research tools."""

from normlightning.callbacks.checkpoint import Checkpoint
from normlightning.callbacks.example_weighing import ExampleWeighingSearch, search_example_weighing
from normlightning.callbacks.median_last_epochs import MedianOfLastEpochs
from normlightning.callbacks.norm_injection import NormInjection
from normlightning.callbacks.norm_stats import NormStatistics
from normlightning.callbacks.norm_sync import NormSync, set_statistics_sync
from normlightning.callbacks.progress import ThrottledProgressBar
from normlightning.callbacks.recalibration import Recalibration, recalibrate_statistics

__all__ = [
    "Checkpoint",
    "ExampleWeighingSearch",
    "MedianOfLastEpochs",
    "NormInjection",
    "NormStatistics",
    "NormSync",
    "Recalibration",
    "ThrottledProgressBar",
    "recalibrate_statistics",
    "search_example_weighing",
    "set_statistics_sync",
]
