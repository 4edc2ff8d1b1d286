"""The unseen evaluation texts are rebuilt byte for byte from what a machine has."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from tests.helpers.paths import BENCHMARKS

SCRIPT = BENCHMARKS / "unseen_texts.py"
spec = importlib.util.spec_from_file_location("unseen_texts", SCRIPT)
assert spec is not None and spec.loader is not None
unseen_texts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(unseen_texts)


def test_licenses_are_cat_in_name_order_following_symlinks(tmp_path: Path) -> None:
    (tmp_path / "GPL-3").write_bytes(b"gpl three\n")
    (tmp_path / "Apache-2.0").write_bytes(b"apache\n")
    os.symlink(tmp_path / "GPL-3", tmp_path / "GPL")
    (tmp_path / "subdir").mkdir()
    assert unseen_texts.licenses_text(tmp_path) == b"apache\ngpl three\ngpl three\n"


def test_wheels_keep_long_bodies_in_path_order(tmp_path: Path) -> None:
    def dist(name: str, body: str) -> None:
        d = tmp_path / f"{name}.dist-info"
        d.mkdir()
        (d / "METADATA").write_text(f"Name: {name}\nVersion: 1\n\n{body}", encoding="utf-8")

    long_b, long_a = "b" * (unseen_texts.MIN_BODY + 1), "a\n\n" * 1000 + "end"
    dist("zeta", long_b)
    dist("alpha", long_a)
    dist("short", "x" * unseen_texts.MIN_BODY)  # not over the bound: left out
    assert unseen_texts.wheels_text(tmp_path) == long_a + "\n\n" + long_b


def test_wheels_leave_out_plancc_whose_description_is_the_changing_readme(tmp_path: Path) -> None:
    for name, dist in (("plancc", "plancc-0.1.0"), ("Other_Pkg", "other_pkg-2.0")):
        d = tmp_path / f"{dist}.dist-info"
        d.mkdir()
        body = name[0] * (unseen_texts.MIN_BODY + 1)
        (d / "METADATA").write_text(f"Metadata-Version: 2.4\nName: {name}\n\n{body}", "utf-8")
    assert unseen_texts.wheels_text(tmp_path) == "O" * (unseen_texts.MIN_BODY + 1)
