"""Quantize a Hugging Face model layer by layer, inputs propagated: the driver of every method.

For a method of :data:`optgptq.compress.quant.methods.METHODS` (GPTQ, GPTQT, DGQ):

1. The model is loaded in float32 on the CPU. The calibration batch is run through the
   embeddings only: a hook on the first decoder layer records its inputs (hidden states and the
   keyword arguments the model passes every layer: masks, RoPE tables, ALiBi) and stops the pass.
2. For each decoder layer, in order, one forward pass over the whole batch quantizes it *true
   sequentially*: a forward pre-hook on each group of linears that read the same input (Llama:
   q/k/v, then o, then gate/up, then down; BLOOM: query_key_value, dense, dense_h_to_4h,
   dense_4h_to_h — the ``linear_groups`` of :data:`optgptq.models.architectures.ARCHITECTURES`)
   feeds the input it is about to receive to the method's solver, quantizes the group's weights
   as one stacked weight, and writes the dequantized weights back before the forward continues.
   Where the method's served layer computes something else (DGQ's INT8 activations), a forward
   hook replaces each quantized linear's output by the served one. So every group is calibrated
   on inputs computed through the already-quantized groups before it, within the layer and in
   earlier layers, and the layer's output — the next layer's input — comes from the quantized
   layer. Working memory is the activations of one layer on the calibration batch.
3. ``matmul_precision`` is torch's float32 matmul precision for the calibration forward
   (``"medium"``: CPUs with bfloat16 units, AMX or AVX512-BF16, multiply bfloat16 operands and
   accumulate in float32, about 2x faster; other CPUs stay in IEEE float32). With ``"medium"``
   on such a CPU, models on transformers' SDPA attention also run it on bfloat16 operands
   (about 3x faster). Either perturbs a layer's output by ~3e-3 of its norm, far below the
   4-bit rounding it calibrates against. The Hessians and the solver always run in IEEE
   float32: with the Hessians in bfloat16 too (relative error ~4e-4 of their norm, which their
   largest eigenvalues set), SmolLM2's 4-bit g64 perplexity came out 1.5% higher (256 x 512
   calibration tokens: 34.45, against 33.94 with only the forward in bfloat16 and 33.96 all in
   float32). A method whose row says ``fast_forward=False`` (DGQ) keeps the forward in IEEE
   float32.

Round-to-nearest (``method="rtn"``) quantizes the same linears with the same groups and
packing, each from its weight alone: it needs no calibration data and no forward pass, and is
the baseline GPTQ is measured against.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from optgptq.compress.quant.methods import Method, method_row
from optgptq.compress.quant.solver import Result
from optgptq.models.architectures import Architecture, architecture_of

MATMUL_PRECISIONS = ("medium", "highest")


@dataclass
class QuantizedModel:
    """A model whose quantized linears hold the weights they apply to unquantized inputs, the
    results behind them (codes and the like), and the method and settings that made them."""

    model: nn.Module
    results: dict[str, Result]
    spec: Any
    method: str
    seconds: float
    layer_seconds: list[float] = field(default_factory=list)


def folder_architecture(model_path: Path) -> Architecture:
    """The folder's architecture; an error naming the supported ones otherwise."""
    config = AutoConfig.from_pretrained(str(model_path), local_files_only=True)
    try:
        return architecture_of(config, " for quantization")
    except ValueError as exc:
        raise ValueError(f"model {str(model_path)!r}: {exc}") from None


def load_float_model(model_path: Path) -> nn.Module:
    """The folder's transformers model in float32 on the CPU, in eval mode."""
    return AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32,
                                                local_files_only=True).eval()


def check_packable(layers: nn.ModuleList, names: list[str], spec: Any) -> None:
    """Every linear ``names`` of every layer must fit the layout of ``spec``'s method."""
    for i, layer in enumerate(layers):
        for name in names:
            m = layer.get_submodule(name)
            try:
                spec.check_shape(m.in_features, m.out_features)
            except ValueError as exc:
                raise ValueError(f"layer {i} {name}: {exc}") from None


