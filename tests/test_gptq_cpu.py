"""The native CPU GPTQ kernel (``gptq_cpu.cpp``, INT8 activations) against its specification and
the PyTorch reference: every bit width, group layout (in order, act-order, per channel, group
sizes not dividing ``K`` or not a multiple of 8), symmetric and asymmetric zeros, odd row counts
and widths; rows independent of the batch; the model runner's swap; and the engine's greedy tokens
on GPTQ checkpoints through the native kernel equal to those through the reference path."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from optgptq.engine.llm import LLM
from optgptq.engine.sampling_params import SamplingParams
from optgptq.models.cpu_gptq_linear import CPUGPTQLinear, FrozenEmbedding, use_cpu_gptq_linears
from optgptq.models.quant_linear import GPTQConfig, GPTQLinear
from optgptq_kernels import cpu_native, ops
from optgptq_kernels.gptq import dequantize_ref, gptq_linear_ref, pack_cols, pack_rows
from optgptq_kernels.gptq_cpu import (PackedGPTQ, gptq_cpu_linear, pack_gptq_cpu,
                                      quantize_int8_cpu)
from tests.conftest import random_prompt

ROWS = (1, 3, 17, 64, 130)
# (group_size, act_order): in order, a group size not dividing K (48 of 160), not a multiple of 8
# (20), per channel, act-order
LAYOUTS = [(32, False), (64, False), (128, False), (48, False), (-1, False), (32, True),
           (48, True), (20, True)]


@pytest.fixture(scope="module", autouse=True)
def native():
    assert cpu_native.available(), "the native CPU kernels did not build"


def random_gptq(k: int, n: int, bits: int, group_size: int, act_order: bool, sym: bool,
                g: torch.Generator) -> tuple:
    """Random GPTQ tensors ``(qweight, qzeros, scales, g_idx, bits)``."""
    g_idx = torch.arange(k) // (k if group_size == -1 else group_size)
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    groups = int(g_idx.max()) + 1
    q = torch.randint(0, 1 << bits, (k, n), generator=g)
    stored = (torch.full((groups, n), (1 << (bits - 1)) - 1) if sym
              else torch.randint(0, 1 << bits, (groups, n), generator=g))
    scales = (torch.rand(groups, n, generator=g) * 0.05 + 1e-3).half()
    return pack_rows(q, bits), pack_cols(stored, bits), scales, g_idx.int(), bits


def int8_spec(x: torch.Tensor, packed: PackedGPTQ, w: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's numerics in float64 (``gptq_cpu.cpp``): ``x`` in packed row order, quantized
    per row and segment to INT8, times the dequantized weight ``w [K, N]``; and the bound on its
    difference from ``x @ w`` (half a quantization step per input)."""
    src = packed.src if packed.src is not None else torch.arange(x.shape[1], dtype=torch.int32)
    real = src >= 0
    xg = torch.where(real, x[:, src.clamp(min=0).long()], torch.zeros(()))
    wg = torch.where(real[:, None], w[src.clamp(min=0).long()], torch.zeros((), dtype=w.dtype))
    y = torch.zeros(x.shape[0], w.shape[1], dtype=torch.float64)
    bound = torch.zeros_like(y)
    b = packed.seg_rows.tolist()
    for k0, k1 in zip(b, b[1:]):
        amax = xg[:, k0:k1].abs().amax(1, keepdim=True)
        # a tensor divided: ``127 / amax`` would be a rounded reciprocal times 127
        inv = torch.where(amax > 0, torch.full_like(amax, 127) / amax, torch.zeros(()))
        x8 = torch.round(xg[:, k0:k1] * inv)
        y += (amax / 127).double() * (x8.double() @ wg[k0:k1])
        bound += (amax / 254).double() * wg[k0:k1].abs().sum(0)
    return y, bound


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size,act_order", LAYOUTS)
def test_kernel_matches_spec_and_reference(bits, group_size, act_order):
    """K = 160 (segments of 64 cut groups of 128 and per-channel rows; 48 does not divide it),
    N = 160 (a ragged last panel) and a narrow N; every row count with and without bias, fresh
    inputs: the kernel equals its INT8 specification up to float32 sums, and the reference up to
    x's rounding to 8 bits."""
    g = torch.Generator().manual_seed(bits * 100 + group_size)
    for k, n in ((160, 160), (96, 32 if bits != 3 else 96)):
        for sym in (False, True):
            args = random_gptq(k, n, bits, group_size, act_order, sym, g)
            packed = pack_gptq_cpu(*args)
            assert (packed.src is not None) == (act_order or group_size % 8 not in (0, 7))
            w = dequantize_ref(*args, dtype=torch.float64)
            for rows in ROWS:
                x = torch.randn(rows, k, generator=g)
                bias = torch.randn(n, generator=g) if rows % 2 else None
                spec, bound = int8_spec(x, packed, w)
                shift = bias.double() if bias is not None else 0
                got = gptq_cpu_linear(x, packed, bias).double()
                assert got.shape == (rows, n)
                eps = 1e-5 * (spec.abs().max() + 1)
                assert (got - spec - shift).abs().max() <= eps, (bits, group_size, sym, rows)
                ref = gptq_linear_ref(x.double(), *args[:4], bits)
                assert bool(((got - shift - ref).abs() <= bound + eps).all())


