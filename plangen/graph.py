"""The model graph: a networkx view of a checkpoint's structure, for the planner.

Discovery is generic: the module tree is read from the dotted tensor names of
the safetensors headers (no weights, no torch, no remote code), so
`model.layers.N` (Llama, Mistral, Qwen2/3, Phi-3, Gemma) and `transformer.h.N`
(Qwen-1) are found the same way: the decoder-block list is the dotted prefix
followed by the indices 0..L-1 for the config's L layers. Inside a block, the
attention module is the child whose 2-D tensors map the hidden size to or from
head space, the MLP the child whose tensors do so for the ffn size, norms are
1-D hidden-sized tensors. The result is then cross-checked against the
architecture table (which names what the executor slices), and a checkpoint
that cannot be understood is an error that says what was not found.

Nodes (`kind` attribute): `model`, `embedding`, `lm_head`, `norm` (final),
`block` (one per decoder layer), `attention`, `kv_group`, `mlp`, `tensor`.
Edges (`kind`): `contains` (the module tree), `residual` (embedding → block 0
→ ... → final norm → lm_head), `tied` (embedding ↔ lm_head when they share
one tensor), and `slice` from a KV group or an MLP to every tensor cut with
it (the axis and space in the edge's attributes): these are the tensors that
must be sliced together. Every walk over it is a bounded loop over known
nodes; the graph has no cycles except the `tied` pair, which no walk follows.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx

from compiler.architectures import Architecture
from compiler.checkpoint import CheckpointFacts, expected_tensors, load_checkpoint_facts

_INDEXED = re.compile(r"^(.*?)\.(\d+)\.(.+)$")


class GraphError(Exception):
    """The checkpoint's structure could not be understood; the message says what is missing."""


