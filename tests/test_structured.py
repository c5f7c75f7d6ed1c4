"""Structured output: grammar masks in the batched sampler, with a tiny random-weights model
(whose unconstrained tokens are arbitrary, so every valid output is the mask's doing)."""

import json
import re

import jsonschema
import pytest
import torch

from optgptq.engine.llm import LLM
from optgptq.engine.sampling_params import SamplingParams
from optgptq.engine.structured import StructuredSpec
from tests.conftest import random_prompt

SCHEMA = {
    "type": "object",
    "properties": {
        "role": {"enum": ["admin", "user", "guest"]},
        "ok": {"type": "boolean"},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "tag": {"type": "string", "pattern": "^[a-z]{1,4}$"},
        "xs": {"type": "array", "items": {"enum": [1, 2, 3]}, "maxItems": 3},
    },
    "required": ["role", "ok", "age", "tag", "xs"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(str(tiny_models["llama-gqa"]), device="cpu", num_blocks=256, block_size=4)


def prompts(seed, lengths):
    g = torch.Generator().manual_seed(seed)
    return [random_prompt(g, n) for n in lengths]


def test_json_schema_output_validates(llm):
    spec = StructuredSpec("json_schema", json.dumps(SCHEMA), strict=True)
    ps = prompts(1, [5, 9, 17])
    outs = llm.generate(ps, SamplingParams(max_tokens=120, temperature=0, structured=spec))
    outs += llm.generate(ps, SamplingParams(max_tokens=120, temperature=1.0, seed=3, n=2,
                                            structured=spec))
    assert len(outs) == 9
    for out in outs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), SCHEMA)


def test_json_object_output_parses(llm, tiny_models):
    tok = llm.engine.tokenizer
    quote = tok.convert_tokens_to_ids('"')
    # a random model never closes a string: favour '"' wherever the grammar allows it
    params = SamplingParams(max_tokens=200, temperature=1.0, seed=5, logit_bias={quote: 100},
                            structured=StructuredSpec("json_object"))
    for out in llm.generate(prompts(2, [4, 11, 23, 6]), params):
        assert out.finish_reason == "stop", out.text
        assert isinstance(json.loads(out.text), dict)


def test_regex_and_choice(llm):
    ps = prompts(3, [6, 13])
    regex = SamplingParams(max_tokens=30, temperature=0,
                           structured=StructuredSpec("regex", r"[a-c]{2,5}-[0-9]{3}"))
    for out in llm.generate(ps, regex):
        assert out.finish_reason == "stop"
        assert re.fullmatch(r"[a-c]{2,5}-[0-9]{3}", out.text), out.text
    choice = SamplingParams(max_tokens=30, temperature=0.8, seed=1,
                            structured=StructuredSpec("choice", json.dumps(["yes", "no!"])))
    assert {o.text for o in llm.generate(ps, choice)} <= {"yes", "no!"}


def test_rows_without_a_grammar_are_untouched(llm):
    ps = prompts(4, [5, 12, 20, 33])
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    alone = [o.token_ids for o in llm.generate(ps, greedy)]
    spec = StructuredSpec("json_schema", json.dumps(SCHEMA))
    mixed_params = [greedy if i % 2 == 0 else
                    SamplingParams(max_tokens=60, temperature=0, structured=spec)
                    for i in range(2 * len(ps))]
    mixed = llm.generate([p for p in ps for _ in range(2)], mixed_params)
    assert [o.token_ids for o in mixed[::2]] == alone
    for out in mixed[1::2]:
        jsonschema.validate(json.loads(out.text), SCHEMA)


@pytest.mark.parametrize("kind,spec", [
    ("json_schema", '{"type": "nonsense"}'), ("json_schema", "{not json"),
    ("regex", "(("), ("grammar", "root ::= undefined_rule"), ("choice", "[]")])
def test_invalid_specs_are_value_errors_naming_the_field(kind, spec):
    with pytest.raises(ValueError, match="^response_format: invalid"):
        StructuredSpec(kind, spec)


TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": SCHEMA}},
         {"type": "function", "function": {"name": "ping", "parameters": {
             "type": "object", "properties": {"n": {"type": "integer", "minimum": 1,
                                                    "maximum": 9}},
             "required": ["n"], "additionalProperties": False}}}]


@pytest.mark.parametrize("choice", ["required", "lookup", "ping"])
def test_tool_choice_grammar_guarantees_calls(llm, choice):
    """tool_choice required or named, on random weights: every output is Hermes calls of the
    offered functions (the named one alone) whose arguments validate against its schema. (One
    call: with parallel calls allowed a random model may go on calling until max_tokens.)"""
    from optgptq.serving.openai_tools import NamedToolChoice, Tool, ToolSpec
    from optgptq.serving.tool_calls import whole

    named = None if choice == "required" else NamedToolChoice.model_validate(
        {"type": "function", "function": {"name": choice}})
    tools = ToolSpec.build([Tool.model_validate(t) for t in TOOLS], named or choice, False)
    params = SamplingParams(max_tokens=200, temperature=1.0, seed=11, n=2,
                            structured=tools.structured())
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for out in llm.generate(prompts(4, [6, 13]), params):
        assert out.finish_reason == "stop", out.text
        content, calls = whole(out.text, tools.names)
        assert content is None and len(calls) == 1, out.text
        for call in calls:
            assert choice in ("required", call.name)
            jsonschema.validate(json.loads(call.arguments), schemas[call.name])
