"""Training text: windows of the calibration pool, never the evaluation pool.

The same corpus and split as `plangen analyze` and `plancc eval`
(`compiler.corpus`): the first part of the text is the calibration pool, the
rest the evaluation pool `plancc eval` reports on. Healing trains on every
whole window of the calibration pool, so its figures stay comparable with the
unhealed ones and nothing it saw is ever scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from compiler.corpus import CorpusError, TokenPools, load_text, tokenize, windows
from heal.options import HealError


@dataclass(frozen=True)
class TrainingText:
    windows: list[list[int]]
    text_sha256: str
    name: str


def training_windows(
    data: str,
    tokenizer: Any,
    seqlen: int,
    data_files: tuple[str, ...] = (),
    limit: int | None = None,
) -> TrainingText:
    """The calibration pool of `data` cut into `seqlen` windows (at most `limit`)."""
    try:
        text = load_text(data, list(data_files) or None)
    except CorpusError as exc:
        raise HealError(str(exc)) from None
    pools = TokenPools.split(tokenize(text, tokenizer), text)
    out = windows(pools.calibration, seqlen, limit)
    if not out:
        raise HealError(
            f"--data {data}: its calibration pool has {len(pools.calibration)} tokens, fewer "
            f"than one window of --seqlen {seqlen}; use a longer text or a shorter --seqlen"
        )
    return TrainingText(out, pools.text_sha256, data)
