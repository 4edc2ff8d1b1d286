"""The layer-wise walk (`executor.layerwise`) equals a full forward, and holds one layer.

Every family's tiny checkpoint is walked one decoder layer at a time (and
with every layer resident) and compared with `AutoModelForCausalLM`'s forward
of the same checkpoint: logits bit for bit, the mean loss equal to
`plangen.heldout.mean_loss` as a float. Exact, not within a tolerance: each
layer runs the same code on the same inputs with the same arguments, batch
by batch, so the arithmetic is the same. The tiny models are initialised with
std 0.2 (not 0.02) so the layers change the loss visibly, and windows are
longer than Gemma-3's sliding window.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from executor.layerwise import LayerWalk
from tests.helpers.layerwise import (
    FAMILIES,
    SEQ,
    SLIDING_WINDOW,
    SMALL_8B_LIKE,
    build,
    materialized,
    on_meta,
    token_windows,
)
from tests.helpers.paths import ROOT


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layerwise")
    return {f: build(root, f) for f in FAMILIES}


def _reference(model_dir: Path, windows: list[list[int]], batch_size: int) -> tuple[float, list]:
    from transformers import AutoModelForCausalLM

    from plangen.heldout import mean_loss

    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    loss = mean_loss(full, windows, batch_size=batch_size)
    with torch.no_grad():
        logits = [
            full(input_ids=torch.tensor(windows[s : s + batch_size]), use_cache=False).logits
            for s in range(0, len(windows), batch_size)
        ]
    return loss, logits


def _assert_walk_equals(model_dir: Path, resident: bool, **open_kw: object) -> None:
    windows = token_windows()
    want_loss, want_logits = _reference(model_dir, windows, batch_size=2)
    with LayerWalk.open(model_dir, resident=resident, batch_size=2, **open_kw) as walk:
        states = walk.run(windows)
        assert walk.loss(states) == want_loss
        got = walk.logits(states)
    assert len(got) == len(want_logits) == 3
    for g, w in zip(got, want_logits, strict=True):
        assert torch.equal(g, w)


@pytest.mark.parametrize("resident", [False, True], ids=["layerwise", "resident"])
@pytest.mark.parametrize("family", FAMILIES)
def test_walk_equals_full_forward(models: dict[str, Path], family: str, resident: bool) -> None:
    _assert_walk_equals(models[family], resident)


def test_the_layers_matter(models: dict[str, Path]) -> None:
    """The comparison is not vacuous: the loss is far from uniform (ln 128 = 4.85) and
    running layer 1 before layer 0 changes it."""
    windows = token_windows()
    with LayerWalk.open(models["llama"], batch_size=2) as walk:
        right = walk.loss(walk.run(windows))
        states = walk.inputs(windows)
        for i in (1, 0):
            with walk.layer(i) as module:
                states = walk.forward_layer(states.layer, states, module)
        swapped = walk.loss(states)
    assert abs(right - 4.852) > 0.3
    assert swapped != right


def test_tied_head_and_bf16_checkpoint(tmp_path: Path) -> None:
    """A tied head reads the embedding's tensor; a bf16 checkpoint walked in fp32 equals
    `from_pretrained(dtype=float32)`."""
    tied = build(tmp_path, "llama", name="tied", tie_word_embeddings=True)
    assert "lm_head.weight" not in json.dumps(_tensor_names(tied))
    _assert_walk_equals(tied, resident=False)
    _assert_walk_equals(build(tmp_path, "qwen2", name="bf16", dtype="bfloat16"), resident=False)


def _tensor_names(model_dir: Path) -> list[str]:
    from compiler.checkpoint import tensor_index

    return list(tensor_index(model_dir))


def test_disk_state_cache(models: dict[str, Path], tmp_path: Path) -> None:
    """States on disk give the same loss; the cache directory is removed on close."""
    cache = tmp_path / "cache"
    windows = token_windows()
    want, _ = _reference(models["qwen2"], windows, batch_size=2)
    with LayerWalk.open(models["qwen2"], batch_size=2, cache=cache) as walk:
        states = walk.inputs(windows)
        assert states.cache.directory is not None
        assert len(list(states.cache.directory.iterdir())) == 3
        for i in range(walk.num_layers):
            with walk.layer(i) as module:
                states = walk.forward_layer(i, states, module)
        assert walk.loss(states) == want
    assert list(cache.iterdir()) == []


@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
def test_one_layer_at_a_time(models: dict[str, Path], family: str) -> None:
    """Nothing is loaded by `open`; inside `layer(i)` exactly layer i is on the device,
    after it layer i is back on meta; the embedding and head are freed after use."""
    windows = token_windows()
    with LayerWalk.open(models[family], batch_size=2) as walk:
        assert on_meta(walk.model)
        states = walk.inputs(windows)
        assert on_meta(walk.model)
        for i in range(walk.num_layers):
            with walk.layer(i) as module:
                assert module is walk.layers[i]
                assert materialized(walk) == [i]
                states = walk.forward_layer(i, states, module)
            assert materialized(walk) == []
        walk.loss(states)
        assert on_meta(walk.model)
        # Rotary tables and other buffers built with the skeleton are real and stay.
        assert all(b.device.type == "cpu" for b in walk.model.buffers())


def test_resident_mode_keeps_everything(models: dict[str, Path]) -> None:
    with LayerWalk.open(models["llama"], resident=True) as walk:
        assert not any(p.device.type == "meta" for p in walk.model.parameters())
        with walk.layer(0):
            pass
        assert materialized(walk) == [0, 1]


def test_inputs_are_the_embeddings_and_per_layer_arguments(models: dict[str, Path]) -> None:
    """No decoder layer runs in `inputs`; each layer gets its own mask (Gemma-3: a
    sliding-window mask for layer 0, the full causal one for layer 1)."""
    from transformers import AutoModelForCausalLM

    model_dir = models["gemma3_text"]
    windows = token_windows(n=2)
    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        embedded = full.get_input_embeddings()(torch.tensor(windows))
    with LayerWalk.open(model_dir, batch_size=2) as walk:
        states = walk.inputs(windows)
        assert torch.equal(states.get(0), embedded)
    assert full.config.layer_types == ["sliding_attention", "full_attention"]
    sliding = states.batches[0].kwargs[0]["attention_mask"]
    assert sliding is not None
    row = sliding[0, 0, SEQ - 1]  # the last query sees only the last 8 keys
    assert row.dtype == torch.bool and int(row.sum()) == SLIDING_WINDOW
    assert states.batches[0].kwargs[1]["attention_mask"] is not sliding


def test_forward_layer_checks_the_boundary(models: dict[str, Path]) -> None:
    with LayerWalk.open(models["llama"]) as walk:
        states = walk.inputs(token_windows(n=1))
        with walk.layer(1) as module, pytest.raises(ValueError, match="input of layer 0"):
            walk.forward_layer(1, states, module)
        with pytest.raises(ValueError, match="head needs"):
            walk.loss(states)


def test_losses_load_the_head_once_for_several_walks(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`losses` of several final states: each `loss`'s float (`mean_loss`'s), the final
    norm and head loaded once, freed after; states not at the end are refused."""
    windows, other = token_windows(), token_windows(n=3)[::-1]
    want = [_reference(models["llama"], w, batch_size=2)[0] for w in (windows, other)]
    with LayerWalk.open(models["llama"], batch_size=2) as walk:
        finals = [walk.run(windows), walk.run(other)]
        loaded: list[list[str]] = []
        load = LayerWalk._load_outside

        def record(self: LayerWalk, names: list[str]) -> None:
            loaded.append(sorted(names))
            load(self, names)

        monkeypatch.setattr(LayerWalk, "_load_outside", record)
        assert walk.losses(finals) == want
        assert loaded == [sorted(walk._outside_names(head=True))]
        assert on_meta(walk.model)
        assert walk.losses([]) == []
        with pytest.raises(ValueError, match="head needs"):
            walk.losses([finals[0], walk.inputs(windows)])


