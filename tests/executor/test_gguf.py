"""GGUF export for llama.cpp (`executor.formats.gguf`).

Structural tests read the file back with gguf-py's GGUFReader: architecture
(`llama` when uniform, `deci` with per-layer arrays when not), keys, tensor
names and shapes, the Q/K RoPE permutation against the Hugging Face tensors,
dtypes and the tokenizer. Runtime tests run the file in llama.cpp itself
(llama-cpp-python, installed by scripts/setup.sh) and compare its logits with
the PyTorch model `executor.load` builds; they skip only when `llama_cpp` is
not importable.

Tiny models get a byte-level BPE tokenizer trained here (llama.cpp needs a
real BPE vocabulary with merges); its check-text hash is in no table, so those
tests name the pre-tokenizer (`tokenizer_pre="gpt-2"`), and the SmolLM2 test
covers detection.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from executor.apply import apply_plan
from executor.formats.gguf import (
    GGUFLayer,
    GGUFUnsupported,
    llama3_rope_factors,
    permute_rows,
    unpermute_rows,
    write_gguf,
)
from executor.formats.gguf_vocab import CHECK_TEXT, CHECK_TEXT_SHA256
from executor.loader import load
from tests.helpers.models import add_char_tokenizer, bpe_tokenizer, logits, make_tiny_model, tokens
from tests.helpers.outputs import read_json
from tests.helpers.plans import write_plan

VOCAB = 320  # 256 byte tokens + 3 specials + merges
LAYERS = 3


def tiny_result(tmp_path: Path, body: str, family: str = "llama", **cfg: Any) -> Path:
    """Apply `body` to a tiny `family` model with a BPE tokenizer; return OUT/A."""
    model_dir = make_tiny_model(tmp_path, family, num_hidden_layers=LAYERS, vocab_size=VOCAB, **cfg)
    bpe_tokenizer(model_dir)
    apply_plan(write_plan(tmp_path, model_dir, body), tmp_path / "out")
    return tmp_path / "out" / "A"


def compensated_result(tmp_path: Path, seed: int) -> Path:
    """A result with `compensate` biases on layer 0's down_proj and layer 1's o_proj."""
    import hashlib

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tables = {
        "mean_in.0.mlp": torch.randn(96, generator=g),
        "mean_in.1.attn": torch.randn(64, generator=g),
    }
    save_file(tables, str(tmp_path / "s.safetensors"))
    sha = hashlib.sha256((tmp_path / "s.safetensors").read_bytes()).hexdigest()
    body = (
        f'scores "s.safetensors" sha256 "{sha}"\n'
        "mlp layers 0 width 48 compensate\nattn layers 1 drop groups 1 compensate\n"
    )
    return tiny_result(tmp_path, body)


def gguf_fields(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(key -> value, tensor name -> ReaderTensor) of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    return fields, {t.name: t for t in reader.tensors}


def hf_state(a_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(a_dir / "model.safetensors"))


HETERO = "attn layers 1 drop groups 0\nmlp layers 0 width 40\nmlp layers 2 width 72\n"


# ---- structure -------------------------------------------------------------------------


def test_uniform_result_is_llama_with_scalar_widths(tmp_path: Path) -> None:
    a = tiny_result(tmp_path, "mlp layers 0..2 width 48\n")
    info = write_gguf(a, tmp_path / "m.gguf", "f32", tokenizer_pre="gpt-2")
    fields, ts = gguf_fields(tmp_path / "m.gguf")
    assert info.arch == fields["general.architecture"] == "llama"
    assert {k: fields[f"llama.{k}"] for k in (
        "block_count", "context_length", "embedding_length", "feed_forward_length",
        "attention.head_count", "attention.head_count_kv", "attention.key_length",
        "attention.value_length", "rope.dimension_count", "vocab_size",
    )} == {
        "block_count": 3, "context_length": 64, "embedding_length": 64,
        "feed_forward_length": 48, "attention.head_count": 4, "attention.head_count_kv": 2,
        "attention.key_length": 16, "attention.value_length": 16, "rope.dimension_count": 16,
        "vocab_size": VOCAB,
    }  # fmt: skip
    assert fields["llama.rope.freq_base"] == 10000.0
    assert math.isclose(fields["llama.attention.layer_norm_rms_epsilon"], 1e-6, rel_tol=1e-6)
    per_layer = {
        "attn_norm": [64],
        "attn_q": [64, 64],
        "attn_k": [64, 32],
        "attn_v": [64, 32],
        "attn_output": [64, 64],
        "ffn_norm": [64],
        "ffn_gate": [64, 48],
        "ffn_up": [64, 48],
        "ffn_down": [48, 64],
    }  # fmt: skip  (GGML order: ne0 first)
    want = {
        "token_embd.weight": [64, VOCAB],
        "output_norm.weight": [64],
        "output.weight": [64, VOCAB],
    }
    for j in range(3):
        want |= {f"blk.{j}.{k}.weight": v for k, v in per_layer.items()}
    assert {n: t.shape.tolist() for n, t in ts.items()} == want
    assert len(ts) == info.tensors


def test_heterogeneous_result_is_deci_with_per_layer_arrays(tmp_path: Path) -> None:
    a = tiny_result(tmp_path, HETERO)
    assert "plancc" in read_json(a / "config.json")
    info = write_gguf(a, tmp_path / "m.gguf", "f32", tokenizer_pre="gpt-2")
    fields, ts = gguf_fields(tmp_path / "m.gguf")
    assert info.arch == fields["general.architecture"] == "deci"
    assert fields["deci.attention.head_count"] == [4, 2, 4]
    assert fields["deci.attention.head_count_kv"] == [2, 1, 2]
    assert fields["deci.feed_forward_length"] == [40, 96, 72]
    assert fields["deci.block_count"] == 3
    assert fields["deci.attention.key_length"] == fields["deci.rope.dimension_count"] == 16
    assert ts["blk.1.attn_q.weight"].shape.tolist() == [64, 32]
    assert ts["blk.1.attn_k.weight"].shape.tolist() == [64, 16]
    assert ts["blk.1.attn_output.weight"].shape.tolist() == [32, 64]
    assert ts["blk.0.ffn_down.weight"].shape.tolist() == [40, 64]
    assert ts["blk.2.ffn_gate.weight"].shape.tolist() == [64, 72]


def test_permutation_is_rope_half_to_interleaved_and_inverts() -> None:
    """One head of dim 4: HF rows (x0, x1, y0, y1) become GGML's (x0, y0, x1, y1)."""
    w = torch.arange(8.0).reshape(8, 1)  # two heads
    assert permute_rows(w, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    b = torch.randn(24)
    assert torch.equal(unpermute_rows(permute_rows(b, 3), 3), b)


def test_qk_permuted_per_layer_and_everything_else_bit_exact(tmp_path: Path) -> None:
    a = tiny_result(tmp_path, HETERO)
    write_gguf(a, tmp_path / "m.gguf", "f32", tokenizer_pre="gpt-2")
    _, ts = gguf_fields(tmp_path / "m.gguf")
    hf = hf_state(a)
    heads = {0: (4, 2), 1: (2, 1), 2: (4, 2)}
    for j, (h, kv) in heads.items():
        p = f"model.layers.{j}.self_attn."
        q = torch.from_numpy(np.array(ts[f"blk.{j}.attn_q.weight"].data))
        k = torch.from_numpy(np.array(ts[f"blk.{j}.attn_k.weight"].data))
        assert torch.equal(unpermute_rows(q, h), hf[p + "q_proj.weight"])
        assert torch.equal(unpermute_rows(k, kv), hf[p + "k_proj.weight"])
        assert not torch.equal(q, hf[p + "q_proj.weight"])  # the permutation did something
        v = np.array(ts[f"blk.{j}.attn_v.weight"].data)
        assert np.array_equal(v, hf[p + "v_proj.weight"].numpy())
    emb = np.array(ts["token_embd.weight"].data)
    assert np.array_equal(emb, hf["model.embed_tokens.weight"].numpy())


@pytest.mark.parametrize("dtype", ["f16", "bf16", "f32"])
def test_dtypes_matrices_converted_norms_f32(tmp_path: Path, dtype: str) -> None:
    import gguf

    a = tiny_result(tmp_path, "mlp layers 1 width 48\n")
    info = write_gguf(a, tmp_path / "m.gguf", dtype, tokenizer_pre="gpt-2")
    fields, ts = gguf_fields(tmp_path / "m.gguf")
    types = {t.tensor_type.name for n, t in ts.items() if len(t.shape) > 1}
    assert types == {dtype.upper()}
    assert {t.tensor_type.name for t in ts.values() if len(t.shape) == 1} == {"F32"}
    ftype = {"f32": 0, "f16": 1, "bf16": 32}[dtype]
    assert fields["general.file_type"] == ftype == int(getattr(gguf.LlamaFileType, {
        "f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16"}[dtype]))  # fmt: skip
    hf = hf_state(a)["model.layers.1.mlp.down_proj.weight"]
    got = np.array(ts["blk.1.ffn_down.weight"].data)
    if dtype == "bf16":  # stored as raw 16-bit words
        want = hf.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        assert np.array_equal(got.view(np.uint16).reshape(want.shape), want)
    else:
        assert np.array_equal(got, hf.to(getattr(torch, {"f16": "float16"}.get(dtype, "float32"))))
    assert info.bytes == (tmp_path / "m.gguf").stat().st_size


def test_tokenizer_keys_round_trip(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    a = tiny_result(tmp_path, "mlp layers 1 width 48\n")
    write_gguf(a, tmp_path / "m.gguf", tokenizer_pre="gpt-2")
    fields, _ = gguf_fields(tmp_path / "m.gguf")
    tok = AutoTokenizer.from_pretrained(a)
    by_id = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    real = [t for t, _ in by_id]
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.tokens"][: len(real)] == real
    pads = fields["tokenizer.ggml.tokens"][len(real) :]
    assert pads == [f"[PAD{i}]" for i in range(len(real), VOCAB)]
    assert fields["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]  # 3 specials: CONTROL
    assert set(fields["tokenizer.ggml.token_type"][len(real) :]) <= {5}  # UNUSED padding
    merges = json.loads((a / "tokenizer.json").read_text())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [
        " ".join(m) if isinstance(m, list) else m for m in merges
    ]
    assert fields["tokenizer.ggml.bos_token_id"] == 1
    assert fields["tokenizer.ggml.eos_token_id"] == 2
    assert fields["tokenizer.ggml.padding_token_id"] == 0
    assert fields["tokenizer.chat_template"] == (a / "chat_template.jinja").read_text()


def test_check_text_is_llama_cpps() -> None:
    """The hash table is only valid for llama.cpp's exact check text."""
    import hashlib

    assert hashlib.sha256(CHECK_TEXT.encode()).hexdigest() == CHECK_TEXT_SHA256


def test_tied_head_is_not_written(tmp_path: Path) -> None:
    a = tiny_result(tmp_path, "mlp layers 1 width 48\n", tie_word_embeddings=True)
    write_gguf(a, tmp_path / "m.gguf", tokenizer_pre="gpt-2")
    _, ts = gguf_fields(tmp_path / "m.gguf")
    assert "output.weight" not in ts and "token_embd.weight" in ts


def test_compensate_biases_are_written(tmp_path: Path) -> None:
    """llama.cpp's llama and deci graphs add `attn_output.bias` and `ffn_down.bias`."""
    a = compensated_result(tmp_path, 1)
    write_gguf(a, tmp_path / "m.gguf", "f32", tokenizer_pre="gpt-2")
    _, ts = gguf_fields(tmp_path / "m.gguf")
    hf = hf_state(a)
    assert np.array_equal(ts["blk.0.ffn_down.bias"].data, hf["model.layers.0.mlp.down_proj.bias"])
    o_bias = hf["model.layers.1.self_attn.o_proj.bias"]
    assert np.array_equal(ts["blk.1.attn_output.bias"].data, o_bias)


def test_llama3_rope_factors_match_transformers() -> None:
    """`rope_freqs` = default inverse frequencies / transformers' llama3 ones."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}  # fmt: skip
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=2, rope_parameters=rope,
                      max_position_embeddings=512)  # fmt: skip
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    base = 1.0 / (500000.0 ** (torch.arange(0, 32, 2, dtype=torch.float64) / 32))
    want = (base / scaled.double()).tolist()
    assert llama3_rope_factors(rope, 32) == pytest.approx(want, rel=1e-6)
    assert len(set(np.round(want, 6))) > 2  # low, high and smoothed bands all present


# ---- refusals: nothing written ---------------------------------------------------------


def refused(a_dir: Path, out: Path, **kw: Any) -> str:
    with pytest.raises(GGUFUnsupported) as exc:
        write_gguf(a_dir, out, **kw)
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    return str(exc.value)


def test_refuses_families_llama_cpp_graphs_do_not_cover(tmp_path: Path) -> None:
    a = make_tiny_model(tmp_path, "qwen2_moe")
    msg = refused(a, tmp_path / "m.gguf", tokenizer_pre="gpt-2")
    assert "model_type 'qwen2_moe'" in msg and "only the Llama layout" in msg
    assert "fix: serve it with transformers or vLLM" in msg


def test_refuses_unknown_tokenizer_and_sentencepiece_style(tmp_path: Path) -> None:
    a = tiny_result(tmp_path, "mlp layers 1 width 48\n")
    msg = refused(a, tmp_path / "m.gguf")
    assert "is not one llama.cpp knows (check-text hash" in msg and "smollm" in msg
    assert "pass its name as tokenizer_pre" in msg
    char = make_tiny_model(tmp_path, "llama", name="char")
    add_char_tokenizer(char)
    msg = refused(char, tmp_path / "c.gguf")
    assert "WordLevel tokenizer without byte-level pre-tokenization" in msg
    bare = make_tiny_model(tmp_path, "llama", name="bare")
    assert "tokenizer.json is missing" in refused(bare, tmp_path / "b.gguf")


def test_refuses_other_dtypes_and_activations(tmp_path: Path) -> None:
    a = tiny_result(tmp_path, "mlp layers 1 width 48\n", hidden_act="gelu")
    msg = refused(a, tmp_path / "m.gguf", dtype="q4_0", tokenizer_pre="gpt-2")
    assert "dtype 'q4_0' is not written" in msg and "llama-quantize" in msg
    msg = refused(a, tmp_path / "m.gguf", tokenizer_pre="gpt-2")
    assert "hidden_act 'gelu'" in msg


def test_untied_head_missing_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    a = tiny_result(tmp_path, "mlp layers 1 width 48\n")
    state = hf_state(a)
    del state["lm_head.weight"]
    save_file(state, str(a / "model.safetensors"))
    msg = refused(a, tmp_path / "m.gguf", tokenizer_pre="gpt-2")
    assert "lm_head.weight is missing" in msg


def test_failure_mid_write_leaves_no_file(tmp_path: Path, monkeypatch) -> None:
    """A tensor that fails after others were written: neither the GGUF nor its partial stays."""
    import executor.formats.gguf as module

    a = tiny_result(tmp_path, "mlp layers 1 width 48\n")
    calls = []
    real = module._encode

    def failing(t: Any, dtype: str) -> Any:
        calls.append(dtype)
        if len(calls) == 5:
            raise OSError("No space left on device")
        return real(t, dtype)

    monkeypatch.setattr(module, "_encode", failing)
    with pytest.raises(OSError, match="No space left"):
        write_gguf(a, tmp_path / "m.gguf", tokenizer_pre="gpt-2")
    assert len(calls) == 5
    assert sorted(p.name for p in tmp_path.iterdir() if "gguf" in p.name) == []


# ---- llama.cpp itself ------------------------------------------------------------------


def llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits for every position of `ids` (F32 KV cache, no flash attention)."""
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (scripts/setup.sh installs it)"
    )
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=max(len(ids), 16),
        n_batch=len(ids),
        n_ubatch=len(ids),
        logits_all=True,
        type_k=0,  # GGML_TYPE_F32: the default F16 cache rounds K and V
        type_v=0,
        flash_attn=False,
        n_threads=2,
        verbose=False,
    )
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


# F32 file, F32 KV cache: llama.cpp and PyTorch differ only in summation order.
# Measured max |delta logit| <= 5e-7 on every case below (logits up to ~1.4); the
# smallest effect a wrong conversion has here (RoPE scaling ignored) is ~5e-3.
F32_ATOL = 1e-5
# F16 matrices (11-bit mantissa): measured max |delta logit| ~3.4e-4 (bf16: ~3e-3).
F16_ATOL = 3e-3
# SmolLM2 mixed plan (24 layers, vocab 49152), F32: measured max |delta log-prob| 7.6e-4
# and perplexity equal to 1e-5 relative (the unpruned model: 1.4e-4, 27.2410 both).
SMOLLM2_ATOL = 5e-3
SMOLLM2_PPL_RTOL = 1e-4

RUNTIME_CASES = {
    "llama-uniform": ("llama", "mlp layers 0..2 width 48\n", {}),
    "llama-deci": ("llama", HETERO, {}),
    "llama-deci-tied": ("llama", HETERO, {"tie_word_embeddings": True}),
    "mistral-deci": ("mistral", HETERO, {}),
    "llama3-rope": (
        "llama",
        HETERO,
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        },
    ),
    "linear-rope": (
        "llama",
        HETERO,
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}},
    ),
}


