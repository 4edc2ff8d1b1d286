"""Wiring of `plancc eval` (the measurement itself lives in `executor.evaluate`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from compiler.cli import EXIT_OK, UsageError
from compiler.corpus import DATA_CHOICES, CorpusError


def cmd_eval(args: argparse.Namespace) -> int:
    from executor.evaluate import evaluate, render_table, results_json

    device = args.device or _default_device()
    results = []
    for path in args.models:
        print(f"plancc: evaluating {path} on {device}", file=sys.stderr)
        try:
            results.append(
                evaluate(
                    path,
                    data=args.data,
                    seqlen=args.seqlen,
                    device=device,
                    limit=args.limit,
                    new_tokens=args.new_tokens,
                    data_files=args.data_files,
                    progress=not args.json,
                )
            )
        except (FileNotFoundError, CorpusError) as exc:
            raise UsageError(str(exc)) from None
    print(results_json(results) if args.json else render_table(results))
    return EXIT_OK


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_eval_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity, parameters, a greedy sample and tokens/s, in one comparison table",
        description="Evaluate models on one protocol: the corpus is tokenized once without "
        "special tokens, the last 40%% of tokens is the evaluation pool, perplexity = "
        "exp(total NLL / predicted tokens) over non-overlapping SEQLEN windows. The first "
        "model is the reference for the change columns.",
        epilog="example: plancc eval ~/.cache/plancc/SmolLM2-135M-Instruct out/ --limit 20",
    )
    p.add_argument(
        "models",
        nargs="+",
        type=Path,
        metavar="MODEL_OR_OUT",
        help="checkpoint directories, or `plancc apply` output directories (their A model)",
    )
    p.add_argument(
        "--data",
        default="builtin",
        help=f"{', '.join(DATA_CHOICES)} (wikitext2/ptb through `datasets`), or a text file "
        "(default: builtin, Python's pydoc topics, always available)",
    )
    p.add_argument(
        "--data-files",
        nargs="+",
        metavar="FILE",
        help="read wikitext2/ptb from these local files (json/jsonl/parquet/csv/text) "
        "instead of the hub",
    )
    p.add_argument("--seqlen", type=int, default=512, help="window length (default 512)")
    p.add_argument("--limit", type=int, help="evaluate only the first N windows (quick runs)")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy sample length")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=cmd_eval)