def test_rows_do_not_depend_on_the_batch():
    """Each row is quantized and summed on its own: a row's output is the same bits alone, in a
    batch of 7 or in one of 300 (two row chunks)."""
    g = torch.Generator().manual_seed(4)
    packed = pack_gptq_cpu(*random_gptq(576, 200, 4, 64, True, False, g))
    x = torch.randn(300, 576, generator=g)
    full = gptq_cpu_linear(x, packed)
    assert torch.equal(gptq_cpu_linear(x[290:297], packed), full[290:297])
    assert torch.equal(gptq_cpu_linear(x[299:], packed), full[299:])


def test_dispatch_and_input_forms(monkeypatch):
    """``ops.gptq_linear`` on float32 CPU tensors runs the native kernel (a strided input too;
    a bfloat16 one is computed in float32 and rounded once); ``OPTGPTQ_KERNELS=reference`` runs
    the reference."""
    g = torch.Generator().manual_seed(1)
    args = random_gptq(64, 96, 4, 32, True, False, g)
    x = torch.randn(64, 5, generator=g).t()  # a column-strided view
    packed = ops.pack_gptq_weight(*args)
    want = gptq_cpu_linear(x.contiguous(), packed)
    assert torch.equal(ops.gptq_linear(x, *args), want)
    assert torch.equal(ops.packed_gptq_linear(x.bfloat16(), packed),
                       gptq_cpu_linear(x.bfloat16().float(), packed).bfloat16())
    monkeypatch.setenv("OPTGPTQ_KERNELS", "reference")
    assert ops.pack_gptq_weight(*args) is None
    assert torch.equal(ops.gptq_linear(x, *args), gptq_linear_ref(x, *args))


def test_pack_rejects_groups_the_scales_lack():
    args = list(random_gptq(64, 64, 4, 32, False, False, torch.Generator().manual_seed(2)))
    args[3] = args[3] + 1  # group 2 of 2
    with pytest.raises(ValueError, match="g_idx"):
        pack_gptq_cpu(*args)


