"""The supported model architectures: one table for the engine's loader and the offline tools.

A row, keyed by the name in config.json's ``architectures``, says which engine model serves the
architecture (:mod:`optgptq.models.loader`) and where the offline tools find their pieces in
the transformers model of it: the decoder layers and final norm (the GQA converter,
:mod:`optgptq.compress.gqa`), each layer's attention module, and its linears grouped by
shared input in the order a layer's forward pass calls them (the quantizer,
:mod:`optgptq.compress.quant`). ``family`` names the attention layout: ``llama`` (separate
q/k/v/o projections, RoPE) or ``bloom`` (fused ``query_key_value``, ALiBi).
"""

from __future__ import annotations

from dataclasses import dataclass

from optgptq.models.bloom import BloomForCausalLM
from optgptq.models.llama import LlamaForCausalLM


@dataclass(frozen=True)
class Architecture:
    """One supported architecture (module docstring)."""

    family: str
    model_class: type
    prefix: str                              # base-model prefix checkpoints may omit
    layers: str                              # transformers: the decoder layers' path
    final_norm: str                          # transformers: the final norm's path
    attention: str                           # transformers: a layer's attention module
    linear_groups: tuple[tuple[str, ...], ...]


_LLAMA = Architecture("llama", LlamaForCausalLM, "model.", "model.layers", "model.norm",
                      "self_attn", (
                          ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                          ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"),
                          ("mlp.down_proj",)))
ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,
    "BloomForCausalLM": Architecture(
        "bloom", BloomForCausalLM, "transformer.", "transformer.h", "transformer.ln_f",
        "self_attention", (("self_attention.query_key_value",), ("self_attention.dense",),
                           ("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",))),
}


def architecture_of(config, job: str = "") -> Architecture:
    """The row of a transformers config's architecture; ``ValueError`` naming the supported
    ones otherwise (``job``, e.g. ``" for quantization"``, ends its first clause)."""
    name = (getattr(config, "architectures", None) or [""])[0]
    if name not in ARCHITECTURES:
        raise ValueError(f"architecture {name or '(none)'} is not supported{job} "
                         f"(supported: {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[name]
