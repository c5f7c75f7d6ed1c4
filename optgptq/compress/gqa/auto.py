"""Choosing how many K/V heads to keep for a KV-cache memory budget (``--num-kv-heads auto``).

The paper picks more or fewer groups by the accelerator's memory. Here the budget is the KV
cache bytes one token may take, across all layers, K and V:

- given directly (``kv_budget``), or
- derived from a target workload on an accelerator:
  ``(accelerator_memory * UTILIZATION - weight bytes) / (target_batch * target_context)``,
  the memory left for the cache after the weights, shared by ``batch x context`` tokens.

Options are the divisors of the query head count ``H`` that are at most the model's K/V heads.
An option takes ``2 * layers * num_kv_heads * head_dim * dtype bytes`` per token. Each option
that fits is converted on the calibration tokens and scored by its *calibration loss*: the
mean next-token cross-entropy (nats) of the converted model on those tokens. The fitting
option with the least loss wins; none fitting is an error. The table of options is returned
for printing.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from optgptq.compress.gqa import arch
from optgptq.compress.gqa.convert import Conversion, convert_model

UTILIZATION = 0.9
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


@dataclass
class Option:
    num_kv_heads: int
    kv_bytes_per_token: int
    fits: bool
    calib_loss: float | None = None


def kv_bytes_per_token(config, num_kv_heads: int, dtype: str = "float16") -> int:
    """KV-cache bytes one token takes with ``num_kv_heads`` K/V heads per layer."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"kv dtype {dtype!r}: expected one of {', '.join(DTYPE_BYTES)}")
    h = arch.num_heads(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // h
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    return 2 * layers * num_kv_heads * head_dim * DTYPE_BYTES[dtype]


def weight_bytes(model: torch.nn.Module, dtype: str = "float16") -> int:
    """Bytes of the model's (distinct) parameters stored in ``dtype``."""
    return sum(p.numel() for p in model.parameters()) * DTYPE_BYTES[dtype]


def token_budget(model: torch.nn.Module, kv_budget: int | None = None,
                 target_batch: int | None = None, target_context: int | None = None,
                 accelerator_memory: int | None = None, dtype: str = "float16") -> float:
    """KV bytes per token allowed: ``kv_budget``, or derived from the target workload."""
    workload = (target_batch, target_context, accelerator_memory)
    if kv_budget is not None:
        if any(v is not None for v in workload):
            raise ValueError("give either --kv-budget or --target-batch/--target-context/"
                             "--accelerator-memory, not both")
        if kv_budget <= 0:
            raise ValueError(f"--kv-budget must be positive, got {kv_budget}")
        return float(kv_budget)
    if any(v is None for v in workload):
        raise ValueError("--num-kv-heads auto needs --kv-budget BYTES, or all of --target-batch, "
                         "--target-context and --accelerator-memory")
    for name, v in zip(("--target-batch", "--target-context", "--accelerator-memory"), workload):
        if v <= 0:
            raise ValueError(f"{name} must be positive, got {v}")
    free = accelerator_memory * UTILIZATION - weight_bytes(model, dtype)
    if free <= 0:
        raise ValueError(f"--accelerator-memory {accelerator_memory}: the weights alone "
                         f"({weight_bytes(model, dtype)} bytes) leave no room for the KV cache")
    return free / (target_batch * target_context)


def choose_num_kv_heads(model: torch.nn.Module, calib: torch.Tensor, budget: float,
                        grouping: str = "similarity", merge: str = "mean",
                        dtype: str = "float16", progress: bool = True
                        ) -> tuple[list[Option], Option, torch.nn.Module, Conversion]:
    """Score every option; returns (table, chosen option, its converted model, its conversion).
    ``model`` itself is left unchanged."""
    config = model.config
    h, kv = arch.num_heads(config), arch.num_kv_heads(config)
    options = [Option(n, kv_bytes_per_token(config, n, dtype), False)
               for n in range(kv, 0, -1) if h % n == 0]
    best: tuple[Option, torch.nn.Module, Conversion] | None = None
    for opt in options:
        opt.fits = opt.kv_bytes_per_token <= budget
        if not opt.fits:
            continue
        candidate = copy.deepcopy(model)
        result = convert_model(candidate, opt.num_kv_heads, grouping, merge, calib,
                               progress=progress)
        opt.calib_loss = result.calib_loss
        if best is None or opt.calib_loss < best[0].calib_loss:
            best = (opt, candidate, result)
        else:
            del candidate
    if best is None:
        smallest = options[-1].kv_bytes_per_token
        raise ValueError(f"KV budget {budget:.0f} bytes per token is below the smallest option "
                         f"({smallest} bytes per token with 1 K/V head)")
    return options, best[0], best[1], best[2]


def format_table(options: list[Option], chosen: Option, budget: float) -> str:
    """The options as a text table, the chosen one marked."""
    lines = [f"KV budget: {budget:,.0f} bytes per token",
             f"{'kv_heads':>8}  {'KV bytes/token':>14}  {'fits':>4}  {'calib loss (nats)':>17}"]
    for o in options:
        loss = f"{o.calib_loss:.4f}" if o.calib_loss is not None else "-"
        mark = "  <- chosen" if o is chosen else ""
        lines.append(f"{o.num_kv_heads:>8}  {o.kv_bytes_per_token:>14,}  "
                     f"{'yes' if o.fits else 'no':>4}  {loss:>17}{mark}")
    return "\n".join(lines)
