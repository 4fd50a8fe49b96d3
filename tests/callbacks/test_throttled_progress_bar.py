"""The CLI's progress bar: redraws throttled in time, never two bars, none when it is turned off."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.callbacks import LearningRateMonitor, TQDMProgressBar

from normlightning.callbacks.throttled_progress_bar import ThrottledProgressBar, with_progress_bar
from normlightning.cli import build_cli


def test_redraws_at_most_every_min_interval_and_at_the_last_batch() -> None:
    bar = ThrottledProgressBar(min_interval=3600.0)
    assert [bar._redraw_now(n, 5) for n in range(1, 6)] == [True, False, False, False, True]
    assert [ThrottledProgressBar(min_interval=0.0)._redraw_now(n, 5) for n in range(1, 6)] == [True] * 5
    every_other = ThrottledProgressBar(min_interval=0.0, refresh_rate=2)
    assert [every_other._redraw_now(n, 5) for n in range(1, 6)] == [False, True, False, True, True]


def test_with_progress_bar_adds_one_only_when_enabled_and_missing() -> None:
    monitor, own = LearningRateMonitor(), TQDMProgressBar()
    added = with_progress_bar([monitor], enabled=True)
    assert added[0] is monitor and isinstance(added[1], ThrottledProgressBar) and len(added) == 2
    assert with_progress_bar([monitor, own], enabled=True) == [monitor, own]
    assert with_progress_bar([monitor], enabled=False) == [monitor]
    assert isinstance(with_progress_bar(None, enabled=True)[0], ThrottledProgressBar)


def test_cli_trainer_gets_the_throttled_bar_unless_turned_off(tmp_path) -> None:
    base = [
        "--config",
        str(Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"),
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ]
    assert isinstance(build_cli(base, run=False).trainer.progress_bar_callback, ThrottledProgressBar)
    assert build_cli([*base, "--trainer.enable_progress_bar=false"], run=False).trainer.progress_bar_callback is None
