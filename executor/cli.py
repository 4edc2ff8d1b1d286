"""The `plancc` program: the compiler's commands (check, fmt, diff) plus the
executor's (apply, restore, eval, from `executor.commands`)."""

from __future__ import annotations

import argparse

from compiler import cli as compiler_cli
from executor import commands as executor_commands


def build_parser() -> argparse.ArgumentParser:
    parser = compiler_cli.ArgumentParser(
        prog="plancc",
        description="plancc: compile, check and apply declarative pruning plans (.prn) for "
        "large language models.",
        epilog="Start with `plancc check PLAN`; see `plancc COMMAND --help` for each command.",
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    compiler_cli.add_commands(sub)
    executor_commands.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return compiler_cli.run(build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
