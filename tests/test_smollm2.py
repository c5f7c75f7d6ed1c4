"""The embedded default model: conversion, greedy equality with transformers, the CLI."""

import json
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from optgptq.engine.llm import LLM
from optgptq.engine.sampling_params import SamplingParams
from tests.conftest import hf_greedy

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue, and then list three colours of the rainbow.",
    "Hi",
]


def test_default_model_folder_is_a_standard_hf_folder(smollm2_path):
    cfg = json.loads((smollm2_path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_key_value_heads"] == 3
    tok = AutoTokenizer.from_pretrained(str(smollm2_path))
    assert tok.chat_template and (smollm2_path / "model.safetensors").is_file()


def test_shipped_tokenizer_is_the_default_models(smollm2_path):
    from optgptq.models.hub import default_tokenizer_path

    shipped = AutoTokenizer.from_pretrained(str(default_tokenizer_path()))
    model = AutoTokenizer.from_pretrained(str(smollm2_path))
    assert len(shipped) == len(model) and shipped.special_tokens_map == model.special_tokens_map
    for text in PROMPTS + ["<|im_start|>user\nnaïve café 東京 🙂<|im_end|>", "  spaces\t\n"]:
        assert shipped.encode(text) == model.encode(text)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[0]}]
    assert shipped.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        model.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


@pytest.mark.slow
def test_smollm2_batched_greedy_equals_transformers(smollm2_path):
    llm = LLM("smollm2", device="cpu")
    prompts = [llm.chat_prompt(p) for p in PROMPTS]
    outs = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    for p, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(smollm2_path, p, 24)
    assert "Paris" in outs[0].text


@pytest.mark.slow
def test_cli_generate_and_errors():
    run = lambda *a: subprocess.run([sys.executable, "-m", "optgptq.cli", "generate", *a],
                                    capture_output=True, text=True, timeout=300)
    ok = run("--model", "smollm2", "--chat", "--prompt", PROMPTS[0], "--max-tokens", "12", "--json")
    assert ok.returncode == 0, ok.stderr
    line = json.loads(ok.stdout.strip().splitlines()[-1])
    assert "Paris" in line["text"]
    bad = run("--model", "/nonexistent/model", "--prompt", "x")
    assert bad.returncode == 2 and "no model hub access" in bad.stderr
    bad = run("--prompt", "x", "--top-p", "2")
    assert bad.returncode == 2 and "top_p" in bad.stderr
