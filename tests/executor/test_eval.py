"""The corpus protocol and `plancc eval`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from compiler.corpus import (
    CorpusError,
    TokenPools,
    builtin_text,
    load_text,
    windows,
)
from tests.helpers.paths import EXAMPLES


def test_builtin_corpus_is_pydoc_topics_in_key_order() -> None:
    from pydoc_data.topics import topics

    text = builtin_text()
    keys = sorted(topics)
    assert text.startswith(topics[keys[0]]) and text.endswith(topics[keys[-1]])
    assert len(text) == sum(len(topics[k]) for k in keys) + 2 * (len(keys) - 1)


def test_split_and_windows() -> None:
    ids = list(range(1000))
    pools = TokenPools.split(ids, "x")
    assert pools.calibration == list(range(600)) and pools.evaluation == list(range(600, 1000))
    chunks = windows(pools.evaluation, 128)
    assert [c[0] for c in chunks] == [600, 728, 856]  # non-overlapping, short tail dropped
    assert all(len(c) == 128 for c in chunks)
    assert len(windows(pools.evaluation, 128, limit=2)) == 2
    with pytest.raises(CorpusError):
        windows(ids, 1)


def test_wikitext2_and_ptb_through_datasets_with_local_files(tmp_path: Path) -> None:
    wiki = tmp_path / "wiki.jsonl"
    wiki.write_text("\n".join(json.dumps({"text": t}) for t in (" = Title = ", "", " body .")))
    assert load_text("wikitext2", data_files=[str(wiki)]) == " = Title = \n\n\n\n body ."
    ptb = tmp_path / "ptb.csv"
    ptb.write_text("sentence\nthe cat sat\na dog ran\n")
    assert load_text("ptb", data_files=str(ptb)) == "the cat sat a dog ran"
    c4 = tmp_path / "c4-validation.00000-of-00008.json"
    c4.write_text('{"text": "first page", "url": "a"}\n{"text": "second page", "url": "b"}\n')
    assert load_text("c4", data_files=str(c4)) == "first page\n\nsecond page"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"words": "x"}) + "\n")
    with pytest.raises(CorpusError, match="no column 'text'"):
        load_text("wikitext2", data_files=[str(bad)])


def test_local_text_file_and_errors(tmp_path: Path) -> None:
    f = tmp_path / "corpus.txt"
    f.write_text("hello world", encoding="utf-8")
    assert load_text(str(f)) == "hello world"
    with pytest.raises(CorpusError, match="neither a built-in corpus"):
        load_text(str(tmp_path / "missing.txt"))
    offline = CorpusError
    with pytest.raises(offline, match="use --data builtin"):

        def no_network(*args: object, **kwargs: object) -> None:
            raise ConnectionError("no network")

        load_text("wikitext2", load_dataset=no_network)


def test_perplexity_matches_transformers_loss(tiny_model) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from executor.evaluate import perplexity

    model = AutoModelForCausalLM.from_pretrained(tiny_model("llama"), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randint(0, 128, (16,), generator=g).tolist() for _ in range(3)]
    with torch.no_grad():
        losses = [float(model(torch.tensor([c]), labels=torch.tensor([c])).loss) for c in chunks]
    expected = math.exp(sum(losses) / len(losses))  # equal window lengths: mean of means
    assert perplexity(model, chunks, "cpu", progress=False) == pytest.approx(expected, rel=1e-6)


@pytest.mark.model
@pytest.mark.slow
def test_eval_cli_on_smollm2(smollm2_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from executor.cli import main

    code = main(["eval", str(smollm2_dir), "--limit", "2", "--new-tokens", "4", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    [r] = report["results"]
    assert r["params"] == 134_515_008
    assert r["windows"] == 2 and r["eval_tokens"] == 2 * 511
    assert 5 < r["perplexity"] < 40  # SmolLM2 on Python's docs: about 16
    assert r["sample"] and r["tokens_per_s"] > 0


def test_eval_cli_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from executor.cli import main

    assert main(["eval", str(tmp_path)]) == 2
    assert "holds no config.json" in capsys.readouterr().err


@pytest.mark.model
@pytest.mark.slow
def test_eval_compares_original_and_pruned_smollm2(
    smollm2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """apply → eval end to end: the pruned model's row has the plan's parameter count."""
    from executor.cli import main

    out = tmp_path / "depth"
    plan = EXAMPLES / "smollm2-depth.prn"
    assert main(["apply", str(plan), "--model", str(smollm2_dir), "-o", str(out)]) == 0
    capsys.readouterr()
    argv = ["eval", str(smollm2_dir), str(out), "--limit", "1", "--new-tokens", "2", "--json"]
    assert main(argv) == 0
    original, pruned = json.loads(capsys.readouterr().out)["results"]
    assert (original["params"], pruned["params"]) == (134_515_008, 113_274_432)
    assert pruned["model"] == str(out) and pruned["windows"] == original["windows"] == 1
    assert math.isfinite(pruned["perplexity"]) and pruned["perplexity"] > original["perplexity"]


def test_eval_checks_every_argument_before_evaluating(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A typo in the last model (or a bad option) is refused before the first model is
    loaded: nothing is evaluated, and every bad path is named at once."""
    import executor.evaluate
    from executor.cli import main
    from tests.helpers.models import make_tiny_model

    def must_not_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(executor.evaluate, "load_model", must_not_load)
    model = make_tiny_model(tmp_path, "llama")
    assert main(["eval", str(model), str(tmp_path / "typo"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'typo'} holds no config.json" in err
    assert f"{tmp_path / 'out'} holds no config.json" in err
    for bad, why in [
        (["--limit", "0"], "--limit 0"),
        (["--seqlen", "1"], "--seqlen 1"),
        (["--new-tokens", "0"], "--new-tokens 0"),
        (["--data", str(tmp_path / "nope.txt")], "neither a built-in corpus"),
    ]:
        assert main(["eval", str(model), *bad]) == 2
        assert why in capsys.readouterr().err


def test_decode_speed_is_the_median_of_timed_runs_after_an_untimed_warm_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """tokens/s times `repeats` generates after one untimed warm-up and takes their
    median: a slow first call (lazy initialization) or one stray slow run does not
    decide the figure."""
    import torch

    import executor.evaluate as ev

    durations = iter([100.0, 1.0, 50.0, 2.0])  # warm-up (untimed), then three timed runs
    clock = {"now": 0.0}

    class Tokenizer:
        pad_token_id = 0
        eos_token_id = 2

        def __call__(self, text: str, return_tensors: str) -> Any:
            class Batch(dict):  # type: ignore[type-arg]
                def to(self, device: str) -> Any:
                    return self

            return Batch(input_ids=torch.tensor([[5, 6, 7]]))

        def decode(self, ids: Any, skip_special_tokens: bool) -> str:
            return " ".join(str(int(i)) for i in ids)

    class Model:
        calls = 0

        def generate(self, input_ids: Any, max_new_tokens: int, **kwargs: Any) -> Any:
            Model.calls += 1
            clock["now"] += next(durations)
            return torch.cat([input_ids, torch.full((1, max_new_tokens), 9)], dim=1)

    monkeypatch.setattr(ev.time, "perf_counter", lambda: clock["now"])
    sample, speed = ev.greedy_sample(Model(), Tokenizer(), "cpu", new_tokens=4)
    assert Model.calls == 4
    assert sample == "9 9 9 9"
    assert speed == pytest.approx(4 / 2.0)  # median of 4/1, 4/50, 4/2