@dataclass(frozen=True)
class ModelGraph:
    graph: nx.DiGraph
    checkpoint: CheckpointFacts
    layers_prefix: str  # e.g. "model.layers"
    attention: str  # the attention module's name inside a block, e.g. "self_attn"
    mlp: str  # e.g. "mlp"
    norms: tuple[str, ...]  # block-relative 1-D hidden-sized tensors

    @property
    def arch(self) -> Architecture:
        return self.checkpoint.arch

    def residual_path(self) -> list[str]:
        """Embedding → blocks → final norm → lm_head, by walking `residual` edges.

        Cycle-safe and bounded: each node is visited once, at most as many steps
        as the graph has nodes; a branch or a loop is reported, never followed.
        """
        g = self.graph
        node = next(n for n, d in g.nodes(data=True) if d["kind"] == "embedding")
        path, seen = [node], {node}
        for _ in range(g.number_of_nodes()):
            nxt = [b for _, b, d in g.out_edges(node, data=True) if d["kind"] == "residual"]
            if not nxt:
                return path
            if len(nxt) > 1 or nxt[0] in seen:
                raise GraphError(f"the residual stream branches or loops at {node}")
            node = nxt[0]
            path.append(node)
            seen.add(node)
        raise GraphError(f"walk bound ({g.number_of_nodes()} steps) reached at {node}")

    def expert_tensors(self, expert: str, bound: int | None = None) -> list[str]:
        """Every tensor cut with one expert (its own, its router row, its slices of fused
        tensors), by a walk over `contains` and `slice` edges from the expert node.

        Bounded and cycle-safe: each node is visited once, `bound` (default: every node
        of the graph) steps at most; past it the walk reports where it stopped. Routed
        experts have no edge to each other, so the walk never reaches another expert."""
        g = self.graph
        if g.nodes[expert].get("kind") != "expert":
            raise GraphError(f"{expert} is not an expert node")
        limit = g.number_of_nodes() if bound is None else bound
        todo, seen, found = [expert], {expert}, []
        steps = 0
        while todo:
            steps += 1
            if steps > limit:
                raise GraphError(f"walk bound ({limit} steps) reached from {expert} at {todo[0]}")
            node = todo.pop()
            for _, nxt, d in g.out_edges(node, data=True):
                if d["kind"] not in ("contains", "slice") or nxt in seen:
                    continue
                seen.add(nxt)
                if g.nodes[nxt]["kind"] == "expert":  # pragma: no cover - a graph bug
                    raise GraphError(f"{expert} reaches another expert, {nxt}")
                if g.nodes[nxt]["kind"] == "tensor":
                    found.append(g.nodes[nxt]["rel"])
                else:
                    todo.append(nxt)
        return sorted(set(found))

    def summary(self) -> str:
        """What `plangen graph` prints."""
        f = self.checkpoint.facts
        g = self.graph
        blocks = [n for n, d in g.nodes(data=True) if d["kind"] == "block"]
        heads, kv = f.get("heads"), f.get("kv_heads")
        ratio = f"GQA {heads // kv}:1" if heads and kv and kv != heads else "MHA"
        lines = [
            f"{self.checkpoint.name}: arch {self.arch.name}, {len(blocks)} decoder blocks "
            f"at `{self.layers_prefix}.N`",
            f"  attention  `{self.attention}`: {heads} heads, {kv} KV heads ({ratio}), "
            f"head_dim {f.get('head_dim')}; {kv} KV group(s) per block",
            f"  mlp        `{self.mlp}`: " + _mlp_text(f),
            "  norms      " + ", ".join(f"`{n}`" for n in self.norms),
        ]
        embed = [n for n, d in g.nodes(data=True) if d["kind"] == "embedding"]
        tied = any(d["kind"] == "tied" for _, _, d in g.edges(data=True))
        lines.append(
            "  embeddings "
            + ", ".join(f"`{g.nodes[n]['tensor']}` {g.nodes[n]['shape']}" for n in embed)
            + ("; lm_head tied to them" if tied else "; separate lm_head")
        )
        for unit in ("kv_group", "mlp", "shared_expert"):
            node = next(
                (n for n, d in g.nodes(data=True) if d["kind"] == unit and not d.get("moe")),
                None,
            )
            if node is None:
                continue
            cuts = [
                f"{g.nodes[t]['rel']} axis {d['axis']}"
                for _, t, d in g.out_edges(node, data=True)
                if d["kind"] == "slice"
            ]
            what = {"kv_group": "each KV group", "mlp": "MLP channels"}.get(unit, unit)
            lines.append(f"  sliced together ({what}): " + ", ".join(cuts))
        expert = next((n for n, d in g.nodes(data=True) if d["kind"] == "expert"), None)
        if expert is not None:
            own = ", ".join(self.expert_tensors(expert))
            lines.append(f"  removed with one expert (`{expert}`; the router: its row): {own}")
        if f.get("kv_heads") == 1:
            lines.append("  one KV group: attention cannot be narrowed (depth and MLP plans only)")
        lines.append(f"graph: {g.number_of_nodes()} nodes, {g.number_of_edges()} edges")
        return "\n".join(lines)

    def to_json(self) -> str:
        data = nx.node_link_data(self.graph, edges="edges")
        return json.dumps(data, sort_keys=True, default=list)

    def to_dot(self) -> str:
        """Graphviz text (structure only: tensors are left out to keep it readable)."""
        out = ["digraph model {", "  rankdir=TB;"]
        keep = {n for n, d in self.graph.nodes(data=True) if d["kind"] != "tensor"}
        for n in sorted(keep):
            out.append(f'  "{n}" [label="{n}\\n{self.graph.nodes[n]["kind"]}"];')
        for a, b, d in sorted(self.graph.edges(data=True)):
            if a in keep and b in keep and d["kind"] != "tied":
                out.append(f'  "{a}" -> "{b}" [label="{d["kind"]}"];')
        out.append("}")
        return "\n".join(out) + "\n"


