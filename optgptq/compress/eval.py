"""Evaluate a model folder: perplexity on a text, weight bytes, KV-cache bytes per token.

Perplexity is the Hugging Face sliding-window recipe: windows of ``window`` tokens start every
``stride`` tokens; each window predicts only the tokens the previous window did not (the first
window scores all its tokens but the first), with the rest as context. ``stride == window`` gives
disjoint windows (the GPTQ paper's setting); a smaller stride gives every scored token more
context. The text is tokenized without special tokens; ``max_tokens`` keeps its first tokens.

The model runs through transformers in float32 on the CPU: a float folder as it is, a GPTQ
checkpoint dequantized by :func:`optgptq.compress.quant.checkpoint.load_dequantized` — exactly the
weights this project's engine computes with — so no GPTQ kernel library is needed. A method that
also quantizes activations (DGQ's A8W4) runs its own layers instead, through the kernels' CPU
references (:func:`optgptq.compress.quant.checkpoint.load_for_eval`), so its perplexity includes
the INT8 activations.

The held-out estimate ``optgptq convert`` and ``optgptq quantize`` print, and their warning:
both commands draw ``--check-samples`` windows of calibration text that the fitting never sees
(:func:`optgptq.compress.calib.load_calibration_split`: the tail of a text source, or extra
samples of the ``generated`` source) and compute the perplexity of the model on them before
and after compressing it, as disjoint windows (:func:`check_perplexity`). It costs two forward
passes over the check windows. The estimate is cheap, not exact: it is measured on the
calibration source's kind of text, so it tracks, but does not replace, a perplexity on
held-out text of the domain the model will serve (``optgptq eval``). When perplexity rises by
more than ``--warn-above`` (relative, default ``WARN_ABOVE``) a warning is printed: at the 10%
default, 4-bit GPTQ with the default flags passes on SmolLM2 and a GQA conversion that damages
the model (3 -> 1 K/V heads without recovery) does not.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm
from transformers import AutoConfig, AutoTokenizer

from optgptq.compress.quant.checkpoint import load_for_eval

CHECK_SAMPLES = 8
WARN_ABOVE = 0.10


@dataclass
class EvalResult:
    perplexity: float
    tokens_scored: int
    window: int
    stride: int
    weight_bytes: int
    kv_bytes_per_token: int

    def to_dict(self) -> dict:
        return asdict(self)


def weight_bytes(path: Path) -> int:
    """Bytes of all stored tensors (tied copies are stored, and counted, once)."""
    total = 0
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                s = f.get_slice(key)
                total += math.prod(s.get_shape()) * _dtype_bytes(s.get_dtype())
    return total


def _dtype_bytes(name: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2,
            "U8": 1, "I8": 1, "BOOL": 1}[name]


def kv_bytes_per_token(path: Path, dtype_bytes: int = 2) -> int:
    """K and V of one token over all layers, at ``dtype_bytes`` per element (float16: 2)."""
    c = AutoConfig.from_pretrained(str(path), local_files_only=True)
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return 2 * c.num_hidden_layers * kv_heads * head_dim * dtype_bytes


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, window: int = 512, stride: int = 512,
               progress: bool = False) -> tuple[float, int]:
    """Sliding-window perplexity of a causal LM on the 1-D token tensor ``ids``."""
    if window < 2:
        raise ValueError(f"window must be at least 2, got {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride must lie in [1, window={window}], got {stride}")
    if ids.numel() < 2:
        raise ValueError(f"the evaluation text is too short: {ids.numel()} tokens")
    nll, count, scored_to = 0.0, 0, 1          # tokens [1, scored_to) are scored
    starts = range(0, max(ids.numel() - window, 0) + stride, stride)
    for begin in tqdm(starts, desc="perplexity", unit="window", disable=not progress):
        end = min(begin + window, ids.numel())
        if end <= scored_to:
            break
        chunk = ids[begin:end].unsqueeze(0)
        logits = model(chunk, use_cache=False).logits[0, :-1].float()
        losses = torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="none")
        new = losses[max(scored_to - begin - 1, 0):]   # position p predicts token begin + p + 1
        nll += float(new.sum())
        count += new.numel()
        scored_to = end
    return math.exp(nll / count), count


def evaluate(model_path: Path, text: str, window: int = 512, stride: int = 512,
             max_tokens: int | None = None, progress: bool = False) -> EvalResult:
    """Perplexity of the model folder on ``text`` plus its weight and KV sizes."""
    if not text.strip():
        raise ValueError("the evaluation text is empty")
    tokenizer = AutoTokenizer.from_pretrained(str(model_path), local_files_only=True)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    model = load_for_eval(Path(model_path))
    ppl, count = perplexity(model, ids, window, stride, progress)
    return EvalResult(ppl, count, window, stride, weight_bytes(Path(model_path)),
                      kv_bytes_per_token(Path(model_path)))


def check_perplexity(model: nn.Module, check: torch.Tensor) -> float | None:
    """Perplexity of ``model`` on the check windows ``[n, seq_len]`` (``None`` if none)."""
    if check.numel() == 0:
        return None
    return perplexity(model, check.reshape(-1), check.shape[1], check.shape[1])[0]


@dataclass
class Estimate:
    """Check-window perplexity before and after a compression step."""

    before: float
    after: float
    tokens: int

    @property
    def rise(self) -> float:
        return self.after / self.before - 1

    def to_dict(self) -> dict:
        return {"check_ppl_before": round(self.before, 4), "check_ppl_after": round(self.after, 4),
                "check_tokens": self.tokens}

    def report(self, warn_above: float, what: str, file=None) -> bool:
        """Print the estimate (and a warning past ``warn_above``); whether it warned."""
        file = file or sys.stderr
        print(f"held-out estimate ({self.tokens} calibration tokens not used for fitting): "
              f"perplexity {self.before:.3f} -> {self.after:.3f} ({self.rise:+.1%})", file=file)
        if self.rise <= warn_above:
            return False
        print(f"optgptq: warning: {what} raised the held-out perplexity estimate by "
              f"{self.rise:.1%}, more than --warn-above {warn_above:.0%}; check the model on "
              f"your own text (optgptq eval) before using it", file=file)
        return True


def estimate(before: float | None, model: nn.Module, check: torch.Tensor, warn_above: float,
             what: str) -> dict:
    """Measure ``model`` on ``check``, report against ``before``; the summary's fields."""
    if before is None:
        return {}
    est = Estimate(before, check_perplexity(model, check), check.numel())
    warned = est.report(warn_above, what)
    return {**est.to_dict(), "check_warning": warned}
