"""The Nemotron-NAS (DeciLM) format: `apply --format nemotron-nas` and `plancc export`.

A heterogeneous result written in this layout must load with stock
transformers and plancc's shipped module (`trust_remote_code`, offline) into
the model `executor.load` builds, be read by vLLM's rules exactly as written
(the schema test copies them), and leave restore bit-exact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from executor.cli import main as plancc
from executor.family_config import ffn_mult_to_intermediate_size
from executor.formats.nemotron_nas import ffn_block
from executor.loader import load
from tests.helpers.models import logits, make_tiny_model, tokens
from tests.helpers.outputs import read_json, tensor_hashes
from tests.helpers.plans import write_plan

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local directories only; never the hub
TOL = 1e-5

# Different MLP widths per layer (one a multiple of 256, written as `ffn_mult`), a
# dropped layer, and one KV group dropped in every kept layer (heads stay global).
HETERO = (
    "drop layers 2\n"
    "attn layers 0, 1, 3 drop groups 1\n"
    "mlp layers 0 width 256\n"
    "mlp layers 1 width 40\n"
)


def apply(tmp_path: Path, model: Path, body: str, *flags: str, name: str = "out") -> Path:
    out = tmp_path / name
    code = plancc(["apply", str(write_plan(tmp_path, model, body)), "-o", str(out), *flags])
    assert code == 0
    return out


def remote(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path, trust_remote_code=True, dtype=torch.float32
    ).eval()


def tiny(tmp_path: Path, family: str) -> Path:
    return make_tiny_model(tmp_path, family, num_hidden_layers=4, intermediate_size=512)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_heterogeneous_result_loads_in_transformers(tmp_path: Path, family: str) -> None:
    model = tiny(tmp_path, family)
    out = apply(tmp_path, model, HETERO, "--format", "nemotron-nas")
    a = out / "A"
    cfg = read_json(a / "config.json")
    assert cfg["model_type"] == "nemotron-nas"
    assert cfg["architectures"] == ["DeciLMForCausalLM"]
    assert cfg["auto_map"] == {
        "AutoConfig": "configuration_decilm.DeciLMConfig",
        "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM",
    }
    heads = 2 if family != "qwen2" else 7
    assert cfg["num_attention_heads"] == heads
    assert cfg["num_key_value_heads"] is None and cfg["intermediate_size"] is None
    group = {"attention": {"no_op": False, "replace_with_linear": False, "n_heads_in_group": heads}}
    ffn = {"no_op": False, "replace_with_linear": False}
    assert cfg["block_configs"] == [
        group | {"ffn": ffn | {"ffn_mult": 6.0}},  # 1.5 * 256 / 64
        group | {"ffn": ffn | {"intermediate_size": 40}},
        group | {"ffn": ffn | {"ffn_mult": 12.0}},  # the untouched 512
    ]
    assert (family == "qwen2") == cfg.get("qkv_bias", False)
    assert not cfg["attention_bias"] and "sliding_window" not in cfg
    assert (a / "configuration_decilm.py").is_file() and (a / "modeling_decilm.py").is_file()
    manifest = read_json(a / "manifest.json")
    assert manifest["model_format"] == "nemotron-nas"
    assert manifest["module_files"] == ["configuration_decilm.py", "modeling_decilm.py"]

    ids = tokens()
    want = logits(load(a), ids)
    # The same plan written in plancc's own layout: executor.load builds the same model.
    hf = apply(tmp_path, model, HETERO, "--format", "hf", name="hf")
    assert torch.equal(logits(load(hf / "A"), ids), want)
    assert tensor_hashes(hf / "A") == tensor_hashes(a)
    shipped = remote(a)
    assert type(shipped).__name__ == "DeciLMForCausalLM"
    torch.testing.assert_close(logits(shipped, ids), want, atol=TOL, rtol=0)
    with torch.no_grad():  # the config's own use_cache (a generation key transformers drops)
        default = shipped(input_ids=ids).logits
    torch.testing.assert_close(default, want, atol=TOL, rtol=0)
    prompt = ids[:1, :5]
    cached = shipped.generate(
        input_ids=prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=True
    )
    fresh = shipped.generate(
        input_ids=prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=False
    )
    assert cached.shape == (1, 13) and torch.equal(cached, fresh)


def test_uniform_result_equals_stock_llama_exactly(tmp_path: Path) -> None:
    model = tiny(tmp_path, "llama")
    body = "mlp layers 0..3 width 256\n"
    stock = apply(tmp_path, model, body, name="stock")
    assert read_json(stock / "A" / "manifest.json")["model_format"] == "hf"
    nas = apply(tmp_path, model, body, "--format", "nemotron-nas", name="nas")
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(stock / "A", dtype=torch.float32).eval()
    ids = tokens()
    assert torch.equal(logits(remote(nas / "A"), ids), logits(ref, ids))


def test_tied_embeddings(tmp_path: Path) -> None:
    """A tied LM head has no tensor of its own: the shipped model ties it too."""
    model = make_tiny_model(tmp_path, "llama", num_hidden_layers=2, tie_word_embeddings=True)
    out = apply(tmp_path, model, "mlp layers 0 width 48\n", "--format", "nemotron-nas")
    assert "lm_head.weight" not in tensor_hashes(out / "A")
    ids = tokens()
    want = logits(load(out / "A"), ids)
    torch.testing.assert_close(logits(remote(out / "A"), ids), want, atol=TOL, rtol=0)


# ---- vLLM's rules, copied from vllm/model_executor/models/nemotron_nas.py -----------------


def vllm_ffn_mult_to_intermediate_size(ffn_mult: float, n_embd: int) -> int:
    intermediate_size = int(2 * ffn_mult * n_embd / 3)
    k = 256
    return (
        intermediate_size
        if intermediate_size % k == 0
        else intermediate_size + k - (intermediate_size % k)
    )


def vllm_parameters(config: Any) -> dict[str, tuple[int, ...]]:
    """The HF-named parameters (and shapes) vLLM's DeciLMForCausalLM builds from this
    config, by attribute access exactly as `DeciLMDecoderLayer.__init__` reads it."""
    h = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    attention_bias = getattr(config, "attention_bias", False) or getattr(config, "bias", False)
    bias_o_proj = attention_bias
    if hasattr(config, "qkv_bias"):
        attention_bias = config.qkv_bias
    mlp_bias = getattr(config, "mlp_bias", False)
    params = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        params["lm_head.weight"] = (config.vocab_size, h)
    for i in range(config.num_hidden_layers):
        block = config.block_configs[i]
        p = f"model.layers.{i}."
        if not block.attention.no_op:
            q = config.num_attention_heads * head_dim
            kv = config.num_attention_heads // block.attention.n_heads_in_group * head_dim
            params[p + "input_layernorm.weight"] = (h,)
            for name, rows in (("q", q), ("k", kv), ("v", kv)):
                params[p + f"self_attn.{name}_proj.weight"] = (rows, h)
                if attention_bias:
                    params[p + f"self_attn.{name}_proj.bias"] = (rows,)
            params[p + "self_attn.o_proj.weight"] = (h, q)
            if bias_o_proj:
                params[p + "self_attn.o_proj.bias"] = (h,)
        if not block.ffn.no_op:
            if hasattr(block.ffn, "ffn_mult"):
                width = vllm_ffn_mult_to_intermediate_size(block.ffn.ffn_mult, h)
            else:
                width = block.ffn.intermediate_size
            params[p + "post_attention_layernorm.weight"] = (h,)
            for name, shape in (("gate", (width, h)), ("up", (width, h)), ("down", (h, width))):
                params[p + f"mlp.{name}_proj.weight"] = shape
                if mlp_bias:
                    params[p + f"mlp.{name}_proj.bias"] = (shape[0],)
    return params


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_vllm_reads_every_tensor_as_written(tmp_path: Path, family: str) -> None:
    from transformers import AutoConfig

    from compiler.checkpoint import tensor_index

    out = apply(tmp_path, tiny(tmp_path, family), HETERO, "--format", "nemotron-nas")
    a = out / "A"
    config = AutoConfig.from_pretrained(a, trust_remote_code=True)
    assert config.model_type == "nemotron-nas"  # vLLM's get_total_num_kv_heads keys on it
    first = next(b for b in config.block_configs if not b.attention.no_op)
    assert config.num_attention_heads // first.attention.n_heads_in_group == 1  # KV heads
    # ffn_mult wins whenever the attribute exists; an intermediate_size block has none.
    assert hasattr(config.block_configs[0].ffn, "ffn_mult")
    assert not hasattr(config.block_configs[1].ffn, "ffn_mult")
    assert config.block_configs[1].ffn.intermediate_size == 40
    # Every tensor of A is a parameter vLLM builds, with its shape, and none is missing.
    index = tensor_index(a)
    assert {n: i.shape for n, i in index.items()} == vllm_parameters(config)
    # The config object serialises back to the dicts on disk.
    on_disk = read_json(a / "config.json")["block_configs"]
    assert config.to_dict()["block_configs"] == on_disk
    config.save_pretrained(tmp_path / "saved")
    assert read_json(tmp_path / "saved" / "config.json")["block_configs"] == on_disk


def test_ffn_mult_written_only_when_the_formula_gives_the_width_back() -> None:
    for hidden in (64, 576, 2048, 4096, 8192):
        for width in range(256, 8 * hidden + 1, 256):
            entry = ffn_block(width, hidden)
            assert isinstance(entry["ffn_mult"], float)
            assert vllm_ffn_mult_to_intermediate_size(entry["ffn_mult"], hidden) == width
            assert ffn_mult_to_intermediate_size(entry["ffn_mult"], hidden) == width
        for width in (40, 700, 1152, 1535):
            assert ffn_block(width, hidden) == {
                "no_op": False,
                "replace_with_linear": False,
                "intermediate_size": width,
            }


def test_shipped_module_supports_no_op_sublayers(tmp_path: Path) -> None:
    """The shipped model reads `no_op` as vLLM does (absent modules, no tensors), though
    plans never write one: a layer without an FFN and one without attention."""
    out = apply(
        tmp_path, tiny(tmp_path, "llama"), "mlp layers 0 width 48\n", "--format", "nemotron-nas"
    )
    a = out / "A"
    cfg = read_json(a / "config.json")
    cfg["block_configs"][1]["ffn"] = {"no_op": True, "replace_with_linear": False}
    cfg["block_configs"][2]["attention"] = {"no_op": True, "replace_with_linear": False}
    (a / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file, save_file

    state = load_file(str(a / "model.safetensors"))
    gone = ("layers.1.mlp.", "layers.1.post_attention", "layers.2.self_attn.", "layers.2.input_")
    kept = {n: t for n, t in state.items() if not any(g in n for g in gone)}
    save_file(kept, str(a / "model.safetensors"), metadata={"format": "pt"})
    shipped = remote(a)
    assert set(shipped.state_dict()) == set(kept)
    prompt = tokens()[:1, :5]
    cached = shipped.generate(
        input_ids=prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=True
    )
    fresh = shipped.generate(
        input_ids=prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=False
    )
    assert torch.equal(cached, fresh)


# ---- restore, export, the default format -------------------------------------------


def test_restore_is_bit_exact_from_a_nemotron_nas_output(tmp_path: Path) -> None:
    model = tiny(tmp_path, "mistral")
    out = apply(tmp_path, model, HETERO, "--format", "nemotron-nas")
    assert plancc(["verify", str(out)]) == 0
    dest = tmp_path / "restored"
    assert plancc(["restore", str(out), "--upto", "all", "-o", str(dest)]) == 0
    assert tensor_hashes(dest) == tensor_hashes(model)
    assert (dest / "config.json").read_bytes() == (model / "config.json").read_bytes()
    assert (dest / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()


def test_export_writes_the_same_tensors_with_a_nemotron_config(tmp_path: Path) -> None:
    model = tiny(tmp_path, "llama")
    out = apply(tmp_path, model, HETERO, "--format", "hf")
    cfg = read_json(out / "A" / "config.json")
    assert cfg["model_type"] == "plancc-llama"  # plancc's own layout
    dest = tmp_path / "nas"
    assert plancc(["export", str(out), "--format", "nemotron-nas", "-o", str(dest)]) == 0
    assert tensor_hashes(dest) == tensor_hashes(out / "A")
    names = sorted(p.name for p in dest.iterdir())
    assert names == [
        ".plancc-output.json",
        "config.json",
        "configuration_decilm.py",
        "generation_config.json",
        "model.safetensors",
        "modeling_decilm.py",
    ]
    marker = read_json(dest / ".plancc-output.json")
    assert marker["kind"] == "export" and marker["model_format"] == "nemotron-nas"
    applied = out / "A"
    ids = tokens()
    want = logits(load(applied), ids)
    torch.testing.assert_close(logits(remote(dest), ids), want, atol=TOL, rtol=0)
    assert torch.equal(logits(load(dest), ids), want)
    # Exporting into an existing directory that is not plancc's is refused.
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    assert plancc(["export", str(out), "--format", "nemotron-nas", "-o", str(other)]) == 2
    assert sorted(p.name for p in other.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("mlp layers 0..3 width 48\n", "hf"),  # uniform: stock transformers loads it
        (HETERO, "nemotron-nas"),
        ("attn layers 0 drop groups 1\n", "hf"),  # heads differ: plancc's own layout
    ],
)
def test_default_format(tmp_path: Path, body: str, expected: str) -> None:
    out = apply(tmp_path, tiny(tmp_path, "llama"), body)
    assert read_json(out / "A" / "manifest.json")["model_format"] == expected


def _sidecar(tmp_path: Path, tables: dict[str, torch.Tensor]) -> str:
    import hashlib

    from safetensors.torch import save_file

    path = tmp_path / "scores.safetensors"
    save_file(tables, str(path))
    return f'scores "{path.name}" sha256 "{hashlib.sha256(path.read_bytes()).hexdigest()}"\n'


@pytest.mark.parametrize(
    ("family", "body", "message"),
    [
        (
            "llama",
            "attn layers 0 drop groups 1\n",
            "Nemotron-NAS keeps num_attention_heads global, but the layers have different "
            "query-head counts (2 in original layers 0; 4 in original layers 1, 2, 3): "
            "`attn ... drop groups` removes query heads with their KV head",
        ),
        ("llama", "COMPENSATE", "layers 1 carry `compensate` biases (o_proj/down_proj)"),
        ("phi3", "mlp layers 0 width 48\n", "Nemotron-NAS is a Llama layout; `phi3` is not one"),
        ("qwen2_moe", "moe layers 0 drop experts 0\n", "`qwen2_moe` is not one"),
    ],
)
def test_refusals_name_the_rule_and_write_nothing(
    tmp_path: Path, family: str, body: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    model = make_tiny_model(tmp_path, family, num_hidden_layers=4)
    if body == "COMPENSATE":
        body = (
            _sidecar(tmp_path, {"mean_in.1.mlp": torch.randn(96)})
            + "mlp layers 1 width 64 compensate\n"
        )
    plan = write_plan(tmp_path, model, body)
    out = tmp_path / "out"
    capsys.readouterr()
    assert plancc(["apply", str(plan), "-o", str(out), "--format", "nemotron-nas"]) == 2
    err = capsys.readouterr().err
    assert message in err and "--format hf" in err and "nothing was written" in err
    assert not out.exists()
    # The same result in plancc's layout: export refuses it the same way.
    assert plancc(["apply", str(plan), "-o", str(out), "--format", "hf"]) == 0
    dest = tmp_path / "nas"
    capsys.readouterr()
    assert plancc(["export", str(out), "--format", "nemotron-nas", "-o", str(dest)]) == 2
    assert "nothing was written" in capsys.readouterr().err
    assert not dest.exists()