def _add_experts(g: nx.DiGraph, mlp: str, f: dict[str, Any]) -> list[str]:
    """A MoE block's router, routed experts and shared expert, each its own node: the
    router `routes` to every expert, the shared expert `joins` every expert (their
    outputs are summed), and experts have no edge between them, so what is cut with one
    expert never reaches another."""
    router = f"{mlp}.router"
    g.add_node(router, kind="router", experts=f.get("experts"), top_k=f.get("top_k"))
    g.add_edge(mlp, router, kind="contains")
    shared = None
    if f.get("shared_ffn"):
        shared = f"{mlp}.shared_expert"
        g.add_node(shared, kind="shared_expert", ffn=f["shared_ffn"])
        g.add_edge(mlp, shared, kind="contains")
    experts = []
    for e in range(f.get("experts") or 0):
        node = f"{mlp}.expert.{e}"
        g.add_node(node, kind="expert", expert=e, ffn=f.get("expert_ffn"))
        g.add_edge(mlp, node, kind="contains")
        g.add_edge(router, node, kind="routes")
        if shared is not None:
            g.add_edge(shared, node, kind="joins")
        experts.append(node)
    return experts


def _add_expert_tensors(
    g: nx.DiGraph,
    ck: CheckpointFacts,
    arch: Architecture,
    layer: int,
    spec: Any,
    experts: list[str],
) -> None:
    """One tensor per expert (`experts.{e}.…`): contained by, and sliced with, its expert."""
    for e, node in enumerate(experts):
        name = arch.layer_prefix.replace("{i}", str(layer)) + spec.name.replace("{e}", str(e))
        if name not in ck.index:
            continue
        tensor = f"tensor:{name}"
        rel = spec.name.replace("{e}", str(e))
        shape = list(ck.index[name].shape)
        g.add_node(tensor, kind="tensor", rel=rel, shape=shape, spaces=list(spec.dims))
        g.add_edge(node, tensor, kind="contains")
        for axis, space in enumerate(spec.dims):
            if space == "expert_ffn":
                g.add_edge(node, tensor, kind="slice", axis=axis, space=space)


def _mlp_text(f: dict[str, Any]) -> str:
    if f.get("experts"):
        return f"{f['experts']} experts (top {f.get('top_k')}), expert ffn {f.get('expert_ffn')}"
    return f"ffn {f.get('ffn')}"


def find_layer_prefix(names: list[str], layers: int) -> str:
    """The dotted prefix whose indexed children are exactly blocks 0..layers-1."""
    seen: dict[str, set[int]] = defaultdict(set)
    count: Counter[str] = Counter()
    for name in names:
        m = _INDEXED.match(name)
        if m:
            seen[m.group(1)].add(int(m.group(2)))
            count[m.group(1)] += 1
    fits = [p for p, idx in seen.items() if idx == set(range(layers))]
    if not fits:
        found = ", ".join(f"{p}.N ({len(i)} indices)" for p, i in sorted(seen.items())) or "none"
        raise GraphError(
            f"no list of {layers} decoder blocks in the tensor names (indexed modules found: "
            f"{found}); the config's layer count and the tensors disagree"
        )
    return max(fits, key=lambda p: (count[p], -len(p)))


