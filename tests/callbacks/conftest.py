"""Make the process bodies of the multi-process tests (ddp_workers.py) importable by spawned
children under ``--import-mode=importlib``."""

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
