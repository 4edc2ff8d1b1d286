"""`plancc apply`, `export`, `restore` and `eval`: argparse wiring for the executor.

Refusals (a plan that does not fit the checkpoint, an unreadable or pickle
checkpoint, an existing output without --force, an output that is not
plancc's, a damaged apply output, a full disk) print why and exit 2 with
nothing written, like every usage error of `plancc`.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from compiler.cli import EXIT_OK, UsageError
from compiler.corpus import DATA_CHOICES, CorpusError, load_text
from executor.device import add_device_argument, resolve_device
from executor.formats import FORMATS, GGUF_DTYPES, GGUF_FILE


def parse_size(text: str) -> int:
    """`5GB`, `500MB`, `2GiB`, `1000000` → bytes (for --max-shard-size)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB)")
    base = 1024 if m.group(3) else 1000
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * base**power)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def cmd_apply(args: argparse.Namespace) -> int:
    from executor.apply import ApplyError, apply_plan
    from executor.outdir import OutputError

    def warn(text: str) -> None:
        print(text, file=sys.stderr)

    try:
        res = apply_plan(
            args.plan,
            args.out,
            model=args.model,
            device=resolve_device(args.device),
            force=args.force,
            max_shard_bytes=args.max_shard_size,
            allow_pickle=args.allow_pickle,
            warn=warn,
            copy_remote_code=args.copy_remote_code,
            hash_source=args.hash_source,
            model_format=args.format,
            gguf_dtype=args.gguf_dtype,
            gguf_pre=args.gguf_pre,
        )
    except ApplyError as exc:
        if exc.details:
            print(exc.details, file=sys.stderr)
        raise UsageError(str(exc)) from None
    except OutputError as exc:
        raise UsageError(str(exc)) from None
    m = res.manifest
    removed = m["removed"]
    rate = res.bytes_written / res.write_seconds / 1e6 if res.write_seconds else 0.0
    print(
        f"wrote {res.out} ({_mb(res.bytes_written)} of tensors in {res.write_seconds:.2f} s, "
        f"{rate:,.0f} MB/s; {res.seconds:.2f} s in all)"
    )
    for name, b in removed["bundles"].items():
        layers = ", ".join(map(str, b["layers"]))
        print(f"  bundle {name}: layers {layers} ({b['params']:,} parameters)")
    if removed["width"]["dir"]:
        print(f"  {removed['width']['dir']}: {removed['width']['params']:,} sliced-away parameters")
    pct = (res.params_after - res.params_before) / res.params_before * 100
    print(f"  parameters {res.params_before:,} → {res.params_after:,} ({pct:+.1f}%)")
    print(f"  format {m['model_format']}: load with {res.loader} ({m['loadability']})")
    if m.get("gguf"):
        print(f"  GGUF ({m['gguf']['dtype']}): {res.out / m['gguf']['file']}")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from executor.formats.export import ExportError, export
    from executor.outdir import OutputError

    try:
        res = export(
            args.src,
            args.out,
            args.format,
            force=args.force,
            dtype=args.gguf_dtype,
            tokenizer_pre=args.gguf_pre,
        )
    except (ExportError, OutputError) as exc:
        raise UsageError(str(exc)) from None
    print(f"wrote {res.dest} ({res.model_format}, {res.seconds:.2f} s)")
    return EXIT_OK


