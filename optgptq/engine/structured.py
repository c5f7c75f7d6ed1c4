"""Structured output: token masks from a grammar, per request, applied inside the batched sampler.

A request's :class:`StructuredSpec` (``SamplingParams.structured``) names what its output must
be: ``json_object`` (any JSON object), ``json_schema`` (a JSON Schema, OpenAI's strict or not),
or vLLM's ``structured_outputs`` extension: ``regex``, ``grammar`` (EBNF, xgrammar's dialect of
GBNF) or ``choice`` (one of a list of strings); or ``structural_tag`` (xgrammar's structural tag,
JSON: tagged segments whose contents follow JSON schemas), which tool calling builds for
``tool_choice`` ``required`` and named functions (:mod:`optgptq.serving.openai_tools`). JSON is
generated without free whitespace (compact separators; at most one blank at a time inside a
structural tag), so a model cannot spend its tokens on blanks.

Library: **xgrammar** (mlc-ai; vLLM's default backend). Measured on this engine's tokenizer
(SmolLM2, vocabulary 49152) with ``bench/structured_compare.py``: a 7-property schema (nested
object, enum, pattern, bounded integer, array) and generic JSON, masks along a valid 60-token
path, median per step, 2 CPU cores::

                    tokenizer setup  compile schema  compile JSON  mask b1   mask b64
    xgrammar 0.2.9        0.6 s          24 ms          4 ms       0.004 ms  0.07 ms
    llguidance 1.9.1      1.8 s           1 ms (lazy)   0.4 ms     0.025 ms  3.8 ms (par)
    outlines-core 0.2.14  1.8 s         1700 ms         n/a        0.019 ms  1.1 ms

xgrammar's masks are the cheapest by an order of magnitude at batch 64 (its precomputed
context-independent token sets make most steps a copy), its compile of a schema is tens of
milliseconds, it supports JSON Schema, regex and EBNF, it rolls back (speculative decoding
later), and its wheels exist for CPython 3.10-3.13 on Linux x86_64/aarch64 and macOS.
llguidance compiles lazily (near-zero up front, paid on the first masks) and was 50x slower
at batch 64 here; outlines-core compiles a regex index per schema (1.7 s) and cannot express
generic JSON (not regular).

Where the work happens:

- the ingress (or any caller building ``SamplingParams``) checks the spec: the grammar is
  parsed without the tokenizer (microseconds to milliseconds), so a bad schema, regex or
  grammar is a ValueError naming ``response_format`` (400) before anything is queued;
- the engine compiles it against the tokenizer (:class:`GrammarCache`, one compile per distinct
  spec text, kept LRU) on a worker thread when the request is added; the request waits out of
  the scheduler until its grammar is ready, so a slow compile never stalls the engine loop;
- each sequence (each of ``n`` choices) holds its own :class:`xgrammar.GrammarMatcher`; the
  sampler fills a bitmask for the rows that have one and sets the other tokens' logits to -inf
  (rows without a grammar untouched; a batch without grammars pays one ``any``); the engine
  advances the matcher with every appended token and finishes the sequence (``stop``) once the
  grammar is complete (the grammar admits EOS only then). Preemption recomputes the KV of the
  tokens a sequence already has, so the matcher's state stays right (nothing to roll back).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

KINDS = ("json_object", "json_schema", "regex", "grammar", "choice", "structural_tag")
MAX_SPEC_CHARS = 64 << 10
"""Longest schema / regex / grammar text a request may carry."""
CACHE_SIZE = 256
"""Compiled grammars kept per engine (LRU)."""


@dataclass(frozen=True)
class StructuredSpec:
    """What a request's output must match. ``spec``: the JSON Schema (JSON text) for
    ``json_schema``, the pattern for ``regex``, the EBNF for ``grammar``, a JSON list of strings
    for ``choice``, the structural tag's JSON for ``structural_tag``, empty for ``json_object``.
    ``strict`` (json_schema): properties and items not in the schema are not allowed (OpenAI's
    strict)."""

    kind: str
    spec: str = ""
    strict: bool = False
    field: str = "response_format"
    """The request field it came from (error messages name it)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self.field}: unknown structured output type {self.kind!r}")
        if not isinstance(self.spec, str) or len(self.spec) > MAX_SPEC_CHARS:
            raise ValueError(f"{self.field}: the {self.kind} must be text of at most "
                             f"{MAX_SPEC_CHARS} characters")
        self.grammar()  # parse now: a bad spec is the caller's error

    def grammar(self):
        """The tokenizer-free xgrammar Grammar; ValueError naming the field if it is invalid."""
        import xgrammar as xgr

        try:
            if self.kind == "json_object":
                return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False,
                                                    strict_mode=False)
            if self.kind == "json_schema":
                return xgr.Grammar.from_json_schema(self.spec, any_whitespace=False,
                                                    strict_mode=self.strict)
            if self.kind == "regex":
                return xgr.Grammar.from_regex(self.spec)
            if self.kind == "grammar":
                return xgr.Grammar.from_ebnf(self.spec)
            if self.kind == "structural_tag":
                return xgr.Grammar.from_structural_tag(self.spec)
            choices = json.loads(self.spec)
            if (not isinstance(choices, list) or not choices
                    or not all(isinstance(c, str) and c for c in choices)):
                raise ValueError("choice must be a non-empty list of non-empty strings")
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c)
                                                                  for c in choices))
        except (RuntimeError, ValueError, TypeError) as exc:
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            if "] " in reason and reason.startswith("["):  # xgrammar's "[time] file:line: why"
                reason = reason.split(": ", 1)[-1]
            raise ValueError(f"{self.field}: invalid {self.kind}: {reason}") from None

    @property
    def key(self) -> tuple:
        return (self.kind, self.spec, self.strict)


class GrammarCache:
    """Compiles specs against one tokenizer on a worker thread, one compile per distinct spec
    (LRU); the tokenizer's tables are built on the first use (about 0.6 s for 49k tokens)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop = stop_token_ids
        self._compiler = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="optgptq-grammar")
        self._cache: OrderedDict[tuple, Future] = OrderedDict()

    def compile(self, spec: StructuredSpec) -> Future:
        """A future of the CompiledGrammar (shared by every request with the same spec)."""
        future = self._cache.get(spec.key)
        if future is None or (future.done() and future.exception() is not None):
            future = self._cache[spec.key] = self._pool.submit(self._compile, spec)
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        self._cache.move_to_end(spec.key)
        return future

    def _compile(self, spec: StructuredSpec):
        import xgrammar as xgr

        if self._compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self._vocab_size,
                                                      stop_token_ids=self._stop)
            self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        return self._compiler.compile_grammar(spec.grammar())

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def matcher(compiled):
    import xgrammar as xgr

    return xgr.GrammarMatcher(compiled)


_SHIFTS = torch.arange(32, dtype=torch.int32)


def apply_masks(logits: torch.Tensor, rows: list[int], matchers: list) -> None:
    """Sets, in place, the logits of the tokens each matcher does not allow now to -inf (row
    ``rows[j]`` by ``matchers[j]``)."""
    import xgrammar as xgr

    vocab = logits.shape[1]
    bitmask = xgr.allocate_token_bitmask(len(rows), vocab)
    for j, m in enumerate(matchers):
        m.fill_next_token_bitmask(bitmask, j)
    allowed = ((bitmask.unsqueeze(-1) >> _SHIFTS) & 1).bool().view(len(rows), -1)[:, :vocab]
    idx = torch.tensor(rows, device=logits.device)
    logits[idx] = logits[idx].masked_fill(~allowed.to(logits.device, non_blocking=True),
                                          float("-inf"))
