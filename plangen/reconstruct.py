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
ordered walk `plangen.calibrate` was shaped for. Each layer costs one
layer-forward over the calibration set: every batch's forward runs in step
(`executor.lockstep`), waiting at o_proj's and then down_proj's input while the
Gram is summed and the solve written in. Where the batches' live tensors do not
fit beside the states (`plangen.memory.in_step_fits`), or in residual mode, a
pass to each projection and one through the layer: about two.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from compiler import ir
from compiler.architectures import Architecture
from compiler.facts import ModelFacts
from compiler.geometry import top_channels
from executor import distributed
from executor.layerwise import LayerWalk, States, StopLayer
from executor.lockstep import Crew, Stop
from plangen.candidate import Candidate
from plangen.metrics import DAMP, OBS
from plangen.metrics.inputs import output_projection
from plangen.scores import ScoreTables
from plangen.surgery import Solved, applied_layer


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
    full-width output X W^T (the residual target: the original's layer output less
    the rest of the pruned layer's, `ResidualHook`)."""
    w = weight.detach().to(torch.float64)
    g = gram.to(device=w.device, dtype=torch.float64)
    rows = g[kept]
    a = rows[:, kept]  # G[K, K], a copy: damped in place below
    lam = damp * float(torch.diagonal(a).mean()) if len(kept) else 0.0
    if lam <= 0.0:
        lam = 1e-8  # an all-zero input (a dead channel set): stay at the kept weights
    a.diagonal().add_(lam)
    fit = rows @ w.T if cross is None else cross.to(device=w.device, dtype=torch.float64)[kept]
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
    ends the forward. Under torchrun (calls on split batches, `executor.distributed`)
    the sum goes round the processes in global batch order (`distributed.Ring`: the
    single process's sum, bit for bit, holding one batch's Gram besides it), and
    `remove` gives every process the Gram over every batch (a collective)."""

    def __init__(self, module: Any, stop: bool):
        self.gram: torch.Tensor | None = None
        self.stop = stop
        self.handle = module.register_forward_pre_hook(self)
        self.ring: distributed.Ring | None = None

    def __call__(self, _module: Any, args: tuple[Any, ...]) -> None:
        g = batch_gram(args[0])
        at = distributed.running_batch()
        if at is None:
            self.gram = g if self.gram is None else self.gram + g
        else:
            shard, b, n = at
            self.ring = self.ring or distributed.Ring(shard)
            self.ring.add(b, n, [g])
        if self.stop:
            raise StopLayer

    def remove(self) -> torch.Tensor:
        self.handle.remove()
        shard = distributed.current()
        if shard is not None:  # also where this process walked no batch
            (self.gram,) = (self.ring or distributed.Ring(shard)).result() or [None]
        if self.gram is None:
            raise RuntimeError("the projection never ran: nothing to reconstruct from")
        return self.gram


class SharedGrams:
    """The Grams of o_proj's and down_proj's inputs on the unpruned model, gathered by
    the calibration's forward walk (a `plangen.calibrate.LayerObserver`) for a one-shot
    reconstruction: those are the inputs it solves on, so it then needs no walk of
    its own (the same batches, the same states: the same Grams bit for bit). They are
    kept in host memory until the solves: (q width^2 + ffn^2) x 8 bytes per layer
    (`nbytes`), which `plangen.analyze_dense` checks fits before asking for them."""

    def __init__(self, arch: Architecture) -> None:
        self.specs = [(part, spec) for _, part, spec in _projections(arch) if spec is not None]
        self.grams: dict[tuple[int, str], torch.Tensor] = {}
        self._hooks: dict[tuple[int, str], GramHook] = {}

    @staticmethod
    def nbytes(facts: ModelFacts) -> int:
        """What the Grams of every layer take, in float64."""
        q = (facts.heads or 0) * (facts.head_dim or 0)
        return (facts.layers or 0) * (q * q + (facts.ffn or 0) ** 2) * 8

    def attach(self, i: int, module: Any) -> None:
        for part, spec in self.specs:
            try:
                proj = module.get_submodule(_module_name(spec))
            except AttributeError:
                continue  # a MoE layer has no dense down_proj
            self._hooks[(i, part)] = GramHook(proj, stop=False)

    def detach(self, i: int) -> None:
        for key in [key for key in self._hooks if key[0] == i]:
            # On the host: a GPU keeps only the layers' being gathered.
            self.grams[key] = self._hooks.pop(key).remove().cpu()

    def covers(self, wanted: Collection[tuple[int, str]]) -> bool:
        return all(key in self.grams for key in wanted)


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
        # Under torchrun, as `GramHook`: the batch seen last, the sums going round.
        self._at: tuple[distributed.Shard, int, int] | None = None
        self.ring: distributed.Ring | None = None

    def __call__(self, _module: Any, args: tuple[Any, ...], out: torch.Tensor) -> None:
        self._x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
        self._y = out.detach().reshape(-1, out.shape[-1]).to(torch.float64)
        self._at = distributed.running_batch()

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
        if self._at is None:
            self.gram = g if self.gram is None else self.gram + g
            self.cross = c if self.cross is None else self.cross + c
        else:
            shard, b, n = self._at
            self.ring = self.ring or distributed.Ring(shard)
            self.ring.add(b, n, [g, c])
        self._x = self._y = None
        self._at = None

    def remove(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.handle.remove()
        shard = distributed.current()
        if shard is not None:  # also where this process walked no batch
            totals = (self.ring or distributed.Ring(shard)).result()
            self.gram, self.cross = totals if totals else (None, None)
        if self.gram is None or self.cross is None:
            raise RuntimeError("the projection never ran: nothing to reconstruct from")
        return self.gram, self.cross


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
    columns is not.

    H^-1 is never rewritten. Removing a set R of columns turns it into the Schur
    complement H^-1 - H^-1[:, R] (H^-1[R, R])^-1 H^-1[R, :], a symmetric update of
    rank |R|, kept as its factor U = L^-1 H^-1[R, :] (L L^T = H^-1[R, R]); the
    removals so far are then H^-1 - V^T V, V the rounds' factors stacked. A round
    needs only the rows of the columns it removes (H^-1[R, :] - V[:, R]^T V) and the
    diagonal (less the column sums of U * U). So a round costs |R| x removed x n
    multiply-adds and no n x n copy, where rewriting H^-1 cost several: on SmolLM2's
    MLP (n = 1536) 2x faster, and the memory beside H^-1 is the removed columns'
    rows, not three more n x n matrices (an 8B's MLP: 1.6 GB each in float64).
    """
    w = weight.detach().to(torch.float64, copy=True)  # updated in place below
    g = gram.to(device=w.device, dtype=torch.float64)
    n = g.shape[0]
    lam = damp * float(torch.diagonal(g).mean()) or 1e-8
    hinv = _damped_inverse(g, lam)
    decided = n if width is None else n - width  # removals that decide the kept set
    diag = torch.diagonal(hinv).clone()  # of H^-1 with the removed columns gone
    removed = torch.zeros(n, dtype=torch.bool, device=w.device)
    factors = torch.empty(decided, n, dtype=torch.float64, device=w.device)  # V, by rows
    score = torch.empty(n, dtype=torch.float64)
    step = max(1, math.ceil(n / blocks))
    order = 0
    while True:
        cost = (w * w).sum(0) / diag.clamp_min(1e-30)
        cost[removed] = math.inf
        left = n - order
        take = min(step, left)
        gone = torch.topk(cost, take, largest=False).indices
        gone = gone[torch.argsort(cost[gone], stable=True)]
        score[gone.cpu()] = torch.arange(order, order + take, dtype=torch.float64)
        order += take
        if order >= decided or take == left:
            break
        v = factors[: order - take]
        rows = hinv[gone].sub_(v[:, gone].T @ v)  # H^-1[gone, :], earlier removals gone
        u, moved = _schur_factor(rows, gone)
        w.sub_(w[:, gone] @ moved)  # the removed columns' weight onto the others
        diag.sub_((u * u).sum(0))
        factors[order - take : order] = u
        removed[gone] = True
    if order < n:  # decided: the rest, cheapest first by this round's cost
        removed[gone] = True
        rest = (~removed).nonzero().squeeze(1)
        rest = rest[torch.argsort(cost[rest], stable=True)]
        score[rest.cpu()] = torch.arange(order, n, dtype=torch.float64)
    return score.numpy()


def _damped_inverse(gram: torch.Tensor, lam: float) -> torch.Tensor:
    """(G + lam I)^-1 through its Cholesky factor: positive definite for lam > 0, so
    half the arithmetic of an LU inverse and two n x n matrices at a time, not three
    (on an 8B's MLP, n = 14336: 1.6 GB each in float64). LU where rounding broke it."""
    damped = gram.clone()  # built in place: no n x n identity beside it
    damped.diagonal().add_(lam)
    chol, info = torch.linalg.cholesky_ex(damped)
    if int(info) != 0:
        return torch.linalg.inv(damped)
    del damped
    return torch.cholesky_inverse(chol)


def _schur_factor(rows: torch.Tensor, gone: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For the rows R = H^-1[gone, :]: U with U^T U = R^T (R[:, gone])^-1 R, the update
    removing `gone` takes off H^-1, and (R[:, gone])^-1 R, the OBS move of W's columns.
    R[:, gone] is a principal block of a positive definite matrix: Cholesky; where
    rounding left it not positive definite, its eigenvalues clamped at a tiny positive."""
    block = rows[:, gone]
    chol, info = torch.linalg.cholesky_ex(block)
    if int(info) == 0:
        u = torch.linalg.solve_triangular(chol, rows, upper=False)
        return u, torch.linalg.solve_triangular(chol.T, u, upper=True)
    values, vectors = torch.linalg.eigh((block + block.T) / 2)
    floor = float(values.abs().max()) * torch.finfo(torch.float64).eps
    values = values.clamp_min(floor or torch.finfo(torch.float64).tiny)
    projected = vectors.T @ rows
    return projected / values.sqrt().unsqueeze(1), vectors @ (projected / values.unsqueeze(1))


def narrows(cand: Candidate, layer: int, part: str) -> bool:
    """Whether the candidate cuts this layer's attention (`attn`) or MLP (`mlp`)."""
    if layer in cand.drop:
        return False
    if part == "attn":
        return bool(cand.groups_dropped.get(layer))
    return layer in cand.mlp_width


@dataclass(frozen=True)
class Settings:
    """How every projection is re-solved: the damping, and on whose inputs (`one_shot`:
    the unpruned layers'; `residual`: down_proj toward the original's layer output)."""

    damp: float = DAMP
    one_shot: bool = False
    residual: bool = False


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
    walk: LayerWalk | None = None,
) -> list[Solved]:
    """Re-solve, layer by layer in order, the projections the candidate narrows
    (or only the (layer, "attn" | "mlp") pairs in `targets`): `solve_all` for one
    candidate, on `walk` (opened on the checkpoint: one layer in memory at a time) or
    the walk over the loaded `model`."""
    if walk is None:
        walk = LayerWalk.over(model, arch, device, batch_size)
    settings = Settings(damp, one_shot, residual)
    return solve_all(walk, arch, facts, [(cand, targets)], scores, windows, settings, progress)[0]


Job = tuple[Candidate, Collection[tuple[int, str]] | None]  # a candidate, its targets


def solve_all(
    walk: LayerWalk,
    arch: Architecture,
    facts: ModelFacts,
    jobs: Sequence[Job],
    scores: ScoreTables,
    windows: Sequence[Sequence[int]],
    settings: Settings = Settings(),
    progress: bool = True,
    grams: SharedGrams | None = None,
    in_step: bool | None = None,
) -> list[list[Solved]]:
    """Every job's reconstruction in one walk: each decoder layer is loaded once and
    serves every candidate, each of which advances its own states through it.

    For a candidate at layer l: what it does besides the re-solved cuts (dropped
    layers, cuts not re-solved, their compensation) is applied to the layer
    (`surgery.applied_layer`); each chosen projection (o_proj, then down_proj) is
    solved on the inputs its own earlier layers, pruned and re-solved, give it,
    against its original weights, and written in, so the layer's next projection
    sees it pruned; then its states go through the layer, and the layer is put
    back bit for bit for the next candidate. With metric `obs` the walk also picks
    the MLP channels (`obs_ranking`, on the same inputs). `settings.one_shot`:
    every projection solved on the inputs of the candidate's unsolved layers, which
    candidates share (`_Shared`: one forward for all of `auto`'s, none when the
    calibration gathered the unpruned model's Grams, `grams`);
    `settings.residual`: the original model's states are walked alongside and
    down_proj is fitted toward its layer output. Dropped layers pass their
    input on. `in_step`: each layer's batches run in step (`_Step`; default: as
    memory allows, `in_step_walk`; never in residual mode)."""
    chosen = [_chosen(cand, targets, facts) for cand, targets in jobs]
    rest = [_rest(cand, parts) for (cand, _), parts in zip(jobs, chosen, strict=True)]
    if settings.one_shot:
        shared = _Shared(walk, arch, facts, scores, settings.damp, grams)
        return shared.solve(jobs, chosen, rest, windows, progress)
    from tqdm import tqdm

    if in_step is None:
        in_step = in_step_walk(walk, facts, windows)
    # The threads of the batches in step, kept from layer to layer (none: pass by pass).
    crew = Crew() if in_step and not settings.residual else None
    first = walk.inputs(windows)  # the embedding: the same pruned or not
    states = [first] + [States(first.batches, _copy(walk, first), 0) for _ in jobs[1:]]
    original = States(first.batches, _copy(walk, first), 0) if settings.residual else None
    solved: list[list[Solved]] = [[] for _ in jobs]
    layers = tqdm(range(walk.num_layers), desc="reconstruct", unit="layer", disable=not progress)
    with crew or contextlib.nullcontext():
        for k in layers:
            with walk.layer(k) as module:
                targets = None
                if original is not None:
                    targets = [
                        walk.forward_batch(k, original, b, module) for b in range(len(original))
                    ]
                for j, (cand, _) in enumerate(jobs):
                    if k in cand.drop:
                        states[j] = walk.skip(k, states[j])
                        continue
                    step = _Step(walk, arch, facts, scores, settings, module, k, targets, crew)
                    with applied_layer(module, k, arch, facts, rest[j], scores):
                        states[j], new = step.run(cand, chosen[j], states[j])
                    solved[j] += new
                if original is not None and targets is not None:
                    original = _advance(walk, k, original, targets)
    for s in states:
        s.cache.close()
    return solved


def in_step_walk(walk: LayerWalk, facts: ModelFacts, windows: Sequence[Sequence[int]]) -> bool:
    """Whether a sequential walk runs each layer's batches in step (one layer-forward
    per layer: `_Step`), as memory allows (`plangen.memory.in_step_fits`)."""
    from plangen.memory import in_step_fits

    tokens = sum(len(w) for w in windows)
    return in_step_fits(walk, facts.hidden or 0, facts.ffn or 0, tokens)


def sequential_passes(
    facts: ModelFacts, settings: Settings, solved: Sequence[Sequence[Solved]], in_step: bool
) -> float:
    """Forward passes a sequential (or residual) `solve_all` of these candidates took:
    one walk each, and a pass to each solved projection unless in step."""
    layers = facts.layers or 1
    partial = settings.residual or not in_step
    return sum((layers + (len(s) if partial else 0)) / layers for s in solved)


def streams(jobs: Sequence[Job], facts: ModelFacts) -> dict[tuple[object, ...], list[int]]:
    """The jobs grouped by the states a one-shot solve reads: a candidate's layers run
    with what it does besides the re-solved cuts (`_rest`), so candidates alike in that
    (all of `auto`'s reconstructed ones: nothing besides) read the same inputs at every
    layer, and one forward and one Gram per projection serve them all."""
    out: dict[tuple[object, ...], list[int]] = {}
    for j, (cand, targets) in enumerate(jobs):
        out.setdefault(_stream_key(_rest(cand, _chosen(cand, targets, facts))), []).append(j)
    return out


def one_shot_walks(jobs: Sequence[Job], facts: ModelFacts, grams: SharedGrams | None) -> int:
    """The walks a one-shot reconstruction of `jobs` takes: one per stream, but none for
    the unpruned model's when the calibration gathered its Grams."""
    groups = streams(jobs, facts)
    chosen = [_chosen(cand, targets, facts) for cand, targets in jobs]
    return sum(not _given(grams, key, members, chosen) for key, members in groups.items())


def _given(
    grams: SharedGrams | None,
    key: tuple[object, ...],
    members: Sequence[int],
    chosen: Sequence[set[tuple[int, str]]],
) -> bool:
    """Whether the calibration's Grams serve this stream: the unpruned model's, and
    every projection it solves gathered."""
    return (
        grams is not None
        and key == _stream_key(Candidate("", ""))
        and grams.covers(set().union(*(chosen[j] for j in members)))
    )


def _stream_key(rest: Candidate) -> tuple[object, ...]:
    """What `applied_layer` does with a candidate's cuts that are not re-solved."""
    cuts = bool(rest.groups_dropped or rest.mlp_width)
    return (
        rest.drop,
        tuple(sorted(rest.groups_dropped.items())),
        tuple(sorted(rest.mlp_width.items())),
        rest.unit_metric if cuts else None,
        rest.compensate and cuts,
        tuple(sorted(rest.experts_dropped.items())),
        rest.experts_rescale,
        rest.expert_width,
        rest.shared_width,
    )


@dataclass
class _Shared:
    """One-shot: every projection solved on the inputs of the candidate's layers as they
    are without the re-solved cuts. Candidates that read the same inputs (`streams`)
    share one state stream, one pass through each layer that also gathers the Grams of
    o_proj and down_proj, and one OBS ranking per MLP (greedy: the ranking decided down
    to the narrowest width asked decides every wider kept set the same way); only the
    solves are per candidate. `auto`'s reconstructed candidates are one stream, the
    unpruned model's: its Grams, when the calibration gathered them (`grams`), need no
    pass at all."""

    walk: LayerWalk
    arch: Architecture
    facts: ModelFacts
    scores: ScoreTables
    damp: float
    grams: SharedGrams | None

    def solve(
        self,
        jobs: Sequence[Job],
        chosen: Sequence[set[tuple[int, str]]],
        rest: Sequence[Candidate],
        windows: Sequence[Sequence[int]],
        progress: bool,
    ) -> list[list[Solved]]:
        from tqdm import tqdm

        groups = streams(jobs, self.facts)
        walked = [
            key for key, members in groups.items() if not _given(self.grams, key, members, chosen)
        ]
        states: dict[tuple[object, ...], States] = {}
        if walked:
            first = self.walk.inputs(windows)
            for n, key in enumerate(walked):
                states[key] = first if n == 0 else States(first.batches, _copy(self.walk, first), 0)
        solved: list[list[Solved]] = [[] for _ in jobs]
        desc = "reconstruct" if walked else "reconstruct (calibration's Grams)"
        for k in tqdm(range(self.walk.num_layers), desc=desc, unit="layer", disable=not progress):
            with self.walk.layer(k) as module:
                for key, members in groups.items():
                    parts = {p for j in members for (layer, p) in chosen[j] if layer == k}
                    if key in states:
                        grams = self._walked(k, module, rest[members[0]], parts, states, key)
                    else:
                        assert self.grams is not None
                        grams = {p: self.grams.grams[(k, p)] for p in parts}
                    rankings: dict[str, np.ndarray] = {}
                    narrowest = _narrowest_obs(jobs, members, k)
                    for j in members:
                        for space, part, spec in _projections(self.arch):
                            if (k, part) not in chosen[j] or spec is None:
                                continue
                            weight = module.get_submodule(_module_name(spec)).weight
                            cand = jobs[j][0]
                            one = self._one(
                                cand, k, space, part, weight, grams[part], rankings, narrowest
                            )
                            solved[j].append(one)
        for st in states.values():
            st.cache.close()
        return solved

    def _walked(
        self,
        k: int,
        module: Any,
        lead: Candidate,
        parts: set[str],
        states: dict[tuple[object, ...], States],
        key: tuple[object, ...],
    ) -> dict[str, torch.Tensor]:
        """The stream's states through layer k (passed on when the stream drops it), and
        the Grams of the projections `parts` gathered on the way."""
        if k in lead.drop:
            states[key] = self.walk.skip(k, states[key])
            return {}
        specs = {part: spec for _, part, spec in _projections(self.arch)}
        hooks = {
            p: GramHook(module.get_submodule(_module_name(specs[p])), stop=False)
            for p in parts
            if specs[p] is not None
        }
        try:
            with applied_layer(module, k, self.arch, self.facts, lead, self.scores):
                states[key] = self.walk.forward_layer(k, states[key], module, inplace=True)
        finally:
            grams = {p: h.remove() for p, h in hooks.items()}
        return grams

    def _one(
        self,
        cand: Candidate,
        k: int,
        space: str,
        part: str,
        weight: torch.Tensor,
        gram: torch.Tensor,
        rankings: dict[str, np.ndarray],
        narrowest: int | None,
    ) -> Solved:
        """One candidate's projection re-solved from the shared Gram; the OBS ranking
        (MLP channels picked in the walk) computed once per layer, kept in `rankings`."""
        ranking = None
        if part == "mlp" and cand.metric == OBS:
            if part not in rankings:
                rankings[part] = obs_ranking(weight, gram, self.damp, width=narrowest)
            ranking = rankings[part]
            kept = np.asarray(top_channels(ranking, cand.mlp_width[k]), dtype=np.int64)
        else:
            kept = cand.kept_inputs(k, space, self.facts, self.scores)
        assert kept is not None
        new = solve(weight, gram, torch.from_numpy(kept).to(weight.device), self.damp)
        return Solved(k, part, kept, new, ranking)


def _module_name(spec: Any) -> str:
    return str(spec.name).removesuffix(".weight")


def _narrowest_obs(jobs: Sequence[Job], members: Sequence[int], k: int) -> int | None:
    """The narrowest MLP width the stream's OBS candidates ask of layer k."""
    widths = [
        jobs[j][0].mlp_width[k]
        for j in members
        if jobs[j][0].metric == OBS and k in jobs[j][0].mlp_width
    ]
    return min(widths) if widths else None


def _chosen(
    cand: Candidate, targets: Collection[tuple[int, str]] | None, facts: ModelFacts
) -> set[tuple[int, str]]:
    return {
        (k, part)
        for k in range(facts.layers or 0)
        for part in ("attn", "mlp")
        if narrows(cand, k, part) and (targets is None or (k, part) in targets)
    }


def _rest(cand: Candidate, chosen: set[tuple[int, str]]) -> Candidate:
    """The candidate without the cuts that are re-solved: what `applied_layer` does."""
    return dataclasses.replace(
        cand,
        groups_dropped={k: g for k, g in cand.groups_dropped.items() if (k, "attn") not in chosen},
        mlp_width={k: w for k, w in cand.mlp_width.items() if (k, "mlp") not in chosen},
    )


def _copy(walk: LayerWalk, states: States) -> Any:
    """A new state cache holding the same tensors as `states` (each candidate's own)."""
    cache = walk.new_cache()
    for b in range(len(states)):
        cache.put(b, states.get(b))
    return cache


def _advance(walk: LayerWalk, k: int, states: States, outputs: list[torch.Tensor]) -> States:
    """Layer k's outputs, computed already, as the states after it (in place)."""
    for b, out in enumerate(outputs):
        states.cache.put(b, out)
    return States(states.batches, states.cache, k + 1)


@dataclass
class _Step:
    """One candidate through one loaded layer: its chosen projections re-solved on its
    states and written in, its states advanced, the layer's weights put back.

    With a `crew` (`in_step_walk`): every batch's forward runs in step through the
    layer (`LayerWalk.lockstep`), waiting at each chosen projection's input while its
    Gram is summed and its solve written in: one layer-forward. Otherwise a pass to each
    projection (stopped there), then one through the layer as solved: about two. The
    same arithmetic in the same order either way (bit for bit: tests)."""

    walk: LayerWalk
    arch: Architecture
    facts: ModelFacts
    scores: ScoreTables
    settings: Settings
    module: Any  # the loaded decoder layer
    k: int
    originals: list[torch.Tensor] | None  # the original's layer output per batch (residual)
    crew: Crew | None = None  # the batches' threads, when they run in step

    def run(
        self, cand: Candidate, chosen: set[tuple[int, str]], states: States
    ) -> tuple[States, list[Solved]]:
        saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        solved: list[Solved] = []
        todo = [
            (space, part, self.module.get_submodule(_module_name(spec)))
            for space, part, spec in _projections(self.arch)
            if (self.k, part) in chosen and spec is not None
        ]
        try:
            if self.crew is not None:  # never in residual mode (`solve_all`)
                hooks = [GramHook(proj, stop=False) for _, _, proj in todo]
                try:
                    stops = [
                        Stop(proj, self._then(cand, space, part, proj, hook, solved, saved))
                        for (space, part, proj), hook in zip(todo, hooks, strict=True)
                    ]
                    states = self.walk.lockstep(
                        self.k, states, stops, self.module, inplace=True, crew=self.crew
                    )
                finally:
                    for hook in hooks:
                        hook.handle.remove()
            else:
                for space, part, proj in todo:
                    gram, cross = self._statistics(proj, part, states)
                    self._solve(cand, space, part, proj, gram, cross, solved, saved)
                # The layer as solved feeds the next.
                states = self.walk.forward_layer(self.k, states, self.module, inplace=True)
        finally:
            with torch.no_grad():
                for w, before in reversed(saved):
                    w.copy_(before)
        return states, solved

    def _then(
        self,
        cand: Candidate,
        space: str,
        part: str,
        proj: Any,
        hook: GramHook,
        solved: list[Solved],
        saved: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> Callable[[], None]:
        """What runs when every batch waits at `proj`'s input: its Gram summed, the solve."""
        return lambda: self._solve(cand, space, part, proj, hook.remove(), None, solved, saved)

    def _solve(
        self,
        cand: Candidate,
        space: str,
        part: str,
        proj: Any,
        gram: torch.Tensor,
        cross: torch.Tensor | None,
        solved: list[Solved],
        saved: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> None:
        """The projection's kept columns re-solved and written in (the layer's next
        projection sees it pruned)."""
        w = proj.weight
        ranking = None
        if part == "mlp" and cand.metric == OBS:
            width = cand.mlp_width[self.k]
            ranking = obs_ranking(w, gram, self.settings.damp, width=width)
            kept = np.asarray(top_channels(ranking, width), dtype=np.int64)
        else:
            kept = cand.kept_inputs(self.k, space, self.facts, self.scores)
        assert kept is not None
        cols = torch.from_numpy(kept).to(w.device)
        new = solve(w, gram, cols, self.settings.damp, cross)
        solved.append(Solved(self.k, part, kept, new, ranking))
        _write(w, cols, new, saved)

    def _statistics(
        self, proj: Any, part: str, states: States
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """X^T X of the projection's inputs over every batch (and X^T T toward the
        original's output, for down_proj in residual mode)."""
        if self.originals is not None and part == "mlp":
            rhook = ResidualHook(proj)
            try:
                for b in range(len(states)):
                    out = self.walk.forward_batch(self.k, states, b, self.module)
                    rhook.add(out, self.originals[b])
            finally:
                gram, cross = rhook.remove()
            return gram, cross
        hook = GramHook(proj, stop=True)
        try:
            self.walk.observe(self.k, states, self.module)
        finally:
            gram = hook.remove()
        return gram, None


def _projections(arch: Architecture) -> list[tuple[str, str, Any]]:
    """(space, part, spec) of the two output projections: o_proj (q) and down_proj (ffn)."""
    specs = arch.attention + arch.dense_mlp
    return [
        (space, part, output_projection(specs, space))
        for space, part in (("q", "attn"), ("ffn", "mlp"))
    ]


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
