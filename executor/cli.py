"""The `plancc` program: the compiler's commands (check, fmt, diff), the
executor's (apply, export, restore, verify, eval, from `executor.commands`), and
those other packages register under the `plancc.commands` entry-point group
(`plancc heal`, from the top-level `heal` package: the executor never imports it,
so the layering stays one-way and heal stays an optional extra)."""

from __future__ import annotations

import argparse
from importlib.metadata import entry_points

from compiler import cli as compiler_cli
from executor import commands as executor_commands

# Each entry point names a function that adds one subcommand to `plancc`'s subparsers
# (pyproject.toml: `[project.entry-points."plancc.commands"]`).
PLUGIN_GROUP = "plancc.commands"


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
    for plugin in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        plugin.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return compiler_cli.run(build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
