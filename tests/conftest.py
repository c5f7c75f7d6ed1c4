"""Shared fixtures: tiny random models saved as HF folders, the default model, HF references, and
the live Serve deployment of tests/test_serve.py and tests/test_openai_sdk.py (``serve_app``)."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray on loopback, not eth0

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in the interpreter on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers import AutoModelForCausalLM, BloomConfig, LlamaConfig

from optgptq.models.hub import default_tokenizer_path, resolve_model


def _save_tiny(config, path, seed: int):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random init is near-uniform; widen it so greedy choices are decisive
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    model.save_pretrained(str(path))
    from transformers import AutoTokenizer

    # tiny models borrow the default model's tokenizer (shipped without the model package)
    AutoTokenizer.from_pretrained(str(default_tokenizer_path())).save_pretrained(str(path))
    return path


TINY = {
    "llama-mha": lambda: LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        tie_word_embeddings=False, architectures=["LlamaForCausalLM"]),
    "llama-gqa": lambda: LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64},
        tie_word_embeddings=True, architectures=["LlamaForCausalLM"]),
    "bloom": lambda: BloomConfig(
        vocab_size=49152, hidden_size=64, n_layer=2, n_head=4, architectures=["BloomForCausalLM"]),
}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny")
    return {name: _save_tiny(make(), root / name, seed=i)
            for i, (name, make) in enumerate(TINY.items())}


@pytest.fixture(scope="session")
def smollm2_path():
    return resolve_model("smollm2")


@torch.no_grad()
def hf_greedy(model_path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy continuation of one unpadded prompt, through its KV cache.

    A plain argmax loop: ``generate`` would stop at EOS, and its ``min_new_tokens`` works by
    masking EOS, which changes the choices it is meant to check.
    """
    model = _hf_model(str(model_path))
    out = model(torch.tensor([prompt_ids]), use_cache=True)
    tokens: list[int] = []
    for _ in range(max_new_tokens):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = model(torch.tensor([tokens[-1:]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens


_HF_CACHE: dict = {}


def _hf_model(path: str):
    if path not in _HF_CACHE:
        _HF_CACHE[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return _HF_CACHE[path]


def random_prompt(rng: torch.Generator, length: int, vocab: int = 49152) -> list[int]:
    return torch.randint(100, vocab, (length,), generator=rng).tolist()


def poison_rows(monkeypatch, is_bad) -> None:
    """The sampler sees NaN logits for every sequence ``is_bad(seq)`` picks (a model gone wrong
    for that request alone); the other rows are untouched."""
    from optgptq.engine.sampler import Sampler

    real = Sampler.__call__

    def call(self, logits, seqs):
        rows = [i for i, seq in enumerate(seqs) if is_bad(seq)]
        if rows:
            logits = logits.clone()
            logits[rows] = float("nan")
        return real(self, logits, seqs)

    monkeypatch.setattr(Sampler, "__call__", call)


# --- The live Serve deployment (a real Ray Serve on loopback, two engine replicas of the tiny
# GQA model), shared by every test that uses ``serve_app`` (tests/test_serve.py and
# tests/test_openai_sdk.py) so that CI starts it once: those tests are collected into one run
# (the SDK's first, the slow ones that overload and kill replicas last), the deployment starts
# with the first of them and shuts down after the last, before any other test can start Ray.

SERVE_MODEL = "tiny"
_SERVE: dict = {}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_serve(model_path) -> dict:
    import ray

    from deployments.app import deploy
    from optgptq.client import GRPCClient, HTTPClient

    device = "cuda" if torch.cuda.is_available() else "cpu"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    http_port, grpc_port = _free_port(), _free_port()
    path = os.pathsep.join(p for p in [root, os.environ.get("PYTHONPATH")] if p)
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        deploy({
            "model": str(model_path), "served_model_name": SERVE_MODEL,
            "engine": {"device": device, "num_blocks": 96, "max_num_seqs": 16},
            "replicas": {"num_replicas": 2, "max_ongoing_requests": 4, "max_queued_requests": 2,
                         # on a GPU machine both replicas share its first GPU
                         **({"num_gpus": 0.5} if device == "cuda" else {})},
            "router": {"load_token_cost": 64, "stats_period_s": 0.5},
            "ingress": {"http_port": http_port, "grpc_port": grpc_port, "replica_header": True},
        })
    except BaseException:
        _stop_serve(force=True)
        raise
    return {"http": HTTPClient(f"http://127.0.0.1:{http_port}", model=SERVE_MODEL, timeout=120),
            "grpc": GRPCClient(f"127.0.0.1:{grpc_port}", model=SERVE_MODEL, timeout=120),
            "port": http_port, "grpc_target": f"127.0.0.1:{grpc_port}",
            "model_path": model_path}


def _stop_serve(force: bool = False) -> None:
    if _SERVE or force:
        _SERVE.clear()
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.fixture
def serve_app(tiny_models) -> dict:
    """The live deployment: ``http`` / ``grpc`` clients, ``port``, ``grpc_target`` and the
    served model's folder ``model_path``."""
    pytest.importorskip("ray")
    pytest.importorskip("grpc")
    if not _SERVE:
        _SERVE.update(_start_serve(tiny_models["llama-gqa"]))
    return _SERVE


def _uses_serve(item) -> bool:
    return "serve_app" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(session, config, items):
    """The tests on the live deployment run together, where the first of them was collected:
    the SDK suite's first, then tests/test_serve.py's in file order (its slow ones overload and
    kill a replica, so they come last)."""
    users = [item for item in items if _uses_serve(item)]
    if not users:
        return
    first = items.index(users[0])
    rest = [item for item in items if not _uses_serve(item)]

    def rank(item) -> int:
        if item.path.name == "test_openai_sdk.py":
            return 0
        return 2 if item.get_closest_marker("slow") else 1

    items[:] = rest[:first] + sorted(users, key=rank) + rest[first:]


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    if _SERVE and (nextitem is None or not _uses_serve(nextitem)):
        _stop_serve()


def pytest_sessionfinish(session, exitstatus):
    _stop_serve()
