"""The one corpus and protocol for calibration and perplexity.

Every number plancc prints about model quality comes through here, so
`plangen analyze` (calibration) and `plancc eval` (perplexity) measure on the
same text, split the same way (architecture.md, "Evaluation protocol"):

* built-in corpus (always available, no network): Python's
  `pydoc_data.topics`, `"\\n\\n".join(topics[k] for k in sorted(topics))`;
* wikitext2 / ptb / c4 (its first validation shard) through `datasets` (from
  the hub, or from local files with `data_files`), or any local UTF-8 text file;
* tokenized once, without special tokens; the first 60% of tokens are the
  calibration pool, the last 40% the evaluation pool;
* calibration: consecutive non-overlapping `seqlen` windows from the start of
  the calibration pool; perplexity: every non-overlapping `seqlen` window of
  the evaluation pool, exp(total NLL / predicted tokens).

No torch here: token ids are plain lists; the tokenizer is passed in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CALIBRATION_FRACTION = 0.6


@dataclass(frozen=True)
class HubDataset:
    """How a named benchmark corpus is read with `datasets` and joined into one text."""

    path: str
    config: str | None
    split: str
    column: str
    joiner: str
    hub_files: str | None = None  # a file inside the hub repository (c4 is 300 GB)


HUB_DATASETS: dict[str, HubDataset] = {
    "wikitext2": HubDataset("wikitext", "wikitext-2-raw-v1", "test", "text", "\n\n"),
    "ptb": HubDataset("ptb_text_only", "penn_treebank", "test", "sentence", " "),
    # The validation shard SparseGPT, Wanda and FLAP calibrate on.
    "c4": HubDataset(
        "allenai/c4",
        None,
        "train",
        "text",
        "\n\n",
        hub_files="en/c4-validation.00000-of-00008.json.gz",
    ),
}
DATA_CHOICES = ("builtin", *HUB_DATASETS)


class CorpusError(Exception):
    """The requested text cannot be had; the message says why and what to do."""


def builtin_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def load_text(
    data: str,
    data_files: str | Sequence[str] | None = None,
    load_dataset: Callable[..., Any] | None = None,
    option: str = "--data",
) -> str:
    """The whole text of `builtin`, `wikitext2`, `ptb` or a local file path.

    `data_files` reads wikitext2/ptb from local files (json, jsonl, parquet,
    csv or text with the dataset's column) instead of the hub. `option` is the
    command's name for `data` (`plangen analyze` says `--calib`), for the messages.
    """
    if data == "builtin":
        return builtin_text()
    spec = HUB_DATASETS.get(data)
    if spec is None:
        path = Path(data).expanduser()
        if not path.is_file():
            raise CorpusError(
                f"{data!r} is neither a built-in corpus ({', '.join(DATA_CHOICES)}) nor a file"
            )
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CorpusError(f"cannot read {path} as UTF-8 text: {exc}") from None
    if load_dataset is None:
        from datasets import load_dataset
    try:
        if data_files is not None:
            files = [data_files] if isinstance(data_files, str) else list(data_files)
            builder = _builder_for(files[0])
            rows = load_dataset(builder, data_files=files, split="train")
        elif spec.hub_files is not None:
            rows = load_dataset(spec.path, data_files=spec.hub_files, split=spec.split)
        else:
            rows = load_dataset(spec.path, spec.config, split=spec.split)
    except Exception as exc:  # datasets raises many types: network, missing files, schema
        raise CorpusError(
            f"cannot load {data} through `datasets` ({type(exc).__name__}: {exc}); without "
            f"network access use {option} builtin, a local text file, or local data files "
            "(--data-files)"
        ) from None
    if spec.column not in rows.column_names:
        raise CorpusError(f"{data}: the data has no column {spec.column!r} ({rows.column_names})")
    return spec.joiner.join(rows[spec.column])


def _builder_for(file: str) -> str:
    suffix = Path(file).suffix.lower()
    return {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(
        suffix, "text"
    )


@dataclass(frozen=True)
class TokenPools:
    """The tokenized corpus split by the protocol."""

    calibration: list[int]
    evaluation: list[int]
    text_sha256: str

    @staticmethod
    def split(ids: Sequence[int], text: str) -> TokenPools:
        cut = int(len(ids) * CALIBRATION_FRACTION)
        sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
        return TokenPools(list(ids[:cut]), list(ids[cut:]), sha)


def tokenize(text: str, tokenizer: Any) -> list[int]:
    """Token ids of the whole text, once, without special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def windows(ids: Sequence[int], seqlen: int, limit: int | None = None) -> list[list[int]]:
    """Consecutive non-overlapping `seqlen` windows from the start (a short tail is dropped)."""
    if seqlen < 2:
        raise CorpusError(f"seqlen must be at least 2, got {seqlen}")
    count = len(ids) // seqlen
    if limit is not None:
        count = min(count, limit)
    return [list(ids[i * seqlen : (i + 1) * seqlen]) for i in range(count)]