# ----------------------------------------------------------------- larger than memory


def _benchmark() -> object:
    path = ROOT / "benchmarks" / "layerwise_memory.py"
    spec = importlib.util.spec_from_file_location("layerwise_memory", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("layerwise_memory", module)
    spec.loader.exec_module(module)
    return module


# SMALL_8B_LIKE: ~125 MB bf16 per layer; six layers and the head: a 0.75 GB checkpoint.
DATA_LIMIT = 700_000_000


@pytest.mark.slow  # writes 0.75 GB and runs two subprocesses: 20-40 s
def test_walks_a_checkpoint_larger_than_the_memory_limit(tmp_path: Path) -> None:
    """Under RLIMIT_DATA = 0.70 GB (private writable memory: heap, anonymous maps;
    not the shared read-only file maps the walk reads through; checked on Linux 5+),
    a 0.75 GB bf16 checkpoint is walked to its loss, while `from_pretrained` of the same
    checkpoint in the same dtype fails (the weights alone exceed the limit)."""
    bench = _benchmark()
    model_dir = bench.build(tmp_path, 6, SMALL_8B_LIKE)
    assert bench.checkpoint_bytes(model_dir) > DATA_LIMIT
    opts = {"dtype": "bfloat16", "tokens": 64, "windows": 1, "data_limit": DATA_LIMIT}
    walked = bench.run_child(model_dir, mode="walk", **opts)
    assert walked["ok"], walked
    assert walked["peak_data"] < DATA_LIMIT
    assert 7.0 < walked["loss"] < 9.0  # about ln 2048 = 7.6: random weights
    whole = bench.run_child(model_dir, mode="whole", **opts)
    assert not whole["ok"], whole
    assert "allocate memory" in whole["error"] or "MemoryError" in whole["error"]
