"""Every plan in examples/ checks cleanly, with its cost report computed by hand.

The hand computations spell out each tensor's size so that a wrong cost model
(or a wrong architecture table) cannot agree with them by accident.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from compiler.check import check_file
from compiler.cli import checkpoint_facts
from compiler.cost import cost, original
from compiler.targets import loadability
from tests.helpers.paths import EXAMPLES

# SmolLM2-135M: hidden 576, 9 heads / 3 KV heads of 64, ffn 1536, vocab 49152, tied.
H, HD, FFN, V = 576, 64, 1536, 49152


def smol_layer(heads: int = 9, kv: int = 3, ffn: int = FFN) -> tuple[int, int, int]:
    """(params, matmul weights, KV bytes) of one SmolLM2 layer."""
    q, k = heads * HD, kv * HD
    attn = H * q + H * k + H * k + q * H  # q, k, v, o
    mlp = 3 * H * ffn  # gate, up, down
    norms = 2 * H
    return attn + mlp + norms, attn + mlp, 2 * k * 2


SMOL_EMBED = V * H + H  # embed_tokens (tied with the LM head) + final norm
SMOL_HEAD = V * H  # the LM head matmul runs even when tied


def smol_totals(layers: list[tuple[int, int, int]]) -> tuple[int, int, int]:
    return (
        SMOL_EMBED + sum(p for p, _, _ in layers),
        2 * (SMOL_HEAD + sum(m for _, m, _ in layers)),
        sum(kv for _, _, kv in layers),
    )


def smol_expected(name: str) -> tuple[int, int, int]:
    full = smol_layer()
    if name == "smollm2-depth.prn":
        return smol_totals([full] * 24)
    if name == "smollm2-attention.prn":
        return smol_totals([smol_layer(heads=6, kv=2)] * 30)
    if name == "smollm2-mlp.prn":
        return smol_totals([smol_layer(ffn=1024)] * 30)
    if name == "smollm2-mixed.prn":
        layers = (
            [full] * 4  # 0..3
            + [smol_layer(ffn=1152)] * 4  # 4..7
            + [smol_layer(heads=6, kv=2, ffn=1152)] * 12  # 8..19
            + [smol_layer(ffn=1280)] * 3  # 26..28 (20..25 dropped)
            + [full]  # 29
        )
        return smol_totals(layers)
    raise KeyError(name)


def qwen2_tiny_expected() -> tuple[int, int, int]:
    h, hd, vocab = 112, 8, 128  # ffn 256, shrunk to 192

    def layer(heads: int, kv: int, width: int) -> tuple[int, int, int]:
        q, k = heads * hd, kv * hd
        weights = h * q + 2 * h * k + q * h + 3 * h * width
        biases = q + 2 * k  # q/k/v biases, no o bias
        return weights + biases + 2 * h, weights, 2 * k * 2

    layers = [layer(14, 2, 192), layer(7, 1, 192), layer(14, 2, 192)]  # 0, 1, 3
    params = 2 * vocab * h + h + sum(p for p, _, _ in layers)  # untied: embed + head
    return params, 2 * (vocab * h + sum(m for _, m, _ in layers)), sum(k for *_, k in layers)


def moe_tiny_expected() -> tuple[int, int, int]:
    h, hd, vocab = 256, 32, 8192
    q, k = 8 * hd, 2 * hd
    attn_w = h * q + 2 * h * k + q * h
    attn_b = q + 2 * k
    experts, width, shared = 14, 96, 192
    router = experts * h
    expert = 3 * h * width
    shared_mlp = 3 * h * shared
    gate = h  # shared_expert_gate: (1, hidden)
    layer = 2 * h + attn_w + attn_b + router + experts * expert + shared_mlp + gate
    active = attn_w + router + 2 * expert + shared_mlp + gate  # top_k 2
    return vocab * h + h + 6 * layer, 2 * (vocab * h + 6 * active), 6 * 2 * k * 2


def moe_expected(
    vocab: int,
    h: int,
    heads: int,
    kv: int,
    hd: int,
    top_k: int,
    layers: list[tuple[int, int]],  # per layer: (experts kept, expert width)
    qk_norms: int = 0,  # per layer: q/k norm parameters
) -> tuple[int, int, int]:
    """A MoE model without a shared expert or biases (Mixtral, Qwen3-MoE, OLMoE)."""
    q, k = heads * hd, kv * hd
    attn_w = h * q + 2 * h * k + q * h
    params = 2 * vocab * h + h  # untied embed + LM head, final norm
    active = vocab * h
    for experts, width in layers:
        expert = 3 * h * width
        params += 2 * h + qk_norms + attn_w + experts * h + experts * expert
        active += attn_w + experts * h + top_k * expert
    return params, 2 * active, len(layers) * 2 * k * 2


EXPECTED = {
    **{n: smol_expected(n) for n in ("smollm2-depth.prn", "smollm2-attention.prn")},
    **{n: smol_expected(n) for n in ("smollm2-mlp.prn", "smollm2-mixed.prn")},
    "qwen2-tiny-gqa7.prn": qwen2_tiny_expected(),
    "qwen2moe-tiny.prn": moe_tiny_expected(),
    # Mixtral-8x7B: one of 8 experts dropped everywhere.
    "mixtral-8x7b.prn": moe_expected(32000, 4096, 32, 8, 128, 2, [(7, 14336)] * 32),
    # Qwen3-30B-A3B: per-head q/k norms (128 each); layers 24..47 keep 96 experts of 512.
    "qwen3-30b-a3b.prn": moe_expected(
        151936, 2048, 32, 4, 128, 8, [(128, 768)] * 24 + [(96, 512)] * 24, qk_norms=2 * 128
    ),
    # OLMoE-1B-7B: q/k norms over the whole projections (2048 each); 48 of 64 experts.
    "olmoe-1b-7b.prn": moe_expected(
        50304, 2048, 16, 16, 128, 8, [(48, 1024)] * 16, qk_norms=2 * 2048
    ),
}
STOCK_LOADABLE = {
    "smollm2-depth.prn": True,
    "smollm2-attention.prn": True,
    "smollm2-mlp.prn": True,
    "smollm2-mixed.prn": False,
    "qwen2-tiny-gqa7.prn": False,
    "qwen2moe-tiny.prn": True,
    "mixtral-8x7b.prn": True,
    "qwen3-30b-a3b.prn": False,
    "olmoe-1b-7b.prn": True,
}


def test_at_least_six_examples_all_covered() -> None:
    names = sorted(p.name for p in EXAMPLES.glob("*.prn"))
    assert len(names) >= 6
    assert names == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_checks_and_costs(name: str) -> None:
    result = check_file(EXAMPLES / name)
    assert result.ok, result.diagnostics
    assert result.resolved is not None
    after = cost(result.resolved)
    assert (after.params, after.flops_per_token, after.kv_bytes_per_token) == EXPECTED[name]
    assert loadability(result.resolved).stock is STOCK_LOADABLE[name]


def test_original_costs_by_hand() -> None:
    smol = check_file(EXAMPLES / "smollm2-depth.prn")
    assert smol.facts is not None
    before = cost(original(smol.facts))
    assert (before.params, before.flops_per_token, before.kv_bytes_per_token) == smol_totals(
        [smol_layer()] * 30
    )
    assert before.params == 134_515_008  # SmolLM2-135M's published parameter count
    moe = check_file(EXAMPLES / "qwen2moe-tiny.prn")
    assert moe.facts is not None
    assert cost(original(moe.facts)).params == 13_728_768  # the fixture README's count


def test_qwen2_example_matches_a_real_tiny_model(tiny_model) -> None:
    """The example's model block is what `plangen header` reads from such a model,
    and the cost model's `before` equals the checkpoint's real parameter count."""
    from compiler.checkpoint import tensor_index

    model = tiny_model(
        "qwen2",
        hidden_size=112,
        num_attention_heads=14,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=256,
        num_hidden_layers=4,
        vocab_size=128,
        tie_word_embeddings=False,
    )
    facts = checkpoint_facts(model)
    facts.pop("fingerprint")
    result = check_file(EXAMPLES / "qwen2-tiny-gqa7.prn", checkpoint=facts)
    assert result.ok, result.diagnostics
    assert result.facts is not None
    numel = sum(_prod(t.shape) for t in tensor_index(model).values())
    assert cost(original(result.facts)).params == numel


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


@pytest.mark.model
def test_moe_example_against_the_trained_fixture(qwen2moe_dir: Path) -> None:
    result = check_file(EXAMPLES / "qwen2moe-tiny.prn", checkpoint=checkpoint_facts(qwen2moe_dir))
    assert result.ok, result.diagnostics


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(n for n in EXPECTED if n.startswith("smollm2")))
def test_smollm2_examples_match_the_checkpoint(name: str, smollm2_dir: Path) -> None:
    result = check_file(EXAMPLES / name, checkpoint=checkpoint_facts(smollm2_dir))
    assert result.ok, [d.message for d in result.errors]
