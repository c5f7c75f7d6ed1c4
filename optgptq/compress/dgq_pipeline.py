"""Quantize a Hugging Face model to DGQ A8W4 layer by layer, with quantized inputs propagated.

The driver of :mod:`optgptq.compress.pipeline` with the DGQ quantizer
(:mod:`optgptq.compress.dgq`): the model is loaded in float32 on the CPU, the calibration batch
runs through the embeddings to the first decoder layer, and each decoder layer makes one forward
pass over the batch. A pre-hook on each group of linears that read the same input (the
architecture's groups in ``ARCHITECTURES``) quantizes the group from the input it is about to
receive; a forward hook then replaces every quantized linear's output by the A8W4 layer's own
output (:func:`optgptq_kernels.dgq.dgq_linear_ref`: per-token INT8 activations, INT8 weights),
so later groups and layers are calibrated on what the served model computes, activation
quantization included.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from optgptq.compress.dgq import DGQ, DGQResult, DGQSpec
from optgptq.compress.pipeline import _first_layer_inputs, arch_spec, load_float_model
from optgptq_kernels.dgq import dgq_linear_ref


@dataclass
class DGQModel:
    """A model whose quantized linears hold the weights they apply to unquantized inputs, and
    the DGQ tensors behind them."""

    model: nn.Module
    results: dict[str, DGQResult]
    spec: DGQSpec
    seconds: float
    layer_seconds: list[float] = field(default_factory=list)


def _check_layers(layers: nn.ModuleList, names: list[str]) -> None:
    for i, layer in enumerate(layers):
        for name in names:
            m = layer.get_submodule(name)
            if m.in_features % 8:
                raise ValueError(f"dgq: layer {i} {name} has {m.in_features} input features; "
                                 f"4-bit codes pack 8 to a word, so it must be a multiple of 8")


def _solve_group(layer: nn.Module, prefix: str, names: tuple[str, ...], x: torch.Tensor,
                 spec: DGQSpec, results: dict[str, DGQResult]) -> None:
    linears = [layer.get_submodule(n) for n in names]
    solver = DGQ(linears[0].in_features)
    solver.add_batch(x)
    stacked = torch.cat([m.weight for m in linears])
    parts = solver.quantize(stacked, spec).split([m.out_features for m in linears])
    for name, linear, part in zip(names, linears, parts):
        linear.weight.data = part.weight
        results[f"{prefix}.{name}"] = part


def _a8w4_output(result: DGQResult, bias: torch.Tensor | None, group_size: int,
                 x: torch.Tensor) -> torch.Tensor:
    """What the served A8W4 layer outputs for ``x [..., K]``."""
    t = result.tensors()
    y = dgq_linear_ref(x.reshape(-1, x.shape[-1]), t["qweight"], t["qzeros"], t["qscales"],
                       t["scales"], t["smooth"], group_size, bias)
    return y.view(*x.shape[:-1], y.shape[-1])


@torch.no_grad()
def quantize_model_dgq(model_path: Path, spec: DGQSpec, calibration: torch.Tensor,
                       progress: bool = True) -> DGQModel:
    """DGQ-quantize the model in ``model_path`` on the ``[num_samples, seq_len]`` token batch
    ``calibration`` (module docstring)."""
    arch = arch_spec(model_path)
    start = time.perf_counter()
    model = load_float_model(model_path)
    layers = model.get_submodule(arch.layers)
    all_names = [n for names in arch.groups for n in names]
    _check_layers(layers, all_names)
    results: dict[str, DGQResult] = {}
    layer_seconds: list[float] = []
    args, kwargs = _first_layer_inputs(model, layers[0], calibration)
    hidden = args[0]
    for i in tqdm(range(len(layers)), desc="dgq a8w4", unit="layer", disable=not progress):
        t = time.perf_counter()
        layer, prefix = layers[i], f"{arch.layers}.{i}"
        handles = []

        def replace(module, inputs, _output, name=""):
            return _a8w4_output(results[name], module.bias, spec.group_size, inputs[0])
        for names in arch.groups:
            def solve(_module, inputs, names=names):
                if f"{prefix}.{names[0]}" not in results:
                    _solve_group(layer, prefix, names, inputs[0], spec, results)
            for n in names:
                linear = layer.get_submodule(n)
                handles.append(linear.register_forward_pre_hook(solve))
                handles.append(linear.register_forward_hook(
                    functools.partial(replace, name=f"{prefix}.{n}")))
        try:
            out = layer(hidden, *args[1:], **kwargs)
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in all_names if f"{prefix}.{n}" not in results]
        assert not missing, f"layer {i}: linears never called: {missing}"
        hidden = out[0] if isinstance(out, tuple) else out
        layer_seconds.append(time.perf_counter() - t)
    return DGQModel(model, results, spec, time.perf_counter() - start, layer_seconds)
