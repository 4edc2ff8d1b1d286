"""The plan language's grammar: `plan.lark` is the single source of syntax."""

from importlib.resources import files

GRAMMAR_PATH = files(__package__) / "plan.lark"


def grammar_text() -> str:
    """Return the text of `plan.lark`, wherever the package is installed."""
    return GRAMMAR_PATH.read_text(encoding="utf-8")