def build_graph(model_dir: str | Path, allow_pickle: bool = False) -> ModelGraph:
    """Discover the structure of a checkpoint and build its graph (headers only)."""
    ck = load_checkpoint_facts(model_dir, allow_pickle=allow_pickle)
    f = ck.facts
    layers = f["layers"]
    prefix = find_layer_prefix(list(ck.index), layers)
    table_prefix = ck.arch.layer_prefix.replace("{i}.", "").rstrip(".")
    if prefix != table_prefix:
        raise GraphError(
            f"decoder blocks found at `{prefix}.N`, but the `{ck.arch.name}` table says "
            f"`{table_prefix}.N`; fix compiler/architectures.py"
        )
    block: dict[str, tuple[int, ...]] = {
        n[len(prefix) + 3 :]: i.shape for n, i in ck.index.items() if n.startswith(f"{prefix}.0.")
    }
    hidden = f["hidden"]
    q, kv = f["heads"] * f["head_dim"], f["kv_heads"] * f["head_dim"]
    head_sizes = {q, kv, q + 2 * kv}  # q, k/v, fused qkv
    attention = _child_mapping(block, hidden, head_sizes, "attention")
    ffn_sizes = {f.get(k) for k in ("ffn", "expert_ffn", "shared_ffn", "experts")} - {None}
    ffn_sizes |= {2 * n for n in ffn_sizes}  # fused gate_up
    mlp = _child_mapping(block, hidden, ffn_sizes, "MLP")
    norms = tuple(
        sorted(
            r
            for r, s in block.items()
            if s == (hidden,) and r.split(".")[0] not in (attention, mlp)
        )
    )
    _cross_check(ck, prefix)
    graph = _assemble(ck, prefix)
    return ModelGraph(graph, ck, prefix, attention, mlp, norms)


def _child_mapping(
    block: dict[str, tuple[int, ...]], hidden: int, sizes: set[int], what: str
) -> str:
    """The block child whose 2-D tensors map `hidden` to or from one of `sizes`."""
    votes: Counter[str] = Counter()
    for rel, shape in block.items():
        if len(shape) == 2 and "." in rel:
            a, b = shape
            if (a in sizes and b == hidden) or (a == hidden and b in sizes and a != b):
                votes[rel.split(".")[0]] += 1
    if not votes:
        raise GraphError(
            f"no {what} module found in block 0 (no 2-D tensor maps the hidden size "
            f"{hidden} to or from {sorted(sizes)})"
        )
    return votes.most_common(1)[0][0]


def _cross_check(ck: CheckpointFacts, prefix: str) -> None:
    expected = expected_tensors(ck.arch, ck.facts)
    missing = sorted(set(expected) - set(ck.index))
    extra = sorted(n for n in set(ck.index) - set(expected) if n.startswith(prefix + "."))
    wrong = sorted(n for n in set(expected) & set(ck.index) if ck.index[n].shape != expected[n])
    if missing or extra or wrong:
        first = (missing + extra + wrong)[0]
        raise GraphError(
            f"the `{ck.arch.name}` architecture table does not describe these tensors "
            f"({len(missing)} missing, {len(extra)} unexpected, {len(wrong)} of another shape; "
            f"first: {first}); fix compiler/architectures.py before planning"
        )


def _add_embeddings(g: nx.DiGraph, ck: CheckpointFacts) -> None:
    """Add the model-level tensors the checkpoint has (embedding, final norm, lm_head),
    before any block, so the residual chain can start at the embedding."""
    for spec in ck.arch.embeddings:
        name = spec.name
        if name not in ck.index:
            continue
        kind = (
            "lm_head"
            if name.startswith("lm_head")
            else ("embedding" if spec.dims[0] == "vocab" else "norm")
        )
        node = name.removesuffix(".weight")
        g.add_node(node, kind=kind, tensor=name, shape=list(ck.index[name].shape))
        g.add_edge("model", node, kind="contains")


def _add_layer_tensor(
    g: nx.DiGraph,
    ck: CheckpointFacts,
    name: str,
    spec: Any,
    blk: str,
    mlp: str,
    groups: list[str],
    experts: list[str],
) -> None:
    """Add one (non-per-expert) tensor of a block and its slice edges: each axis is
    linked to the units (KV groups, MLP, experts) whose removal cuts along it."""
    node = f"tensor:{name}"
    g.add_node(
        node,
        kind="tensor",
        rel=spec.name,
        shape=list(ck.index[name].shape),
        spaces=list(spec.dims),
    )
    g.add_edge(blk, node, kind="contains")
    for axis, space in enumerate(spec.dims):
        if space in ("q", "kv", "qkv"):
            for grp in groups:
                g.add_edge(grp, node, kind="slice", axis=axis, space=space)
        elif space in ("ffn", "gate_up"):
            g.add_edge(mlp, node, kind="slice", axis=axis, space=space)
        elif space == "experts":  # the router's rows, or fused experts' slices
            for e in experts:
                g.add_edge(e, node, kind="slice", axis=axis, space=space)
        elif space in ("expert_ffn", "expert_gate_up"):
            for e in experts:  # each expert's own channels of the fused tensor
                g.add_edge(e, node, kind="slice", axis=axis, space=space)
        elif space == "shared_ffn":
            g.add_edge(f"{mlp}.shared_expert", node, kind="slice", axis=axis, space=space)


