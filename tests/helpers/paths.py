"""Where things are: the repository root and what lies beside it."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
BENCHMARKS = ROOT / "benchmarks"
# Fixtures too large for the repository live beside it, in ../shared (absent in a
# user's clone: the tests needing them skip).
SHARED = ROOT.parent / "shared"
SHARED_MOE = SHARED / "fixtures" / "qwen2moe-tiny"
