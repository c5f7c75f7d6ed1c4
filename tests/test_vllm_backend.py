"""The vLLM backend's own logic, without vLLM: its cache events mapped onto the router's block
hashes, the engine settings mapped onto vLLM's arguments, the ``backend``/``vllm`` app config."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from optgptq import cli
from optgptq.config import EngineConfig
from optgptq.serving.kv_events import VLLMEventTranslator
from optgptq.serving.router_index import PrefixIndex, RouterParams, prompt_block_hashes
from optgptq.serving.vllm_engine import CPU_KV_BYTES, vllm_engine_args


# Stand-ins for vLLM's event classes: the translator matches them by class name and fields.
@dataclass
class BlockStored:
    block_hashes: list
    parent_block_hash: object
    token_ids: list
    block_size: int
    lora_id: int | None = None
    medium: str | None = "GPU"
    lora_name: str | None = None
    extra_keys: list | None = None
    group_idx: int | None = 0


@dataclass
class BlockRemoved:
    block_hashes: list
    medium: str | None = "GPU"
    group_idx: int | None = 0


@dataclass
class AllBlocksCleared:
    pad: list = field(default_factory=list)


def _vh(i: int) -> bytes:  # vLLM hashes are opaque to the translator
    return f"vllm-{i}".encode()


def test_stored_blocks_get_the_routers_chained_hashes():
    tokens = list(range(100, 100 + 4 * 8 + 3))
    t = VLLMEventTranslator(8)
    first = t.translate([BlockStored([_vh(0), _vh(1)], None, tokens[:16], 8)])
    later = t.translate([BlockStored([_vh(2), _vh(3)], _vh(1), tokens[16:32], 8)])
    assert [k for k, _ in first + later] == ["add"] * 4
    assert [h for _, h in first + later] == prompt_block_hashes(tokens, 8)
    index = PrefixIndex(RouterParams(block_size=8))
    index.apply_events("r", first + later)
    assert index.matched_tokens(prompt_block_hashes(tokens, 8), ["r"]) == {"r": 32}
    assert len(t) == 4 and t.skipped == 0


def test_a_hash_is_evicted_when_its_last_copy_goes():
    t = VLLMEventTranslator(4)
    (add,) = t.translate([BlockStored([_vh(0)], None, [5, 6, 7, 8], 4)])
    assert t.translate([BlockStored([_vh(0)], None, [5, 6, 7, 8], 4)]) == []  # second copy
    assert t.translate([BlockRemoved([_vh(0)])]) == []
    assert t.translate([BlockRemoved([_vh(0)]), BlockRemoved([_vh(9)])]) == [("evict", add[1])]
    assert len(t) == 0


def test_clear_evicts_everything():
    t = VLLMEventTranslator(2)
    adds = t.translate([BlockStored([_vh(0), _vh(1)], None, [1, 2, 3, 4], 2)])
    assert t.translate([AllBlocksCleared()]) == [("evict", h) for _, h in adds]
    assert len(t) == 0


@pytest.mark.parametrize("event", [
    BlockStored([_vh(5)], _vh(4), [1, 2], 2),                      # parent never seen
    BlockStored([_vh(5)], None, [1, 2, 3, 4], 4),                  # vLLM block size differs
    BlockStored([_vh(5)], None, [1, 2], 2, lora_name="adapter"),   # LoRA changes the KV
    BlockStored([_vh(5)], None, [1, 2], 2, extra_keys=[("salt",)]),
    BlockStored([_vh(5)], None, [1, 2], 2, group_idx=1),
])
def test_events_the_router_cannot_name_are_skipped(event):
    t = VLLMEventTranslator(2)
    assert t.translate([event]) == [] and t.skipped == 1 and len(t) == 0


@pytest.fixture(scope="module")
def gptq_folder(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("rtn") / "q"
    assert cli.main(["quantize", "--model", str(tiny_models["llama-gqa"]), "--out", str(out),
                     "--method", "rtn", "--bits", "4", "--group-size", "32"]) == 0
    return out


def test_engine_settings_become_vllm_arguments(tiny_models, gptq_folder):
    model = str(tiny_models["llama-gqa"])
    args = vllm_engine_args(EngineConfig(model=model, block_size=32, num_blocks=40,
                                         max_num_seqs=8, max_model_len=256),
                            {"enforce_eager": True})
    assert args == {"model": model, "dtype": "float32", "quantization": None, "block_size": 32,
                    "max_num_seqs": 8, "max_num_batched_tokens": 1024, "max_model_len": 256,
                    "enable_prefix_caching": True, "seed": 0, "kv_cache_memory_bytes": CPU_KV_BYTES,
                    "num_gpu_blocks_override": 40, "enforce_eager": True}
    q = vllm_engine_args(EngineConfig(model=str(gptq_folder), block_size=32))
    assert (q["quantization"], q["dtype"]) == ("gptq", "bfloat16")
    gpu = vllm_engine_args(EngineConfig(model=model, block_size=16), on_cpu=False)
    assert (gpu["dtype"], gpu["block_size"], gpu["kv_cache_memory_bytes"]) == ("auto", 16, None)


@pytest.mark.parametrize("settings,extra,field", [
    ({"block_size": 16}, {}, "block_size"),
    ({"block_size": 32, "device": "cuda:1"}, {}, "device"),
    ({"block_size": 32, "quantization": "gptq"}, {}, "quantization"),
    ({"block_size": 32}, {"block_size": 64}, "vllm.block_size"),
    ({"block_size": 32}, {"model": "x"}, "vllm.model"),
])
def test_settings_vllm_cannot_honour_name_the_field(tiny_models, settings, extra, field):
    config = EngineConfig(model=str(tiny_models["llama-gqa"]), **settings)
    with pytest.raises(ValueError, match=field):
        vllm_engine_args(config, extra)


def test_gptq_in_float32_is_refused_on_cpu(gptq_folder):
    with pytest.raises(ValueError, match="dtype"):
        vllm_engine_args(EngineConfig(model=str(gptq_folder), block_size=32, dtype="float32"))


def test_app_config_backend(monkeypatch):
    pytest.importorskip("ray.serve")
    import deployments.app as app

    monkeypatch.setattr(app, "vllm_available", lambda: False)
    with pytest.raises(ValueError, match="make vllm"):
        app.parse_config({"backend": "vllm"})
    with pytest.raises(ValueError, match="vllm: arguments for vLLM"):
        app.parse_config({"vllm": {"enforce_eager": True}})
    with pytest.raises(ValueError, match="backend"):
        app.parse_config({"backend": "sglang"})
    monkeypatch.setattr(app, "vllm_available", lambda: True)
    with pytest.raises(ValueError, match="vllm.max_num_seqs"):
        app.parse_config({"backend": "vllm", "vllm": {"max_num_seqs": 4}})
    config = app.parse_config({"backend": "vllm", "engine": {"block_size": 32},
                               "vllm": {"enforce_eager": True}})
    assert config.backend == "vllm" and config.vllm == {"enforce_eager": True}


def test_sampling_params_and_logprobs_map_onto_vllms(monkeypatch):
    """Every engine field reaches vLLM's SamplingParams (a stand-in recording its arguments);
    n > 1 is refused; vLLM's per-token {id: Logprob(logprob, rank)} become our logprobs and
    top alternatives."""
    import sys
    import types

    from optgptq.engine.sampling_params import SamplingParams
    from optgptq.serving.vllm_engine import _sampling_params, vllm_logprobs

    fake = types.ModuleType("vllm")
    fake.SamplingParams = lambda **kwargs: kwargs
    kinds = types.ModuleType("vllm.sampling_params")
    kinds.RequestOutputKind = types.SimpleNamespace(DELTA="delta")
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", kinds)
    mapped = _sampling_params(SamplingParams(
        max_tokens=9, min_tokens=2, presence_penalty=0.5, frequency_penalty=-1,
        repetition_penalty=1.1, logit_bias={5: -100}, logprobs=True, top_logprobs=3))
    assert {k: mapped[k] for k in ("n", "max_tokens", "min_tokens", "presence_penalty",
                                   "frequency_penalty", "repetition_penalty", "logit_bias",
                                   "logprobs", "output_kind")} == {
        "n": 1, "max_tokens": 9, "min_tokens": 2, "presence_penalty": 0.5,
        "frequency_penalty": -1, "repetition_penalty": 1.1, "logit_bias": {5: -100},
        "logprobs": 3, "output_kind": "delta"}
    assert _sampling_params(SamplingParams())["logprobs"] is None
    assert "structured_outputs" not in _sampling_params(SamplingParams())
    from optgptq.engine.structured import StructuredSpec
    kinds.StructuredOutputsParams = lambda **kwargs: kwargs
    for spec, expected in ((StructuredSpec("json_object"), {"json_object": True}),
                           (StructuredSpec("json_schema", '{"type": "object"}', strict=True),
                            {"json": {"type": "object"}}),
                           (StructuredSpec("choice", '["a", "b"]'), {"choice": ["a", "b"]}),
                           (StructuredSpec("regex", "[0-9]+"), {"regex": "[0-9]+"}),
                           (StructuredSpec("grammar", 'root ::= "x"'), {"grammar": 'root ::= "x"'})):
        mapped = _sampling_params(SamplingParams(structured=spec))["structured_outputs"]
        assert mapped == {**expected, "disable_any_whitespace": True,
                          "disable_additional_properties": spec.strict}
    with pytest.raises(ValueError, match="^n: "):
        _sampling_params(SamplingParams(n=2))
    lp = types.SimpleNamespace
    steps = [{7: lp(logprob=-0.1, rank=1), 8: lp(logprob=-2.5, rank=2)},
             {9: lp(logprob=-4.0, rank=5), 3: lp(logprob=-0.3, rank=1),
              4: lp(logprob=-1.9, rank=2)}]
    assert vllm_logprobs([7, 9], steps, 2) == ([-0.1, -4.0], [[(7, -0.1), (8, -2.5)],
                                                               [(3, -0.3), (4, -1.9)]])
    assert vllm_logprobs([7], steps[:1], 0) == ([-0.1], [None])
