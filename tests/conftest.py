"""Shared fixtures: a scratch working directory, writers of tiny datasets in their real on-disk
formats, a recorder of Lightning's rank-zero messages, and the process-wide state (registries,
warnings filters, random generators, environment) restored after every test, so that tests pass in
any order (``-p randomly``)."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import pickle
import random
import shlex
import signal
import struct
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs"


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run inside ``tmp_path`` so that ``runs/`` and friends land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _write_idx(path: Path, array: np.ndarray) -> None:
    """IDX format (MNIST): big-endian magic ``0x0000 08 <ndim>`` (08 = unsigned byte), big-endian int32 dims, bytes."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


# mutmut (``mutmut run``, docs/mutation.md) calls each function of a mutated module through this file's two frames
MUTMUT_TRAMPOLINE = os.path.join("mutmut", "mutation", "trampoline.py")


@pytest.fixture
def warning_sites(request: pytest.FixtureRequest) -> Callable[[list[warnings.WarningMessage]], list[str]]:
    """``sites(record)``: where each recorded warning points, ``"caller"`` for the calling test's file, else the
    file's path. A warning raised with the right ``stacklevel`` points at the line that called the function; under
    mutmut that line is in its trampoline, which counts as the caller (so ``stacklevel`` one too high is not seen
    there; a plain pytest run sees it)."""
    test_file = str(request.path)

    def sites(record: list[warnings.WarningMessage]) -> list[str]:
        return [
            "caller" if w.filename == test_file or w.filename.endswith(MUTMUT_TRAMPOLINE) else w.filename
            for w in record
        ]

    return sites


@pytest.fixture
def write_mnist() -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """Write ``root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``; returns the train images and labels."""

    def write(root: Path, num_train: int = 12, num_test: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        raw = root / "MNIST" / "raw"
        raw.mkdir(parents=True)
        out = None
        for prefix, count in (("train", num_train), ("t10k", num_test)):
            images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
            labels = (np.arange(count) % 10).astype(np.uint8)
            _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
            _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
            if prefix == "train":
                out = (images, labels)
        assert out is not None
        return out

    return write


@pytest.fixture
def write_cifar() -> Callable[..., tuple[np.ndarray, list[int]]]:
    """Write the CIFAR python-pickle layout; returns the test images ``(N, 3, 32, 32)`` uint8 and labels."""

    def write(root: Path, num_classes: int = 10, per_file: int = 4, seed: int = 0) -> tuple[np.ndarray, list[int]]:
        rng = np.random.default_rng(seed)

        def batch(count: int, label_key: str) -> tuple[dict, np.ndarray, list[int]]:
            images = rng.integers(0, 256, size=(count, 3, 32, 32), dtype=np.uint8)
            labels = [int(i % num_classes) for i in range(count)]
            entry = {"data": images.reshape(count, 3072), label_key: labels, "batch_label": "fixture"}
            return entry, images, labels

        def dump(path: Path, obj: dict) -> None:
            with open(path, "wb") as file:
                pickle.dump(obj, file, protocol=2)

        if num_classes == 10:
            folder = root / "cifar-10-batches-py"
            folder.mkdir(parents=True)
            for i in range(1, 6):
                dump(folder / f"data_batch_{i}", batch(per_file, "labels")[0])
            entry, images, labels = batch(per_file, "labels")
            dump(folder / "test_batch", entry)
            dump(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072})
        else:
            folder = root / "cifar-100-python"
            folder.mkdir(parents=True)
            dump(folder / "train", batch(per_file, "fine_labels")[0])
            entry, images, labels = batch(per_file, "fine_labels")
            dump(folder / "test", entry)
            dump(
                folder / "meta",
                {"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": [f"s{i}" for i in range(20)]},
            )
        return images, labels

    return write