def test_swap_drops_the_checkpoint_tensors_and_warns_on_slow_paths(monkeypatch, caplog):
    g = torch.Generator().manual_seed(3)
    layer = GPTQLinear(96, 64, GPTQConfig(4, 32), bias=True)
    for name, t in zip(("qweight", "qzeros", "scales", "g_idx"), random_gptq(96, 64, 4, 32,
                                                                             False, False, g)):
        setattr(layer, name, t)
    layer.bias = torch.nn.Parameter(torch.randn(64, generator=g), requires_grad=False)
    model = torch.nn.ModuleDict({"proj": layer, "other": torch.nn.Linear(4, 4)})
    x = torch.randn(2, 3, 96, generator=g)
    want = layer(x)  # GPTQLinear through the dispatch point: the same kernel, repacked per call
    with caplog.at_level(logging.WARNING):
        assert use_cpu_gptq_linears(model) == 1
    assert not caplog.records
    assert isinstance(model["proj"], CPUGPTQLinear) and not list(model["proj"].buffers())
    assert torch.equal(model["proj"](x), want)
    # without the native kernel the layer stays, and one line says the path is slow
    monkeypatch.setattr(ops, "pack_gptq_weight", lambda *args: None)
    model = torch.nn.ModuleDict({"proj": layer})
    with caplog.at_level(logging.WARNING):
        assert use_cpu_gptq_linears(model) == 0
    assert type(model["proj"]) is GPTQLinear
    assert [r.message for r in caplog.records if "reference" in r.message]


