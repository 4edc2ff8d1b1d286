"""`plangen graph`: the model graph discovered from tensor names, cross-checked
against the architecture table, for every dense family and Qwen-1."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import networkx as nx
import pytest

from plangen.cli import main
from plangen.graph import GraphError, build_graph, find_layer_prefix
from tests.helpers.models import make_tiny_model

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
    _check_json(mg.to_json(), f, group_cuts, mlp_cuts, norms)
    _check_dot(mg.to_dot(), f)


def _structure(f: dict) -> tuple[dict[str, str], set[tuple[str, str, str]]]:
    """The non-tensor nodes (id -> kind) and edges (source, target, kind) that a dense
    model of this config must have: the module tree and the residual stream."""
    layers, kv = f["layers"], f["kv_heads"]
    nodes = {
        "model": "model",
        "model.embed_tokens": "embedding",
        "model.norm": "norm",
        "lm_head": "lm_head",
    }
    edges = {("model", n, "contains") for n in nodes if n != "model"}
    chain = ["model.embed_tokens"]
    for i in range(layers):
        blk = f"model.layers.{i}"
        attn, mlp = f"{blk}.attention", f"{blk}.mlp"
        nodes.update({blk: "block", attn: "attention", mlp: "mlp"})
        edges |= {("model", blk, "contains"), (blk, attn, "contains"), (blk, mlp, "contains")}
        for k in range(kv):
            nodes[f"{attn}.group.{k}"] = "kv_group"
            edges.add((attn, f"{attn}.group.{k}", "contains"))
        chain.append(blk)
    chain += ["model.norm", "lm_head"]
    edges |= {(a, b, "residual") for a, b in itertools.pairwise(chain)}
    return nodes, edges


def _check_json(text: str, f: dict, group_cuts: dict, mlp_cuts: dict, norms: int) -> None:
    """The node-link JSON holds the whole graph: every module node with the config's
    numbers, and a `slice` edge from each KV group and MLP to each tensor cut with it."""
    data = json.loads(text)
    assert data["directed"] and not data["multigraph"]
    nodes = {n["id"]: n for n in data["nodes"]}
    want_nodes, want_edges = _structure(f)
    assert {n: d["kind"] for n, d in nodes.items() if d["kind"] != "tensor"} == want_nodes
    layers, heads, kv = f["layers"], f["heads"], f["kv_heads"]
    for i in range(layers):
        attn = nodes[f"model.layers.{i}.attention"]
        assert (attn["heads"], attn["kv_heads"], attn["head_dim"]) == (heads, kv, f["head_dim"])
        assert nodes[f"model.layers.{i}.mlp"]["ffn"] == f["ffn"]
        assert nodes[f"model.layers.{i}"]["index"] == i
        # The KV groups split the query heads into kv runs of heads // kv.
        ratio = heads // kv
        assert [
            nodes[f"model.layers.{i}.attention.group.{k}"]["query_heads"] for k in range(kv)
        ] == [list(range(k * ratio, (k + 1) * ratio)) for k in range(kv)]
    assert nodes["model.embed_tokens"]["shape"] == [f["vocab"], f["hidden"]]
    assert nodes["model.norm"]["shape"] == [f["hidden"]]
    edges = [(e["source"], e["target"], e["kind"]) for e in data["edges"]]
    assert want_edges <= set(edges)
    kinds = Counter(k for *_, k in edges)
    tensors = [n for n, d in nodes.items() if d["kind"] == "tensor"]
    # contains: model's 3 + L children, per block attention + mlp + kv groups, every tensor.
    assert kinds["contains"] == 3 + layers * (3 + kv) + len(tensors)
    assert kinds["residual"] == layers + 2
    assert kinds["slice"] == layers * (kv * len(group_cuts) + len(mlp_cuts))
    assert kinds["tied"] == int(f["tied"])
    # Each slice edge names a tensor of its own block, on the table's axis and space.
    cuts = {**group_cuts, **mlp_cuts}
    for e in data["edges"]:
        if e["kind"] == "slice":
            block = e["source"].split(".attention")[0].removesuffix(".mlp")
            tensor = nodes[e["target"]]
            assert e["target"] == f"tensor:{block}.{tensor['rel']}"
            assert (e["axis"], e["space"]) == cuts[tensor["rel"]]
    # Every hidden-sized 1-D tensor of a block that is not cut is one of its norms.
    per_block = [n for n in tensors if n.startswith("tensor:model.layers.0.")]
    hidden_1d = [n for n in per_block if nodes[n]["shape"] == [f["hidden"]]]
    assert len(hidden_1d) == norms


def _check_dot(text: str, f: dict) -> None:
    """The Graphviz text: exactly the module nodes, each labelled with its kind, and the
    contains/residual edges between them; no tensor and no `tied` edge."""
    want_nodes, want_edges = _structure(f)
    lines = text.splitlines()
    assert lines[:2] == ["digraph model {", "  rankdir=TB;"] and lines[-1] == "}"
    body = lines[2:-1]
    node_lines = [ln for ln in body if "->" not in ln]
    edge_lines = [ln for ln in body if "->" in ln]
    assert node_lines == [f'  "{n}" [label="{n}\\n{k}"];' for n, k in sorted(want_nodes.items())]
    assert sorted(edge_lines) == sorted(
        f'  "{a}" -> "{b}" [label="{k}"];' for a, b, k in want_edges
    )
    assert "tensor:" not in text


def test_qwen1_is_found_at_transformer_h(qwen1: Path) -> None:
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
    text = capsys.readouterr().out
    mg = build_graph(model_dir)
    assert json.loads(text) == json.loads(mg.to_json())  # the whole graph, as checked above
    f = mg.checkpoint.facts
    gemma_cuts = {
        **{
            f"self_attn.{p}_proj.weight": (0, sp)
            for p, sp in (("q", "q"), ("k", "kv"), ("v", "kv"))
        },
        "self_attn.o_proj.weight": (1, "q"),
    }
    mlp_cuts = {
        "mlp.gate_proj.weight": (0, "ffn"),
        "mlp.up_proj.weight": (0, "ffn"),
        "mlp.down_proj.weight": (1, "ffn"),
    }
    _check_json(text, f, gemma_cuts, mlp_cuts, 4)
    assert main(["graph", str(model_dir), "--dot"]) == 0
    dot = capsys.readouterr().out
    _check_dot(dot, f)
    assert dot.count("kv_group") == 2  # one KV group in each of the 2 blocks


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
    from tests.helpers.models import make_tiny_model

    model_dir = make_tiny_model(tmp_path, "qwen2_moe")
    if fused:
        from tests.helpers.models import fused_copy

        model_dir = fused_copy(model_dir, tmp_path)
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
