"""README statements that the code can check: the DataModule attributes the tasks read."""

from __future__ import annotations

import re
from pathlib import Path

from normlightning.data.base import DATAMODULE_ATTRIBUTES

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_lists_exactly_the_datamodule_attributes() -> None:
    text = README.read_text()
    block = re.search(r"<!-- datamodule-attributes -->\n(.*?)<!-- /datamodule-attributes -->", text, re.S)
    assert block, "README.md lost its datamodule-attributes table"
    rows = re.findall(r"^\| `(\w+)` \| (.+?) \|$", block.group(1), re.M)
    assert dict(rows) == DATAMODULE_ATTRIBUTES
