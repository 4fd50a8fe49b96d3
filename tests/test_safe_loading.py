"""Checkpoints from others are loaded without running code from them (issue 30): a file that carries a
call is refused with an error naming the file and the type, before anything in it runs."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from normlightning.checkpoint_files import read_checkpoint
from normlightning.cli import build_cli
from normlightning.injection.spec import CHECKPOINT_KEY
from normlightning.safe_loading import UnsafeFileError
from normlightning.tasks import ClassificationTask

SYSTEM = re.escape(f"{os.system.__module__}.system")  # the global a pickled os.system call names: posix.system

CONFIG = """
model:
  class_path: normlightning.tasks.ClassificationTask
  init_args: {backbone: small_cnn, backbone_kwargs: {width: 4}}
data:
  class_path: normlightning.data.Synthetic
  init_args: {input_shape: [3, 8, 8], num_classes: 3, num_train: 8, num_val: 4, num_test: 4, batch_size: 4}
"""


class HarmlessRecord:
    """A type of the user's own that they may declare safe with ``add_safe_globals``."""

    def __init__(self, value: int) -> None:
        self.value = value


def save_checkpoint(path: Path, extra: object) -> Path:
    """A checkpoint shaped like ours (weights, injection spec, hyperparameters), ``extra`` in its hyperparameters."""
    torch.save(
        {
            "state_dict": {"w": torch.ones(2)},
            CHECKPOINT_KEY: {"layers": [], "param_norms": []},
            "hyper_parameters": {"lr": 0.1, "note": extra},
        },
        path,
    )
    return path


def test_checkpoint_carrying_a_call_is_refused_before_it_runs(run_dir: Path, load_time_payload) -> None:
    payload, marker = load_time_payload
    path = save_checkpoint(run_dir / "shared.ckpt", payload)
    refused = rf"checkpoint '.*shared\.ckpt' needs the types {SYSTEM} to load.*add_safe_globals.*weights_only=False"
    with pytest.raises(UnsafeFileError, match=refused):  # the norm: callback's reader
        read_checkpoint(path)
    with pytest.raises(UnsafeFileError, match=refused):
        ClassificationTask.load_from_checkpoint(path)
    (run_dir / "tiny.yaml").write_text(CONFIG)
    with pytest.raises(UnsafeFileError, match=rf"--ckpt_path '.*shared\.ckpt' needs the types {SYSTEM}"):
        build_cli(["test", "--config", "tiny.yaml", f"--ckpt_path={path}"])
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the file is live: an unrestricted load runs its call
    assert marker.exists()


def test_a_call_the_scan_misses_is_refused_by_the_weights_only_load(tmp_path, load_time_payload, monkeypatch) -> None:
    """Defence in depth: with the up-front scan blind, torch's weights-only unpickler still refuses the file."""
    payload, marker = load_time_payload
    path = save_checkpoint(tmp_path / "shared.ckpt", payload)
    monkeypatch.setattr(torch.serialization, "get_unsafe_globals_in_checkpoint", lambda f: [])
    refused = rf"'.*shared\.ckpt' needs more than a weights-only load allows: .*{SYSTEM}"
    with pytest.raises(UnsafeFileError, match=refused):
        read_checkpoint(path)
    assert not marker.exists()


def test_a_type_the_user_declares_safe_loads(tmp_path) -> None:
    """The documented opt-in for a trusted file: ``add_safe_globals`` (here its scoped form) for a type of one's own."""
    path = save_checkpoint(tmp_path / "own.ckpt", HarmlessRecord(7))
    name = re.escape(f"{HarmlessRecord.__module__}.HarmlessRecord")
    with pytest.raises(UnsafeFileError, match=rf"'.*own\.ckpt' needs the types {name}"):
        read_checkpoint(path)
    with torch.serialization.safe_globals([HarmlessRecord]):
        loaded = read_checkpoint(path)
    note = loaded["hyper_parameters"]["note"]
    assert isinstance(note, HarmlessRecord) and note.value == 7
    torch.testing.assert_close(loaded["state_dict"]["w"], torch.ones(2))


def _task_with_weights_no_fresh_task_has() -> ClassificationTask:
    """A small task whose every parameter is ``linspace(-1, 1)`` (so a load that falls back to fresh weights shows)."""
    task = ClassificationTask(backbone="small_cnn", num_classes=3, input_shape=(3, 8, 8), backbone_kwargs={"width": 4})
    with torch.no_grad():
        for parameter in task.parameters():
            parameter.copy_(torch.linspace(-1, 1, parameter.numel()).view_as(parameter))
    return task


def test_load_from_checkpoint_opt_in_for_a_trusted_file(tmp_path) -> None:
    """``weights_only=False`` is the caller's promise that the file is trusted: the scan is skipped and it loads."""
    task = _task_with_weights_no_fresh_task_has()
    path = tmp_path / "trusted.ckpt"
    torch.save(
        {
            "state_dict": task.state_dict(),
            "hyper_parameters": dict(task.hparams),
            "pytorch-lightning_version": "2.6.0",
            "note": HarmlessRecord(3),
        },
        path,
    )
    with pytest.raises(UnsafeFileError, match=r"'.*trusted\.ckpt' needs the types .*HarmlessRecord"):
        ClassificationTask.load_from_checkpoint(path)
    loaded = ClassificationTask.load_from_checkpoint(path, weights_only=False)
    for key, value in task.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)


def test_a_remote_checkpoint_is_loaded_weights_only_with_the_callers_arguments(tmp_path, monkeypatch) -> None:
    """A URL is not a local file to check: Lightning downloads it with ``torch.hub.load_state_dict_from_url``
    (recorded here, reading a local copy), whose own default would be ``weights_only=False``; the task's
    ``weights_only=True`` and the positional ``map_location`` reach it."""
    task = _task_with_weights_no_fresh_task_has()
    local = tmp_path / "remote-copy.ckpt"
    torch.save(
        {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams), "pytorch-lightning_version": "2.6.0"},
        local,
    )
    downloads = []

    def load_state_dict_from_url(url, map_location=None, weights_only=False, **kwargs):
        downloads.append((url, map_location, weights_only))
        return torch.load(local, map_location=map_location, weights_only=weights_only)

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", load_state_dict_from_url)
    url = "https://example.org/runs/last.ckpt"
    loaded = ClassificationTask.load_from_checkpoint(url, "cpu")
    assert downloads == [(url, "cpu", True)]
    for key, value in task.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
