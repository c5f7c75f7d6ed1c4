"""The ``optgptq`` command line: ``generate`` runs the engine on prompts; ``client`` sends one to
a running deployment (``make serve``) over HTTP or gRPC; ``convert``, ``quantize``, ``compress``
and ``eval`` (:mod:`optgptq.compress`) compress and evaluate models offline."""

from __future__ import annotations

import argparse
import json
import sys
import time

from optgptq.compress.cli import register as register_compress
from optgptq.config import EngineConfig


def _engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default="smollm2",
                   help="'smollm2' (embedded default) or a local Hugging Face folder")
    g.add_argument("--device", default="auto")
    g.add_argument("--dtype", default="auto")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--kv-cache-bytes", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=128)
    g.add_argument("--max-num-batched-tokens", type=int, default=1024)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--no-prefix-caching", action="store_true")


def _engine_config(a: argparse.Namespace) -> EngineConfig:
    return EngineConfig(model=a.model, device=a.device, dtype=a.dtype, block_size=a.block_size,
                        kv_cache_bytes=a.kv_cache_bytes, max_num_seqs=a.max_num_seqs,
                        max_num_batched_tokens=a.max_num_batched_tokens,
                        max_model_len=a.max_model_len,
                        enable_prefix_caching=not a.no_prefix_caching)


def _generate(a: argparse.Namespace) -> int:
    from optgptq.engine.llm_engine import LLMEngine
    from optgptq.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k,
                            top_p=a.top_p, seed=a.seed, stop=a.stop or [],
                            ignore_eos=a.ignore_eos, logprobs=a.logprobs)
    engine = LLMEngine(_engine_config(a))
    prompts = []
    for text in a.prompt:
        if a.chat:
            prompts.append(engine.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True,
                tokenize=True, return_dict=True)["input_ids"])
        else:
            prompts.append(text)
    streaming = len(prompts) == 1 and not a.json
    ids = [engine.add_request(p, params, stream=streaming) for p in prompts]
    start = time.perf_counter()
    done, failed = {}, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if streaming:
                print(out.delta_text, end="", flush=True)
            if out.finished:
                done[out.request_id] = out
        failed.update(engine.take_failures())
    elapsed = time.perf_counter() - start
    if streaming:
        print()
    for text, rid in zip(a.prompt, ids):
        if rid in failed:
            print(f"optgptq: error: prompt {text!r}: {failed[rid]}", file=sys.stderr)
            continue
        out = done[rid]
        if a.json:
            print(json.dumps({"prompt": text, "text": out.text, "token_ids": out.token_ids,
                              "finish_reason": out.finish_reason, "logprobs": out.logprobs}))
        elif not streaming:
            print(f"### {text}\n{out.text}\n[{out.finish_reason}]")
    n = sum(len(o.token_ids) for o in done.values())
    print(f"[{len(ids)} request(s), {n} tokens in {elapsed:.2f}s, {n / elapsed:.1f} tok/s, "
          f"device {engine.runner.device}, dtype {str(engine.runner.dtype).removeprefix('torch.')}]",
          file=sys.stderr)
    return 1 if failed else 0


def _client(a: argparse.Namespace) -> int:
    from optgptq.client import ClientError, GRPCClient, HTTPClient

    params = {"max_tokens": a.max_tokens, "temperature": a.temperature}
    try:
        if a.grpc:
            client = GRPCClient(a.grpc, model=a.model, api_key=a.api_key)
            if a.stream:
                for part in client.stream(a.prompt, chat=not a.raw, **params):
                    print(part.text, end="", flush=True)
                print()
            else:
                print(client.generate(a.prompt, chat=not a.raw, **params).text)
            return 0
        client = HTTPClient(a.url, model=a.model, api_key=a.api_key)
        send = client.complete if a.raw else client.chat
        if a.stream:
            for delta in send(a.prompt, stream=True, **params):
                print(delta, end="", flush=True)
            print()
        else:
            out = send(a.prompt, **params)
            choice = out["choices"][0]
            print(choice["text"] if a.raw else choice["message"]["content"])
    except ClientError as exc:
        print(f"optgptq client: error {exc.status}: {exc.message}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"optgptq client: cannot reach the server: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="optgptq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for one or more prompts")
    _engine_args(gen)
    gen.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    gen.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--logprobs", action="store_true")
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt")
    gen.set_defaults(func=_generate)
    cli = sub.add_parser("client", help="send a prompt to a running deployment (HTTP or gRPC)")
    cli.add_argument("--prompt", required=True)
    cli.add_argument("--url", default="http://127.0.0.1:8000", help="HTTP base URL")
    cli.add_argument("--grpc", metavar="HOST:PORT", help="use gRPC at this address instead")
    cli.add_argument("--model", default="smollm2", help="the served model name")
    cli.add_argument("--raw", action="store_true", help="plain completion, no chat template")
    cli.add_argument("--stream", action="store_true")
    cli.add_argument("--max-tokens", type=int, default=64)
    cli.add_argument("--temperature", type=float, default=0.0)
    cli.add_argument("--api-key", default=None, help="default: $OPTGPTQ_API_KEY")
    cli.set_defaults(func=_client)
    register_compress(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"optgptq: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
