"""Shared fixtures for the real-network tier (filled in below)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # chaos/ is not an installed package; make it importable
    sys.path.insert(0, str(REPO))
