"""The README as a user runs it: its commands, its command table and its links.

Every command in the README's ```bash blocks is either run here (the cheap ones:
no calibration, training, network or long runs) and must exit with 0, or with
the code its `# exit N` comment states, or it is listed in `NOT_RUN` with the
reason. A command in neither place fails the test, so a new README command is
never silently skipped. `plancc` and `plangen` run as `sys.executable -m
executor.cli` / `-m plangen` with the repository on PYTHONPATH, in a temporary
directory that sees the repository's `examples/`.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.paths import ROOT

README = ROOT / "README.md"
DEMO = Path("~/.cache/plancc/SmolLM2-135M-Instruct").expanduser()
PROGRAMS = {"plancc": ["executor.cli"], "plangen": ["plangen"]}

# Commands the test does not run, matched by their first words, with the reason.
NOT_RUN = {
    "bash scripts/setup.sh": "installs packages (network, minutes)",
    "bash scripts/test.sh": "runs the whole test suite (this test included)",
    ". .venv/bin/activate": "shell set-up; the test runs the CLIs through sys.executable",
    "plangen analyze": "calibration and reconstruction: about 7 minutes on 2 cores",
    "plancc check smol.prn": "needs the plan `plangen analyze` writes",
    "plancc apply smol.prn": "needs the plan `plangen analyze` writes",
    "plancc heal": "training: 15 to 25 minutes",
    "plancc eval": "a long run: 24 windows of 512 through the model twice",
}


def readme_commands() -> list[tuple[str, int]]:
    """(command, expected exit code) for every line of the README's ```bash blocks."""
    text = README.read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.splitlines():
            command, _, comment = line.partition("#")
            command = command.strip()
            if not command:
                continue
            expected = re.match(r"\s*exit (\d+)", comment)
            commands.append((command, int(expected.group(1)) if expected else 0))
    return commands


def not_run_reason(command: str) -> str | None:
    for prefix, reason in NOT_RUN.items():
        if command == prefix or command.startswith(prefix + " "):
            return reason
    return None


def argv_of(command: str, cwd: Path = ROOT) -> list[str]:
    words = []
    for word in shlex.split(command):
        word = os.path.expanduser(word)
        # The shell's globbing, relative to where the command runs.
        words += sorted(str(p.relative_to(cwd)) for p in cwd.glob(word)) if "*" in word else [word]
    if words[0] not in PROGRAMS:
        raise AssertionError(f"README command neither run nor in NOT_RUN: {command}")
    return [sys.executable, "-m", *PROGRAMS[words[0]], *words[1:]]


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def needs_demo(command: str) -> bool:
    # Commands naming the demo checkpoint, and those using a plan whose `source` is it.
    return "~/.cache/plancc" in command or command.split()[:2] in (
        ["plancc", "apply"],
        ["plancc", "verify"],
        ["plancc", "restore"],
        ["plangen", "fetch-demo"],
    )


def test_readme_commands_are_all_accounted_for():
    commands = readme_commands()
    assert len(commands) >= 10, commands
    for command, _ in commands:
        if not_run_reason(command) is None:
            argv_of(command)  # raises for a command that is neither run nor allow-listed
    # Every allow-list entry still names a README command (no stale exemptions).
    for prefix in NOT_RUN:
        assert any(c == prefix or c.startswith(prefix + " ") for c, _ in commands), prefix


def _run_readme_commands(tmp_path: Path, demo: bool) -> list[str]:
    """Run the README's runnable commands that need the demo checkpoint (`demo`) or
    not, in README order (apply before verify and restore); return those run."""
    (tmp_path / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    ran = []
    for command, expected in readme_commands():
        if not_run_reason(command) is not None or needs_demo(command) != demo:
            continue
        result = run(argv_of(command, tmp_path), tmp_path)
        assert result.returncode == expected, (
            f"{command}: exit {result.returncode}, README says {expected}\n"
            f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        )
        ran.append(command)
    return ran


def test_readme_commands_run(tmp_path):
    """The cheap commands that need no checkpoint (fmt, diff, check)."""
    assert _run_readme_commands(tmp_path, demo=False), "no README command ran"


@pytest.mark.model
def test_readme_demo_commands_run(smollm2_dir, tmp_path):
    """The cheap commands on the demo checkpoint, at the path the README names."""
    if smollm2_dir.resolve() != DEMO.resolve():
        pytest.skip(f"the README names {DEMO}; the demo checkpoint is at {smollm2_dir}")
    assert _run_readme_commands(tmp_path, demo=True), "no README demo command ran"


def help_commands(program: str) -> list[str]:
    out = run([sys.executable, "-m", *PROGRAMS[program], "--help"], ROOT)
    assert out.returncode == 0, out.stderr
    # argparse lists subcommands as "    name   help" (or "    name" alone when long).
    section = out.stdout.split("COMMAND\n", 1)[1]
    return re.findall(r"^ {4}([a-z][a-z-]*)(?: |$)", section, flags=re.M)


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_command_table_matches_help(program):
    """The README's command table lists exactly the commands `--help` lists, and
    every command's own `--help` exits 0."""
    table = re.findall(
        rf"^\| `{program} ([a-z-]+)` \|", README.read_text(encoding="utf-8"), flags=re.M
    )
    listed = help_commands(program)
    assert listed, f"{program} --help lists no commands"
    assert sorted(table) == sorted(listed)
    for name in listed:
        out = run([sys.executable, "-m", *PROGRAMS[program], name, "--help"], ROOT)
        assert out.returncode == 0, (name, out.stderr)


def markdown_files() -> list[Path]:
    return [
        README,
        *sorted((ROOT / "docs").glob("*.md")),
        ROOT / "benchmarks" / "README.md",
        *sorted((ROOT / "benchmarks" / "results").glob("*.md")),
    ]


def test_relative_links_exist():
    """Every relative link in README.md, docs/ and benchmarks/ points at a file
    or folder of the repository (so it works on GitHub)."""
    broken = []
    assert (ROOT / "docs").is_dir()
    for md in markdown_files():
        text = md.read_text(encoding="utf-8")
        text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)  # code is not links
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = target.split("#", 1)[0]
            if not (md.parent / path).exists():
                broken.append(f"{md.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_readme_has_no_paths_a_user_lacks():
    text = README.read_text(encoding="utf-8")
    for bad in ("../shared", "/tmp/", "issue "):
        assert bad not in text, bad
    # The set-up and test commands, exactly as CI runs them.
    assert "bash scripts/setup.sh" in text
    assert "bash scripts/test.sh" in text
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
