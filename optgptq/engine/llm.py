"""``LLM``: the offline batch API. Queue every prompt, step the engine until all finish."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import fields

from tqdm import tqdm

from optgptq.config import EngineConfig
from optgptq.engine.llm_engine import LLMEngine
from optgptq.engine.outputs import RequestOutput
from optgptq.engine.sampling_params import SamplingParams


class LLM:
    """``LLM("smollm2").generate(["Hello"], SamplingParams(max_tokens=8))``.

    Keyword arguments are :class:`~optgptq.config.EngineConfig` fields.
    """

    def __init__(self, model: str = "smollm2", **engine_kwargs) -> None:
        known = {f.name for f in fields(EngineConfig)}
        unknown = sorted(set(engine_kwargs) - known)
        if unknown:
            raise ValueError(f"unknown engine setting(s): {', '.join(unknown)}")
        self.engine = LLMEngine(EngineConfig(model=model, **engine_kwargs))
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: str | list[int] | Seq[str | list[int]],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Final outputs in prompt order (a prompt of ``n`` choices: its ``n`` outputs, in
        choice order). A prompt is a string or a list of token ids."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts")
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(self.engine.add_request(prompt, p, stream=False))
        except ValueError:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        done: dict[tuple[str, int], RequestOutput] = {}
        failed: list[tuple[str, str]] = []
        with tqdm(total=sum(p.n for p in params), disable=not use_tqdm, desc="generate") as bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id, out.index] = out
                        bar.update(1)
                failed += self.engine.take_failures()
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(ids)} requests failed (prompt "
                               f"{ids.index(failed[0][0])}: {failed[0][1]})")
        return [done[rid, j] for rid, p in zip(ids, params) for j in range(p.n)]

    def chat_prompt(self, message: str) -> list[int]:
        """Token ids of one user message under the model's chat template."""
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], add_generation_prompt=True, tokenize=True,
            return_dict=True)["input_ids"]
