"""OpenAI conformance, driven by the official ``openai`` Python SDK against the live deployment.

The deployment is tests/test_serve.py's (``serve_app`` in tests/conftest.py: started once for
both modules). Every test asserts what a field does, not only that it is accepted: token counts,
where a stop string cuts the text, seeded and greedy reproducibility (greedy against
transformers' own argmax loop on the same weights), choice indices and usage of ``n`` and of a
list of prompts, logprobs' shapes and values, the usage chunk of ``stream_options``, penalties,
``logit_bias``, ``min_tokens``, ``cache_salt`` namespaces, the models routes, and refused
fields as ``BadRequestError`` naming the field (a refused field found implemented in
:data:`~optgptq.serving.openai_requests.REFUSED` is skipped). vLLM's extras go in
``extra_body``, as vLLM's own docs do.
"""

from __future__ import annotations

import math
import random

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("ray")

from optgptq.serving.openai_requests import REFUSED  # noqa: E402

from tests.conftest import SERVE_MODEL as MODEL  # noqa: E402
from tests.conftest import hf_greedy  # noqa: E402

GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}
WORDS = ["paged", "cache", "block", "river", "token", "quiet", "router", "lamp", "north",
         "yellow", "engine", "grain", "seven", "tower", "signal", "maple"]


@pytest.fixture
def client(serve_app):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{serve_app['port']}/v1", api_key="unused",
                         max_retries=0, timeout=120)


@pytest.fixture
def tokenizer(serve_app):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(serve_app["model_path"]))


@pytest.fixture
def rng():
    return random.Random()


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _stream(client, chat: bool, **kwargs) -> list:
    create = client.chat.completions.create if chat else client.completions.create
    return list(create(model=MODEL, stream=True, **kwargs))


def _stream_text(chunks, index: int = 0) -> str:
    out = []
    for c in chunks:
        for ch in c.choices:
            if ch.index == index:
                piece = ch.delta.content if hasattr(ch, "delta") else ch.text
                out.append(piece or "")
    return "".join(out)


# --- models -----------------------------------------------------------------------------------

def test_models_list_and_retrieve(client):
    assert [m.id for m in client.models.list()] == [MODEL]
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.object == "model"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-17")
    assert err.value.status_code == 404 and "gpt-17" in err.value.message


# --- lengths, usage, streaming ------------------------------------------------------------------

def test_max_tokens_usage_and_stream_usage_chunk(client, rng):
    prompt = _words(rng, 8)
    unary = client.completions.create(model=MODEL, prompt=prompt, max_tokens=7, **GREEDY)
    assert unary.object == "text_completion" and unary.model == MODEL
    assert unary.usage.completion_tokens == 7 and unary.choices[0].finish_reason == "length"
    assert unary.usage.total_tokens == unary.usage.prompt_tokens + 7
    chunks = _stream(client, False, prompt=prompt, max_tokens=7,
                     stream_options={"include_usage": True}, **GREEDY)
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage.model_dump(exclude_none=True) == \
        unary.usage.model_dump(exclude_none=True)
    assert _stream_text(chunks) == unary.choices[0].text  # greedy: unary and stream agree
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    # without include_usage: no usage chunk
    plain = _stream(client, False, prompt=prompt, max_tokens=7, **GREEDY)
    assert all(c.usage is None and c.choices for c in plain)


