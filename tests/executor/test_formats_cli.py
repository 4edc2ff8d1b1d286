"""`plancc apply --format gguf` and `plancc export --format gguf` through the CLI.

The GGUF writer itself is tested in tests/executor/test_gguf.py (structure, llama.cpp runs);
here: the file lands beside A and is recorded (so `verify` covers it), export
writes the same bytes from an existing result, and a result llama.cpp cannot
run is refused before anything is written, with the target table's rule.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from executor.cli import main
from tests.helpers.models import bpe_tokenizer, make_tiny_model
from tests.helpers.outputs import read_json
from tests.helpers.plans import write_plan

HETERO = "mlp layers 0 width 40\nmlp layers 2 width 72\n"
GGUF = ["--format", "gguf", "--gguf-dtype", "f32", "--gguf-pre", "gpt-2"]


def _model(tmp_path: Path, family: str = "llama") -> Path:
    return bpe_tokenizer(make_tiny_model(tmp_path, family, num_hidden_layers=3, vocab_size=320))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_apply_writes_a_gguf_beside_a_and_export_writes_the_same_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import gguf

    model = _model(tmp_path)
    out = tmp_path / "out"
    assert main(["apply", str(write_plan(tmp_path, model, HETERO)), "-o", str(out), *GGUF]) == 0
    assert f"GGUF (f32): {out / 'model.gguf'}" in capsys.readouterr().out
    manifest = read_json(out / "A" / "manifest.json")
    assert manifest["gguf"] == {"file": "model.gguf", "dtype": "f32"}
    assert manifest["files"]["model.gguf"] == _sha(out / "model.gguf")
    reader = gguf.GGUFReader(out / "model.gguf")
    assert reader.fields["general.architecture"].contents() == "deci"
    assert reader.fields["deci.feed_forward_length"].contents() == [40, 96, 72]
    assert main(["verify", str(out)]) == 0
    exported = tmp_path / "exported"
    assert main(["export", str(out), "-o", str(exported), *GGUF]) == 0
    assert _sha(exported / "model.gguf") == _sha(out / "model.gguf")


@pytest.mark.parametrize(
    ("family", "why"),
    [
        ("qwen2", "cannot take `qwen2` results"),
        ("qwen2_moe", "`qwen2_moe` has mixture-of-experts layers"),
    ],
)
def test_a_result_llama_cpp_cannot_run_is_refused_before_writing(
    family: str, why: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _model(tmp_path, family)
    out = tmp_path / "out"
    plan = write_plan(tmp_path, model, "drop layers 1\n")
    assert main(["apply", str(plan), "-o", str(out), *GGUF]) == 2
    err = capsys.readouterr().err
    assert why in err and "nothing was written" in err and "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
