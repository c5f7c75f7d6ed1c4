"""Write a quantized model as a checkpoint folder of its method, and read any checkpoint back.

:func:`save_checkpoint` writes the folder of any method of
:data:`optgptq.compress.quant.methods.METHODS`:

- ``model.safetensors``: for each quantized linear ``m``, the tensors of its result (GPTQ, the
  layout of :mod:`optgptq_kernels.gptq`: ``m.qweight`` codes packed along the input dim,
  ``m.qzeros`` zero points minus one packed along the output dim, ``m.scales`` float16,
  ``m.g_idx`` int32; GPTQT's binary-coding planes, :mod:`optgptq_kernels.bcq`; DGQ's tensors,
  :mod:`optgptq_kernels.dgq`) and ``m.bias`` if it has one; every other tensor as in the model
  (float tensors in ``dtype``, default float16), tied copies stored once;
- ``config.json``: the source config with the spec's ``quantization_config`` (GPTQ:
  ``{quant_method: gptq, bits, group_size, desc_act, sym, checkpoint_format: gptq,
  static_groups, damp_percent, true_sequential, lm_head: false, meta: {quantizer, mse}}``,
  ``mse`` the clipping search's norm, 0 when off; gptqmodel keeps it in ``meta`` too);
- every other file of the source folder (tokenizer, generation config).

It is written to a temporary sibling folder and renamed into place when complete, so an
interrupted run never leaves a folder that looks like a model. :func:`load_for_eval` reads any
checkpoint back as a transformers model that computes what the engine serves.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from optgptq.compress.quant.pipeline import QuantizedModel
from optgptq.folders import staged_folder
from optgptq.models.quantization import (QUANT_METHODS, method_of, quantized_module_names,
                                         swap_in_quantized)

_MODEL_FILES = ("config.json", "model.safetensors.index.json")


@torch.no_grad()
def load_dequantized(path: Path) -> nn.Module:
    """A quantized checkpoint as an ordinary float32 transformers model (weights dequantized), for
    evaluation on any machine; a float checkpoint loads as it is."""
    path = Path(path)
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    qc = getattr(config, "quantization_config", None)
    if not qc:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                    local_files_only=True).eval()
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    method = QUANT_METHODS[method_of(qc)]
    settings = method.parse(qc)
    model, raw = _empty_model(config, path)
    state = {}
    for name, tensor in raw.items():
        module, _, leaf = name.rpartition(".")
        if f"{module}.{method.marker}" in raw and leaf != "bias":
            if leaf == method.marker:
                prefix = module + "."
                tensors = {k[len(prefix):]: t for k, t in raw.items() if k.startswith(prefix)
                           and "." not in k[len(prefix):] and k[len(prefix):] != "bias"}
                state[f"{module}.weight"] = method.dense_weight(tensors, settings)
        else:
            state[name] = tensor.float() if tensor.is_floating_point() else tensor
    return _fill(model, state, path)


def _empty_model(config, path: Path) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A float32 model of ``config`` without its quantization (weights not loaded), and every
    tensor the folder stores."""
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    raw: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            raw.update({k: f.get_tensor(k) for k in f.keys()})
    return model, raw


def _fill(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> nn.Module:
    """Load ``state`` into ``model``, tie its weights, and name what is missing or unexpected."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"model {str(path)!r}: unexpected tensors {unexpected[:5]}")
    model.tie_weights()
    untied = [m for m in missing if "lm_head" not in m]
    if untied:
        raise ValueError(f"model {str(path)!r}: missing tensors {untied[:5]}")
    return model


def save_checkpoint(qm: QuantizedModel, source: Path, out: Path,
                    dtype: torch.dtype = torch.float16, overwrite: bool = False) -> Path:
    """Write the checkpoint folder ``out`` of the quantized model (module docstring) and return
    its path: for each quantized linear its result's tensors (stored as given) replace
    ``module.weight`` (its bias stays, in ``dtype``); every other tensor as in the model (float
    tensors in ``dtype``, tied copies once); config.json gets the spec's
    ``quantization_config``; other source files are copied."""
    tensors = {name: r.tensors() for name, r in qm.results.items()}
    qconfig = qm.spec.quantization_config(qm.method)
    model = qm.model
    method_of(qconfig)
    out = Path(out).expanduser().resolve()
    if out.exists() and not overwrite:
        raise ValueError(f"out {str(out)!r} already exists (pass overwrite to replace it)")
    if out == Path(source).resolve():
        raise ValueError("out must differ from the source model folder")
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        module, _, leaf = name.rpartition(".")
        if module in tensors and leaf == "weight":
            state.update({f"{module}.{k}": t.contiguous() for k, t in tensors[module].items()})
        elif tensor.data_ptr() not in seen:       # skip tied copies (lm_head = embeddings)
            seen.add(tensor.data_ptr())
            state[name] = (tensor.to(dtype) if tensor.is_floating_point() else tensor).contiguous()
    with staged_folder(out, replace=True) as tmp:
        for f in Path(source).iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name not in _MODEL_FILES:
                shutil.copy2(f, tmp / f.name)
        config = json.loads((Path(source) / "config.json").read_text())
        config["quantization_config"] = qconfig
        for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]:
            config[key] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return out


@torch.no_grad()
def load_with_layers(path: Path) -> nn.Module:
    """A quantized checkpoint as a float32 transformers model whose quantized linears are its
    method's own layers, computing through the kernels' dispatch point (on the CPU, the
    references): the engine's numerics, activation quantization included."""
    path = Path(path)
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    qc = config.quantization_config
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    model, raw = _empty_model(config, path)
    quantized = quantized_module_names(qc, list(raw))
    swap_in_quantized(model, quantized, qc)
    state = {name: t.float() if t.is_floating_point() and (name.rpartition(".")[0] not in
                                                            quantized or name.endswith(".bias"))
             else t for name, t in raw.items()}
    return _fill(model, state, path)


def load_for_eval(path: Path) -> nn.Module:
    """The float32 transformers model that computes what the engine serves from ``path``: dense
    weights for a float or weight-only checkpoint (:func:`load_dequantized`), the method's own
    layers when it also quantizes activations (:func:`load_with_layers`)."""
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    qc = getattr(config, "quantization_config", None)
    qc = qc if isinstance(qc, dict) or qc is None else qc.to_dict()
    if qc and not QUANT_METHODS[method_of(qc)].weight_only:
        return load_with_layers(path)
    return load_dequantized(path)