@pytest.mark.parametrize("n,k", [(200, 576), (72, 100)])
def test_int8_weight_is_the_checkpoint_path_of_its_codes(n, k):
    """``quantize_int8_cpu`` packs the same kernel operands as a symmetric 8-bit GPTQ checkpoint
    of its codes (groups of 64; a ragged last group where 64 does not divide K): outputs bit for
    bit equal; its weight within half a step (absmax / 254) of the float one per group."""
    g = torch.Generator().manual_seed(n)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)
    packed = quantize_int8_cpu(w)
    groups = -(-k // 64)
    wg = torch.nn.functional.pad(w, (0, groups * 64 - k)).view(n, groups, 64)
    scales = (wg.abs().amax(2) / 127).half()
    codes = (wg / scales.float().unsqueeze(2)).round().clamp(-127, 127) + 128
    codes = codes.view(n, -1)[:, :k].t().long()
    args = (pack_rows(codes, 8), pack_cols(torch.full((groups, n), 127), 8),
            scales.t().contiguous(), (torch.arange(k) // 64).int(), 8)
    x = torch.randn(9, k, generator=g)
    assert torch.equal(gptq_cpu_linear(x, packed), gptq_cpu_linear(x, pack_gptq_cpu(*args)))
    step = scales.float().repeat_interleave(64, dim=1)[:, :k]
    assert bool(((dequantize_ref(*args, dtype=torch.float32).t() - w).abs()
                 <= step / 2 + 1e-6).all())


@pytest.mark.parametrize("act", ["int8", "int16"])
def test_head_runs_int8_only_with_int8_activations(tiny_models, tmp_path, monkeypatch, act):
    """With the default INT8 activations the float output head of a GPTQ checkpoint runs as
    8-bit codes on the same kernel and the tied embedding keeps the exact weight; with
    ``int16`` the head stays the float packed linear. Either way generation runs, and in
    ``int8`` the engine's first greedy token of a prompt is the reference's where the
    reference's top two logits are well apart."""
    ckpt = _rtn_checkpoint(tiny_models["llama-gqa"], tmp_path / "q", 4, 32, False, False)
    monkeypatch.setenv("OPTGPTQ_CPU_GPTQ_ACT", act)
    llm = LLM(str(ckpt), device="cpu", kv_cache_bytes=64 << 20)
    model = llm.engine.runner.model
    head = model.lm_head
    if act == "int8":
        assert isinstance(head, CPUGPTQLinear) and head.bits == 8
        assert isinstance(model.model.embed_tokens, FrozenEmbedding)
    else:
        assert not isinstance(head, CPUGPTQLinear)
    state = load_file(str(ckpt / "model.safetensors"))
    table = state.get("model.embed_tokens.weight", state.get("lm_head.weight")).float()
    ids = torch.tensor([[1, 7, 300]])
    assert torch.equal(model.model.embed_tokens(ids)[0], table[ids[0]])
    rng = torch.Generator().manual_seed(8)
    prompts = [random_prompt(rng, n) for n in (5, 12, 30, 9)]
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=2)
    got = llm.generate(prompts, params)
    monkeypatch.setenv("OPTGPTQ_KERNELS", "reference")
    ref = LLM(str(ckpt), device="cpu", kv_cache_bytes=64 << 20).generate(prompts, params)
    apart = 0
    for a, b in zip(got, ref):
        (_, first), (_, second) = b.top_logprobs[0]
        if first - second > 0.05:
            apart += 1
            assert a.token_ids == b.token_ids
    assert apart


def _rtn_checkpoint(src, dst, bits: int, group_size: int, act_order: bool, sym: bool):
    """A GPTQ checkpoint of ``src``'s decoder linears, round to nearest, groups in a random
    order when ``act_order`` (each group's rows scattered over the input dimension)."""
    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(0)
    state, out = load_file(str(src / "model.safetensors")), {}
    qmax = (1 << bits) - 1
    for name, tensor in state.items():
        if not (".layers." in name and name.endswith("proj.weight")):
            out[name] = tensor
            continue
        w = tensor.t().double()
        k, n = w.shape
        g_idx = torch.arange(k) // group_size
        if act_order:
            g_idx = g_idx[torch.randperm(k, generator=g)]
        groups = int(g_idx.max()) + 1
        lo = torch.stack([w[g_idx == i].min(0).values for i in range(groups)]).clamp(max=0)
        hi = torch.stack([w[g_idx == i].max(0).values for i in range(groups)]).clamp(min=0)
        if sym:
            hi = torch.maximum(hi, -lo)
            lo = -hi
        scales = ((hi - lo) / qmax).clamp(min=1e-5).half().double()
        zeros = (torch.full_like(scales, (qmax + 1) // 2) if sym
                 else (-lo / scales).round().clamp(1, qmax))
        q = ((w / scales[g_idx]).round() + zeros[g_idx]).clamp(0, qmax).long()
        module = name[: -len(".weight")]
        out.update({f"{module}.qweight": pack_rows(q, bits),
                    f"{module}.qzeros": pack_cols(zeros.long() - 1, bits),
                    f"{module}.scales": scales.half(), f"{module}.g_idx": g_idx.int()})
    save_file(out, str(dst / "model.safetensors"))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group_size,
                                  "desc_act": act_order, "sym": sym, "checkpoint_format": "gptq"}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("bits,group_size,act_order,sym", [
    (4, 32, True, True),
    pytest.param(4, 48, False, False, marks=pytest.mark.slow),
    pytest.param(8, 16, True, False, marks=pytest.mark.slow)])
def test_engine_greedy_tokens_native_equal_reference(tiny_models, tmp_path, monkeypatch, bits,
                                                     group_size, act_order, sym):
    """The engine on a GPTQ checkpoint: its layers swapped for the native kernel's, and with
    activations in two INT8 pieces (``OPTGPTQ_CPU_GPTQ_ACT=int16``, within ~3e-5 of the float
    product) the same greedy tokens as with every kernel on its PyTorch reference
    (``OPTGPTQ_KERNELS=reference``). Not with the default single INT8 piece: it moves this tiny
    random model's logits by ~1%, and some steps' top two are closer than that (0.02-0.04
    apart at logits of ~10), so those tokens may differ."""
    ckpt = _rtn_checkpoint(tiny_models["llama-gqa"], tmp_path / "q", bits, group_size,
                           act_order, sym)
    rng = torch.Generator().manual_seed(5)
    prompts = [random_prompt(rng, n) for n in (3, 40, 17)]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    monkeypatch.setenv("OPTGPTQ_CPU_GPTQ_ACT", "int16")
    llm = LLM(str(ckpt), device="cpu", kv_cache_bytes=64 << 20)
    layers = [m for m in llm.engine.runner.model.modules() if isinstance(m, CPUGPTQLinear)]
    assert layers and all(m.packed.act_pieces == 2 for m in layers)
    assert not any(isinstance(m, GPTQLinear) for m in llm.engine.runner.model.modules())
    native = [o.token_ids for o in llm.generate(prompts, params)]
    monkeypatch.setenv("OPTGPTQ_KERNELS", "reference")
    reference = LLM(str(ckpt), device="cpu", kv_cache_bytes=64 << 20).generate(prompts, params)
    assert native == [o.token_ids for o in reference]
