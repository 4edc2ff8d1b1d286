"""`plangen graph`: the model graph discovered from tensor names, cross-checked
against the architecture table, for every dense family and Qwen-1."""

from __future__ import annotations

import json
from pathlib import Path

import networkx as nx
import pytest
from conftest import make_tiny_model
from test_qwen1 import qwen1  # noqa: F401 (fixture)

from plangen.cli import main
from plangen.graph import GraphError, build_graph, find_layer_prefix

# (family, config overrides, attention module, mlp module, norms of a block)
FAMILIES = [
    ("llama", {}, "self_attn", "mlp", 2),
    ("qwen2", {}, "self_attn", "mlp", 2),  # 14 heads : 2 KV heads = 7:1
    ("qwen3", {}, "self_attn", "mlp", 2),
    ("phi3", {}, "self_attn", "mlp", 2),  # fused qkv and gate_up
    ("gemma3_text", {}, "self_attn", "mlp", 4),  # one KV head, four norms
]


def _slices(g: nx.DiGraph, node: str) -> dict[str, tuple[int, str]]:
    return {
        g.nodes[t]["rel"]: (d["axis"], d["space"])
        for _, t, d in g.out_edges(node, data=True)
        if d["kind"] == "slice"
    }


@pytest.mark.parametrize(("arch", "over", "attn", "mlp", "norms"), FAMILIES)
def test_graph_of_each_family(
    tmp_path: Path, arch: str, over: dict, attn: str, mlp: str, norms: int
) -> None:
    model_dir = make_tiny_model(tmp_path, arch, num_hidden_layers=3, **over)
    mg = build_graph(model_dir)
    g, f = mg.graph, mg.checkpoint.facts
    assert (mg.layers_prefix, mg.attention, mg.mlp) == ("model.layers", attn, mlp)
    assert len(mg.norms) == norms
    blocks = [n for n, d in g.nodes(data=True) if d["kind"] == "block"]
    assert blocks == [f"model.layers.{i}" for i in range(3)]
    # The residual stream is one path: embedding, blocks in order, final norm, lm_head.
    path = ["model.embed_tokens", *blocks, "model.norm", "lm_head"]
    assert mg.residual_path() == path
    groups = [n for n, d in g.nodes(data=True) if d["kind"] == "kv_group"]
    assert len(groups) == 3 * f["kv_heads"]
    ratio = f["heads"] // f["kv_heads"]
    assert g.nodes["model.layers.1.attention.group.0"]["query_heads"] == list(range(ratio))
    # Exactly the table's tensors are sliced together, each on its table axis.
    group_cuts = _slices(g, "model.layers.0.attention.group.0")
    mlp_cuts = _slices(g, "model.layers.0.mlp")
    if arch == "phi3":
        assert group_cuts == {
            "self_attn.qkv_proj.weight": (0, "qkv"),
            "self_attn.o_proj.weight": (1, "q"),
        }
        assert mlp_cuts == {
            "mlp.gate_up_proj.weight": (0, "gate_up"),
            "mlp.down_proj.weight": (1, "ffn"),
        }
    else:
        parts = (("q", "q"), ("k", "kv"), ("v", "kv"))
        want = {f"self_attn.{p}_proj.weight": (0, sp) for p, sp in parts}
        want["self_attn.o_proj.weight"] = (1, "q")
        if arch == "qwen2":  # q/k/v biases are cut with their rows
            want.update({f"self_attn.{p}_proj.bias": (0, sp) for p, sp in parts})
        assert group_cuts == want
        assert mlp_cuts == {
            "mlp.gate_proj.weight": (0, "ffn"),
            "mlp.up_proj.weight": (0, "ffn"),
            "mlp.down_proj.weight": (1, "ffn"),
        }
    assert any(d["kind"] == "tied" for *_, d in g.edges(data=True)) == f["tied"]
    json.loads(mg.to_json())
    assert mg.to_dot().startswith("digraph model {")


def test_qwen1_is_found_at_transformer_h(qwen1: Path) -> None:  # noqa: F811
    mg = build_graph(qwen1)
    assert (mg.layers_prefix, mg.attention, mg.mlp) == ("transformer.h", "attn", "mlp")
    assert mg.norms == ("ln_1.weight", "ln_2.weight")
    assert set(_slices(mg.graph, "transformer.h.0.mlp")) == {
        "mlp.w1.weight",
        "mlp.w2.weight",
        "mlp.c_proj.weight",
    }


def test_cli_prints_summary_and_single_kv_group_note(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = make_tiny_model(tmp_path, "gemma3_text", num_hidden_layers=2)
    assert main(["graph", str(model_dir)]) == 0
    out = capsys.readouterr().out
    assert "2 decoder blocks at `model.layers.N`" in out
    assert "4 heads, 1 KV heads (GQA 4:1), head_dim 32" in out
    assert "attention cannot be narrowed (depth and MLP plans only)" in out
    assert main(["graph", str(model_dir), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {n["kind"] for n in data["nodes"]} >= {"block", "kv_group", "mlp", "embedding"}


def test_no_block_list_is_a_clear_error() -> None:
    names = ["embed.weight", "blocks.0.w", "blocks.1.w"]
    assert find_layer_prefix(names, 2) == "blocks"
    with pytest.raises(GraphError, match=r"no list of 3 decoder blocks .*blocks\.N \(2 indices\)"):
        find_layer_prefix(names, 3)


def test_cli_error_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["graph", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_residual_walk_reports_a_loop_instead_of_hanging(tmp_path: Path) -> None:
    mg = build_graph(make_tiny_model(tmp_path, "llama", num_hidden_layers=2))
    mg.graph.add_edge("model.layers.1", "model.layers.0", kind="residual")
    mg.graph.remove_edge("model.layers.1", "model.norm")
    with pytest.raises(GraphError, match=r"branches or loops at model\.layers\.1"):
        mg.residual_path()


@pytest.mark.parametrize("fused", [False, True])
def test_every_expert_is_its_own_boundary(fused: bool, tmp_path: Path) -> None:
    """Qwen2-MoE: the router routes to every expert, the shared expert joins every
    expert, no edge joins two experts, and the tensors cut with expert 2 are its own
    (per-expert form) or its slices of the fused tensors, plus its router row."""
    from conftest import make_tiny_model

    model_dir = make_tiny_model(tmp_path, "qwen2_moe")
    if fused:
        from test_experts import _fused_copy

        model_dir = _fused_copy(model_dir, tmp_path)
    mg = build_graph(model_dir)
    g = mg.graph
    mlp = "model.layers.0.mlp"
    experts = [f"{mlp}.expert.{e}" for e in range(4)]
    assert {
        b for _, b, d in g.out_edges(f"{mlp}.router", data=True) if d["kind"] == "routes"
    } == set(experts)
    joins = {
        b for _, b, d in g.out_edges(f"{mlp}.shared_expert", data=True) if d["kind"] == "joins"
    }
    assert joins == set(experts)
    assert not any(g.has_edge(a, b) for a in experts for b in experts)
    own = mg.expert_tensors(f"{mlp}.expert.2")
    if fused:
        assert own == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj", "mlp.gate.weight"]
    else:
        assert own == [
            "mlp.experts.2.down_proj.weight",
            "mlp.experts.2.gate_proj.weight",
            "mlp.experts.2.up_proj.weight",
            "mlp.gate.weight",
        ]
    with pytest.raises(GraphError, match="walk bound \\(0 steps\\) reached"):
        mg.expert_tensors(f"{mlp}.expert.2", bound=0)