def test_chat_max_completion_tokens_role_and_stream(client, rng):
    messages = _chat(_words(rng, 6))
    unary = client.chat.completions.create(model=MODEL, messages=messages,
                                           max_completion_tokens=5, **GREEDY)
    assert unary.object == "chat.completion"
    assert unary.choices[0].message.role == "assistant"
    assert unary.usage.completion_tokens == 5 and unary.choices[0].finish_reason == "length"
    # max_completion_tokens wins over max_tokens
    both = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=9,
                                          max_completion_tokens=3, **GREEDY)
    assert both.usage.completion_tokens == 3
    chunks = _stream(client, True, messages=messages, max_completion_tokens=5,
                     stream_options={"include_usage": True}, **GREEDY)
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.delta.role is None for c in chunks[1:] for ch in c.choices)
    assert _stream_text(chunks) == unary.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert chunks[-1].usage.prompt_tokens == unary.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_greedy_matches_transformers(client, serve_app, tokenizer, rng):
    """temperature 0 is the model's argmax, token for token (the reference: transformers'
    greedy loop on the same weights), unary and streamed."""
    ids = [rng.randrange(100, 49152) for _ in range(12)]
    expected = hf_greedy(serve_app["model_path"], ids, 10)
    unary = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, logprobs=0,
                                      **GREEDY)
    assert unary.usage.prompt_tokens == 12
    assert unary.choices[0].logprobs.tokens == [tokenizer.decode([t]) for t in expected]
    assert unary.choices[0].text == tokenizer.decode(expected)
    chunks = _stream(client, False, prompt=ids, max_tokens=10, **GREEDY)
    assert _stream_text(chunks) == unary.choices[0].text


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_stop_string_cuts_the_text(client, rng, chat):
    kwargs = ({"messages": _chat(_words(rng, 6))} if chat else {"prompt": _words(rng, 6)})
    create = client.chat.completions.create if chat else client.completions.create

    def text_of(response):
        c = response.choices[0]
        return c.message.content if chat else c.text

    full = text_of(create(model=MODEL, max_tokens=16, **kwargs, **GREEDY))
    # a stop string from the middle of the greedy text: the answer ends right before its first
    # occurrence
    start = next((i for i in range(max(1, len(full) // 3), len(full) - 2)
                  if full[i:i + 2].strip() == full[i:i + 2]), None)
    if start is None:
        pytest.skip(f"no usable stop string in {full!r}")
    stop = full[start:start + 2]
    cut = full[:full.index(stop)]
    stopped = create(model=MODEL, max_tokens=16, stop=[stop, "\x00never"], **kwargs, **GREEDY)
    assert text_of(stopped) == cut and stopped.choices[0].finish_reason == "stop"
    chunks = _stream(client, chat, max_tokens=16, stop=stop, **kwargs, **GREEDY)
    assert _stream_text(chunks) == cut
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_seed_reproduces_sampling(client, rng, chat):
    kwargs = ({"messages": _chat(_words(rng, 6))} if chat else {"prompt": _words(rng, 6)})
    create = client.chat.completions.create if chat else client.completions.create
    common = {"model": MODEL, "max_tokens": 12, "temperature": 1.0,
              "extra_body": {"ignore_eos": True}, **kwargs}

    def text_of(response):
        c = response.choices[0]
        return c.message.content if chat else c.text

    a, b = (text_of(create(seed=1234, **common)) for _ in range(2))
    assert a == b
    other = {text_of(create(seed=s, **common)) for s in (1, 2, 3)}
    assert len(other | {a}) > 1  # the seed matters (12 tokens of a near-uniform model)
    assert _stream_text(_stream(client, chat, seed=1234, **{k: v for k, v in common.items()
                                                            if k != "model"})) == a


# --- n and lists of prompts ----------------------------------------------------------------------

def test_n_choices_and_list_prompts(client, rng):
    ids = [rng.randrange(100, 49152) for _ in range(10)]
    one = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, **GREEDY)
    two = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, n=2, **GREEDY)
    assert [c.index for c in two.choices] == [0, 1]
    assert {c.text for c in two.choices} == {one.choices[0].text}
    assert two.usage.prompt_tokens == 10 and two.usage.completion_tokens == 12  # prompt once
    sampled = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, n=2, seed=7,
                                        temperature=1.0, extra_body={"ignore_eos": True})
    assert sampled.choices[0].text != sampled.choices[1].text  # n samples, not one repeated

    prompts = [_words(rng, 4), _words(rng, 7)]
    singles = [client.completions.create(model=MODEL, prompt=p, max_tokens=5, **GREEDY)
               for p in prompts]
    listed = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, n=2, **GREEDY)
    assert [c.index for c in listed.choices] == [0, 1, 2, 3]  # prompt_index * n + j
    assert [c.text for c in listed.choices] == [s.choices[0].text for s in singles for _ in "ab"]
    assert listed.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert listed.usage.completion_tokens == 20
    chunks = _stream(client, False, prompt=prompts, max_tokens=5, n=2,
                     stream_options={"include_usage": True}, **GREEDY)
    for i in range(4):
        assert _stream_text(chunks, i) == listed.choices[i].text
    assert chunks[-1].usage.completion_tokens == 20


