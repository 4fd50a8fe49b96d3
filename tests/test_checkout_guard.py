"""The session guard of conftest.py: the files it watches, and those it leaves to tools and users."""

from __future__ import annotations


def test_files_under_lists_new_files_and_skips_caches_and_virtual_environments(tmp_path, checkout_guard_files) -> None:
    (tmp_path / "runs" / "default").mkdir(parents=True)
    (tmp_path / "runs" / "default" / "hparams.yaml").write_text("a: 1\n")
    (tmp_path / "README.md").write_text("x")
    for skipped in ("__pycache__", ".git", "pkg.egg-info", ".venv"):
        (tmp_path / skipped).mkdir()
        (tmp_path / skipped / "file").write_text("x")
    (tmp_path / ".venv" / "pyvenv.cfg").write_text("home = /usr\n")
    assert checkout_guard_files(tmp_path) == {"README.md", "runs/default/hparams.yaml"}
