"""The table `plancc heal` ends with: the original, each pruned stage, each healed stage.

Perplexity, parameters and tokens/s as `plancc eval` prints them
(`executor.evaluate`), on the evaluation pool of the training text's corpus
(what healing never saw), as markdown and JSON.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from heal.options import HealOptions
from heal.workdir import original_model


def report_tables(opts: HealOptions, stages: Sequence[Any], work: Path) -> tuple[str, str]:
    """(markdown, JSON) of the original, then each stage unhealed and healed."""
    from executor.evaluate import evaluate, render_table, results_json

    rows = [("original", original_model(opts.out, work))]
    for s in stages:
        rows.append((f"{s.name} (pruned)", s.unhealed))
        rows.append((f"{s.name} (healed)", work / f"stage-{s.name}"))
    results = []
    for label, path in rows:
        r = evaluate(
            path,
            data=opts.data,
            seqlen=opts.seqlen,
            device=opts.device,
            limit=opts.eval_limit,
            data_files=list(opts.data_files) or None,
            progress=opts.progress,
        )
        results.append(dataclasses.replace(r, model=label))
    table = render_table(results)
    return "```text\n" + table + "\n```", results_json(results)
