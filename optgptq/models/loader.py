"""Load a local Hugging Face folder (config.json + safetensors) into one of the engine's models.

Architectures are declared as data in :mod:`optgptq.models.architectures`. The model is built
on the meta device, materialised on the target device, and filled tensor by tensor from the
safetensors shards, so peak memory is one copy of the weights. Missing or unexpected tensors
are errors, not warnings.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig

from optgptq.models.architectures import ARCHITECTURES
from optgptq.models.merged import merge_projections
from optgptq.models.quantization import (method_of, quantized_module_names, random_quantized,
                                         swap_in_quantized)


def load_config(path: Path, quantization: str | None = None):
    """The transformers config of a local folder, checked for a supported architecture and, when
    ``quantization`` is given, for a checkpoint of that method (``"none"``: a float one)."""
    if not (path / "config.json").is_file():
        raise ValueError(f"model {str(path)!r}: no config.json in this folder")
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    arch = (getattr(config, "architectures", None) or [""])[0]
    if arch not in ARCHITECTURES:
        raise ValueError(f"model {str(path)!r}: architecture {arch or '(none)'} is not supported "
                         f"(supported: {', '.join(ARCHITECTURES)})")
    if arch == "MistralForCausalLM" and getattr(config, "sliding_window", None):
        raise ValueError(f"model {str(path)!r}: sliding-window attention is not supported")
    qc = getattr(config, "quantization_config", None)
    method = method_of(qc if isinstance(qc, dict) or qc is None else qc.to_dict()) or "none"
    if quantization is not None and quantization != method:
        raise ValueError(f"quantization={quantization!r}, but model {str(path)!r} is "
                         f"{'not quantized' if method == 'none' else f'a {method} checkpoint'}")
    return config


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model {str(path)!r}: no .safetensors weights in this folder")
    return files


def _tensor_names(files: list[Path]) -> list[str]:
    names: list[str] = []
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            names.extend(f.keys())
    return names


def load_model(path: Path, config, dtype: torch.dtype, device: torch.device,
               max_positions: int, dummy: bool = False) -> torch.nn.Module:
    """Build the model for ``path`` (``config`` from :func:`load_config`) and load its weights.

    Parameters are created on the meta device and replaced by the checkpoint's tensors, so
    peak memory is one copy of the weights; a quantized checkpoint's linears become its
    method's layers (:mod:`optgptq.models.quantization`); computed buffers (RoPE tables,
    ALiBi slopes) are built on the CPU by the modules themselves and moved with the model.
    Once loaded, projections that share an input are merged (:mod:`optgptq.models.merged`).
    ``dummy`` fills the weights with random values instead (no weight files needed); a
    quantized config then quantizes every linear but the output head, in its method's layout.
    """
    arch = ARCHITECTURES[config.architectures[0]]
    cls, prefix = arch.model_class, arch.prefix
    files = [] if dummy else _weight_files(path)
    quantized: set[str] = set()
    with torch.device("meta"):
        model = cls(config, max_positions)
        qc = getattr(config, "quantization_config", None)
        if qc:
            qc = qc if isinstance(qc, dict) else qc.to_dict()
            modules = dict(model.named_modules())
            if dummy:
                quantized = {n for n, m in modules.items() if isinstance(m, torch.nn.Linear)
                             and n.rpartition(".")[2] != "lm_head"}
            else:
                quantized = {n if n in modules else prefix + n
                             for n in quantized_module_names(qc, _tensor_names(files))}
            swap_in_quantized(model, quantized, qc)
    expected = model.state_dict(keep_vars=True)
    if dummy:
        state = _random_state(model, expected, quantized, dtype, device)
    else:
        state = _read_state(path, files, expected, prefix, quantized, dtype, device)
    # Tied parameters appear under several names; one stored copy fills them all.
    for name, param in expected.items():
        if name not in state:
            twin = next((n for n, p in expected.items() if p is param and n in state), None)
            if twin is None:
                raise ValueError(f"model {str(path)!r}: missing tensor {name!r}")
            state[name] = state[twin]
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False)
    model = model.to(device).eval()
    merge_projections(model)
    return model


def _read_state(path: Path, files: list[Path], expected: dict, prefix: str, quantized: set[str],
                dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                name = key if key in expected else prefix + key
                if name not in expected:
                    raise ValueError(f"model {str(path)!r}: unexpected tensor {key!r} in {file.name}")
                tensor = f.get_tensor(key)
                if tensor.shape != expected[name].shape:
                    raise ValueError(f"model {str(path)!r}: tensor {key!r} has shape "
                                     f"{tuple(tensor.shape)}, expected {tuple(expected[name].shape)}")
                # Integer codes stay integers and a quantized layer's tensors stay as stored
                # (its kernels decide the compute types); everything else takes the model's dtype.
                module, _, leaf = name.rpartition(".")
                keep = not tensor.is_floating_point() or (module in quantized and leaf != "bias")
                state[name] = tensor.to(device=device, dtype=None if keep else dtype)
    return state


@torch.no_grad()
def _random_state(model: torch.nn.Module, expected: dict, quantized: set[str],
                  dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Random weights for ``load_format: dummy``: N(0, 0.02) matrices, unit norm weights, zero
    biases; quantized layers fill their own tensors (their method's ``randomize``)."""
    gen = torch.Generator(device).manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, param in expected.items():
        module, _, leaf = name.rpartition(".")
        if id(param) in seen or module in quantized:
            continue
        seen.add(id(param))
        t = torch.empty(param.shape, dtype=dtype, device=device)
        if param.dim() >= 2:
            state[name] = t.normal_(0.0, 0.02, generator=gen)
        else:
            state[name] = t.fill_(0.0 if leaf == "bias" else 1.0)
    modules = dict(model.named_modules())
    for name in sorted(quantized):
        for leaf, t in random_quantized(modules[name], gen, dtype, device).items():
            state[f"{name}.{leaf}"] = t
    return state
