"""The quantization methods the engine serves, and swapping their layers into a model.

A quantized checkpoint names its method in config.json's ``quantization_config.quant_method``
and stores, for every quantized linear ``x``, method-specific tensors instead of ``x.weight``;
one of them (the method's *marker*, e.g. ``x.qweight`` for GPTQ) says which linears are
quantized, so layers a quantizer left in full precision load as ordinary linears.

Each method is one :class:`QuantMethod` entry in ``QUANT_METHODS``: how to read its settings,
which layer replaces ``nn.Linear``, and how to turn its tensors back into a dense weight (for
evaluation with transformers). The loader and the evaluator only go through this table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from optgptq.models.quant_linear import GPTQConfig, GPTQLinear, gptq_dense_weight


@dataclass(frozen=True)
class QuantMethod:
    """One checkpoint format: ``parse`` reads ``quantization_config`` (raising ``ValueError`` on
    bad settings), ``layer(in_features, out_features, config, bias)`` builds the module that
    replaces ``nn.Linear``, ``dense_weight(tensors, config)`` rebuilds the float32 ``[out, in]``
    weight from a linear's checkpoint tensors (keyed by leaf name); ``randomize(layer,
    generator)``, where given, returns random tensors of the layer's layout (keyed by leaf name;
    engine setting ``load_format: dummy``)."""

    marker: str
    parse: Callable[[dict], Any]
    layer: Callable[[int, int, Any, bool], nn.Module]
    dense_weight: Callable[[dict[str, torch.Tensor], Any], torch.Tensor]
    randomize: Callable[[nn.Module, torch.Generator], dict[str, torch.Tensor]] | None = None


QUANT_METHODS: dict[str, QuantMethod] = {
    "gptq": QuantMethod("qweight", GPTQConfig.from_hf, GPTQLinear, gptq_dense_weight,
                        GPTQLinear.random_tensors),
}


def method_of(qc: dict | None) -> str | None:
    """The checkpoint's method name (``None`` for a float checkpoint), checked to be served."""
    if not qc:
        return None
    method = qc.get("quant_method")
    if method not in QUANT_METHODS:
        raise ValueError(f"quantization_config.quant_method={method!r} is not supported "
                         f"(supported: {', '.join(QUANT_METHODS)})")
    return method


def quantized_module_names(qc: dict, tensor_names: list[str]) -> set[str]:
    """Modules a checkpoint stores quantized: those with the method's marker tensor."""
    suffix = "." + QUANT_METHODS[method_of(qc)].marker
    return {n[: -len(suffix)] for n in tensor_names if n.endswith(suffix)}


def swap_in_quantized(model: nn.Module, names: set[str], qc: dict) -> None:
    """Replace the named ``nn.Linear`` modules of ``model`` by the method's layer (in place)."""
    method = QUANT_METHODS[method_of(qc)]
    config = method.parse(qc)
    modules = dict(model.named_modules())
    for name in sorted(names):
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"checkpoint quantizes {name!r}, which is not a linear layer of "
                             f"this model")
        parent_name, _, child = name.rpartition(".")
        quant = method.layer(linear.in_features, linear.out_features, config,
                             linear.bias is not None)
        setattr(modules[parent_name] if parent_name else model, child, quant)


def random_quantized(layer: nn.Module, generator: torch.Generator, dtype: torch.dtype,
                     device: torch.device) -> dict[str, torch.Tensor]:
    """Random tensors for a quantized layer (``load_format: dummy``), bias in ``dtype``."""
    method = next((name for name, m in QUANT_METHODS.items() if isinstance(layer, m.layer)), None)
    assert method is not None, f"{type(layer).__name__} is no registered quantized layer"
    if QUANT_METHODS[method].randomize is None:
        raise ValueError(f"load_format: dummy is not available for {method} checkpoints")
    tensors = QUANT_METHODS[method].randomize(layer, generator)
    if getattr(layer, "bias", None) is not None:
        tensors["bias"] = torch.zeros(layer.bias.shape, dtype=dtype, device=device)
    return tensors