@pytest.mark.parametrize("case", list(RUNTIME_CASES))
def test_llama_cpp_logits_equal_pytorch(tmp_path: Path, case: str) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    family, body, cfg = RUNTIME_CASES[case]
    a = tiny_result(tmp_path, body, family, **cfg)
    info = write_gguf(a, tmp_path / "m.gguf", "f32", tokenizer_pre="gpt-2")
    ids = tokens(VOCAB, 40, seed=3)[0]
    want = logits(load(a, dtype="float32"), ids[None])[0].numpy()
    got = llama_cpp_logits(tmp_path / "m.gguf", ids.tolist())
    assert info.arch == ("llama" if "uniform" in case else "deci")
    np.testing.assert_allclose(got, want, atol=F32_ATOL, rtol=0)


def test_llama_cpp_runs_compensate_biases_and_f16(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    a = compensated_result(tmp_path, 4)
    ids = tokens(VOCAB, 40, seed=5)[0]
    want = logits(load(a, dtype="float32"), ids[None])[0].numpy()
    write_gguf(a, tmp_path / "f32.gguf", "f32", tokenizer_pre="gpt-2")
    np.testing.assert_allclose(
        llama_cpp_logits(tmp_path / "f32.gguf", ids.tolist()), want, atol=F32_ATOL, rtol=0
    )
    write_gguf(a, tmp_path / "f16.gguf", "f16", tokenizer_pre="gpt-2")
    got16 = llama_cpp_logits(tmp_path / "f16.gguf", ids.tolist())
    np.testing.assert_allclose(got16, want, atol=F16_ATOL, rtol=0)
    assert np.abs(got16 - want).max() > F32_ATOL  # f16 really is the rounded file


# The statements of examples/smollm2-mixed.prn: depth, attention and MLP width at once.
SMOLLM2_MIXED = """
keep layers 0..3, 29
drop layers 20..25
bundle B layers 20..22
bundle C layers 23..25
attn layers 8..19 drop groups 1
mlp layers 4..19 width 1152
mlp layers 26..28 width 1280
"""


@pytest.mark.model
@pytest.mark.slow
def test_smollm2_mixed_plan_runs_in_llama_cpp(smollm2_dir: Path, tmp_path: Path) -> None:
    """The heterogeneous SmolLM2 result as `deci`: llama.cpp tokenizes the corpus as the
    Hugging Face tokenizer does (pre-tokenizer detected as `smollm`) and predicts the
    same next-token log-probabilities as `executor.load`."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from transformers import AutoTokenizer

    from compiler.corpus import builtin_text, tokenize, windows

    apply_plan(write_plan(tmp_path, smollm2_dir, SMOLLM2_MIXED), tmp_path / "out")
    a = tmp_path / "out" / "A"
    info = write_gguf(a, tmp_path / "m.gguf", "f32")
    assert (info.arch, info.tokenizer_pre, len(info.layers)) == ("deci", "smollm", 24)
    assert info.layers[8] == GGUFLayer(6, 2, 1152) and info.layers[0] == GGUFLayer(9, 3, 1536)
    text = builtin_text()[:20_000]
    ids = tokenize(text, AutoTokenizer.from_pretrained(a))
    vocab = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    assert vocab.tokenize(text.encode(), add_bos=False, special=False) == ids
    vocab.close()
    model = load(a, dtype="float32")
    nll = {"torch": 0.0, "llama.cpp": 0.0}
    for chunk in windows(ids, 128, limit=2):
        want = torch.log_softmax(logits(model, torch.tensor([chunk]))[0], -1)
        got = torch.log_softmax(torch.from_numpy(llama_cpp_logits(tmp_path / "m.gguf", chunk)), -1)
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=SMOLLM2_ATOL, rtol=0)
        target = torch.tensor(chunk[1:])[:, None]
        nll["torch"] -= float(want[:-1].gather(1, target).sum())
        nll["llama.cpp"] -= float(got[:-1].gather(1, target).sum())
    ppl = {k: math.exp(v / 254) for k, v in nll.items()}
    assert ppl["llama.cpp"] == pytest.approx(ppl["torch"], rel=SMOLLM2_PPL_RTOL)
