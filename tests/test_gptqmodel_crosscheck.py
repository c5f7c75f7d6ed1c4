"""Cross-check with the maintained GPTQ library: gptqmodel loads our checkpoint of a tiny model
and computes the logits our dequantized weights give (to its bfloat16 kernel's rounding), and
the greedy tokens the engine gives; where optimum is installed too, transformers'
``AutoModelForCausalLM`` loads it through gptqmodel and agrees as well.

gptqmodel runs in a subprocess (it patches transformers and logs on import). The test is
skipped, saying why, where gptqmodel is not installed (``pip install --no-deps
gptqmodel==7.6.0`` plus its runtime dependencies, see README.md).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from optgptq.compress.quant.checkpoint import load_dequantized, save_checkpoint
from optgptq.compress.quant.pipeline import quantize_model
from optgptq.compress.quant.quantizer import QuantSpec
from optgptq.engine.llm import LLM
from optgptq.engine.sampling_params import SamplingParams

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None,
                       reason="gptqmodel is not installed (pip install --no-deps "
                              "gptqmodel==7.6.0 and its dependencies; see README.md)"),
]

_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from gptqmodel import GPTQModel
    path, ids, steps = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    model = GPTQModel.load(path, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
        tokens = list(ids)
        for _ in range(steps):
            tokens.append(int(model(input_ids=torch.tensor([tokens])).logits[0, -1].argmax()))
    out = {"logits": logits.tolist(), "greedy": tokens[len(ids):]}
    try:
        import optimum  # transformers' own GPTQ path needs it
    except ImportError:
        optimum = None
    if optimum is not None:
        from transformers import AutoModelForCausalLM
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16, device_map="cpu")
        with torch.no_grad():
            out["hf_logits"] = hf(torch.tensor([ids])).logits[0].float().tolist()
    print(json.dumps(out))
""")


@pytest.mark.parametrize("act_order", [False, True])
def test_gptqmodel_loads_our_checkpoint(tiny_models, tmp_path, act_order):
    src = tiny_models["llama-mha"]            # 64 / 128 features: every kernel's shapes
    g = torch.Generator().manual_seed(9)
    calib = torch.randint(100, 49152, (8, 64), generator=g)
    spec = QuantSpec(4, 32, sym=True, desc_act=act_order, mse=False)
    qm = quantize_model(src, spec, "gptq", calib, progress=False)
    out = save_checkpoint(qm, src, tmp_path / "q", dtype=torch.float32)
    prompt = torch.randint(100, 49152, (12,), generator=g).tolist()
    env = dict(os.environ, GPTQMODEL_CPU_WORKERS="2")
    done = subprocess.run([sys.executable, "-c", _SCRIPT, str(out), json.dumps(prompt), "6"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    with torch.no_grad():
        ours = load_dequantized(out)(torch.tensor([prompt])).logits[0]
    # gptqmodel's CPU kernel (TorchFusedLinear) keeps scales and zeros in bfloat16: agreement
    # to bfloat16 rounding (relative error well under 2%). A zero-point, g_idx or packing
    # mistake moves weights by whole quantization steps (tens of percent).
    for key in ("logits", "hf_logits"):   # hf_logits: transformers (float16) via gptqmodel
        if key in theirs:
            rel = (torch.tensor(theirs[key]) - ours).norm() / ours.norm()
            assert rel < 0.02, (key, float(rel))
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    engine = LLM(str(out), device="cpu").generate([prompt], params)[0].token_ids
    assert engine == theirs["greedy"]
