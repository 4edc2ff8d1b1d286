"""Score tables: computed from a calibration pass, written to and read from the sidecar.

The sidecar (`PLAN.scores.safetensors`) holds every table a plan's `by METRIC`
and `compensate` read, under the names `compiler.sidecar` defines
(`METRIC.L.mlp`, `mean_in.L.attn`, ...), plus what re-planning needs without
calibrating again (`--scores FILE`): `METRIC.L.attn` (one score per KV group),
`block_influence` (layers,), `angular` (layers x layers: row n, column start,
NaN where no block fits), `removal` (layers,), and the calibration loss. All
tables are float64; the metadata records how they were measured. Saving the
same tables gives the same bytes (safetensors orders tensors by name and the
metadata carries no clock).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from compiler.architectures import Architecture
from compiler.facts import ModelFacts
from compiler.geometry import Geometry
from compiler.hashing import sha256_file
from compiler.sidecar import table_name
from plangen.metrics import OBS, LayerScores

RECONSTRUCT = "reconstruct"  # tables `reconstruct.L.attn|mlp`: re-solved weights (float32)

if TYPE_CHECKING:
    from plangen.calibrate import Calibration
    from plangen.metrics.inputs import LayerStats


@dataclass
class ScoreTables:
    """Every measured table, by sidecar name, and how they were measured."""

    tables: dict[str, np.ndarray]
    metadata: dict[str, str]

    def width(self, metric: str, layer: int) -> LayerScores:
        try:
            return LayerScores(
                self.tables[table_name(metric, layer, "attn")],
                self.tables[table_name(metric, layer, "mlp")],
            )
        except KeyError:
            raise KeyError(
                f"the scores have no `{metric}` tables for layer {layer} (metrics measured: "
                f"{', '.join(self.width_metrics()) or 'none'})"
            ) from None

    def width_metrics(self) -> list[str]:
        names = {k.split(".")[0] for k in self.tables if k.endswith(".mlp")}
        return sorted(names - {"mean_in", RECONSTRUCT})

    def without_reconstruction(self) -> ScoreTables:
        """The measurements alone: reconstructed weights, and the OBS rankings made in
        the same walk, hold for one plan only."""
        meta = json.loads(self.metadata.get("plancc", "{}"))
        meta.pop("reconstruction", None)
        per_plan = (f"{RECONSTRUCT}.", f"{OBS}.")
        return ScoreTables(
            {k: v for k, v in self.tables.items() if not k.startswith(per_plan)},
            metadata_json(meta) if meta else {},
        )

    def has(self, name: str) -> bool:
        return name in self.tables

    def layer_vector(self, name: str) -> list[float]:
        return [float(x) for x in self.tables[name]]

    def angular(self) -> dict[tuple[int, int], float]:
        """d(start, n) from the stored matrix."""
        m = self.tables["angular"]
        return {
            (s, n): float(m[n, s])
            for n in range(1, m.shape[0])
            for s in range(m.shape[1])
            if not math.isnan(m[n, s])
        }


def dense_layers(facts: ModelFacts) -> list[int]:
    """Layers with a dense MLP (width metrics score these; MoE layers come later)."""
    n = facts.layers or 0
    return [i for i in range(n) if not facts.is_moe_layer(i)]


def geometry(facts: ModelFacts) -> Geometry:
    return Geometry(facts.heads or 0, facts.kv_heads or 0, facts.head_dim or 0, facts.ffn or 0)


@dataclass
class UnitTables:
    """A forward-only width metric's KV-group table of every layer and MLP-channel table
    of every dense layer, on a MoE model: what its parameter budget drops groups and
    narrows dense MLPs by (`plangen.strategies.moe_budget`). Measured in the router
    pass, each layer while the walk has it loaded (`collect_router`: `watch` as its
    `also`, `score` as its `after`), so no weight is read after the pass."""

    arch: Architecture
    facts: ModelFacts
    metric: str
    tables: dict[str, np.ndarray] = field(default_factory=dict)
    stats: dict[int, LayerStats] = field(default_factory=dict)  # the layers being measured

    def watch(self, i: int, layer: Any) -> list[Any]:
        """Hooks on layer i's o_proj and dense down_proj inputs; the caller removes them."""
        from plangen.calibrate import watch_layer_inputs
        from plangen.metrics.inputs import LayerStats

        self.stats[i] = LayerStats()
        return watch_layer_inputs(layer, self.arch, self.stats[i])

    def score(self, i: int, layer: Any) -> None:
        """Layer i's tables, once it has run over every batch (its statistics dropped)."""
        from plangen.metrics.inputs import LayerInputs
        from plangen.metrics.registry import WIDTH_METRICS

        stats = self.stats.pop(i)
        if not stats.attn_in.count:
            return
        inputs = LayerInputs.of(layer, self.arch, i, stats, geometry(self.facts))
        scores = WIDTH_METRICS[self.metric].score(inputs)
        self.tables[table_name(self.metric, i, "attn")] = scores.groups
        if not self.facts.is_moe_layer(i) and stats.mlp_in.count:
            self.tables[table_name(self.metric, i, "mlp")] = scores.channels


