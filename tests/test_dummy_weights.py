"""``load_format: dummy`` (random weights from a config alone) and ``skip_tokenizer_init``:
what the GPU benchmarks of full-size architectures run on, since no weights can be downloaded."""

from __future__ import annotations

import json
import shutil

import pytest

from optgptq.engine.llm import LLM
from optgptq.engine.sampling_params import SamplingParams


def _config_only(src, dst, quantization: dict | None = None):
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    if quantization:
        cfg["quantization_config"] = quantization
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("quantized", [False, True])
def test_dummy_weights_generate_from_a_config_alone(tiny_models, tmp_path, quantized):
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False,
          "sym": False, "checkpoint_format": "gptq"} if quantized else None
    folder = _config_only(tiny_models["llama-gqa"], tmp_path / "cfg", qc)
    llm = LLM(str(folder), device="cpu", load_format="dummy", skip_tokenizer_init=True,
              num_blocks=32)
    model = llm.engine.runner.model
    # GPTQ layers, swapped for the native CPU kernel's layout where it is built
    linears = [n for n, m in model.named_modules()
               if type(m).__name__ in ("GPTQLinear", "CPUGPTQLinear")]
    assert bool(linears) == quantized
    weights = [p for p in model.parameters() if p.dim() == 2]
    assert all(p.std() > 0.01 for p in weights)         # random, not zeros
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    outs = llm.generate([[5, 9, 2, 7], [11, 3]], params)
    assert [len(o.token_ids) for o in outs] == [6, 6] and all(o.text == "" for o in outs)
    # the same prompt alone gives the same greedy tokens: the random weights are deterministic
    again = LLM(str(folder), device="cpu", load_format="dummy", skip_tokenizer_init=True,
                num_blocks=32).generate([[5, 9, 2, 7]], params)
    assert again[0].token_ids == outs[0].token_ids


def test_without_tokenizer_text_prompts_and_stop_strings_are_rejected(tiny_models, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_models["llama-mha"], folder)
    llm = LLM(str(folder), device="cpu", skip_tokenizer_init=True, num_blocks=16)
    with pytest.raises(ValueError, match="without a tokenizer"):
        llm.generate("hello")
    with pytest.raises(ValueError, match="stop strings"):
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2, stop=["x"]))
    ref = LLM(str(folder), device="cpu", num_blocks=16)
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    assert (llm.generate([[4, 8, 15]], params)[0].token_ids
            == ref.generate([[4, 8, 15]], params)[0].token_ids)


def test_bad_load_format_is_named():
    with pytest.raises(ValueError, match="load_format"):
        LLM("smollm2", device="cpu", load_format="pickle")
