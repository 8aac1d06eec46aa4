"""Make the seeded-defect helpers importable as top-level modules (as tests/impl does via pythonpath)."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = str(Path(__file__).parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