def _add_block(
    g: nx.DiGraph,
    ck: CheckpointFacts,
    prefix: str,
    i: int,
    previous: str,
    dense: set,
    head_dim: int,
    kv: int,
    ratio: int,
) -> str:
    """Add block `i` (its attention, KV groups, MLP, experts and tensors) after
    `previous` on the residual chain; returns the block, the chain's new end. The
    head counts come from the caller, which reads them before anything is added."""
    arch, f = ck.arch, ck.facts
    blk = f"{prefix}.{i}"
    moe = arch.moe and i not in dense
    g.add_node(blk, kind="block", index=i, moe=moe)
    g.add_edge("model", blk, kind="contains")
    g.add_edge(previous, blk, kind="residual")
    attn, mlp = f"{blk}.attention", f"{blk}.mlp"
    g.add_node(attn, kind="attention", heads=f["heads"], kv_heads=kv, head_dim=head_dim)
    g.add_node(mlp, kind="mlp", ffn=None if moe else f.get("ffn"), moe=moe)
    g.add_edge(blk, attn, kind="contains")
    g.add_edge(blk, mlp, kind="contains")
    groups = [f"{attn}.group.{k}" for k in range(kv)]
    for k, grp in enumerate(groups):
        q = list(range(k * ratio, (k + 1) * ratio))
        g.add_node(grp, kind="kv_group", group=k, kv_head=k, query_heads=q)
        g.add_edge(attn, grp, kind="contains")
    experts = _add_experts(g, mlp, f) if moe else []
    for spec in arch.layer_tensors(moe):
        if spec.per_expert:
            _add_expert_tensors(g, ck, arch, i, spec, experts)
            continue
        name = arch.layer_prefix.replace("{i}", str(i)) + spec.name
        if name not in ck.index:
            continue
        _add_layer_tensor(g, ck, name, spec, blk, mlp, groups, experts)
    return blk


def _assemble(ck: CheckpointFacts, prefix: str) -> nx.DiGraph:
    arch, f = ck.arch, ck.facts
    g = nx.DiGraph()
    g.add_node("model", kind="model", arch=arch.name, name=ck.name)
    head_dim, kv = f["head_dim"], f["kv_heads"]
    ratio = f["heads"] // kv
    dense = set(f.get("dense_layers") or ())
    _add_embeddings(g, ck)
    embed = next(n for n, d in g.nodes(data=True) if d["kind"] == "embedding")
    final = [n for n, d in g.nodes(data=True) if d["kind"] == "norm"]
    head = [n for n, d in g.nodes(data=True) if d["kind"] == "lm_head"]
    previous = embed
    for i in range(f["layers"]):
        previous = _add_block(g, ck, prefix, i, previous, dense, head_dim, kv, ratio)
    for n in final + head:
        g.add_edge(previous, n, kind="residual")
        previous = n
    if f.get("tied") and not head:  # the output projection is the embedding itself
        shape = g.nodes[embed]["shape"]
        g.add_node("lm_head", kind="lm_head", tensor=g.nodes[embed]["tensor"], shape=shape)
        g.add_edge("model", "lm_head", kind="contains")
        g.add_edge(previous, "lm_head", kind="residual")
        g.add_edge(embed, "lm_head", kind="tied")
    return g
