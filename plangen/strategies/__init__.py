"""Strategies: turn score tables and a budget into `Candidate`s, one module each.

* `depth`: drop whole layers (ShortGPT block influence, Gromov angular block,
  removal loss);
* `uniform`: the same width cut in every layer of a range;
* `unbalanced`: per-layer cuts from a layer-importance score;
* `global_budget`: one budget over every KV group and MLP channel of the model
  (seed 4's knapsack), FLAP's adaptive structure search as its `flap` form.

All of them read only `Budget` (what to keep, what units cost) and the
`ScoreTables`, never the model, so `--scores FILE` re-plans without
calibrating, and they are deterministic: ties break on layer and unit index.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

from compiler import cost
from compiler.facts import ModelFacts
from compiler.resolve import Channels
from plangen.candidate import original_params
from plangen.scores import ScoreTables, dense_layers


class StrategyError(Exception):
    """The options cannot give a plan (e.g. a budget no strategy can reach)."""


@dataclass(frozen=True)
class Budget:
    """The parameter budget and the price of each prunable unit, from the cost model."""

    facts: ModelFacts
    scores: ScoreTables
    keep_params: int  # parameters the result should have (embeddings counted)
    total: int  # parameters of the original model
    layer_cost: int  # a whole dense layer
    group_cost: int  # one KV group of a dense layer
    channel_cost: int  # one MLP channel of a dense layer

    @property
    def remove(self) -> int:
        return self.total - self.keep_params

    @property
    def layers(self) -> list[int]:
        return dense_layers(self.facts)

    @property
    def kv_heads(self) -> int:
        return self.facts.kv_heads or 0

    @property
    def ffn(self) -> int:
        return self.facts.ffn or 0

    @staticmethod
    def of(facts: ModelFacts, scores: ScoreTables, keep_fraction: float) -> Budget:
        if not 0.0 < keep_fraction < 1.0:
            raise StrategyError(
                f"--target-params must be between 0 and 1 (the fraction kept), got {keep_fraction}"
            )
        total = original_params(facts)
        base = cost.original(facts)
        layer = next(lp for lp in base.layers if lp.index in dense_layers(facts))
        arch = facts.arch
        assert arch is not None
        full = cost.layer_cost(arch, facts, layer).params
        one_group = dataclasses.replace(layer, groups_kept=layer.groups_kept[1:])
        one_channel = dataclasses.replace(layer, ffn=Channels((facts.ffn or 1) - 1))
        return Budget(
            facts,
            scores,
            keep_params=round(total * keep_fraction),
            total=total,
            layer_cost=full,
            group_cost=full - cost.layer_cost(arch, facts, one_group).params,
            channel_cost=full - cost.layer_cost(arch, facts, one_channel).params,
        )


def parse_layer_range(text: str | None, layers: int, what: str) -> list[int]:
    """`A..B` (inclusive), `all` or `none`; a range past the model is clamped with a warning."""
    if text is None or text == "all":
        return list(range(layers))
    if text == "none":
        return []
    try:
        a, _, b = text.partition("..")
        lo, hi = int(a), int(b or a)
    except ValueError:
        raise StrategyError(f"{what} must look like A..B, `all` or `none`, got {text!r}") from None
    if lo > hi:
        raise StrategyError(f"{what} {text} is reversed: write {hi}..{lo}")
    if hi >= layers:
        warnings.warn(
            f"{what} {text} goes past the model's last layer {layers - 1}: clamped to "
            f"{lo}..{layers - 1}",
            stacklevel=2,
        )
        hi = layers - 1
    return list(range(lo, hi + 1))