def test_chat_n_streamed(client, rng):
    messages = _chat(_words(rng, 5))
    unary = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, n=2,
                                           **GREEDY)
    assert [c.index for c in unary.choices] == [0, 1]
    assert unary.usage.completion_tokens == 8
    chunks = _stream(client, True, messages=messages, max_tokens=4, n=2,
                     stream_options={"include_usage": True}, **GREEDY)
    for i in (0, 1):
        mine = [ch for c in chunks for ch in c.choices if ch.index == i]
        assert mine[0].delta.role == "assistant" and mine[-1].finish_reason == "length"
        assert _stream_text(chunks, i) == unary.choices[i].message.content
    assert chunks[-1].usage.prompt_tokens == unary.usage.prompt_tokens


# --- messages ----------------------------------------------------------------------------------------

def test_list_of_parts_and_developer_role(client, rng):
    system, a, b = _words(rng, 4), _words(rng, 3), _words(rng, 3)
    plain = client.chat.completions.create(model=MODEL, max_tokens=6, messages=[
        {"role": "system", "content": system}, {"role": "user", "content": f"{a}\n{b}"}],
        **GREEDY)
    parts = client.chat.completions.create(model=MODEL, max_tokens=6, messages=[
        {"role": "developer", "content": [{"type": "text", "text": system}]},
        {"role": "user", "content": [{"type": "text", "text": a}, {"type": "text", "text": b}]}],
        **GREEDY)
    assert parts.usage.prompt_tokens == plain.usage.prompt_tokens
    assert parts.choices[0].message.content == plain.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
    assert "messages" in err.value.message and err.value.body["param"] == "messages"


def test_echo(client, rng):
    prompt = _words(rng, 5)
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, **GREEDY)
    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, echo=True,
                                       **GREEDY)
    assert echoed.choices[0].text == prompt + plain.choices[0].text
    assert echoed.usage.completion_tokens == 5
    chunks = _stream(client, False, prompt=prompt, max_tokens=5, echo=True, **GREEDY)
    assert _stream_text(chunks) == echoed.choices[0].text


# --- logprobs ------------------------------------------------------------------------------------------

def test_chat_logprobs_and_top_logprobs(client, rng):
    messages = _chat(_words(rng, 6))
    unary = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6,
                                           logprobs=True, top_logprobs=3, **GREEDY)
    content = unary.choices[0].logprobs.content
    assert len(content) == unary.usage.completion_tokens == 6
    for entry in content:
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 3
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        # greedy: the chosen token is the argmax, the first of top_logprobs
        assert entry.top_logprobs[0].token == entry.token
        assert math.isclose(entry.top_logprobs[0].logprob, entry.logprob, abs_tol=1e-4)
    assert sum(math.exp(v) for v in values) <= 1 + 1e-4
    # logprobs without top_logprobs: empty lists; top_logprobs without logprobs: 400
    bare = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3,
                                          logprobs=True, **GREEDY)
    assert all(e.top_logprobs == [] for e in bare.choices[0].logprobs.content)
    assert [e.token for e in bare.choices[0].logprobs.content] == [e.token for e in content[:3]]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3,
                                       top_logprobs=2)
    assert "top_logprobs" in err.value.message
    # streamed: the same entries, spread over the chunks
    chunks = _stream(client, True, messages=messages, max_tokens=6, logprobs=True,
                     top_logprobs=3, **GREEDY)
    streamed = [e for c in chunks for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert all(math.isclose(s.logprob, u.logprob, abs_tol=1e-4)
               for s, u in zip(streamed, content))
    assert unary.choices[0].logprobs is not None
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, **GREEDY)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs(client, rng):
    prompt = _words(rng, 6)
    unary = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, logprobs=2,
                                      **GREEDY)
    lp = unary.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == unary.choices[0].text
    assert lp.text_offset[0] == 0
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 2 <= len(top) <= 3 and token in top  # the 2 most likely, and the chosen one
        assert math.isclose(top[token], value, abs_tol=1e-4)
        assert math.isclose(max(top.values()), value, abs_tol=1e-4)  # greedy: the argmax
    zero = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, logprobs=0,
                                     **GREEDY)
    assert zero.choices[0].logprobs.tokens == lp.tokens
    assert zero.choices[0].logprobs.top_logprobs is None
    chunks = _stream(client, False, prompt=prompt, max_tokens=6, logprobs=2, **GREEDY)
    tokens = [t for c in chunks for ch in c.choices if ch.logprobs for t in ch.logprobs.tokens]
    offsets = [o for c in chunks for ch in c.choices if ch.logprobs
               for o in ch.logprobs.text_offset]
    assert tokens == lp.tokens and offsets == lp.text_offset
    with pytest.raises(openai.BadRequestError) as err:  # OpenAI's limit
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, logprobs=6)
    assert "logprobs" in err.value.message


