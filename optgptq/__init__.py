"""optgptq: an Opt-GPTQ inference stack (paged KV engine, kernels, compression, serving).

The offline API: ``from optgptq import LLM, SamplingParams``. ``LLM`` is imported on first use,
so that processes which only serve or relay (no model of their own) never import torch.
"""

from optgptq.engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    if name == "LLM":
        from optgptq.engine.llm import LLM

        return LLM
    raise AttributeError(f"module 'optgptq' has no attribute {name!r}")