def cmd_restore(args: argparse.Namespace) -> int:
    from executor.outdir import OutputError
    from executor.restore import RestoreError, restore

    try:
        res = restore(args.out_dir, args.upto, args.dest, force=args.force)
    except (RestoreError, OutputError) as exc:
        raise UsageError(str(exc)) from None
    what = (
        "the original checkpoint (every file verified, fingerprint matches the source)"
        if res.complete
        else f"{len(res.layers)} layers"
    )
    print(f"wrote {res.dest}: {what} ({res.seconds:.2f} s)")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from executor.restore import RestoreError, verify

    try:
        res = verify(args.out_dir)
    except RestoreError as exc:
        raise UsageError(str(exc)) from None
    print(f"{res.root}: ok, {res.files} files match the sha256 `plancc apply` recorded")
    return EXIT_OK


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register apply, export, restore, verify and eval on a `plancc` subparser set
    (`plancc heal` comes from the `heal` package, through `executor.cli`'s entry points)."""
    _add_apply(sub)
    _add_export(sub)
    _add_restore(sub)
    _add_verify(sub)
    _add_eval(sub)


def _add_apply(sub: argparse._SubParsersAction) -> None:
    """`plancc apply`: the longest option list of the commands, kept apart so
    add_commands reads as the list of subcommands."""
    p = sub.add_parser(
        "apply",
        help="apply a plan to a checkpoint: OUT/A (the pruned model) and OUT/bundles",
        description="Check the plan against the checkpoint (model block and fingerprint), then "
        "stream the checkpoint into OUT/A (pruned, renumbered, config updated, manifest) and "
        "OUT/bundles (dropped layers and sliced-away channels, original bytes). Untouched "
        "tensors are copied as byte ranges; nothing is written unless everything succeeds.",
        epilog="exit status: 0 written, 2 refused (plan does not fit, bad checkpoint, OUT exists)"
        "\nexample: plancc apply examples/smollm2-depth.prn -o out/smollm2-depth",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("plan", type=Path, metavar="PLAN", help="the plan (.prn)")
    p.add_argument(
        "--model",
        type=Path,
        metavar="DIR",
        help="checkpoint directory (default: the plan's `source`, relative to the plan file)",
    )
    p.add_argument("-o", "--out", type=Path, required=True, metavar="OUT", help="output directory")
    add_device_argument(p, "where channel metrics are computed")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace OUT if it is a previous plancc output (anything else is refused)",
    )
    p.add_argument(
        "--max-shard-size",
        type=parse_size,
        default="5GB",
        metavar="SIZE",
        help="largest output shard (default 5GB)",
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept a trusted pickle checkpoint (pytorch_model.bin, or sharded with "
        "pytorch_model.bin.index.json): it is converted to safetensors in a temporary "
        "directory (torch.load weights_only=True, one shard at a time), applied, and removed",
    )
    p.add_argument(
        "--copy-remote-code",
        action="store_true",
        help="copy the checkpoint's *.py files into A and keep `auto_map` in its config "
        "(default: they go to OUT/bundles/_files, so A never runs code with trust_remote_code)",
    )
    p.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="how A is written: hf (safetensors + config.json; a heterogeneous result loads "
        "with executor.load only), nemotron-nas (the same tensors with a Nemotron-NAS/DeciLM "
        "config: vLLM and transformers with trust_remote_code), gguf (hf A plus "
        f"OUT/{GGUF_FILE} for llama.cpp). Default: hf when stock transformers loads the "
        "result, else nemotron-nas when it fits that layout, else hf",
    )
    _add_gguf_dtype(p)
    p.add_argument(
        "--hash-source",
        action="store_true",
        help="also record the sha256 of the source's weight files (reads them once more), so "
        "`restore --upto all` proves the rebuilt files equal them",
    )
    p.set_defaults(func=cmd_apply)


def _add_restore(sub: argparse._SubParsersAction) -> None:
    """`plancc restore`, in its own function like every subcommand."""
    p = sub.add_parser(
        "restore",
        help="rebuild a model from OUT/A plus bundles (all of them: the original, bit for bit)",
        description="Put the layers of bundles back in their original places: `--upto B` "
        "restores bundle B (and every bundle before it in name order), `--upto all` every "
        "bundle plus the sliced-away channels, giving back the original checkpoint byte for "
        "byte.",
        epilog="Every file restore reads is checked against the sha256 apply recorded first; "
        "`--upto all` also checks the result's fingerprint.\n"
        "exit status: 0 written, 2 refused (OUT damaged or incomplete, DIR exists)",
    )
    p.add_argument("out_dir", type=Path, metavar="OUT", help="the -o directory of `plancc apply`")
    p.add_argument("--upto", default="all", metavar="BUNDLE", help="a bundle name, or `all`")
    p.add_argument("-o", "--out", dest="dest", type=Path, required=True, metavar="DIR")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace DIR if it is a previous plancc output (anything else is refused)",
    )
    p.set_defaults(func=cmd_restore)


