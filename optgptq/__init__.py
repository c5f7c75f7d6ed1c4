"""optgptq: an Opt-GPTQ inference stack (paged KV engine, kernels, compression, serving).

The offline API: ``from optgptq import LLM, SamplingParams``.
"""

from optgptq.engine.llm import LLM
from optgptq.engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