# --- penalties, logit_bias, min_tokens ---------------------------------------------------------------

def test_logit_bias(client, serve_app, tokenizer, rng):
    ids = [rng.randrange(100, 49152) for _ in range(10)]
    first = hf_greedy(serve_app["model_path"], ids, 1)[0]
    banned = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, logprobs=1,
                                       logit_bias={str(first): -100}, **GREEDY)
    lp = banned.choices[0].logprobs
    assert lp.tokens[0] != tokenizer.decode([first])
    # logprobs are the raw model's: the banned token is still the most likely there
    assert tokenizer.decode([first]) in lp.top_logprobs[0]
    forced_id = 4321
    forced = client.chat.completions.create(model=MODEL, messages=_chat(_words(rng, 5)),
                                            max_tokens=5, logit_bias={str(forced_id): 100},
                                            temperature=1.0, seed=3, logprobs=True,
                                            extra_body={"ignore_eos": True})
    assert [e.token for e in forced.choices[0].logprobs.content] == \
        [tokenizer.decode([forced_id])] * 5
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=ids, max_tokens=1,
                                  logit_bias={"49152": 1})  # beyond the vocabulary
    assert "logit_bias" in err.value.message


def _forced(client, prompt, token: int, bias: float, n: int, **penalty):
    """A greedy answer with ``bias`` on ``token``: its tokens, and per step the gap between the
    raw (unadjusted) logprobs of the step's most likely token and of ``token``."""
    lp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0,
                                   logprobs=1, logit_bias={str(token): bias},
                                   extra_body={"ignore_eos": True, **penalty}
                                   ).choices[0].logprobs
    return lp.tokens, lp.top_logprobs, lp.token_logprobs


@pytest.mark.parametrize("field,value", [("presence_penalty", 2.0), ("frequency_penalty", 0.5)])
def test_presence_and_frequency_penalties_exactly(client, tokenizer, field, value):
    """With a bias just above every step's raw gap, greedy repeats the biased token; the penalty
    (``value`` once for presence, ``value`` per occurrence for frequency) stops it at exactly the
    first step where the gap exceeds what is left of the bias: predicted from the raw logprobs,
    which the server reports before any adjustment."""
    prompt = [random.Random(5).randrange(100, 49152) for _ in range(8)]
    token, n = 4321, 16
    text = tokenizer.decode([token])
    tokens, tops, chosen = _forced(client, prompt, token, 100.0, n)
    assert tokens == [text] * n
    gaps = [max(top.values()) - lp for top, lp in zip(tops, chosen)]
    bias = max(gaps) + 0.25
    tokens, _, _ = _forced(client, prompt, token, bias, n)
    assert tokens == [text] * n  # the bias alone still wins every step

    def penalty(count: int) -> float:
        return value * count if field == "frequency_penalty" else value * (count > 0)

    stop = next((k for k in range(1, n) if gaps[k] > bias - penalty(k) + 1e-3), None)
    if stop is None or any(abs(gaps[k] - (bias - penalty(k))) < 1e-2 for k in range(n)):
        pytest.skip("no step where the penalty decides clearly (a different prompt is needed)")
    tokens, _, _ = _forced(client, prompt, token, bias, n, **{field: value})
    assert tokens[:stop] == [text] * stop and tokens[stop] != text, (stop, gaps, tokens)
    with pytest.raises(openai.BadRequestError) as err:  # OpenAI's range: -2..2
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, **{field: 2.5})
    assert field in err.value.message


