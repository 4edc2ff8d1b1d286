"""Weight reconstruction: re-solve the consuming projection of what a layer keeps.

Removing MLP channels (or KV groups) deletes columns of `down_proj` (or
`o_proj`); the kept columns were trained to work with the removed ones, so the
layer's output drifts. SlimGPT, FASP and ZipLM re-solve the kept columns by
least squares on calibration inputs, so the projection's output stays as close
as possible to the original's. With X the projection's inputs (tokens x in),
K the kept columns and W the original weight (out x in):

    W' = argmin ||X_K W'^T - X W^T||^2 + lam ||W' - W_K||^2
       = (W G[:, K] + lam W_K) (G[K, K] + lam I)^-1,     G = X^T X

damped toward the kept weights (not toward zero: ridge toward zero shrinks the
layer and, at small cuts, fits the calibration text's quirks), with lam a
fraction `damp` of the mean diagonal of G[K, K] so it means the same at any
scale. Only G is needed, accumulated batch by batch in float64 (`batch_gram`).

Sequential (the default, and what the peers do): layer l is solved on inputs
produced by the model with layers < l already pruned and reconstructed, so
each layer also absorbs the error of the ones before it. The executor's walk
(`executor.layerwise.LayerWalk`, resident over the loaded model) runs the
decoder one layer at a time over cached hidden states for that, the layer-
ordered walk `plangen.calibrate` was shaped for; each layer costs about two
layer-forwards over the calibration set (Gram pass, then the output pass).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Collection, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from compiler import ir
from compiler.architectures import Architecture
from compiler.facts import ModelFacts
from compiler.geometry import top_channels
from executor.layerwise import LayerWalk, States, StopLayer
from plangen.calibrate import module_path, output_projection
from plangen.candidate import Candidate
from plangen.metrics import DAMP, OBS
from plangen.scores import ScoreTables
from plangen.surgery import Solved, applied


def solve(
    weight: torch.Tensor,
    gram: torch.Tensor,
    kept: torch.Tensor,
    damp: float,
    cross: torch.Tensor | None = None,
) -> torch.Tensor:
    """The kept columns re-solved: (W G[:, K] + lam W_K)(G[K, K] + lam I)^-1, float64 inside,
    returned in the weight's dtype. `gram` is X^T X of the projection's inputs; `cross`
    (in x out), when given, is X^T T for another target T than the projection's own
    full-width output X W^T (the residual target of `residual_targets`)."""
    w = weight.detach().to(torch.float64)
    g = gram.to(device=w.device, dtype=torch.float64)
    gkk = g[kept][:, kept]
    lam = damp * float(torch.diagonal(gkk).mean()) if len(kept) else 0.0
    if lam <= 0.0:
        lam = 1e-8  # an all-zero input (a dead channel set): stay at the kept weights
    a = gkk + lam * torch.eye(len(kept), dtype=torch.float64, device=w.device)
    fit = g[kept] @ w.T if cross is None else cross.to(device=w.device, dtype=torch.float64)[kept]
    b = fit + lam * w[:, kept].T  # (K, out)
    chol, info = torch.linalg.cholesky_ex(a)
    # Not positive definite even in float64 (a degenerate input): least squares instead.
    solved = torch.cholesky_solve(b, chol) if int(info) == 0 else torch.linalg.lstsq(a, b).solution
    # Through float32, the precision of the sidecar table apply reads it back from.
    return solved.T.float().to(weight.dtype).contiguous()


def batch_gram(x: torch.Tensor, parts: int = 8) -> torch.Tensor:
    """X^T X of one batch of rows (tokens x in), float64: only the blocks on and above
    the diagonal are multiplied (in `parts` column bands), the rest mirrored. The same
    float64 dot products as the full product, in about 0.6 of its time (a float32
    product would take half, but its rounding, amplified by the solve where the
    damping carries it, moved a tiny model's solved weights by 1e-2)."""
    x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
    n = x.shape[1]
    gram = torch.empty(n, n, dtype=torch.float64, device=x.device)
    edges = sorted({n * i // parts for i in range(parts + 1)})
    for a, b in itertools.pairwise(edges):
        band = x[:, a:b].T @ x[:, a:]  # rows a:b, columns a: of the Gram
        gram[a:b, a:] = band
        gram[a:, a:b] = band.T
    return gram


class GramHook:
    """X^T X of a module's input over every call, float64 (`batch_gram`); optionally
    ends the forward."""

    def __init__(self, module: Any, stop: bool):
        self.gram: torch.Tensor | None = None
        self.stop = stop
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, _module: Any, args: tuple[Any, ...]) -> None:
        g = batch_gram(args[0])
        self.gram = g if self.gram is None else self.gram + g
        if self.stop:
            raise StopLayer

    def remove(self) -> torch.Tensor:
        self.handle.remove()
        if self.gram is None:
            raise RuntimeError("the projection never ran: nothing to reconstruct from")
        return self.gram


class ResidualHook:
    """X^T X and X^T T of `down_proj`, with T the output that would put the residual
    stream back on the original model's: T = H_orig - (layer output - down_proj's own
    output), so the MLP also absorbs the error of everything pruned before it."""

    def __init__(self, module: Any):
        self.gram: torch.Tensor | None = None
        self.cross: torch.Tensor | None = None
        self._x: torch.Tensor | None = None
        self._y: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self)

    def __call__(self, _module: Any, args: tuple[Any, ...], out: torch.Tensor) -> None:
        self._x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
        self._y = out.detach().reshape(-1, out.shape[-1]).to(torch.float64)

    def add(self, layer_out: torch.Tensor, original: torch.Tensor) -> None:
        """One batch: the pruned layer's output and the original model's, same tokens."""
        assert self._x is not None and self._y is not None
        width = layer_out.shape[-1]
        target = (
            original.reshape(-1, width).to(torch.float64)
            - layer_out.reshape(-1, width).to(torch.float64)
            + self._y
        )
        g, c = self._x.T @ self._x, self._x.T @ target
        self.gram = g if self.gram is None else self.gram + g
        self.cross = c if self.cross is None else self.cross + c
        self._x = self._y = None

    def remove(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.handle.remove()
        if self.gram is None or self.cross is None:
            raise RuntimeError("the projection never ran: nothing to reconstruct from")
        return self.gram, self.cross


def residual_targets(walk: LayerWalk, states: States) -> list[list[torch.Tensor]]:
    """Every layer's output on every batch of `states` (the walk's inputs), of the model
    as it is (the original): [layer][batch]. One forward pass; held in memory (layers x
    tokens x hidden)."""
    outs = []
    for k in range(walk.num_layers):
        with walk.layer(k) as module:
            states = walk.forward_layer(k, states, module)
        outs.append([states.get(b) for b in range(len(states))])
    return outs


def obs_ranking(
    weight: torch.Tensor,
    gram: torch.Tensor,
    damp: float,
    blocks: int = 64,
    width: int | None = None,
) -> np.ndarray:
    """Input columns ranked by Optimal Brain Surgeon, removing greedily (SlimGPT's
    structured OBS): removing column j and re-fitting the rest costs
    ||W[:, j]||^2 / [H^-1]_jj of output error, H = G + lam I; the cheapest goes
    first, then W and H^-1 are updated as if it were gone, so correlated
    columns are not all kept or all removed together. Columns leave in `blocks`
    rounds (each the cheapest 1/blocks of the start), the rank within a round by
    its cost. Returns a score per column, higher = removed later (kept first).

    With `width`, only what `top_channels(ranking, width)` reads is decided: the
    rounds stop with the one that removes the (n - width)-th column, and the columns
    still in place then rank above every removed one by their cost in that round (a
    one-shot OBS order). The kept set is the full ranking's; the order among the kept
    columns is not. Each round works on the columns still in place only (W and H^-1
    shrink as they go), the same arithmetic per remaining entry as on the full matrices."""
    w = weight.detach().to(torch.float64)
    g = gram.to(device=w.device, dtype=torch.float64)
    n = g.shape[0]
    lam = damp * float(torch.diagonal(g).mean()) or 1e-8
    hinv = torch.linalg.inv(g + lam * torch.eye(n, dtype=torch.float64, device=w.device))
    decided = n if width is None else n - width  # removals that decide the kept set
    alive = torch.arange(n, device=w.device)  # original index of each column still in place
    score = torch.empty(n, dtype=torch.float64)
    step = max(1, math.ceil(n / blocks))
    order = 0
    while True:
        cost = (w * w).sum(0) / torch.diagonal(hinv).clamp_min(1e-30)
        left = len(alive)
        take = min(step, left)
        gone = torch.topk(cost, take, largest=False).indices
        gone = gone[torch.argsort(cost[gone], stable=True)]
        score[alive[gone].cpu()] = torch.arange(order, order + take, dtype=torch.float64)
        order += take
        if order >= decided or take == left:
            break
        # Block OBS update: the removed columns' weight moves onto the others.
        stay = torch.ones(left, dtype=torch.bool, device=w.device)
        stay[gone] = False
        stay = stay.nonzero().squeeze(1)
        hgs = hinv[gone]  # (take, left)
        solve_b = torch.linalg.solve(hgs[:, gone], hgs[:, stay])  # (take, left - take)
        w = w[:, stay].sub_(w[:, gone] @ solve_b)
        rows = hinv[stay]
        hinv = rows[:, stay].sub_(rows[:, gone] @ solve_b)
        alive = alive[stay]
    if order < n:  # decided: the rest, cheapest first by this round's cost
        stay = torch.ones(len(alive), dtype=torch.bool, device=w.device)
        stay[gone] = False
        rest = stay.nonzero().squeeze(1)
        rest = rest[torch.argsort(cost[rest], stable=True)]
        score[alive[rest].cpu()] = torch.arange(order, n, dtype=torch.float64)
    return score.numpy()


def narrows(cand: Candidate, layer: int, part: str) -> bool:
    """Whether the candidate cuts this layer's attention (`attn`) or MLP (`mlp`)."""
    if layer in cand.drop:
        return False
    if part == "attn":
        return bool(cand.groups_dropped.get(layer))
    return layer in cand.mlp_width


def sequential(
    model: Any,
    arch: Architecture,
    facts: ModelFacts,
    cand: Candidate,
    scores: ScoreTables,
    windows: Sequence[Sequence[int]],
    *,
    targets: Collection[tuple[int, str]] | None = None,
    damp: float = DAMP,
    one_shot: bool = False,
    residual: bool = False,
    batch_size: int = 4,
    device: str = "cpu",
    progress: bool = True,
) -> list[Solved]:
    """Re-solve, layer by layer in order, the projections the candidate narrows
    (or only the (layer, "attn" | "mlp") pairs in `targets`).

    What the candidate does besides (dropped layers, cuts that are not re-solved,
    their compensation) is applied first (`surgery.applied`); each re-solved
    projection is written in as the walk reaches it, so layer l sees the pruned
    and reconstructed layers < l, and is solved against its own original
    weights. With metric `obs` the walk also picks the MLP channels
    (`obs_ranking`, on the same inputs). `one_shot` solves every layer on the
    unpruned model's inputs instead (what a single calibration pass would give;
    measured worse). Everything is restored bit for bit before returning.
    Dropped layers pass their input on.
    """

    n = facts.layers or 0
    chosen = {
        (k, part)
        for k in range(n)
        for part in ("attn", "mlp")
        if narrows(cand, k, part) and (targets is None or (k, part) in targets)
    }
    rest = dataclasses.replace(
        cand,
        groups_dropped={k: g for k, g in cand.groups_dropped.items() if (k, "attn") not in chosen},
        mlp_width={k: w for k, w in cand.mlp_width.items() if (k, "mlp") not in chosen},
    )
    walk = LayerWalk.over(model, arch, device, batch_size)
    states = walk.inputs(windows)  # the embedding: the same pruned or not
    originals = residual_targets(walk, states) if residual else None
    with applied(model, arch, facts, rest, scores):
        return _walk(
            model,
            arch,
            walk,
            states,
            originals,
            chosen,
            cand,
            scores,
            facts,
            damp,
            one_shot,
            progress,
        )


def _projections(arch: Architecture) -> list[tuple[str, str, Any]]:
    """(space, part, spec) of the two output projections: o_proj (q) and down_proj (ffn)."""
    specs = arch.attention + arch.dense_mlp
    return [
        (space, part, output_projection(specs, space))
        for space, part in (("q", "attn"), ("ffn", "mlp"))
    ]


def _walk(
    model: Any,
    arch: Architecture,
    walk: LayerWalk,
    states: States,
    originals: list[list[torch.Tensor]] | None,
    chosen: set[tuple[int, str]],
    cand: Candidate,
    scores: ScoreTables,
    facts: ModelFacts,
    damp: float,
    one_shot: bool,
    progress: bool,
) -> list[Solved]:
    from tqdm import tqdm

    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    solved: list[Solved] = []
    try:
        for k in tqdm(
            range(walk.num_layers), desc="reconstruct", unit="layer", disable=not progress
        ):
            if k in cand.drop:
                states = walk.skip(k, states)
                continue
            pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
            for space, part, spec in _projections(arch):
                if (k, part) not in chosen or spec is None:
                    continue
                module = model.get_submodule(module_path(arch, k, spec))
                cross = None
                if originals is not None and part == "mlp":
                    rhook = ResidualHook(module)
                    try:
                        for b in range(len(states)):
                            rhook.add(walk.forward_batch(k, states, b), originals[k][b])
                    finally:
                        gram, cross = rhook.remove()
                else:
                    hook = GramHook(module, stop=True)
                    try:
                        walk.observe(k, states)
                    finally:
                        gram = hook.remove()
                w = module.weight
                ranking = None
                if part == "mlp" and cand.metric == OBS:
                    width = cand.mlp_width[k]
                    ranking = obs_ranking(w, gram, damp, width=width)
                    kept = np.asarray(top_channels(ranking, width), dtype=np.int64)
                else:
                    kept = cand.kept_inputs(k, space, facts, scores)
                assert kept is not None
                cols = torch.from_numpy(kept).to(w.device)
                new = solve(w, gram, cols, damp, cross)
                solved.append(Solved(k, part, kept, new, ranking))
                pending.append((w, cols, new))
                if not one_shot:  # the layer's next projection sees this one pruned
                    _write(w, cols, new, saved)
            if one_shot:  # the unpruned layer's output feeds the next
                states = walk.forward_layer(k, states, inplace=True)
            for w, cols, new in pending if one_shot else ():
                _write(w, cols, new, saved)
            if not one_shot:
                states = walk.forward_layer(k, states, inplace=True)
    finally:
        with torch.no_grad():
            for w, before in reversed(saved):
                w.copy_(before)
    return solved


def _write(
    w: torch.Tensor,
    cols: torch.Tensor,
    new: torch.Tensor,
    saved: list[tuple[torch.Tensor, torch.Tensor]],
) -> None:
    """Prune one projection in place: only the kept columns, re-solved."""
    saved.append((w, w.detach().clone()))
    with torch.no_grad():
        w.zero_()
        w[:, cols] = new


def iter_tables(solved: Sequence[Solved]) -> Iterator[tuple[str, np.ndarray]]:
    """The sidecar tables of a reconstruction: `reconstruct.L.PART` (out x kept) and,
    where the walk picked the channels, their ranking `obs.L.mlp`."""
    from compiler.sidecar import table_name

    for s in solved:
        yield table_name("reconstruct", s.layer, s.part), s.weight.detach().float().cpu().numpy()
        if s.ranking is not None:
            yield table_name(OBS, s.layer, s.part), s.ranking


def attach(
    scores: ScoreTables,
    solved: Sequence[Solved],
    plan: ir.Plan,
    facts: ModelFacts,
    *,
    damp: float,
    one_shot: bool,
    samples: int,
    residual: bool = False,
    seqlen: int,
) -> None:
    """Put a reconstruction into the sidecar's tables, and into its metadata the plan it
    was solved for (`compiler.sidecar.layer_decisions`, what P124 compares) and how."""
    from compiler.sidecar import layer_decisions
    from plangen.scores import metadata_json

    scores.tables.update(iter_tables(solved))
    meta = json.loads(scores.metadata.get("plancc", "{}"))
    meta["reconstruction"] = {
        "for": layer_decisions(plan, facts),
        "damp": damp,
        "mode": "one-shot" if one_shot else "residual" if residual else "sequential",
        "samples": samples,
        "seqlen": seqlen,
    }
    scores.metadata = metadata_json(meta)
