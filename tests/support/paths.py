"""Where the tests' data lives: the repository's root and tests/fixtures (the tiny models and their references)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