def test_repetition_penalty(client, tokenizer):
    """vLLM's repetition_penalty r divides a seen token's positive logit by r (multiplies a
    negative one): a token that a bias just above every raw gap makes greedy's choice is picked
    once, then loses to the step's best token."""
    prompt = [random.Random(6).randrange(100, 49152) for _ in range(8)]
    token, text, n = 4321, tokenizer.decode([4321]), 6
    tokens, tops, chosen = _forced(client, prompt, token, 100.0, n)
    assert tokens == [text] * n
    bias = max(max(top.values()) - lp for top, lp in zip(tops, chosen)) + 0.25
    tokens, _, _ = _forced(client, prompt, token, bias, n)
    assert tokens == [text] * n
    tokens, _, _ = _forced(client, prompt, token, bias, n, repetition_penalty=50.0)
    assert tokens[0] == text and text not in tokens[1:], tokens
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=2,
                                  extra_body={"repetition_penalty": 0})
    assert "repetition_penalty" in err.value.message


def test_min_tokens_holds_back_eos(client, tokenizer, rng):
    """EOS forced by logit_bias ends the answer at once; ``min_tokens`` (ignore_eos false)
    holds it back until that many tokens."""
    eos = str(tokenizer.eos_token_id)
    prompt = _words(rng, 5)
    early = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                      logit_bias={eos: 100})
    assert early.choices[0].finish_reason == "stop" and early.usage.completion_tokens <= 1
    held = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                     logit_bias={eos: 100},
                                     extra_body={"min_tokens": 5, "ignore_eos": False})
    assert held.choices[0].finish_reason == "stop"
    assert 5 <= held.usage.completion_tokens <= 6
    chat = client.chat.completions.create(model=MODEL, messages=_chat(prompt), max_tokens=12,
                                          temperature=0, logit_bias={eos: 100},
                                          extra_body={"min_tokens": 4})
    assert chat.choices[0].finish_reason == "stop" and 4 <= chat.usage.completion_tokens <= 5


# --- cache_salt ----------------------------------------------------------------------------------------

def test_cache_salt_separates_prefix_caches(client, rng):
    ids = [rng.randrange(100, 49152) for _ in range(70)]  # 4 full blocks of 16

    def cached(**extra) -> int:
        out = client.completions.create(model=MODEL, prompt=ids, max_tokens=1,
                                        extra_body={"ignore_eos": True, **extra})
        return out.usage.prompt_tokens_details.cached_tokens

    assert cached(cache_salt="alpha") == 0
    assert cached(cache_salt="alpha") >= 64
    assert cached(cache_salt="beta") == 0  # another salt: another namespace
    assert cached() == 0  # nor unsalted
    assert cached(cache_salt="beta") >= 64


# --- errors ---------------------------------------------------------------------------------------------

