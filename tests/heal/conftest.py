"""The pruned tiny model the heal tests train."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.heal import DEPTH
from tests.helpers.models import add_char_tokenizer, make_tiny_model
from tests.helpers.plans import write_plan


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-layer tiny Llama pruned to 3 layers (bundles B and C) and one narrowed MLP."""
    from executor.apply import apply_plan

    tmp = tmp_path_factory.mktemp("heal")
    model = add_char_tokenizer(make_tiny_model(tmp, "llama", num_hidden_layers=6))
    apply_plan(write_plan(tmp, model, DEPTH), tmp / "out")
    return tmp / "out"