@contextmanager
def float32_matmul(precision: str) -> Iterator[None]:
    """torch's float32 matmul precision set to ``precision`` for the block, then restored."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def _bf16_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, **kwargs):
    """transformers' SDPA attention on bfloat16 operands, its output back in the query's dtype."""
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.bfloat16()
    out, weights = sdpa_attention_forward(module, query.bfloat16(), key.bfloat16(),
                                          value.bfloat16(), attention_mask, **kwargs)
    return out.to(query.dtype), weights


def _cpu_has_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX or AVX512-BF16); elsewhere bfloat16
    attention would be emulated, slower than float32."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


_BF16_SDPA = "optgptq_calibration_bf16_sdpa"
AttentionInterface.register(_BF16_SDPA, _bf16_sdpa)


@contextmanager
def calibration_attention(model: nn.Module, precision: str) -> Iterator[None]:
    """With ``"medium"``, a model on transformers' SDPA attention runs it on bfloat16 operands
    for the block (see the module docstring); others are left as they are."""
    old = model.config._attn_implementation
    if precision != "medium" or old != "sdpa" or not _cpu_has_bfloat16():
        yield
        return
    model.set_attn_implementation(_BF16_SDPA)
    try:
        yield
    finally:
        model.set_attn_implementation(old)


class _Captured(Exception):
    pass


def _first_layer_inputs(model: nn.Module, layer: nn.Module, ids: torch.Tensor):
    store = {}

    def hook(_module, args, kwargs):
        store["args"], store["kwargs"] = args, kwargs
        raise _Captured

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(ids, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    return store["args"], store["kwargs"]


def _solve_group(layer: nn.Module, prefix: str, names: tuple[str, ...], x: torch.Tensor | None,
                 method: Method, spec: Any, results: dict[str, Result]) -> None:
    """Quantize the linears ``names`` (all reading ``x``; ``None`` for a method without
    calibration) as one stacked weight."""
    linears = [layer.get_submodule(n) for n in names]
    solver = method.solver(linears[0].in_features)
    stacked = torch.cat([m.weight for m in linears])
    with float32_matmul("highest"):
        if x is not None:
            solver.add_batch(x)
        parts = solver.quantize(stacked, spec).split([m.out_features for m in linears])
    for name, linear, part in zip(names, linears, parts):
        linear.weight.data = part.weight
        results[f"{prefix}.{name}"] = part


@torch.no_grad()
def quantize_model(model_path: Path, spec: Any, method: str = "gptq",
                   calibration: torch.Tensor | None = None, progress: bool = True,
                   matmul_precision: str = "medium") -> QuantizedModel:
    """Quantize the model in ``model_path`` with ``method`` (a key of
    :data:`~optgptq.compress.quant.methods.METHODS`) and its settings ``spec`` (see the module
    docstring); ``calibration`` is a ``[num_samples, seq_len]`` token batch, required by every
    method but round-to-nearest."""
    row = method_row(method, spec)
    if matmul_precision not in MATMUL_PRECISIONS:
        raise ValueError(f"matmul_precision must be one of {MATMUL_PRECISIONS}, "
                         f"got {matmul_precision!r}")
    arch = folder_architecture(model_path)
    if row.calibrated and calibration is None:
        raise ValueError(f"method {method!r} needs a calibration batch")
    start = time.perf_counter()
    model = load_float_model(model_path)
    layers = model.get_submodule(arch.layers)
    check_packable(layers, [n for names in arch.linear_groups for n in names], spec)
    results: dict[str, Result] = {}
    layer_seconds: list[float] = []
    bar = tqdm(range(len(layers)), desc=f"{method} {spec.bits}-bit", unit="layer",
               disable=not progress)
    if not row.calibrated:
        for i in bar:
            t = time.perf_counter()
            for name in (n for names in arch.linear_groups for n in names):
                _solve_group(layers[i], f"{arch.layers}.{i}", (name,), None, row, spec, results)
            layer_seconds.append(time.perf_counter() - t)
    else:
        precision = matmul_precision if row.fast_forward else "highest"
        with float32_matmul(precision), calibration_attention(model, precision):
            _calibrate(model, layers, arch, row, spec, calibration, results, layer_seconds, bar)
    return QuantizedModel(model, results, spec, method, time.perf_counter() - start,
                          layer_seconds)


def _calibrate(model: nn.Module, layers: nn.ModuleList, arch: Architecture, method: Method,
               spec: Any, calibration: torch.Tensor, results: dict[str, Result],
               layer_seconds: list[float], bar: tqdm) -> None:
    """Step 2 of the module docstring: every layer quantized in one true-sequential pass."""
    args, kwargs = _first_layer_inputs(model, layers[0], calibration)
    hidden = args[0]
    for i in bar:
        t = time.perf_counter()
        layer, prefix = layers[i], f"{arch.layers}.{i}"
        handles = []
        for names in arch.linear_groups:
            def solve(_module, inputs, names=names):
                if f"{prefix}.{names[0]}" not in results:
                    _solve_group(layer, prefix, names, inputs[0], method, spec, results)

            def served(module, inputs, _output, name=""):
                return method.served_output(results[name], spec, inputs[0], module.bias)
            for n in names:
                linear = layer.get_submodule(n)
                handles.append(linear.register_forward_pre_hook(solve))
                if method.served_output is not None:
                    handles.append(linear.register_forward_hook(
                        functools.partial(served, name=f"{prefix}.{n}")))
        try:
            out = layer(hidden, *args[1:], **kwargs)
        finally:
            for h in handles:
                h.remove()
        missing = [n for names in arch.linear_groups for n in names
                   if f"{prefix}.{n}" not in results]
        assert not missing, f"layer {i}: linears never called: {missing}"
        hidden = out[0] if isinstance(out, tuple) else out
        layer_seconds.append(time.perf_counter() - t)
        bar.set_postfix(seconds=f"{layer_seconds[-1]:.1f}")
