"""CUDA graphs of decode steps (optgptq/engine/cuda_graphs.py): buckets on any machine; on an
accelerator, graph replays must give the eager engine's tokens exactly (float32)."""

from __future__ import annotations

import pytest
import torch

from optgptq.engine import cuda_graphs
from optgptq.engine.llm import LLM
from optgptq.engine.sampling_params import SamplingParams
from tests.conftest import random_prompt
from tests.test_gptq_format import write_gptq_twins


def test_buckets_cover_every_batch_size():
    assert cuda_graphs.bucket_sizes(1) == [1]
    assert cuda_graphs.bucket_sizes(6) == [1, 2, 4, 6]
    assert cuda_graphs.bucket_sizes(20) == [1, 2, 4, 8, 16, 20]
    sizes = cuda_graphs.bucket_sizes(256)
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-1] == 256 and len(sizes) == 35


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no accelerator")
@pytest.mark.parametrize("name", ["llama-gqa", "bloom", "gptq"])
def test_graph_replays_equal_eager_steps(tiny_models, tmp_path, monkeypatch, name):
    torch.backends.cuda.matmul.allow_tf32 = False
    path = (write_gptq_twins(tiny_models["llama-gqa"], tmp_path, 4, 32)[0] if name == "gptq"
            else tiny_models[name])
    replays = []
    run = cuda_graphs.DecodeGraphs.run
    monkeypatch.setattr(cuda_graphs.DecodeGraphs, "run",
                        lambda self, *a: replays.append(a[0].shape[0]) or run(self, *a))
    g = torch.Generator().manual_seed(31)
    prompts = [random_prompt(g, n) for n in (5, 19, 33, 8, 61, 2, 40, 17, 26, 11, 3)]
    params = [SamplingParams(max_tokens=4 + 3 * i, temperature=0, ignore_eos=True)
              for i in range(len(prompts))]   # the batch shrinks as requests finish
    kw = dict(device="cuda", dtype="float32", num_blocks=96, max_num_seqs=12,
              max_num_batched_tokens=64)
    eager = LLM(str(path), enforce_eager=True, **kw).generate(prompts, params)
    graphed = LLM(str(path), **kw).generate(prompts, params)
    assert [o.token_ids for o in graphed] == [o.token_ids for o in eager]
    assert len(set(replays)) >= 5     # many batch sizes replayed, padded into their buckets