def compute_tables(
    facts: ModelFacts,
    calib: Calibration,
    metrics: Sequence[str],
    removal: Sequence[float] | None = None,
) -> ScoreTables:
    """The sidecar tables of `metrics` (width metric names, scored on the dense layers in
    the calibration walk: `calibrate.collect(metrics=..., scored=dense_layers(facts))`)
    plus depth and mean_in tables; no weight is read."""
    tables: dict[str, np.ndarray] = {}
    for i in dense_layers(facts):
        stats = calib.layers[i]
        for name in metrics:
            if name not in stats.scores:
                raise ValueError(f"layer {i}: `{name}` was not scored in the calibration walk")
            tables[table_name(name, i, "attn")] = stats.scores[name].groups
            tables[table_name(name, i, "mlp")] = stats.scores[name].channels
        for part, moments in (("attn", stats.attn_in), ("mlp", stats.mlp_in)):
            if moments.count:
                tables[table_name("mean_in", i, part)] = moments.mean.numpy()
    n = facts.layers or 0
    tables["block_influence"] = np.asarray(calib.depth.block_influence(), dtype=np.float64)
    angular = np.full((n, n), np.nan)
    for (start, size), d in calib.depth.angular_distance().items():
        angular[size, start] = d
    tables["angular"] = angular
    if removal is not None:
        tables["removal"] = np.asarray(removal, dtype=np.float64)
    tables["calibration_loss"] = np.asarray([calib.loss], dtype=np.float64)
    return ScoreTables(tables, {})


def write_sidecar(path: Path, scores: ScoreTables) -> str:
    """Save the tables (float64, contiguous; reconstructed weights float32, the precision
    apply casts them from) with their metadata; return the file's sha256."""
    import torch
    from safetensors.torch import save_file

    tensors = {
        k: torch.from_numpy(
            np.ascontiguousarray(
                v, dtype=np.float32 if k.startswith(f"{RECONSTRUCT}.") else np.float64
            )
        )
        for k, v in scores.tables.items()
    }
    save_file(tensors, str(path), metadata=dict(scores.metadata))
    return sha256_file(path)


def read_sidecar(path: Path) -> ScoreTables:
    """Tables and metadata of an earlier sidecar (`--scores FILE`).

    Raises `SidecarError` naming the file and the fix for a missing, truncated or
    non-safetensors file (its header is validated first, as the checker does)."""
    from safetensors import safe_open

    from compiler.sidecar import SIDECAR_FIX, SidecarError, read_sidecar_tables

    read_sidecar_tables(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            tables = {k: fh.get_tensor(k).double().numpy() for k in fh.keys()}  # noqa: SIM118
            metadata = dict(fh.metadata() or {})
    except Exception as exc:  # safetensors and torch raise several types for a bad file
        raise SidecarError(
            f"scores sidecar {path} cannot be read ({type(exc).__name__}: {exc}); {SIDECAR_FIX}"
        ) from None
    return ScoreTables(tables, metadata)


def metadata_json(values: Mapping[str, Any]) -> dict[str, str]:
    """safetensors metadata is str -> str and its key order is not kept (a hash map), so
    everything goes under one key as sorted JSON: the same values, the same bytes."""
    return {"plancc": json.dumps(values, sort_keys=True)}
