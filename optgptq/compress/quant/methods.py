"""The quantization methods: one row each, the one place a method is named.

A method's name (the key of ``METHODS``) is what ``optgptq quantize --method`` takes, what
:func:`optgptq.compress.quant.pipeline.quantize_model` takes, and what the checkpoint's
``quantization_config.meta.quantizer`` records. Its row holds:

- ``spec``: the settings class; ``check_shape(in_features, out_features)`` says whether a
  linear fits the method's layout and ``quantization_config(method)`` is config.json's entry;
- ``solver``: built with a linear's ``in_features``, a
  :class:`~optgptq.compress.quant.solver.Solver` whose results know their checkpoint tensors;
- ``calibrated``: whether it needs calibration inputs (round-to-nearest does not: its linears
  are quantized one by one, from their weights alone);
- ``fast_forward``: whether the calibration forward may run at the reduced matmul precision
  asked for (``matmul_precision``); DGQ's forward computes the served INT8 layers' outputs
  and stays in IEEE float32;
- ``served_output``: where the served layer computes something other than its input times
  the dequantized weight (DGQ quantizes activations too), that output, which later layers are
  then calibrated on.

Adding a method is a spec, a solver and a row here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from optgptq.compress.quant.dgq import DGQ, DGQSpec, served_output
from optgptq.compress.quant.gptq import GPTQ, RTN
from optgptq.compress.quant.gptqt import GPTQT, GPTQTSpec
from optgptq.compress.quant.quantizer import QuantSpec
from optgptq.compress.quant.solver import Result, Solver


@dataclass(frozen=True)
class Method:
    """One quantization method (module docstring)."""

    spec: type
    solver: Callable[[int], Solver]
    calibrated: bool = True
    fast_forward: bool = True
    served_output: Callable[[Result, Any, torch.Tensor, torch.Tensor | None],
                            torch.Tensor] | None = None


METHODS: dict[str, Method] = {
    "gptq": Method(QuantSpec, GPTQ),
    "rtn": Method(QuantSpec, RTN, calibrated=False),
    "gptqt": Method(GPTQTSpec, GPTQT),
    "dgq": Method(DGQSpec, DGQ, fast_forward=False, served_output=served_output),
}


def method_row(name: str, spec: Any) -> Method:
    """The row of method ``name``, checked to take settings of ``spec``'s type."""
    if name not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {name!r}")
    row = METHODS[name]
    if not isinstance(spec, row.spec):
        raise ValueError(f"method {name!r} takes a {row.spec.__name__}, got "
                         f"{type(spec).__name__}")
    return row
