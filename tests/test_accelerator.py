"""The engine on an accelerator (CUDA, ROCm or DCU through torch.cuda); skipped where there is none.

float32 on the device must give transformers' CPU greedy tokens; bfloat16 must run through the
same paths (paged cache, chunked prefill, preemption) and agree with float32 on the first tokens.
"""

import pytest
import torch

from optgptq.engine.llm import LLM
from optgptq.engine.sampling_params import SamplingParams
from tests.conftest import hf_greedy, random_prompt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no accelerator")


@pytest.mark.parametrize("name", ["llama-mha", "llama-gqa", "bloom"])
def test_float32_on_device_equals_transformers(tiny_models, name):
    torch.backends.cuda.matmul.allow_tf32 = False
    path = tiny_models[name]
    g = torch.Generator().manual_seed(21)
    prompts = [random_prompt(g, n) for n in (7, 33, 70)]
    llm = LLM(str(path), device="cuda", dtype="float32", num_blocks=64, block_size=16,
              max_num_batched_tokens=48)
    assert llm.engine.runner.kv_caches[0][0].is_cuda
    outs = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    for p, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(path, p, 16)


@pytest.mark.parametrize("name", ["llama-gqa", "bloom"])
def test_bfloat16_on_device_tracks_float32(tiny_models, name):
    path = str(tiny_models[name])
    g = torch.Generator().manual_seed(22)
    prompts = [random_prompt(g, n) for n in (12, 40)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    ref = LLM(path, device="cuda", dtype="float32", num_blocks=64).generate(prompts, params)
    low = LLM(path, device="cuda", dtype="bfloat16", num_blocks=64).generate(prompts, params)
    for a, b in zip(ref, low):
        assert a.token_ids[:2] == b.token_ids[:2]


def test_kv_pool_is_sized_from_the_engines_share_of_the_device(tiny_models):
    path = str(tiny_models["llama-gqa"])
    whole = LLM(path, device="cuda", kv_cache_memory_fraction=0.1).engine.runner
    blocks_whole = whole.num_blocks
    del whole
    torch.cuda.empty_cache()
    half = LLM(path, device="cuda", kv_cache_memory_fraction=0.1,
               accelerator_share=0.5).engine.runner
    free, total = torch.cuda.mem_get_info()
    assert half.num_blocks * half.bytes_per_block <= 0.1 * 0.5 * total
    assert 0.3 * blocks_whole < half.num_blocks < 0.7 * blocks_whole
