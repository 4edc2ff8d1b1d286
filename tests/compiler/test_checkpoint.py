"""compiler.checkpoint: safetensors headers, the tensor index, fingerprints, and
the architecture table's tensor predictions checked against real `save_pretrained`
output of every supported family."""

from __future__ import annotations

import hashlib
import itertools
import json
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from compiler.architectures import ARCH_NAMES, ARCHITECTURES
from compiler.checkpoint import (
    CheckpointError,
    TensorInfo,
    expected_tensors,
    fingerprint,
    format_model_block,
    load_checkpoint_facts,
    read_safetensors_header,
    tensor_index,
    tensor_mismatches,
)
from compiler.facts import FACT_LINES
from compiler.ir import Selection
from tests.helpers.models import TINY_ARCHS, make_tiny_model, write_safetensors


def _on_disk(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes as the safetensors library (not our reader) sees them."""
    from safetensors import safe_open

    out: dict[str, tuple[int, ...]] = {}
    files = sorted(model_dir.glob("*.safetensors"))
    assert files, f"no safetensors files in {model_dir}"
    for file in files:
        with safe_open(str(file), "np") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                out[name] = tuple(f.get_slice(name).get_shape())
    return out


# ---- the architecture table against save_pretrained ----------------------------

# Config variants that switch optional tensors on or off. A family whose modeling
# code ignores a key (Mistral and attention_bias, Qwen2 and mlp_bias) must be
# predicted to ignore it too.
VARIANTS: dict[str, dict[str, object]] = {
    "default": {},
    "tied": {"tie_word_embeddings": True},
    "attention_bias": {"attention_bias": True},
    "mlp_bias": {"mlp_bias": True},
}
SPECIAL_CASES: dict[str, tuple[str, dict[str, object]]] = {
    "qwen2_moe-dense-0..2": ("qwen2_moe", {"num_hidden_layers": 4, "mlp_only_layers": [0, 1, 2]}),
    "qwen2_moe-sparse-step-2": ("qwen2_moe", {"num_hidden_layers": 4, "decoder_sparse_step": 2}),
    "qwen2_moe-no-qkv-bias": ("qwen2_moe", {"qkv_bias": False}),
    # Qwen2's modeling code hard-codes q/k/v biases; a config key cannot remove them.
    "qwen2-qkv-bias-key-ignored": ("qwen2", {"qkv_bias": False}),
    "qwen3_moe-dense-1": ("qwen3_moe", {"num_hidden_layers": 3, "mlp_only_layers": [1]}),
    "qwen3_moe-bias": ("qwen3_moe", {"attention_bias": True}),
    "qwen2-tied-bf16": ("qwen2", {"tie_word_embeddings": True, "dtype": "bfloat16"}),
    "llama-mha-4-layers": ("llama", {"num_key_value_heads": 4, "num_hidden_layers": 4}),
    "olmoe-3-layers": ("olmoe", {"num_hidden_layers": 3}),
}
CASES = [(f"{a}-{v}", a, over) for a in TINY_ARCHS for v, over in VARIANTS.items()] + [
    (k, a, over) for k, (a, over) in SPECIAL_CASES.items()
]


@pytest.mark.parametrize(
    ("model_type", "overrides"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_table_predicts_exactly_the_saved_tensors(
    tmp_path: Path, model_type: str, overrides: dict[str, object]
) -> None:
    model_dir = make_tiny_model(tmp_path, model_type, **overrides)
    ckpt = load_checkpoint_facts(model_dir)
    assert ckpt.arch.name == model_type
    expected = expected_tensors(ckpt.arch, ckpt.facts)
    on_disk = _on_disk(model_dir)
    assert tensor_mismatches(expected, ckpt.index) == []
    assert expected == on_disk
    # Our header reader agrees with the safetensors library.
    assert {n: i.shape for n, i in ckpt.index.items()} == on_disk
    # The bias flags the header prints say what is on disk.
    biases = {n.rsplit(".", 2)[-2] for n in on_disk if n.endswith(".bias")}
    assert ckpt.facts.get("qkv_bias", False) == bool(biases & {"q_proj", "qkv_proj", "q_a_proj"})
    assert ckpt.facts.get("o_bias", False) == ("o_proj" in biases)
    assert ckpt.facts.get("mlp_bias", False) == bool(biases & {"gate_proj", "down_proj"})
    assert ckpt.facts["tied"] == ("lm_head.weight" not in on_disk)


def test_every_table_entry_with_a_tiny_builder_is_covered() -> None:
    # `qwen` (v1) needs remote code, so it has no transformers config class.
    assert set(ARCHITECTURES) - set(TINY_ARCHS) == {"qwen"}


def test_dense_layers_come_from_the_config(tmp_path: Path) -> None:
    dense = make_tiny_model(
        tmp_path, "qwen2_moe", name="d", num_hidden_layers=4, mlp_only_layers=[0, 1, 2]
    )
    assert load_checkpoint_facts(dense).facts["dense_layers"] == (0, 1, 2)
    step = make_tiny_model(
        tmp_path, "qwen2_moe", name="s", num_hidden_layers=4, decoder_sparse_step=2
    )
    assert load_checkpoint_facts(step).facts["dense_layers"] == (0, 2)
    # transformers 5 writes Qwen3-MoE's expert count as num_local_experts; all
    # layers are still sparse.
    q3 = make_tiny_model(tmp_path, "qwen3_moe")
    facts = load_checkpoint_facts(q3).facts
    assert facts["experts"] == 4
    assert "dense_layers" not in facts


@pytest.mark.model
def test_sharded_trained_fixture_matches_the_table(qwen2moe_dir: Path) -> None:
    ckpt = load_checkpoint_facts(qwen2moe_dir)
    assert {i.file for i in ckpt.index.values()} == {
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    }
    assert len(ckpt.index) == 374
    assert expected_tensors(ckpt.arch, ckpt.facts) == _on_disk(qwen2moe_dir)


def test_expected_tensors_without_torch() -> None:
    facts = {
        "layers": 2,
        "hidden": 8,
        "ffn": 12,
        "vocab": 10,
        "tied": True,
        "heads": 4,
        "kv_heads": 2,
        "head_dim": 2,
    }
    got = expected_tensors(ARCHITECTURES["llama"], facts)
    assert got["model.embed_tokens.weight"] == (10, 8)
    assert "lm_head.weight" not in got
    assert got["model.layers.1.self_attn.k_proj.weight"] == (4, 8)
    assert got["model.layers.0.self_attn.o_proj.weight"] == (8, 8)
    assert got["model.layers.0.mlp.down_proj.weight"] == (8, 12)
    assert len(got) == 2 + 2 * 9
    phi = expected_tensors(ARCHITECTURES["phi3"], {**facts, "tied": False})
    assert phi["model.layers.0.self_attn.qkv_proj.weight"] == (8 + 2 * 4, 8)
    assert phi["model.layers.0.mlp.gate_up_proj.weight"] == (24, 8)
    assert phi["lm_head.weight"] == (10, 8)


def test_expected_tensors_names_the_missing_fact() -> None:
    with pytest.raises(ValueError, match="expert_ffn"):
        expected_tensors(
            ARCHITECTURES["mixtral"],
            {"layers": 1, "hidden": 8, "heads": 2, "kv_heads": 1, "head_dim": 4, "vocab": 4,
             "experts": 2},
        )  # fmt: skip


# ---- safetensors headers -------------------------------------------------------


def test_read_header_of_a_hand_made_file(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {"a": ("F32", (2, 3)), "b": ("BF16", (4,))}, metadata={"format": "pt"})
    header = read_safetensors_header(path)
    assert header["__metadata__"] == {"format": "pt"}
    assert header["a"] == {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
    assert header["b"]["data_offsets"] == [24, 32]


def test_byte_range_points_at_the_data(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    blobs = write_safetensors(
        tmp_path / "model.safetensors", {"a": ("F32", (2, 3)), "b": ("I64", (5,))}
    )
    index = tensor_index(tmp_path)
    raw = (tmp_path / "model.safetensors").read_bytes()
    for name, info in index.items():
        begin, end = info.byte_range
        assert raw[begin:end] == blobs[name]
        assert info.numel * (4 if info.dtype == "F32" else 8) == end - begin
    assert index["b"] == TensorInfo(
        "b", (5,), "I64", "model.safetensors", (24, 64), index["b"].data_start
    )


def _header_file(
    path: Path, header_bytes: bytes, data: bytes = b"", length: int | None = None
) -> Path:
    n = len(header_bytes) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + header_bytes + data)
    return path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "truncated"),
        (b"\x10\x00\x00", "truncated"),
        (struct.pack("<Q", 4096) + b'{"a":1}', "truncated"),
        (struct.pack("<Q", 1 << 40) + b"{}", "not a safetensors file"),
        (struct.pack("<Q", 7) + b'{"a": [', "not valid JSON"),
        (struct.pack("<Q", 2) + b"\xff\xfe", "not valid JSON"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
    ],
    ids=["empty", "short-length", "header-past-eof", "huge-length", "bad-json", "not-utf8", "list"],
)
def test_corrupt_files_are_refused_with_the_file_named(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as err:
        read_safetensors_header(path)
    assert str(path) in str(err.value)
    assert "re-download" in str(err.value) or "re-save" in str(err.value)


def test_data_offsets_past_the_end_of_the_file(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    path = _header_file(tmp_path / "t.safetensors", header, data=b"\0" * 8)  # 8 of 16 bytes
    with pytest.raises(CheckpointError, match="past the end of the file") as err:
        read_safetensors_header(path)
    assert "'w'" in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}, "needs 16 bytes"),
        ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 16]}, "bad shape"),
        ({"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}, "data_offsets"),
        ({"shape": [4], "data_offsets": [0, 16]}, "no dtype"),
        ("nope", "not an object"),
    ],
)
def test_bad_header_entries(tmp_path: Path, entry: object, message: str) -> None:
    path = _header_file(tmp_path / "t.safetensors", json.dumps({"w": entry}).encode(), b"\0" * 16)
    with pytest.raises(CheckpointError, match=message):
        read_safetensors_header(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        read_safetensors_header(tmp_path / "gone.safetensors")


# ---- the tensor index ---------------------------------------------------------


def _sharded(tmp_path: Path, weight_map: dict[str, str] | None = None) -> Path:
    write_safetensors(tmp_path / "s1.safetensors", {"a": ("F32", (2,)), "b": ("F32", (3,))})
    write_safetensors(tmp_path / "s2.safetensors", {"c": ("BF16", (4, 4))})
    if weight_map is None:
        weight_map = {"a": "s1.safetensors", "b": "s1.safetensors", "c": "s2.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return tmp_path


def test_sharded_index(tmp_path: Path) -> None:
    index = tensor_index(_sharded(tmp_path))
    assert list(index) == ["a", "b", "c"]
    assert index["c"].file == "s2.safetensors"
    assert index["c"].shape == (4, 4) and index["c"].dtype == "BF16"


def test_index_naming_the_wrong_shard(tmp_path: Path) -> None:
    wrong = {"a": "s2.safetensors", "b": "s1.safetensors", "c": "s2.safetensors"}
    with pytest.raises(CheckpointError, match="disagree"):
        tensor_index(_sharded(tmp_path, wrong))


def test_index_listing_an_absent_tensor(tmp_path: Path) -> None:
    extra = {"a": "s1.safetensors", "b": "s1.safetensors", "c": "s2.safetensors"}
    extra["d"] = "s2.safetensors"
    with pytest.raises(CheckpointError, match="absent from their shards"):
        tensor_index(_sharded(tmp_path, extra))


def test_index_naming_a_missing_shard(tmp_path: Path) -> None:
    _sharded(tmp_path)
    (tmp_path / "s2.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"s2\.safetensors: file not found"):
        tensor_index(tmp_path)


def test_corrupt_index_json(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt shard index"):
        tensor_index(tmp_path)


def test_no_weights_at_all(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"no model\.safetensors or model\.safetensors\.in"):
        tensor_index(tmp_path)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "consolidated.pt"])
def test_pickle_only_checkpoints_are_refused(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="pickle") as err:
        tensor_index(tmp_path)
    assert name in str(err.value)
    assert "--allow-pickle" in str(err.value)


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such directory"):
        tensor_index(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no such directory"):
        load_checkpoint_facts(tmp_path / "nope")


# ---- config.json -------------------------------------------------------------


def test_unknown_model_type_lists_supported_architectures(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    write_safetensors(tmp_path / "model.safetensors", {"a": ("F32", (1,))})
    with pytest.raises(CheckpointError, match="'gpt2' is not supported") as err:
        load_checkpoint_facts(tmp_path)
    for name in ARCH_NAMES:
        assert name in str(err.value)


def test_missing_and_invalid_config(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "model.safetensors", {"a": ("F32", (1,))})
    with pytest.raises(CheckpointError, match=r"config\.json: not found"):
        load_checkpoint_facts(tmp_path)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        load_checkpoint_facts(tmp_path)
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    with pytest.raises(CheckpointError, match="no `model_type`"):
        load_checkpoint_facts(tmp_path)


# ---- fingerprint ---------------------------------------------------------------


def test_fingerprint_of_a_hand_made_checkpoint_is_pinned(tmp_path: Path) -> None:
    config = {"model_type": "llama", "hidden_size": 8, "name": "café"}
    (tmp_path / "config.json").write_text(json.dumps(config, indent=2))
    write_safetensors(
        tmp_path / "model.safetensors",
        {"model.norm.weight": ("F32", (8,)), "lm_head.weight": ("BF16", (4, 8))},
    )
    canonical = (
        '{"config":{"hidden_size":8,"model_type":"llama","name":"café"},'
        '"tensors":[["lm_head.weight",[4,8],"BF16"],["model.norm.weight",[8],"F32"]]}'
    )
    by_hand = "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    got = fingerprint(config, tensor_index(tmp_path))
    assert got == by_hand
    # Pinned: changing the definition breaks every plan ever written.
    assert got == "sha256:e6f13f092cc268c4a948111a443ee7789235f537c94d4381428f1cafa2932466"


def test_fingerprint_ignores_who_saved_it(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "model.safetensors", {"model.norm.weight": ("F32", (8,))})
    index = tensor_index(tmp_path)
    base = {"hidden_size": 8, "model_type": "llama"}
    saved = dict(base, transformers_version="9.9.9", _name_or_path="/somewhere")
    assert fingerprint(base, index) == fingerprint(saved, index)
    assert fingerprint(base, index) != fingerprint(dict(base, hidden_size=9), index)


def test_fingerprint_is_stable_and_ignores_weights(tmp_path: Path) -> None:
    a = make_tiny_model(tmp_path, "llama", name="a", seed=0)
    b = make_tiny_model(tmp_path, "llama", name="b", seed=1)
    assert (a / "model.safetensors").read_bytes() != (b / "model.safetensors").read_bytes()
    fa = load_checkpoint_facts(a).facts["fingerprint"]
    assert fa == load_checkpoint_facts(a).facts["fingerprint"]
    assert fa == load_checkpoint_facts(b).facts["fingerprint"]
    assert fa.startswith("sha256:") and len(fa) == len("sha256:") + 64


def test_fingerprint_changes_with_config_and_shapes(tmp_path: Path) -> None:
    base = load_checkpoint_facts(make_tiny_model(tmp_path, "llama", name="base"))
    config = dict(base.config)
    config["rms_norm_eps"] = 1e-5 + 1e-9
    assert fingerprint(config, base.index) != base.facts["fingerprint"]

    # Same config, one tensor reshaped or retyped: a different checkpoint.
    name = "model.norm.weight"
    info = base.index[name]
    reshaped = {**base.index, name: TensorInfo(name, (65,), info.dtype, info.file, (0, 260))}
    assert fingerprint(base.config, reshaped) != base.facts["fingerprint"]
    retyped = {**base.index, name: TensorInfo(name, info.shape, "BF16", info.file, (0, 128))}
    assert fingerprint(base.config, retyped) != base.facts["fingerprint"]

    wider = load_checkpoint_facts(
        make_tiny_model(tmp_path, "llama", name="wider", intermediate_size=128)
    )
    assert wider.facts["fingerprint"] != base.facts["fingerprint"]
    bf16 = load_checkpoint_facts(make_tiny_model(tmp_path, "llama", name="bf16", dtype="bfloat16"))
    assert bf16.facts["fingerprint"] != base.facts["fingerprint"]


# ---- the model block -------------------------------------------------------------


def test_model_block_canonical_layout() -> None:
    facts = {
        "fingerprint": "sha256:abc",
        "dense_layers": (5, 0, 1, 2),
        "mlp_bias": False,
        "qkv_bias": True,
        "o_bias": False,
        "shared_ffn": 256,
        "expert_ffn": 128,
        "top_k": 2,
        "experts": 16,
        "head_dim": 64,
        "kv_heads": 3,
        "heads": 9,
        "tied": True,
        "vocab": 49152,
        "ffn": 1536,
        "hidden": 576,
        "layers": 30,
    }
    assert format_model_block("SmolLM2-135M-Instruct", "llama", facts) == (
        'model "SmolLM2-135M-Instruct" {\n'
        "  arch llama\n"
        "  layers 30  hidden 576  ffn 1536  vocab 49152  tied true\n"
        "  heads 9  kv_heads 3  head_dim 64\n"
        "  experts 16  top_k 2  expert_ffn 128  shared_ffn 256\n"
        "  qkv_bias true\n"
        "  dense_layers 0..2, 5\n"
        '  fingerprint "sha256:abc"\n'
        "}\n"
    )


def test_model_block_omits_empty_lines_and_false_flags() -> None:
    facts = {"layers": 2, "tied": False, "qkv_bias": False, "dense_layers": ()}
    assert format_model_block('we"ird\\name', "mistral", facts) == (
        'model "we\\"ird\\\\name" {\n  arch mistral\n  layers 2  tied false\n}\n'
    )


def test_model_block_keeps_unknown_facts_before_the_fingerprint() -> None:
    facts = {"layers": 2, "zeta": 1, "alpha": "x", "fingerprint": "sha256:0"}
    assert format_model_block("m", "llama", facts).splitlines()[-4:] == [
        '  fingerprint "sha256:0"',
        "  zeta 1",
        '  alpha "x"',
        "}",
    ]


def test_fact_lines_cover_the_compiler_fact_vocabulary() -> None:
    facts_module = pytest.importorskip("compiler.facts")
    known = {k for line in FACT_LINES for k in line}
    assert set(facts_module.KNOWN_FACTS) <= known


@pytest.mark.parametrize(
    ("values", "text"),
    [([], ""), ([3], "3"), ([0, 1, 2, 5], "0..2, 5"), ([7, 1, 2, 2, 9, 8], "1..2, 7..9")],
)
def test_format_selection(values: list[int], text: str) -> None:
    assert str(Selection.from_ints(sorted(set(values)))) == text


def _parse_selection(text: str) -> set[int]:
    out: set[int] = set()
    for part in filter(None, text.split(", ")):
        lo, _, hi = part.partition("..")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


@given(st.sets(st.integers(min_value=0, max_value=200), max_size=40))
def test_format_selection_round_trips(values: set[int]) -> None:
    text = str(Selection.from_ints(sorted(values)))
    assert _parse_selection(text) == values
    # Canonical: no two items could have been merged.
    parts = [p for p in text.split(", ") if p]
    bounds = [(int(p.partition("..")[0]), int(p.partition("..")[2] or p)) for p in parts]
    assert all(b[0] > a[1] + 1 for a, b in itertools.pairwise(bounds))