REFUSED_CASES = [
    ("completions", "tools", [{"type": "function", "function": {"name": "f",
                                                              "parameters": {}}}]),
    ("completions", "tool_choice", "required"),
    ("chat", "response_format", {"type": "json_object"}),
    ("chat", "response_format", {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object"}, "strict": True}}),
    ("chat", "functions", [{"name": "f", "parameters": {}}]),
    ("chat", "audio", {"voice": "alloy", "format": "wav"}),
    ("chat", "reasoning_effort", "low"),
    ("chat", "store", True),
    ("chat", "metadata", {"k": "v"}),
    ("chat", "user", "someone"),
    ("chat", "prompt_cache_key", "k"),
    ("completions", "best_of", 2),
    ("completions", "suffix", "tail"),
    ("completions", "user", "someone"),
]


def _implemented(field: str, value) -> bool:
    rule = REFUSED.get(field)
    return rule is None or rule[0](value)


@pytest.mark.parametrize("endpoint,field,value", REFUSED_CASES,
                         ids=[f"{e}-{f}-{i}" for i, (e, f, _) in enumerate(REFUSED_CASES)])
def test_refused_fields_are_400_naming_the_field(client, endpoint, field, value):
    if _implemented(field, value):
        pytest.skip(f"{field} is implemented now: its conformance test belongs here")
    with pytest.raises(openai.BadRequestError) as err:
        if endpoint == "chat":
            client.chat.completions.create(model=MODEL, messages=_chat("hi"), max_tokens=2,
                                           **{field: value})
        else:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=2,
                                      extra_body={field: value})  # tools: not the SDK's
    e = err.value
    assert e.status_code == 400 and field in e.message
    assert set(e.body) == {"message", "type", "param", "code"}
    assert e.body["param"] == field and e.param == field and e.code == "unsupported_parameter"
    assert e.type == "invalid_request_error"


# a bounded count: an unbounded integer lets a random model's digits run past max_tokens
SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["north", "south"]},
                                          "count": {"type": "integer", "minimum": 0,
                                                    "maximum": 999}},
          "required": ["answer", "count"], "additionalProperties": False}


@pytest.mark.skipif(not _implemented("response_format", {"type": "json_object"}),
                    reason="structured output is refused by this server (see the refused tests)")
@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_structured_output(client, rng, stream):
    """Once implemented: json_schema (strict) gives JSON of that schema, json_object a JSON
    object, vLLM's structured_outputs choice one of the choices; unary and streamed."""
    import json

    def content(**kwargs) -> tuple[str, str]:
        common = {"messages": _chat(_words(rng, 5)), "max_tokens": 48, "temperature": 1.0,
                  "seed": rng.randrange(1 << 30), **kwargs}
        if not stream:
            c = client.chat.completions.create(model=MODEL, **common).choices[0]
            return c.message.content, c.finish_reason
        chunks = _stream(client, True, **common)
        return _stream_text(chunks), [c.choices[0].finish_reason for c in chunks
                                      if c.choices][-1]

    text, finish = content(response_format={"type": "json_schema", "json_schema": {
        "name": "reply", "schema": SCHEMA, "strict": True}})
    assert finish == "stop", text
    value = json.loads(text)
    assert set(value) == {"answer", "count"} and value["answer"] in ("north", "south")
    assert isinstance(value["count"], int) and 0 <= value["count"] <= 999
    text, finish = content(extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert text in ("yes", "no") and finish == "stop"
    text, finish = content(response_format={"type": "json_object"}, max_tokens=200)
    if finish == "stop":  # a random model may not close the object within max_tokens
        assert isinstance(json.loads(text), dict)
    else:
        assert text.startswith("{")


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {}, "additionalProperties": False}}}


def _calls(client, stream: bool, **kwargs) -> tuple[list[tuple[str, str]], str | None, str]:
    """(name, arguments) of each call, the content and the finish reason; a stream's deltas
    reassembled by call index."""
    if not stream:
        c = client.chat.completions.create(model=MODEL, **kwargs).choices[0]
        calls = [(t.function.name, t.function.arguments) for t in c.message.tool_calls or ()]
        return calls, c.message.content, c.finish_reason
    chunks = _stream(client, True, **kwargs)
    calls: dict[int, list] = {}
    for chunk in chunks:
        for piece in (chunk.choices[0].delta.tool_calls or ()) if chunk.choices else ():
            if piece.id is not None:
                assert piece.type == "function" and piece.index not in calls
                calls[piece.index] = [piece.function.name, ""]
            calls[piece.index][1] += piece.function.arguments or ""
    finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    return [tuple(calls[i]) for i in sorted(calls)], _stream_text(chunks) or None, finish