class _RunsOnLoad:
    """The payload of a malicious file: unpickling it calls ``os.system(command)``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Callable[[str], int], tuple[str]]:
        return os.system, (self.command,)


@pytest.fixture
def load_time_payload(tmp_path: Path) -> tuple[object, Path]:
    """``(payload, marker)``: unpickling ``payload`` runs a shell command that creates the file ``marker``
    (in ``tmp_path``); a safe reader refuses the payload and ``marker`` never exists."""
    marker = tmp_path / "payload_ran"
    return _RunsOnLoad(f"touch {shlex.quote(str(marker))}"), marker


@pytest.fixture
def write_image_folders() -> Callable[..., list[str]]:
    """Write ``root/<split>/<class>/<i>.jpg`` JPEGs (40x30, one colour per class); returns the class names."""

    def write(
        root: Path,
        classes: tuple[str, ...] = ("cat", "dog", "eel"),
        splits: tuple[str, ...] = ("train", "val"),
        per_class: int = 2,
    ) -> list[str]:
        colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
        for split in splits:
            for index, name in enumerate(classes):
                folder = root / split / name
                folder.mkdir(parents=True)
                for i in range(per_class):
                    Image.new("RGB", (40, 30), colours[index % len(colours)]).save(folder / f"{i}.jpg", quality=95)
        return list(classes)

    return write


#: Checkout folders the guard below does not look into: tools' caches and a virtual environment or data of the user's.
NOT_WATCHED = {".git", "__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache", "data"}


def files_under(root: Path) -> set[str]:
    """Relative paths of the files under ``root``, skipping :data:`NOT_WATCHED`, ``*.egg-info`` and virtual
    environments (a folder with a ``pyvenv.cfg``)."""
    found: set[str] = set()
    pending = [root]
    while pending:
        folder = pending.pop()
        for entry in os.scandir(folder):
            if entry.is_dir(follow_symlinks=False):
                path = Path(entry.path)
                if (
                    entry.name not in NOT_WATCHED
                    and not entry.name.endswith(".egg-info")
                    and not (path / "pyvenv.cfg").exists()
                ):
                    pending.append(path)
            else:
                found.add(os.path.relpath(entry.path, root))
    return found


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``-n``), give each worker process its share of the cores for torch's threads.

    Each of ``W`` workers would otherwise run ``os.cpu_count()`` intra-op threads, ``W`` times more
    threads than cores, which wait on each other; a worker gets ``max(1, cores // W)``.
    """
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers is not None:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[CHECKOUT_FILES] = files_under(REPO_ROOT)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the session if a test wrote into the checkout (runs must go under ``tmp_path``)."""
    before = session.config.stash.get(CHECKOUT_FILES, None)
    if before is None:
        return
    written = sorted(files_under(REPO_ROOT) - before)
    if written:
        listing = "\n  ".join(written[:20])
        print(f"\nERROR: the tests wrote {len(written)} file(s) into the checkout {REPO_ROOT}:\n  {listing}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


CHECKOUT_FILES = pytest.StashKey[set]()


@pytest.fixture
def checkout_guard_files() -> Callable[[Path], set[str]]:
    """:func:`files_under`, the guard's listing, for its own test."""
    return files_under


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests call the CLI with explicit args; hide pytest's own argv from LightningCLI."""
    monkeypatch.setattr("sys.argv", ["normlightning"])


@pytest.fixture(autouse=True)
def _restore_environ():
    """Undo environment changes a test leaves behind.

    An in-process Lightning DDP run writes ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_PORT``, ...
    into ``os.environ``; a later ``normlightning`` subprocess that inherited them would believe it
    was launched externally as one rank of a job and wait for peers that never come.
    """
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@contextlib.contextmanager
def restored_global_state() -> Iterator[None]:
    """Undo, on exit, what the block changed in process-wide state: the norm and backbone registries
    (``register_norm`` / ``register_backbone`` plugins, an example imported for its registration, the
    norm entry points discovered), the
    warnings filters, the global random generators of torch (CPU), numpy and Python
    (``seed_everything``, ``torch.manual_seed``), and the SIGINT/SIGTERM handlers (Lightning ignores
    Ctrl+C from its shutdown on, and installs its own SIGTERM handler)."""
    from normlightning.models import registry as backbone_registry
    from normlightning.norms import registry as norm_registry

    norms, backbones = dict(norm_registry._REGISTRY), dict(backbone_registry._PLUGINS)
    norm_entry_points = norm_registry._ENTRY_POINTS
    torch_rng, numpy_rng, python_rng = torch.get_rng_state(), np.random.get_state(), random.getstate()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with warnings.catch_warnings():
            yield
    finally:
        norm_registry._REGISTRY.clear()
        norm_registry._REGISTRY.update(norms)
        norm_registry._ENTRY_POINTS = norm_entry_points
        backbone_registry._PLUGINS.clear()
        backbone_registry._PLUGINS.update(backbones)
        torch.set_rng_state(torch_rng)
        np.random.set_state(numpy_rng)
        random.setstate(python_rng)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


@pytest.fixture(autouse=True)
def _restore_global_state() -> Iterator[None]:
    """Every test runs inside :func:`restored_global_state`."""
    with restored_global_state():
        yield


@pytest.fixture
def global_state_restorer() -> Callable[[], contextlib.AbstractContextManager[None]]:
    """:func:`restored_global_state` itself, for the test of what it restores."""
    return restored_global_state


@pytest.fixture
def lightning_info():
    """Messages of Lightning's rank-zero logger (``rank_zero_info``), which does not propagate to pytest's."""
    records: list[str] = []
    handler = logging.Handler(level=logging.INFO)
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


_RESOLVED_CONFIGS: dict[str, dict] = {}


@pytest.fixture(scope="session")
def resolve_config() -> Callable[[Path], dict]:
    """``resolve(path)``: the config as ``normlightning fit --config <path> --print_config`` resolves it (every
    default filled in; nothing instantiated), parsed from YAML. Each file is resolved once per session (about
    1 s each), so the tests that read resolved configs share the work; every call gets its own copy."""
    from normlightning.cli import main

    def resolve(path: Path) -> dict:
        key = str(path)
        if key not in _RESOLVED_CONFIGS:
            out = io.StringIO()
            with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as info:
                main(["fit", "--config", key, "--print_config"])
            assert info.value.code == 0, f"{path.name}: --print_config exited with {info.value.code}"
            _RESOLVED_CONFIGS[key] = yaml.safe_load(out.getvalue())
        return copy.deepcopy(_RESOLVED_CONFIGS[key])

    return resolve
