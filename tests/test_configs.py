"""Every YAML file in configs/ parses with the `normlightning` command (nothing is instantiated)."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs() -> None:
    assert any(path.name == "quickstart.yaml" for path in CONFIGS)


@pytest.mark.parametrize("config", CONFIGS, ids=[path.name for path in CONFIGS])
def test_config_parses(config: Path, resolve_config) -> None:
    """``--print_config`` exits 0 (asserted by the fixture) with every section; the fixture keeps the result for
    tests/test_paper_settings.py, which checks the resolved values against the papers."""
    resolved = resolve_config(config)
    assert "model" in resolved and "data" in resolved and "trainer" in resolved
