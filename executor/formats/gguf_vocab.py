"""The tokenizer of a GGUF file, as llama.cpp's converter writes it.

llama.cpp tokenizes by itself, so the GGUF must carry the vocabulary, the BPE
merges, the special token ids, the chat template, and `tokenizer.ggml.pre`: the
name of the pre-tokenizer (the regex that splits text before BPE) that
llama.cpp must use. The converter (`convert_hf_to_gguf.py`,
`get_vocab_base_pre`) cannot read that regex from tokenizer.json; it encodes a
fixed check text and looks the hash of the ids up in a table of known
tokenizers. We do the same, with the entries of that table for the
byte-level BPE tokenizers of the Llama-layout models plancc writes; an unknown
hash is refused rather than guessed, because a wrong pre-tokenizer tokenizes
silently differently.

Only GPT-2-style byte-level BPE (SmolLM, Llama 3, Qwen2, Mistral-Nemo) is
written; SentencePiece vocabularies (Llama 2, Mistral 7B v0.x) are refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from executor.tokenizer import load_tokenizer

# llama.cpp's check text (conversion/base.py, `get_vocab_base_pre`, llama.cpp 0c1e57098).
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? "
    "'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
CHECK_TEXT_SHA256 = "a36179c1e2b1cfcfbfad1dc779addad2ffc778201e4cf0d538bddeafa2c526da"

# sha256(str(AutoTokenizer.encode(CHECK_TEXT))) -> llama.cpp pre-tokenizer name, copied
# from the same table (the hashes are llama.cpp's; only byte-level BPE entries of
# Llama-layout families are listed).
KNOWN_PRE_TOKENIZERS: dict[str, str] = {
    # HuggingFaceTB/SmolLM-135M (SmolLM and SmolLM2)
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    # meta-llama/Meta-Llama-3-8B
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    # Qwen/Qwen1.5-7B
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    # Qwen/Qwen3-Embedding-0.6B
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    # mistralai/Mistral-Nemo-Base-2407
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    # openai-community/gpt2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}

# gguf.TokenType values (kept as ints so this module imports without gguf).
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


class VocabError(ValueError):
    """The tokenizer cannot be written for llama.cpp: the message says why, `fix` what to do."""

    def __init__(self, message: str, fix: str = "use the original model's tokenizer files") -> None:
        super().__init__(message)
        self.fix = fix


@dataclass(frozen=True)
class Vocab:
    """Everything `tokenizer.ggml.*` needs, read before the GGUF file is opened."""

    tokens: list[str]
    token_types: list[int]
    pre: str
    special: Any  # gguf.SpecialVocab: merges, special ids, add_bos/eos, chat template
    chat_template: str | None


def tokenizer_kind_problem(a_dir: Path) -> str | None:
    """Why the tokenizer in `a_dir` is not a byte-level BPE one (None: it is)."""
    path = a_dir / "tokenizer.json"
    if not path.is_file():
        return f"{path} is missing: llama.cpp needs the tokenizer inside the GGUF file"
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{path} cannot be read ({exc})"
    model = spec.get("model") or {}
    text = json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
    if model.get("type") != "BPE" or '"ByteLevel"' not in text:
        return (
            f"{path} is a {model.get('type', 'unknown')} tokenizer without byte-level "
            "pre-tokenization (SentencePiece-style); only GPT-2-style byte-level BPE "
            "vocabularies are written to GGUF"
        )
    return None


def pre_tokenizer_hash(tokenizer: Any) -> str:
    """The converter's fingerprint of a tokenizer: sha256 of str(ids of CHECK_TEXT)."""
    ids = tokenizer.encode(CHECK_TEXT)
    return hashlib.sha256(str(ids).encode()).hexdigest()


def read_vocab(a_dir: Path, vocab_size: int, pre: str | None = None) -> Vocab:
    """The vocabulary of `a_dir` padded to `vocab_size` tokens, as the converter lists it.

    `pre` names llama.cpp's pre-tokenizer directly (for a tokenizer llama.cpp's table
    does not know, when you know which one it needs); None detects it by hash.
    Raises VocabError for a tokenizer that cannot be written.
    """
    import gguf

    problem = tokenizer_kind_problem(a_dir)
    if problem:
        raise VocabError(problem)
    tokenizer = load_tokenizer(a_dir)
    if pre is None:
        digest = pre_tokenizer_hash(tokenizer)
        pre = KNOWN_PRE_TOKENIZERS.get(digest)
        if pre is None:
            raise VocabError(
                f"the tokenizer in {a_dir} is not one llama.cpp knows (check-text hash "
                f"{digest}; known: {', '.join(sorted(set(KNOWN_PRE_TOKENIZERS.values())))})",
                "if you know which llama.cpp pre-tokenizer it needs, pass its name as "
                "tokenizer_pre (llama.cpp's `tokenizer.ggml.pre` values)",
            )
    vocab: dict[str, int] = tokenizer.get_vocab()
    if vocab and max(vocab.values()) >= vocab_size:
        raise VocabError(
            f"the tokenizer in {a_dir} has token id {max(vocab.values())}, but the model's "
            f"vocab_size is {vocab_size}; the tokenizer files do not belong to this model"
        )
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        token = reverse[i]
        if token in added:
            # llama.cpp assumes added tokens are pre-normalized (the converter does this).
            if i in decoder and not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            special = i in decoder and decoder[i].special
            types.append(CONTROL if special or _looks_special(token) else USER_DEFINED)
        else:
            types.append(NORMAL)
        tokens.append(token)
    special_vocab = gguf.SpecialVocab(a_dir, load_merges=True, n_vocab=vocab_size)
    if not special_vocab.merges:
        raise VocabError(f"{a_dir / 'tokenizer.json'} has no BPE merges; llama.cpp needs them")
    template = None
    if special_vocab.chat_template is None:
        jinja = a_dir / "chat_template.jinja"
        if jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
    return Vocab(tokens, types, pre, special_vocab, template)


def _looks_special(token: str) -> bool:
    """The converter's `does_token_look_special` for text tokens."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def add_vocab(writer: Any, vocab: Vocab) -> None:
    """Write the `tokenizer.ggml.*` keys (and the chat template) to a GGUFWriter."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    vocab.special.add_to_gguf(writer, quiet=True)
    if vocab.chat_template is not None:
        writer.add_chat_template(vocab.chat_template)
