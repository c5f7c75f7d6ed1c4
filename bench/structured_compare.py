"""Compare grammar libraries for structured output on this engine's tokenizer (SmolLM2's,
vocabulary 49152): compile time of a JSON schema and of generic JSON, and per-step token-mask
time on CPU at batch 1 and 64 (every row its own matcher, advanced along a valid path).

    python3 bench/structured_compare.py
"""

from __future__ import annotations

import json
import random
import time

import torch
from transformers import AutoTokenizer

from optgptq.models.hub import resolve_model

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {"type": "object", "properties": {
            "city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"], "additionalProperties": False},
        "role": {"enum": ["admin", "user", "guest"]},
        "score": {"type": "number"},
    },
    "required": ["name", "age", "email", "tags", "address", "role", "score"],
    "additionalProperties": False,
}
TEXT = json.dumps({"name": "Ada Lovelace", "age": 36, "email": "ada@math.com",
                   "tags": ["math", "poetry", "engines"], "address": {"city": "London",
                   "zip": "12345"}, "role": "admin", "score": 9.5},
                  separators=(",", ":"))
VOCAB = 49152
STEPS = 40


def allowed(mask: torch.Tensor, row: int, token: int) -> bool:
    return bool((int(mask[row, token // 32]) >> (token % 32)) & 1)


def best(fn, reps=3):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def path_tokens(tok):
    return tok.encode(TEXT, add_special_tokens=False)


def bench_xgrammar(tok, ids, batches):
    import xgrammar as xgr
    t = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=VOCAB)
    t_tok = time.perf_counter() - t
    schema = json.dumps(SCHEMA)

    def compile_schema():
        return xgr.GrammarCompiler(info, cache_enabled=False).compile_json_schema(schema)
    t_schema = best(compile_schema)
    t_json = best(lambda: xgr.GrammarCompiler(info, cache_enabled=False)
                  .compile_builtin_json_grammar())
    cg = compile_schema()
    out = {"tokenizer_s": t_tok, "compile_schema_s": t_schema, "compile_json_s": t_json}
    for b in batches:
        ms = [xgr.GrammarMatcher(cg) for _ in range(b)]
        mask = xgr.allocate_token_bitmask(b, VOCAB)
        batch = xgr.BatchGrammarMatcher() if hasattr(xgr, "BatchGrammarMatcher") else None
        times = []
        for step in range(min(STEPS, len(ids))):
            t = time.perf_counter()
            if batch is not None and b > 1:
                batch.batch_fill_next_token_bitmask(ms, mask)
            else:
                for i, m in enumerate(ms):
                    m.fill_next_token_bitmask(mask, i)
            times.append(time.perf_counter() - t)
            assert allowed(mask, b - 1, ids[step])
            for m in ms:
                assert m.accept_token(ids[step])
        out[f"mask_ms_b{b}"] = 1e3 * sorted(times)[len(times) // 2]
    return out


def bench_llguidance(tok, ids, batches):
    import llguidance
    import llguidance.hf
    import llguidance.torch
    t = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=VOCAB)
    t_tok = time.perf_counter() - t
    grm = llguidance.LLMatcher.grammar_from_json_schema(
        json.dumps(SCHEMA), defaults={"whitespace_flexible": False})
    grm_json = llguidance.LLMatcher.grammar_from_json_schema(
        json.dumps({"type": "object"}), defaults={"whitespace_flexible": False})

    def compile_(g):  # llguidance builds lazily: the first mask is the real work
        m = llguidance.LLMatcher(tok_ll := lltok, g)
        mask = llguidance.torch.allocate_token_bitmask(1, VOCAB)
        llguidance.torch.fill_next_token_bitmask(m, mask, 0)
        assert not m.is_error(), m.get_error()
        return tok_ll
    out = {"tokenizer_s": t_tok, "compile_schema_s": best(lambda: compile_(grm)),
           "compile_json_s": best(lambda: compile_(grm_json))}
    exe = llguidance.LLExecutor()
    for b in batches:
        ms = [llguidance.LLMatcher(lltok, grm) for _ in range(b)]
        mask = llguidance.torch.allocate_token_bitmask(b, VOCAB)
        times = []
        for step in range(min(STEPS, len(ids))):
            t = time.perf_counter()
            if b > 1:
                llguidance.torch.fill_next_token_bitmask_par(exe, [(m, i) for i, m in enumerate(ms)], mask)
            else:
                llguidance.torch.fill_next_token_bitmask(ms[0], mask, 0)
            times.append(time.perf_counter() - t)
            assert allowed(mask, b - 1, ids[step])
            for m in ms:
                assert m.consume_token(ids[step]), m.get_error()
        out[f"mask_ms_b{b}"] = 1e3 * sorted(times)[len(times) // 2]
    return out


def bench_outlines(tok, ids, batches):
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema
    t = time.perf_counter()
    # byte-level BPE tokens decoded to text, as outlines-core's from_pretrained does (it needs
    # the Hub); tokens that are partial UTF-8 are approximated with U+FFFD here
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    inverse = {chr(b): b for b in printable} | {chr(256 + k): b for k, b in enumerate(others)}
    vocab: dict[str, list[int]] = {}
    for token, i in tok.get_vocab().items():
        if i != tok.eos_token_id and i < VOCAB:
            raw = bytes(inverse.get(c, 32) for c in token).decode("utf-8", "replace")
            vocab.setdefault(raw, []).append(i)
    voc = Vocabulary(tok.eos_token_id, vocab)
    t_tok = time.perf_counter() - t
    regex = build_regex_from_schema(json.dumps(SCHEMA))
    t_schema = best(lambda: Index(regex, voc), reps=1)
    from outlines_core.json_schema import build_regex_from_schema as b
    out = {"tokenizer_s": t_tok, "compile_schema_s": t_schema,
           "compile_json_s": "n/a (regex only: generic JSON is not a regular language)"}
    index = Index(regex, voc)
    for bsz in batches:
        gs = [Guide(index) for _ in range(bsz)]
        mask = torch.zeros((bsz, (VOCAB + 31) // 32), dtype=torch.int32)
        times = []
        for step in range(min(STEPS, len(ids))):
            t = time.perf_counter()
            for i, g in enumerate(gs):
                row = mask[i]
                g.write_mask_into(row.data_ptr(), row.numel(), row.element_size())
            times.append(time.perf_counter() - t)
            assert allowed(mask, bsz - 1, ids[step])
            for g in gs:
                g.advance(ids[step])
        out[f"mask_ms_b{bsz}"] = 1e3 * sorted(times)[len(times) // 2]
    return out


def main():
    tok = AutoTokenizer.from_pretrained(str(resolve_model("smollm2")))
    ids = path_tokens(tok)
    print(f"torch threads {torch.get_num_threads()}, {len(ids)} path tokens")
    for name, fn in (("xgrammar", bench_xgrammar), ("llguidance", bench_llguidance),
                     ("outlines-core", bench_outlines)):
        try:
            print(name, json.dumps(fn(tok, ids, (1, 64))))
        except Exception as exc:  # noqa: BLE001 - a comparison: report and go on
            print(name, "failed:", type(exc).__name__, exc)


if __name__ == "__main__":
    main()
