"""Typed engine configuration, validated once where it enters (CLI, YAML, Python API).

Plain dataclasses, so the engine imports with torch + transformers alone (the GPU machines
that run benchmarks have no pydantic); the serving layer wraps these in its own models.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DTYPES = ("auto", "float32", "float16", "bfloat16")
LOAD_FORMATS = ("safetensors", "dummy")


@dataclass
class EngineConfig:
    """Everything that shapes one engine instance (one accelerator, one KV pool)."""

    model: str = "smollm2"
    """``smollm2`` (the embedded default) or a local Hugging Face folder."""
    device: str = "auto"
    """``auto`` (first accelerator, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    dtype: str = "auto"
    """Weights and KV dtype; ``auto`` is float32 on CPU, the checkpoint's 16-bit type (else
    bfloat16) on an accelerator."""
    load_format: str = "safetensors"
    """``safetensors`` (the folder's weights) or ``dummy``: random weights of the folder's
    config (and quantization layout), for speed and memory measurements without a download."""
    skip_tokenizer_init: bool = False
    """Run without a tokenizer: prompts are token ids, outputs carry ids and no text."""
    quantization: str | None = None
    """The checkpoint's method, checked when the model loads: ``none`` (float), ``gptq``,
    ``gptqt`` or ``dgq``; unset accepts whatever the checkpoint is."""
    block_size: int = 16
    """Tokens per KV cache block."""
    kv_cache_memory_fraction: float = 0.85
    """On an accelerator: fraction of the memory free after loading weights given to the pool."""
    accelerator_share: float = 1.0
    """The part of the accelerator this engine may use (0.5: two engines share one GPU); the
    memory it counts as free is at most that part of the device's, less what it holds."""
    kv_cache_bytes: int | None = None
    """Pool size in bytes; overrides the fraction. On CPU the default is 2 GiB."""
    num_blocks: int | None = None
    """Exact number of blocks; overrides both budgets (tests and capacity planning)."""
    max_num_seqs: int = 128
    """Most sequences in one step's batch."""
    max_num_batched_tokens: int = 1024
    """Token budget of one step: decodes plus prefill chunks."""
    max_model_len: int | None = None
    """Longest prompt plus output; default: the model's max_position_embeddings (2048 for ALiBi)."""
    enable_prefix_caching: bool = True
    """Reuse full cached blocks of earlier prompts with the same token prefix."""
    enforce_eager: bool = False
    """Never capture CUDA graphs of decode steps (on an accelerator they are captured at start)."""
    seed: int = 0
    """Seed of the engine's sampling generator (requests may carry their own)."""

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value <= 0):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        for name in ("block_size", "kv_cache_bytes", "num_blocks", "max_num_seqs",
                     "max_num_batched_tokens", "max_model_len"):
            positive(name)
        for name in ("kv_cache_memory_fraction", "accelerator_share"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)!r}")
        if self.quantization is not None:
            from optgptq.models.quantization import QUANT_METHODS

            if self.quantization not in ("none", *QUANT_METHODS):
                raise ValueError(f"quantization must be none or one of "
                                 f"{', '.join(QUANT_METHODS)}, got {self.quantization!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, "
                             f"got {self.load_format!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if not isinstance(self.model, (str, Path)) or not str(self.model):
            raise ValueError("model must be 'smollm2' or a local model folder")
        self.model = str(self.model)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EngineConfig":
        """Build from a mapping, naming any unknown field."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown engine setting(s): {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(known))})")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "EngineConfig":
        """Load the ``engine:`` section (or the whole file) of a YAML file."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of engine settings")
        return cls.from_dict(data.get("engine", data))
