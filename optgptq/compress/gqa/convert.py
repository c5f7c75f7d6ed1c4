"""Opt-GQA conversion: merge a model's K/V heads into fewer, shared by groups of query heads.

``convert_model`` turns attention with ``H`` query heads and ``H_kv`` K/V heads into ``H_kv'``
K/V heads (``H_kv'`` divides ``H``, at most ``H_kv``), in place on a float32 transformers
model, layer by layer:

1. run the calibration tokens through the layer (inputs propagated through the already
   converted layers) and accumulate the attention input Gram matrix and each head's query
   second moment (:mod:`optgptq.compress.gqa.grouping`, :mod:`optgptq.compress.gqa.merge`
   say what they are used for);
2. group the query heads (``contiguous`` or ``similarity``), merge each group's K/V heads
   (``mean`` or ``lstsq``) and write them (:mod:`optgptq.compress.gqa.arch`);
3. ``lstsq`` only: refit the output projection on the calibration tokens;
4. run the converted layer to get the next layer's inputs.

Without calibration tokens only ``contiguous`` + ``mean`` is possible (a pure weight
operation). With them, the calibration loss, the mean next-token cross-entropy (nats) of the
converted model on the calibration tokens, comes out of the same pass.

``convert_folder`` reads an HF folder and writes the converted one (config with
``num_key_value_heads``, safetensors, tokenizer and generation config) to a temporary folder
renamed into place when complete. ``expand_to_mha`` does the inverse of a grouping: it copies
each K/V head to all of its query heads (optionally shuffling the query heads), giving a
multi-head model that computes the same function.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from optgptq.compress.gqa import arch
from optgptq.compress.gqa.grouping import (check_group_count, contiguous_groups, head_similarity,
                                           similarity_groups)
from optgptq.compress.gqa.merge import (OutProjFit, mean_merge, output_weights,
                                        rope_query_weights, weighted_merge)
from optgptq.folders import staged_folder

GROUPINGS = ("contiguous", "similarity")
MERGES = ("mean", "lstsq")
_WEIGHT_FILES = (".safetensors", ".bin")
_WRITTEN = ("config.json", "model.safetensors.index.json")


@dataclass
class Conversion:
    """What a conversion did: the groups per layer and the calibration loss (if calibrated)."""

    num_kv_heads: int
    groups: list[list[list[int]]] = field(default_factory=list)
    calib_loss: float | None = None


class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


def load_model(path: str | Path) -> torch.nn.Module:
    """A float32 transformers model from a local HF folder, checked to be convertible."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    arch.architecture(config)
    if getattr(config, "quantization_config", None):
        raise ValueError(f"model {str(path)!r} is quantized; convert the unquantized model")
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _check(model: torch.nn.Module, num_kv_heads: int, grouping: str, merge: str,
           calib: torch.Tensor | None) -> None:
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping={grouping!r}: expected one of {', '.join(GROUPINGS)}")
    if merge not in MERGES:
        raise ValueError(f"merge={merge!r}: expected one of {', '.join(MERGES)}")
    cfg = model.config
    check_group_count(arch.num_heads(cfg), arch.num_kv_heads(cfg), num_kv_heads)
    if calib is None and (grouping, merge) != ("contiguous", "mean"):
        raise ValueError(f"grouping={grouping!r} with merge={merge!r} needs calibration tokens")
    if calib is not None and (calib.dim() != 2 or calib.shape[1] < 2):
        raise ValueError(f"calibration tokens must be [num_samples, seq_len >= 2], "
                         f"got {tuple(calib.shape)}")


