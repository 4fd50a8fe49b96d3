"""Every ``normlightning fit`` command in a fenced block of README.md and docs/ resolves (``--print_config``)
and bounds its training (``max_epochs`` or ``max_steps``), so that none runs Lightning's default of 1000 epochs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from normlightning.cli import build_cli

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


def fenced_fit_commands() -> list[tuple[str, list[str]]]:
    """``(file, args)`` of every ``normlightning fit ...`` line of a fenced block (continuations joined); lines with
    a ``<placeholder>``, a ``PYTHONPATH=`` (modules of the reader's) or a ``--config`` the reader writes (not in the
    checkout) are left out, and so are the command's own output lines (``normlightning fit: done ...``). A shell
    variable (``$seed`` in a loop over seeds) is read as 0."""
    commands = []
    for path in DOCS:
        for block in re.findall(r"^```[a-z]*\n(.*?)^```", path.read_text(), re.S | re.M):
            for line in block.replace("\\\n", " ").splitlines():
                found = re.search(r"\bnormlightning (fit(?=\s|$).*)", line)
                if found is None or "<" in line or "PYTHONPATH=" in line:
                    continue
                command = re.sub(r"\$\{?\w+\}?", "0", found.group(1))  # a loop's shell variable: its first value
                args = shlex.split(command, comments=True)
                configs = [
                    a.split("=", 1)[1] if "=" in a else args[i + 1]
                    for i, a in enumerate(args)
                    if a.split("=", 1)[0] == "--config"
                ]
                if all((REPO_ROOT / c).is_file() for c in configs):
                    commands.append((path.name, args))
    return commands


COMMANDS = fenced_fit_commands()


def test_the_docs_have_fit_commands_to_check() -> None:
    assert {name for name, _ in COMMANDS} >= {"README.md", "interop.md"}


@pytest.mark.parametrize("doc, args", COMMANDS, ids=[f"{d}:{' '.join(a)[:60]}" for d, a in COMMANDS])
def test_documented_fit_command_resolves_and_bounds_training(doc, args, monkeypatch, capsys) -> None:
    monkeypatch.chdir(REPO_ROOT)  # the commands name configs relative to the checkout; --print_config writes nothing
    with pytest.raises(SystemExit) as exit_info:
        build_cli([*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    assert trainer["max_epochs"] not in (None, -1) or trainer["max_steps"] not in (None, -1), (
        f"{doc}: `normlightning {' '.join(args)}` sets neither trainer.max_epochs nor max_steps"
    )
