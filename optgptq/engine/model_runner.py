"""The model runner: the only part of the engine that touches the device.

It loads the model, sizes and preallocates the paged KV cache (per layer, K and V tensors of
shape ``[num_kv_heads, num_blocks, block_size, head_dim]``), turns a scheduled batch into one
flat forward pass, and samples the next token of every sequence whose prompt is fully computed.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from optgptq.config import EngineConfig
from optgptq.engine.cuda_graphs import DecodeGraphs
from optgptq.engine.sampler import Sample, Sampler
from optgptq.engine.scheduler import ScheduledBatch
from optgptq.engine.step_inputs import StepInputBuilder
from optgptq.models.cpu_gptq_linear import use_cpu_gptq_linears
from optgptq.models.cpu_linear import use_cpu_linears
from optgptq.models.layers import AttentionMetadata, PagedAttention
from optgptq.models.loader import load_config, load_model
from optgptq_kernels import ops

_CPU_DEFAULT_KV_BYTES = 2 << 30
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: no accelerator is visible to torch")
    return device


def pick_dtype(name: str, device: torch.device, hf_config) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    stored = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    return stored if stored in (torch.float16, torch.bfloat16) else torch.bfloat16


class ModelRunner:
    def __init__(self, config: EngineConfig, model_path: Path) -> None:
        t0 = time.perf_counter()
        self.config = config
        self.device = pick_device(config.device)
        self.hf_config = load_config(model_path, config.quantization)
        self.dtype = pick_dtype(config.dtype, self.device, self.hf_config)
        self.max_model_len = self._max_model_len(self.hf_config)
        self.model = load_model(model_path, self.hf_config, self.dtype, self.device,
                                self.max_model_len, dummy=config.load_format == "dummy")
        if self.device.type == "cpu":
            use_cpu_gptq_linears(self.model)  # GPTQ weights in the native kernel's layout
            use_cpu_linears(self.model)  # faster small-batch products (see cpu_linear.py)
        t1 = time.perf_counter()
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, PagedAttention)]
        self.block_size = config.block_size
        self.num_blocks = self._num_blocks()
        self.kv_caches = []
        bs, hkv, d = self._block_shape()
        for layer in self.attn_layers:
            k, v = (self._cache_tensor((hkv, self.num_blocks, bs, d)) for _ in range(2))
            layer.k_cache, layer.v_cache = k, v
            self.kv_caches.append((k, v))
        self.sampler = Sampler(self.device, config.seed)
        self.inputs = StepInputBuilder(self.block_size, config.max_num_seqs,
                                       -(-self.max_model_len // self.block_size))
        self.graphs = None
        probe = self.kv_caches[0][0]
        ops.native_cpu(probe)  # on a CPU, build the native kernels now, not mid-request
        t2 = time.perf_counter()
        # Graphs need the Triton kernels: the PyTorch references synchronise with the host.
        if probe.is_cuda and ops.use_triton(probe) and not config.enforce_eager:
            self.graphs = DecodeGraphs(self.model, self.device, config.max_num_seqs,
                                       self.max_model_len, self.block_size)
        self.startup = {"load_s": t1 - t0, "kv_cache_s": t2 - t1,
                        "cuda_graphs_s": time.perf_counter() - t2}
        """Seconds spent loading the weights, allocating the KV cache (and building the native
        CPU kernels there), capturing the decode graphs."""

    def _cache_tensor(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A zeroed cache tensor; on a CPU backed by huge pages where the kernel allows, as the
        decode attention reads its blocks in any order (1.2-1.35x faster over a 2 GiB pool)."""
        t = torch.empty(shape, dtype=self.dtype, device=self.device)
        ops.advise_huge_pages(t)
        return t.zero_()

    def _max_model_len(self, hf_config) -> int:
        limit = getattr(hf_config, "max_position_embeddings", None)
        if self.config.max_model_len is not None:
            if limit is not None and self.config.max_model_len > limit:
                raise ValueError(f"max_model_len={self.config.max_model_len} exceeds the model's "
                                 f"max_position_embeddings ({limit})")
            return self.config.max_model_len
        return limit or 2048

    def _block_shape(self) -> tuple[int, int, int]:
        layer = self.attn_layers[0]
        if any((a.num_kv_heads, a.head_dim) != (layer.num_kv_heads, layer.head_dim)
               for a in self.attn_layers):
            raise ValueError("every attention layer must have the same K/V head count and "
                             "head size (one cache block shape for the whole pool)")
        return (self.block_size, layer.num_kv_heads, layer.head_dim)

    @property
    def bytes_per_block(self) -> int:
        b, h, d = self._block_shape()
        return 2 * len(self.attn_layers) * b * h * d * self.dtype.itemsize

    def _num_blocks(self) -> int:
        cfg = self.config
        if cfg.num_blocks is not None:
            return cfg.num_blocks
        if cfg.kv_cache_bytes is not None:
            budget = cfg.kv_cache_bytes
        elif self.device.type == "cpu":
            budget = _CPU_DEFAULT_KV_BYTES
        else:  # what the device has free, within this engine's share of it
            free, total = torch.cuda.mem_get_info(self.device)
            mine = torch.cuda.memory_reserved(self.device)
            free = min(free, max(0, int(cfg.accelerator_share * total) - mine))
            budget = int(free * cfg.kv_cache_memory_fraction)
        num = budget // self.bytes_per_block
        if num < 1:
            raise ValueError(f"KV cache budget of {budget} bytes holds no block of "
                             f"{self.bytes_per_block} bytes")
        return int(num)

    def make_generator(self, seed: int) -> torch.Generator:
        return self.sampler.generator_for(seed)

    @torch.inference_mode()
    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy the KV of block ``source`` to block ``destination`` for each pair, in every
        layer (a forked choice's own copy of a partially filled block)."""
        src = torch.tensor([s for s, _ in pairs], device=self.device)
        dst = torch.tensor([d for _, d in pairs], device=self.device)
        for k, v in self.kv_caches:
            k.index_copy_(1, dst, k.index_select(1, src))
            v.index_copy_(1, dst, v.index_select(1, src))

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> list[Sample]:
        """Run one step; returns a :class:`~optgptq.engine.sampler.Sample` for each sampling
        sequence and for each choice forking from one (:meth:`Sampler.sample`)."""
        inp = self.inputs.build(batch)
        dev = self.device
        if self.graphs is not None and inp.is_decode and self.graphs.fits(len(batch.seqs)):
            hidden = self.graphs.run(torch.tensor(inp.input_ids, dtype=torch.long),
                                     torch.tensor(inp.positions, dtype=torch.long),
                                     torch.tensor(inp.slots, dtype=torch.long),
                                     torch.tensor(inp.seq_lens, dtype=torch.int32),
                                     inp.block_tables)
        else:
            meta = AttentionMetadata(
                positions=torch.tensor(inp.positions, dtype=torch.long, device=dev),
                slot_mapping=torch.tensor(inp.slots, dtype=torch.long, device=dev),
                query_start_loc=torch.tensor(inp.query_starts, dtype=torch.int32, device=dev),
                seq_lens=torch.tensor(inp.seq_lens, dtype=torch.int32, device=dev),
                block_tables=inp.block_tables.to(dev),
                max_query_len=max(batch.num_new_tokens),
                max_seq_len=max(inp.seq_lens),
            )
            hidden = self.model(torch.tensor(inp.input_ids, dtype=torch.long, device=dev), meta)
        if not inp.sampling:
            return []
        if len(inp.logits_rows) < hidden.shape[0]:  # (a decode step samples every row: no gather)
            # staged, not a synchronous copy: the logits queue behind the forward pass
            hidden = hidden[torch.tensor(inp.logits_rows).to(dev, non_blocking=True)]
        logits = self.model.compute_logits(hidden)
        return self.sampler.sample(logits, [batch.seqs[i] for i in inp.sampling])