def _layer_inputs(model: torch.nn.Module, calib: torch.Tensor, batch_size: int) -> list:
    """(args, kwargs) each calibration batch passes to the first decoder layer."""
    captured = []

    def grab(module, args, kwargs):
        captured.append((list(args), dict(kwargs)))
        raise _Stop

    handle = arch.decoder_layers(model)[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in calib.split(batch_size):
            try:
                model(batch, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _run(layer: torch.nn.Module, inputs: list, hooks: list) -> list:
    """Runs ``layer`` on every batch with temporary ``(module, pre_hook, hook)`` hooks; returns
    the outputs of the batches that ran to completion."""
    handles = []
    for module, pre, post in hooks:
        if pre is not None:
            handles.append(module.register_forward_pre_hook(pre))
        if post is not None:
            handles.append(module.register_forward_hook(post))
    outs = []
    try:
        for args, kwargs in inputs:
            try:
                out = layer(*args, **kwargs)
                outs.append(out[0] if isinstance(out, tuple) else out)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return outs


def _stats(att: arch.Attention, layer, inputs: list, stacks: dict, keep_output: bool):
    """Gram matrix of the attention input, query second moments, and the original output
    projection's outputs (for ``lstsq``); stops each batch at the output projection."""
    n = att.input_module.in_features + 1
    gram = torch.zeros(n, n, dtype=torch.float64)
    qmom = torch.zeros(att.num_heads, att.head_dim, att.head_dim, dtype=torch.float64)
    outputs = []

    def on_input(module, args):
        nonlocal gram, qmom
        x = args[0].reshape(-1, args[0].shape[-1]).double()
        x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
        gram += x.T @ x
        q = torch.einsum("ti,hid->htd", x, stacks["q"].double())
        qmom += q.transpose(1, 2) @ q

    def on_output(module, args, out):
        if keep_output:
            outputs.append(out.detach())
        raise _Stop

    _run(layer, inputs, [(att.input_module, on_input, None), (att.out_proj, None, on_output)])
    return gram, qmom, outputs


def _merge(att: arch.Attention, stacks: dict, groups: list[list[int]], merge: str,
           qmom: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if merge == "mean":
        return (torch.stack([mean_merge(stacks["k"][g]) for g in groups]),
                torch.stack([mean_merge(stacks["v"][g]) for g in groups]))
    rope = att.family == "llama"
    kw = rope_query_weights(qmom) if rope else qmom
    out_w = att.out_proj.weight.detach()
    return (torch.stack([weighted_merge(stacks["k"][g], kw[g]) for g in groups]),
            torch.stack([weighted_merge(stacks["v"][g], output_weights(out_w, g, att.head_dim))
                         for g in groups]))


def _refit_out_proj(att: arch.Attention, layer, inputs: list, targets: list) -> None:
    fit = OutProjFit(att.out_proj)
    pending = iter(targets)

    def on_input(module, args):
        fit.add(args[0], next(pending))
        raise _Stop

    _run(layer, inputs, [(att.out_proj, on_input, None)])
    fit.apply()


@torch.no_grad()
def convert_model(model: torch.nn.Module, num_kv_heads: int, grouping: str = "similarity",
                  merge: str = "mean", calib: torch.Tensor | None = None, batch_size: int = 4,
                  progress: bool = True) -> Conversion:
    """Convert ``model`` in place to ``num_kv_heads`` K/V heads (see the module docstring)."""
    _check(model, num_kv_heads, grouping, merge, calib)
    layers = arch.attention_layers(model)
    result = Conversion(num_kv_heads)
    if calib is None:
        for att in layers:
            groups = contiguous_groups(att.num_heads, num_kv_heads)
            stacks = att.stacks()
            att.write(groups, *_merge(att, stacks, groups, merge, torch.empty(0)))
            result.groups.append(groups)
        arch.set_kv_heads(model, result.groups)
        return result
    inputs = _layer_inputs(model, calib, batch_size)
    blocks = arch.decoder_layers(model)
    bar = tqdm(list(zip(layers, blocks)), desc=f"GQA {grouping}/{merge} -> {num_kv_heads}",
               unit="layer", disable=not progress, file=sys.stderr)
    for att, block in bar:
        stacks = att.stacks()
        gram, qmom, targets = _stats(att, block, inputs, stacks, keep_output=merge == "lstsq")
        if grouping == "similarity":
            groups = similarity_groups(head_similarity(stacks["k"], stacks["v"], gram),
                                       num_kv_heads)
        else:
            groups = contiguous_groups(att.num_heads, num_kv_heads)
        att.write(groups, *_merge(att, stacks, groups, merge, qmom))
        if merge == "lstsq":
            _refit_out_proj(att, block, inputs, targets)
        for (args, _), hidden in zip(inputs, _run(block, inputs, [])):
            args[0] = hidden
        result.groups.append(groups)
    arch.set_kv_heads(model, result.groups)
    result.calib_loss = _loss(model, inputs, calib, batch_size)
    return result


def _loss(model: torch.nn.Module, inputs: list, calib: torch.Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy from the last layer's outputs."""
    norm, head = arch.final_norm(model), model.get_output_embeddings()
    total, count = 0.0, 0
    for (args, _), batch in zip(inputs, calib.split(batch_size)):
        logits = head(norm(args[0]))[:, :-1].float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += batch[:, 1:].numel()
    return total / count


@torch.no_grad()
def expand_to_mha(model: torch.nn.Module, shuffle_seed: int | None = None) -> list[list[int]]:
    """Copy each K/V head to every query head that reads it (a multi-head model computing the
    same function); with ``shuffle_seed``, also permute each layer's query heads at random.
    Returns each layer's permutation: new head ``i`` is old query head ``perm[i]``."""
    if not arch.is_llama(model.config):
        raise ValueError("BLOOM models are stored multi-head already; nothing to expand")
    gen = torch.Generator().manual_seed(shuffle_seed) if shuffle_seed is not None else None
    perms = []
    for att in arch.attention_layers(model):
        h = att.num_heads
        perm = torch.randperm(h, generator=gen) if gen is not None else torch.arange(h)
        stacks = att.stacks()
        att.write([[int(p)] for p in perm], stacks["k"][perm], stacks["v"][perm])
        perms.append(perm.tolist())
    model.config.num_key_value_heads = model.config.num_attention_heads
    return perms


def save_folder(model: torch.nn.Module, source: str | Path, out: str | Path) -> Path:
    """Write ``model`` as an HF folder at ``out`` (which must not exist), in the source
    config's dtype, with the source folder's tokenizer and other non-weight files, through a
    temporary folder renamed at the end."""
    from transformers import AutoConfig

    source, out = Path(source), Path(out).expanduser().resolve()
    if out.exists():
        raise ValueError(f"--out {str(out)!r} already exists; choose a new folder")
    dtype = getattr(AutoConfig.from_pretrained(str(source), local_files_only=True), "dtype", None)
    model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype or torch.float32)
    with staged_folder(out) as tmp:
        model.save_pretrained(str(tmp))
        for f in sorted(source.iterdir()):
            if (f.is_file() and not f.name.endswith(_WEIGHT_FILES) and f.name not in _WRITTEN
                    and not (tmp / f.name).exists()):
                shutil.copy2(f, tmp / f.name)
    return out


def convert_folder(model_path: str | Path, out: str | Path, num_kv_heads: int,
                   grouping: str = "similarity", merge: str = "mean",
                   calib: torch.Tensor | None = None, progress: bool = True) -> Conversion:
    """Convert the HF folder ``model_path`` and write the result to ``out``."""
    model = load_model(model_path)
    result = convert_model(model, num_kv_heads, grouping, merge, calib, progress=progress)
    save_folder(model, model_path, out)
    return result
