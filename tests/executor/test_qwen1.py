"""Qwen-1 (`arch qwen`, remote code): a hand-written synthetic checkpoint.

Stock transformers cannot build Qwen-1 (`QWenLMHeadModel` is remote code), so
the checkpoint is written tensor by tensor with the names and shapes of the
upstream modeling_qwen.py: `transformer.wte`, `transformer.h.{i}.ln_1/ln_2`
(RMSNorm weights), `attn.c_attn` (fused [q | k | v], weight (3*hidden, hidden)
plus bias), `attn.c_proj` (hidden, heads*kv_channels, no bias), `mlp.w1` and
`mlp.w2` (intermediate_size/2, hidden), `mlp.c_proj` (hidden,
intermediate_size/2), `transformer.ln_f`, `lm_head` (untied). Expected results
are computed here with numpy from the source tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from compiler.checkpoint import expected_tensors, load_checkpoint_facts
from executor.cli import main as plancc
from plangen.cli import main as plangen
from tests.helpers.plans import write_plan
from tests.helpers.qwen1 import FFN2, HEAD_DIM, HEADS, HIDDEN, qwen1_shapes


def read_all(d: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "np") as fh:
            for name in fh.keys():  # noqa: SIM118 (safe_open has no __iter__)
                out[name] = fh.get_tensor(name)
    return out


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def apply(tmp_path: Path, model: Path, body: str, capsys: pytest.CaptureFixture[str]) -> Path:
    plan = write_plan(tmp_path, model, body)
    out = tmp_path / "out"
    assert plancc(["apply", str(plan), "-o", str(out)]) == 0, capsys.readouterr().err
    return out


def assert_restores(out: Path, model: Path, tmp_path: Path) -> None:
    dest = tmp_path / "restored"
    assert plancc(["restore", str(out), "--upto", "all", "-o", str(dest)]) == 0
    got, src = read_all(dest), read_all(model)
    assert got.keys() == src.keys()
    assert all(same(got[n], src[n]) for n in src)


def test_header(qwen1: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert plangen(["header", str(qwen1)]) == 0
    cap = capsys.readouterr()
    assert cap.err == ""  # no warning: the table describes these tensors
    ck = load_checkpoint_facts(qwen1)
    assert cap.out == (
        'model "qwen1-tiny" {\n'
        "  arch qwen\n"
        "  layers 3  hidden 64  ffn 128  vocab 96  tied false\n"
        "  heads 4  kv_heads 4  head_dim 16\n"
        "  qkv_bias true\n"
        f'  fingerprint "{ck.facts["fingerprint"]}"\n'
        "}\n"
    )
    assert ck.arch.name == "qwen"
    assert ck.facts["ffn"] == FFN2 and ck.facts["head_dim"] == HEAD_DIM
    assert ck.facts["kv_heads"] == HEADS and not ck.facts["o_bias"]


def test_expected_tensors_match_exactly(qwen1: Path) -> None:
    ck = load_checkpoint_facts(qwen1)
    assert expected_tensors(ck.arch, ck.facts) == qwen1_shapes()
    assert {n: i.shape for n, i in ck.index.items()} == qwen1_shapes()


def test_drop_layer_renumbers(
    qwen1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = apply(tmp_path, qwen1, "drop layers 1", capsys)
    src, a = read_all(qwen1), read_all(out / "A")
    expected = {n: src[n] for n in src if not n.startswith("transformer.h.")}
    for n in src:
        if n.startswith("transformer.h.0."):
            expected[n] = src[n]
        elif n.startswith("transformer.h.2."):
            expected[n.replace("transformer.h.2.", "transformer.h.1.")] = src[n]
    assert a.keys() == expected.keys()
    assert all(same(a[n], expected[n]) for n in a)
    bundle = read_all(out / "bundles" / "B")
    assert bundle.keys() == {n for n in src if n.startswith("transformer.h.1.")}
    assert all(same(bundle[n], src[n]) for n in bundle)
    config = json.loads((out / "A" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and "layer_types" not in config
    layers_map = json.loads((out / "A" / "layers_map.json").read_text())
    assert layers_map["new_to_original"] == [0, 2]
    assert_restores(out, qwen1, tmp_path)


def test_attn_drop_group_slices_fused_qkv(
    qwen1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = apply(tmp_path, qwen1, "attn layers 0 drop groups 2", capsys)
    src, a = read_all(qwen1), read_all(out / "A")
    kept_heads = [0, 1, 3]  # MHA: one KV group = one head
    q_rows = np.concatenate([np.arange(h * HEAD_DIM, (h + 1) * HEAD_DIM) for h in kept_heads])
    qkv_rows = np.concatenate([q_rows, HIDDEN + q_rows, 2 * HIDDEN + q_rows])
    p = "transformer.h.0.attn."
    w, b, o = src[p + "c_attn.weight"], src[p + "c_attn.bias"], src[p + "c_proj.weight"]
    # By hand: q rows of heads 0, 1, 3, then the same rows of k and of v.
    by_hand = np.concatenate([w[0:32], w[48:64], w[64:96], w[112:128], w[128:160], w[176:192]])
    assert same(w[qkv_rows], by_hand)
    assert same(a[p + "c_attn.weight"], by_hand)
    assert same(a[p + "c_attn.bias"], np.concatenate([b[0:32], b[48:96], b[112:160], b[176:192]]))
    assert same(a[p + "c_proj.weight"], np.concatenate([o[:, 0:32], o[:, 48:64]], axis=1))
    assert a[p + "c_attn.weight"].shape == (3 * 48, HIDDEN)
    assert a[p + "c_proj.weight"].shape == (HIDDEN, 48)
    sliced = {p + "c_attn.weight", p + "c_attn.bias", p + "c_proj.weight"}
    assert a.keys() == src.keys()
    assert all(same(a[n], src[n]) for n in src if n not in sliced)
    assert_restores(out, qwen1, tmp_path)


def test_mlp_width_by_magnitude(
    qwen1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = apply(tmp_path, qwen1, "mlp layers 2 width 64 by magnitude", capsys)
    src, a = read_all(qwen1), read_all(out / "A")
    p = "transformer.h.2.mlp."
    w1, w2, cp = (
        src[p + n].astype(np.float64) for n in ("w1.weight", "w2.weight", "c_proj.weight")
    )
    # The documented magnitude: sqrt of the sum of squares over the w1 row,
    # the w2 row and the c_proj column of each channel.
    score = np.sqrt((w1**2).sum(axis=1) + (w2**2).sum(axis=1) + (cp**2).sum(axis=0))
    top = sorted(np.argsort(-score, kind="stable")[:64].tolist())
    meta = json.loads((out / "bundles" / "_width" / "width_meta.json").read_text())
    kept = meta["layers"]["2"]["ffn"]
    assert kept == top
    assert min(score[kept]) > max(np.delete(score, kept))
    assert same(a[p + "w1.weight"], src[p + "w1.weight"][kept])
    assert same(a[p + "w2.weight"], src[p + "w2.weight"][kept])
    assert same(a[p + "c_proj.weight"], src[p + "c_proj.weight"][:, kept])
    sliced = {p + "w1.weight", p + "w2.weight", p + "c_proj.weight"}
    assert a.keys() == src.keys()
    assert all(same(a[n], src[n]) for n in src if n not in sliced)
    config = json.loads((out / "A" / "config.json").read_text())
    assert [layer["config"]["intermediate_size"] for layer in config["plancc"]["layers"]] == [
        256,
        256,
        128,
    ]
    assert_restores(out, qwen1, tmp_path)
