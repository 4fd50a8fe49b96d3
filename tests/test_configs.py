"""Every YAML file in configs/ parses with the `normlightning` command (nothing is instantiated)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from normlightning.cli import main

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs() -> None:
    assert any(path.name == "quickstart.yaml" for path in CONFIGS)


@pytest.mark.parametrize("config", CONFIGS, ids=[path.name for path in CONFIGS])
def test_config_parses(config: Path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(config), "--print_config"])
    assert info.value.code == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert "model" in resolved and "data" in resolved and "trainer" in resolved
