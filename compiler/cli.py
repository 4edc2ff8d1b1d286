"""`plancc check`, `plancc fmt` and `plancc diff`: the compiler's commands.

They need no weights and no torch. `executor.cli` adds `apply`, `restore` and
`eval` to the same `plancc` program.

Exit status (all commands): 0 clean (warnings allowed) / no difference,
1 plan errors / would reformat / differences (or a plan with errors, for diff),
2 usage or I/O errors (and, for diff, a plan that does not parse).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compiler.check import CheckResult, check_text, resolve_anyway
from compiler.diagnostics import render_json, render_text, summary_line
from compiler.diff import diff_plans
from compiler.fmt import format_source
from compiler.resolve import ResolvedPlan
from compiler.targets import ANY, TARGET_NAMES, TARGETS

EXIT_OK, EXIT_PLAN, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C


class ArgumentParser(argparse.ArgumentParser):
    """argparse without abbreviated options: `--data` must never silently mean
    `--data-files`, and an option added later must not change what an old command
    line means. Subcommand parsers inherit the class (`add_subparsers`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


class UsageError(Exception):
    """Bad command line or unreadable input: exit status 2."""


def read_plan_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory, expected a .prn plan file") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from None


def checkpoint_facts(
    model_dir: Path, allow_pickle: bool = False, weights: bool = False
) -> dict[str, object]:
    """Facts of a real checkpoint (config.json + safetensors headers only; with
    `allow_pickle`, a pickle checkpoint's tensors read with torch). `weights` adds
    the weights digest, which reads every tensor once (then it is memoized)."""
    from compiler.checkpoint import CheckpointError, load_checkpoint_facts, weights_digest

    try:
        ck = load_checkpoint_facts(model_dir, allow_pickle=allow_pickle)
        digest = {"weights": weights_digest(ck.model_dir, ck.index)} if weights else {}
    except CheckpointError as exc:
        raise UsageError(str(exc)) from None
    return {"arch": ck.arch.name, **ck.facts, **digest}


def run_check(
    path: Path, model: Path | None, allow_pickle: bool = False, target: str = ANY
) -> CheckResult:
    """Read the plan once (I/O errors become usage errors, before any diagnostics)
    and check it: a plan given as `<(git show HEAD:plan.prn)` is a pipe, which a
    second read would find empty."""
    text = read_plan_text(path)
    # The weights are hashed only for a plan that states them (a safetensors source).
    states_weights = re.search(r'^\s*weights\s+"', text, re.MULTILINE) is not None
    real = (
        checkpoint_facts(model, allow_pickle, weights=states_weights and not allow_pickle)
        if model is not None
        else None
    )
    return check_text(text, base_dir=path.parent, checkpoint=real, target=target)


# ---- check ----------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    from compiler.report import render_report, report_json

    status = EXIT_OK
    for path in args.plans:
        result = run_check(path, args.model, args.allow_pickle, args.target)
        diags = list(result.diagnostics)
        if args.format == "json":
            if diags:
                print(render_json(diags, str(path)))
            if result.resolved is not None and not args.no_cost:
                print(json.dumps({"path": str(path), "report": report_json(result.resolved)}))
        else:
            if diags:
                print(render_text(diags, str(path), result.source))
                print()
            print(f"{path}: {summary_line(diags)}")
            if result.resolved is not None and not args.no_cost:
                print()
                print(render_report(result.resolved))
        if result.errors:
            status = EXIT_PLAN
    return status


# ---- fmt ------------------------------------------------------------------------------


def write_atomically(path: Path, text: str) -> None:
    """Write next to `path` and rename over it: a crash never leaves half a plan."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cmd_fmt(args: argparse.Namespace) -> int:
    status = EXIT_OK
    for path in args.files:
        text = read_plan_text(path)
        result = format_source(text)
        if result.text is None:  # refused: the file stays as it is
            print(render_text(list(result.diagnostics), str(path), text), file=sys.stderr)
            print(f"{path}: not formatted: {result.reason}", file=sys.stderr)
            status = max(status, EXIT_PLAN)
            continue
        formatted = result.text
        if formatted == text:
            continue
        if args.check:
            print(f"would reformat {path}")
            status = max(status, EXIT_PLAN)
        else:
            write_atomically(path, formatted)
            print(f"reformatted {path}")
    return status


# ---- diff -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _DiffSide:
    path: Path
    result: CheckResult
    resolved: ResolvedPlan


def _diff_side(path: Path) -> _DiffSide:
    """Check one plan and resolve it as far as it goes; a plan that does not parse,
    or names no model to resolve against, cannot be compared (exit 2)."""
    result = run_check(path, None)
    resolved = resolve_anyway(result)
    if resolved is None:
        print(render_text(result.errors, str(path), result.source), file=sys.stderr)
        what = "does not parse" if result.plan is None else "has no usable model block"
        raise UsageError(
            f"{path} {what}, so there is nothing to compare; `plancc check {path}` says why"
        )
    return _DiffSide(path, result, resolved)


def _not_checking(side: _DiffSide, other_clean: bool, is_new: bool) -> str:
    """The section after the difference that lists a plan's errors."""
    verb = "no longer checks" if is_new and other_clean else "does not check"
    errors = side.result.errors
    head = f"{side.path} {verb}: {summary_line(errors).removeprefix('found ')}"
    return head + "\n" + render_text(errors, str(side.path), side.result.source)


def cmd_diff(args: argparse.Namespace) -> int:
    old, new = _diff_side(args.old), _diff_side(args.new)
    differs, text = diff_plans(old.resolved, new.resolved)
    print(text)
    for side, other, is_new in ((old, new, False), (new, old, True)):
        if side.result.errors:
            print()
            print(_not_checking(side, other.result.ok, is_new))
    broken = not (old.result.ok and new.result.ok)
    return EXIT_PLAN if differs or broken else EXIT_OK


# ---- wiring ---------------------------------------------------------------------------


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register check, fmt and diff on a `plancc` subparser set."""
    p = sub.add_parser(
        "check",
        help="validate plans and print their cost report (no weights needed)",
        description="Validate plans against the language rules and the GQA/MoE invariants, "
        "then print the cost before → after: parameters, FLOPs/token, KV-cache bytes/token, "
        "a per-layer table, whether stock transformers can load the result and, per serving "
        "target, whether the result runs there or the first reason it does not. With "
        "--target, every rule of that target the plan breaks is an error at its statement.",
        epilog="exit status: 0 clean (warnings allowed), 1 plan errors (with --target: also "
        "a broken target rule), 2 usage or I/O errors\n"
        "targets:\n"
        + "".join(f"  {t.name:<9} {t.what} (--format {t.format})\n" for t in TARGETS.values())
        + "example: plancc check examples/smollm2-depth.prn --model ~/.cache/plancc/"
        "SmolLM2-135M-Instruct --target vllm",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("plans", nargs="+", type=Path, metavar="PLAN", help="plan files (.prn)")
    p.add_argument(
        "--model",
        type=Path,
        metavar="DIR",
        help="also verify the model block and fingerprint against this checkpoint "
        "(reads config.json and safetensors headers only)",
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="with --model: read a trusted pickle checkpoint (pytorch_model.bin, or sharded) "
        "with torch.load(weights_only=True) instead of refusing it",
    )
    p.add_argument("--format", choices=("text", "json"), default="text", help="output format")
    p.add_argument(
        "--target",
        choices=(*TARGET_NAMES, ANY),
        default=ANY,
        help="where the result must run: its rules become errors (P140-P146) located at "
        "the statements that break them; `any` (default): none, the report still lists "
        "every target",
    )
    p.add_argument("--no-cost", action="store_true", help="diagnostics only, no cost report")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser(
        "fmt",
        help="rewrite plans in canonical layout",
        description="Rewrite plans in canonical layout: header, then statements by kind and "
        "first layer; comments stay with their statements. Idempotent. A plan with syntax "
        "or header errors (P001-P011) is refused and left untouched.",
        epilog="exit status: 0 nothing to do / formatted, 1 --check found files to reformat "
        "or a file has syntax or header errors, 2 I/O errors",
    )
    p.add_argument("files", nargs="+", type=Path, metavar="FILE")
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if any would")
    p.set_defaults(func=cmd_fmt)

    p = sub.add_parser(
        "diff",
        help="semantic difference between two plans",
        description="Compare the models two plans describe, layer by layer (dropped/kept, "
        "KV groups, widths, experts, bundles), with the cost delta. Plans that mean the same "
        "model print `no difference` even when their text differs. A plan with errors is "
        "compared as far as it resolves (indices outside the model ignored, widths as "
        "written), and its errors are listed after the difference under `PLAN no longer "
        "checks` (or `does not check`).",
        epilog="exit status: 0 no difference and both plans check cleanly, 1 differences or "
        "a plan with errors, 2 a plan that does not parse (or has no usable model block), "
        "usage or I/O errors",
    )
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path)
    p.set_defaults(func=cmd_diff)


def run(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse argv and dispatch; usage errors print `plancc: error: ...` and exit 2."""
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `plancc check x | head`
        return EXIT_OK
    except KeyboardInterrupt:  # every command's staging is removed on the way out
        print(f"{parser.prog}: interrupted; no partial output was left", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:  # the boundary: an I/O failure is exit 2 with a message
        print(f"{parser.prog}: error: {describe_os_error('I/O error', exc)}", file=sys.stderr)
        return EXIT_USAGE


_FIXES = {
    errno.ENOSPC: "free space on that filesystem, or write elsewhere with -o",
    errno.EDQUOT: "free space (the disk quota is full), or write elsewhere with -o",
    errno.EACCES: "choose a location you can write with -o",
    errno.EPERM: "choose a location you can write with -o",
    errno.EROFS: "the filesystem is read-only; choose another location with -o",
    errno.ENOTDIR: "a component of the path is a file, not a directory; choose another -o",
    errno.ENOENT: "check the path",
    errno.EXDEV: "choose -o on the same filesystem as its parent directory",
}


def describe_os_error(what: str, exc: OSError, where: Path | None = None) -> str:
    """`what (path): reason; fix` for an OSError (the CLI prefixes `plancc: error:`).

    `where` names the path when the error itself does not (a failed write on an fd).
    """
    path = exc.filename if exc.filename is not None else (where or "?")
    reason = exc.strerror or str(exc) or type(exc).__name__
    fix = _FIXES.get(exc.errno or -1)
    return f"{what} ({path}): {reason}" + (f"; {fix}" if fix else "")