def _add_verify(sub: argparse._SubParsersAction) -> None:
    """`plancc verify`, in its own function like every subcommand."""
    p = sub.add_parser(
        "verify",
        help="check an apply output: metadata valid, every file's sha256 as apply recorded",
        description="Run every check `plancc restore` makes before writing, and write nothing: "
        "each metadata file is validated, every file's sha256 is compared with the one apply "
        "recorded in A/manifest.json, and files apply did not write are reported.",
        epilog="exit status: 0 intact, 2 damaged (each differing file is named)",
    )
    p.add_argument("out_dir", type=Path, metavar="OUT", help="the -o directory of `plancc apply`")
    p.set_defaults(func=cmd_verify)


def _add_gguf_dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--gguf-dtype",
        choices=GGUF_DTYPES,
        default="f16",
        help="element type of the GGUF tensors (default f16; quantize with llama.cpp's "
        "llama-quantize)",
    )
    p.add_argument(
        "--gguf-pre",
        metavar="NAME",
        help="llama.cpp's pre-tokenizer name (tokenizer.ggml.pre) for a tokenizer whose "
        "check-text hash plancc does not know (default: found from that hash, as "
        "llama.cpp's converter does)",
    )


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write an apply result in another format: nemotron-nas (vLLM, transformers) or gguf",
        description="Read the model of an apply output (OUT/A) or of a model directory plancc "
        "wrote, and write it to DIR in the Nemotron-NAS (DeciLM) layout, for vLLM and "
        f"transformers with trust_remote_code, or as DIR/{GGUF_FILE} for llama.cpp. The "
        "source is only read; a model the format cannot express is refused with the rule "
        "and the fix, and nothing is written.",
        epilog="exit status: 0 written, 2 refused (the format cannot express the model, DIR "
        "exists and is not plancc's)\nexample: plancc export out/smollm2-mixed --format "
        "nemotron-nas -o out/smollm2-mixed-nas",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", type=Path, metavar="OUT_OR_A", help="apply output or model directory")
    p.add_argument("--format", required=True, choices=FORMATS[1:], help="the format to write")
    p.add_argument("-o", "--out", type=Path, required=True, metavar="DIR", help="new directory")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace DIR if it is a previous plancc output (anything else is refused)",
    )
    _add_gguf_dtype(p)
    p.set_defaults(func=cmd_export)


def cmd_eval(args: argparse.Namespace) -> int:
    from executor.evaluate import check_inputs, evaluate, render_table, results_json

    try:  # every argument first: a bad last one must not cost the first evaluation
        check_inputs(args.models, args.seqlen, args.limit, args.new_tokens)
        text = load_text(args.data, args.data_files)
    except (ValueError, FileNotFoundError, CorpusError) as exc:
        raise UsageError(str(exc)) from None
    device = resolve_device(args.device)
    results = []
    for path in args.models:
        print(f"plancc: evaluating {path} on {device}", file=sys.stderr)
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
                text=text,
            )
        )
    print(results_json(results) if args.json else render_table(results))
    return EXIT_OK


def _add_eval(sub: argparse._SubParsersAction) -> None:
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
        help=f"{', '.join(DATA_CHOICES)} (wikitext2/ptb/c4 through `datasets`), or a text file "
        "(default: builtin, Python's pydoc topics, always available)",
    )
    p.add_argument(
        "--data-files",
        nargs="+",
        metavar="FILE",
        help="read wikitext2/ptb/c4 from these local files (json/jsonl/parquet/csv/text) "
        "instead of the hub",
    )
    p.add_argument("--seqlen", type=int, default=512, help="window length (default 512)")
    p.add_argument("--limit", type=int, help="evaluate only the first N windows (quick runs)")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy sample length")
    add_device_argument(p, "where the models run")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=cmd_eval)
