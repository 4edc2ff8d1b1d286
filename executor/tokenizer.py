"""The tokenizer of a model directory plancc wrote (the loader's, the GGUF vocabulary's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer of any model directory plancc wrote, never running its code.

    A sealed plancc config (`model_type` `plancc-<family>`, so stock model loaders
    refuse it) or a Nemotron-NAS one makes AutoTokenizer warn that it does not know
    the model type while it looks for a tokenizer class; the tokenizer files say
    which class to build, so that warning is noise here and is held back.
    """
    from transformers import AutoTokenizer
    from transformers.utils import logging

    previous = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    finally:
        logging.set_verbosity(previous)