@pytest.mark.parametrize("choice", ["required", "get_weather"])
def test_tool_choice_required_and_named_give_valid_calls(client, rng, choice):
    """The grammar guarantees the calls on random weights; streamed deltas reassemble to the
    unary response of the same seed."""
    import json

    import jsonschema

    named = {"type": "function", "function": {"name": choice}}
    kwargs = {"messages": _chat("weather in Paris?"), "tools": [WEATHER, TIME],
              "tool_choice": choice if choice == "required" else named,
              "parallel_tool_calls": False, "max_tokens": 120, "seed": rng.randrange(1 << 30)}
    calls, content, finish = _calls(client, False, **kwargs)
    assert _calls(client, True, **kwargs) == (calls, content, finish)
    assert content is None and len(calls) == 1
    assert finish == ("tool_calls" if choice == "required" else "stop")
    name, arguments = calls[0]
    assert name in ("get_weather", "get_time") and choice in ("required", name)
    schema = (WEATHER if name == "get_weather" else TIME)["function"]["parameters"]
    jsonschema.validate(json.loads(arguments), schema)


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_tool_choice_auto_parses_what_the_model_emits(client, stream):
    """The model's output forced to a call (vLLM's structured_outputs choice): auto parses it;
    none leaves it text. The tools are in the prompt either way."""
    text = ('Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", '
            '"days": 2}}\n</tool_call>')
    kwargs = {"messages": _chat("weather in Rome?"), "tools": [WEATHER], "max_tokens": 80,
              "extra_body": {"structured_outputs": {"choice": [text]}}}
    calls, content, finish = _calls(client, stream, **kwargs)
    assert calls == [("get_weather", '{"city": "Rome", "days": 2}')]
    assert content == "Checking." and finish == "tool_calls"
    calls, content, finish = _calls(client, stream, tool_choice="none", **kwargs)
    assert calls == [] and content == text and finish == "stop"
    plain = client.chat.completions.create(model=MODEL, messages=_chat("weather in Rome?"),
                                           max_tokens=1)
    with_tools = client.chat.completions.create(model=MODEL, messages=_chat("weather in Rome?"),
                                                tools=[WEATHER], tool_choice="none", max_tokens=1)
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 50


def test_a_tool_result_continues_the_conversation(client):
    messages = _chat("weather in Rome?") + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Rome", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER],
                                         max_tokens=3, **GREEDY)
    assert out.usage.completion_tokens == 3


@pytest.mark.parametrize("kwargs,param", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "no-such-type"}}}}}]}, "tools"),
    ({"messages": [{"role": "tool", "content": "sunny"}]}, "messages"),
])
def test_bad_tool_input_is_400_naming_the_field(client, kwargs, param):
    kwargs = {"messages": _chat("hi"), "max_tokens": 2, **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, **kwargs)
    assert err.value.status_code == 400 and err.value.body["param"] == param, err.value.body
    assert err.value.type == "invalid_request_error"


def test_no_op_values_of_refused_fields_are_accepted(client):
    out = client.chat.completions.create(model=MODEL, messages=_chat("hi"), max_tokens=2,
                                         response_format={"type": "text"}, tools=[],
                                         tool_choice="none", store=False, **GREEDY)
    assert out.usage.completion_tokens == 2
    out = client.completions.create(model=MODEL, prompt="hi", max_tokens=2, best_of=1, **GREEDY)
    assert out.usage.completion_tokens == 2


def test_unknown_field_unknown_model_and_bad_values(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2,
                                  extra_body={"frobnicate": 1})
    assert "frobnicate" in err.value.message and err.value.body["param"] == "frobnicate"
    for call in (lambda: client.completions.create(model="gpt-17", prompt="hi", max_tokens=2),
                 lambda: client.chat.completions.create(model="gpt-17", messages=_chat("hi"),
                                                        max_tokens=2)):
        with pytest.raises(openai.NotFoundError) as err:
            call()
        assert err.value.status_code == 404 and "gpt-17" in err.value.message
        assert err.value.body["param"] == "model" and err.value.code == "model_not_found"
    for field, value in (("temperature", 3.0), ("max_tokens", 0), ("n", 0), ("top_p", 0)):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model=MODEL, prompt="hi", **{"max_tokens": 2,
                                                                   field: value})
        assert err.value.status_code == 400 and err.value.body["param"] == field, err.value.body
        assert field in err.value.message
