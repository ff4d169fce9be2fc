"""Structured output and tools on the engine: every constrained answer matches its constraint (JSON validated with
``jsonschema``, regexes, choices, Lark and GBNF grammars), greedy and sampled; constrained rows are batch-invariant;
malformed constraints are refused; tools render through the chat template and calls parse, whole and streamed.

The base is a tiny seeded random Llama with SmolLM2's real tokenizer (49,152 tokens), so answers can spell JSON;
schemas bound their strings and arrays, so a random model's every path ends within ``max_tokens``."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from hub_peft.errors import InvalidInputError
from hub_peft.serving import MultiAdapterModel, SamplingParams
from hub_peft.serving.structured import MAX_SOURCE_CHARS, Constraint
from hub_peft.serving.tools import CallStream, call_format, forced_calls, hermes_messages, parse_calls, render

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "email": {"type": ["string", "null"], "maxLength": 8},
    },
    "required": ["name", "age", "tags", "email"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}


def smol_tokenizer():
    from transformers import AutoTokenizer

    from hub_peft.base_model import embedded_model_dir

    return AutoTokenizer.from_pretrained(embedded_model_dir())


@pytest.fixture(scope="session")
def smol_base(tmp_path_factory):
    """A tiny seeded random Llama with SmolLM2's tokenizer, saved to a folder (adapters record its path)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = smol_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    folder = tmp_path_factory.mktemp("smol_tiny")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load_smol_tiny(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="session")
def smol_adapters(smol_base, tmp_path_factory):
    """Two LoRAs and a ReFT on the tiny SmolLM2-tokenizer base, large enough to change greedy tokens."""
    from peft import LoraConfig, get_peft_model

    from hub_peft import save_adapter
    from hub_peft.reft import ReftConfig, get_reft_model

    root = tmp_path_factory.mktemp("smol_adapters")
    folders = {}
    for name, seed, targets in (("json-lora", 1, ["q_proj", "v_proj"]), ("tool-lora", 2, ["o_proj", "down_proj"])):
        torch.manual_seed(seed)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        model = get_peft_model(load_smol_tiny(smol_base)[0], config)
        with torch.no_grad():
            for key, p in model.named_parameters():
                if "lora_B" in key:
                    p.mul_(30)
        folders[name] = save_adapter(model, root / name)
    torch.manual_seed(3)
    reft = get_reft_model(load_smol_tiny(smol_base)[0], ReftConfig(layers=[0, 1], positions="f1+l1"))
    with torch.no_grad():
        for module in reft.interventions.values():
            module.source.weight.mul_(5)
    folders["style-reft"] = save_adapter(reft, root / "style-reft")
    return folders


@pytest.fixture(scope="module")
def engine(smol_base, smol_adapters):
    engine = MultiAdapterModel(load_smol_tiny(smol_base))
    for name, folder in smol_adapters.items():
        engine.add(name, folder, pin=True)
    return engine


def text_of(engine, completion) -> str:
    return engine.tokenizer.decode(completion.tokens, skip_special_tokens=True)


def check(constraint: Constraint, text: str) -> None:
    """``text`` matches ``constraint`` (checked independently of llguidance)."""
    if constraint.kind == "json":
        jsonschema.validate(json.loads(text), json.loads(constraint.source))
    elif constraint.kind == "regex":
        assert re.fullmatch(constraint.source, text), text
    elif constraint.kind == "choice":
        assert text in json.loads(constraint.source), text


CONSTRAINTS = [
    Constraint.json_schema(PERSON),
    Constraint.json_schema(
        {"type": "array", "items": {"type": "integer", "minimum": -99, "maximum": 999}, "maxItems": 4}
    ),
    Constraint.regex(r"[0-9]{3}-[A-Z][a-z]{1,6}"),
    Constraint.choice(["positive", "negative", "neutral"]),
]
SPECS = [None, "json-lora", "tool-lora", "style-reft", {"json-lora": 0.6, "tool-lora": 0.4}]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_constrained_answer_matches_its_constraint_in_a_mixed_batch(engine, temperature):
    prompts, adapters, constraints, params = [], [], [], []
    for i, spec in enumerate(SPECS):
        for k, constraint in enumerate(CONSTRAINTS):
            prompts.append([{"role": "user", "content": f"Answer {i} {k}"}])
            adapters.append(spec)
            constraints.append(constraint)
            params.append(SamplingParams(max_tokens=80, temperature=temperature, seed=10 * i + k))
    prompts.append([{"role": "user", "content": "free"}])  # an unconstrained row shares the steps
    adapters.append("json-lora")
    constraints.append(None)
    params.append(SamplingParams(max_tokens=20, temperature=temperature, seed=99))
    out = engine.generate_tokens(prompts, adapters, params=params, constraints=constraints)
    for constraint, completion in zip(constraints[:-1], out[:-1], strict=True):
        assert completion.finish_reason == "stop", text_of(engine, completion)
        check(constraint, text_of(engine, completion))
    texts = {text_of(engine, c) for c in out[:-1]}
    assert len(texts) > len(CONSTRAINTS), "the adapters and seeds should change the answers"
    assert out[-1].finish_reason == "length"  # the free row is not held by its neighbours' grammars


def test_constrained_rows_are_the_same_alone_and_in_a_batch(engine):
    rows = [
        ([{"role": "user", "content": "a person"}], "json-lora", Constraint.json_schema(PERSON), 0.0),
        ([{"role": "user", "content": "a person"}], "style-reft", Constraint.json_schema(PERSON), 1.0),
        ([{"role": "user", "content": "a code"}], {"json-lora": 0.5, "style-reft": 1.0}, CONSTRAINTS[2], 1.0),
        ([{"role": "user", "content": "anything"}], None, None, 1.0),
    ]
    params = [SamplingParams(max_tokens=40, temperature=t, seed=7) for *_, t in rows]
    batch = engine.generate_tokens(
        [r[0] for r in rows], [r[1] for r in rows], params=params, constraints=[r[2] for r in rows]
    )
    for row, p, together in zip(rows, params, batch, strict=True):
        alone = engine.generate_tokens([row[0]], [row[1]], params=[p], constraints=[row[2]])[0]
        assert alone.tokens == together.tokens


def test_grammars_lark_and_gbnf(engine):
    lark = Constraint.grammar('start: "yes" | "no" ("," NUMBER)?\nNUMBER: /[0-9]{1,3}/')
    gbnf = Constraint.grammar('root ::= "v" [0-9] [0-9]? "." [0-9]')
    out = engine.generate_tokens(
        [[{"role": "user", "content": "q"}]] * 2,
        params=[SamplingParams(max_tokens=20, temperature=1.0, seed=s) for s in (1, 2)],
        constraints=[lark, gbnf],
    )
    assert re.fullmatch(r"yes|no(,[0-9]{1,3})?", text_of(engine, out[0]))
    assert re.fullmatch(r"v[0-9][0-9]?\.[0-9]", text_of(engine, out[1]))


def test_compiled_grammars_are_cached_and_copied(engine):
    compiler = engine.grammars
    constraint = Constraint.json_schema({"type": "object", "properties": {"cache": {"type": "boolean"}}})
    before = compiler.compiles
    first, second = compiler.matcher(constraint), compiler.matcher(constraint)
    assert compiler.compiles == before + 1 and first is not second
    token = engine.tokenizer("{", add_special_tokens=False)["input_ids"][0]
    assert first.consume_token(token)  # advancing one copy leaves the other at the start
    assert compiler.masks([second])[0][token] and not compiler.masks([first])[0][token]


@pytest.mark.parametrize(
    "constraint, words",
    [
        (Constraint("json", "{not json"), "malformed"),
        (Constraint.regex("(("), "unclosed group"),
        (Constraint.grammar("start: missing_rule"), "missing_rule"),
        (Constraint.regex("a" * (MAX_SOURCE_CHARS + 1)), "shorten it"),
        (Constraint.regex("a{300000}"), "cannot be used|ms per token"),  # over the parser's or the step's limits
    ],
)
def test_bad_constraints_are_refused_before_they_run(engine, constraint, words):
    with pytest.raises(InvalidInputError, match=words):
        engine.generation([{"role": "user", "content": "x"}], None, SamplingParams(), constraint=constraint)


def test_ignore_eos_with_a_constraint_is_refused(engine):
    with pytest.raises(InvalidInputError, match="ignore_eos"):
        engine.generation("x", None, SamplingParams(ignore_eos=True), constraint=Constraint.json_schema())
    with pytest.raises(InvalidInputError, match="choice"):
        Constraint.choice([])


# --- tools -------------------------------------------------------------------------------------------------------


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'},
    {"role": "user", "content": "And the time?"},
]

# a Hermes-style template that renders tools itself (as Qwen2.5's does), for the native path
NATIVE = (
    "{% if tools %}<|im_start|>system\nTOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}<|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}<|im_end|>\n"
    "{% endfor %}<|im_start|>assistant\n"
)


# a Llama-3.1-style template: it renders tools and asks for a bare JSON object per call
LLAMA_LIKE = (
    '{% if tools %}<|im_start|>system\nAnswer a call as {"name": ..., "parameters": ...}. Tools: '
    "{% for t in tools %}{{ t | tojson }}{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.tool_calls %}{% for c in m.tool_calls %}"
    '{"name": "{{ c.function.name }}", "parameters": {{ c.function.arguments | tojson }}}'
    "{% endfor %}{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
)


def test_the_call_format_follows_the_chat_template():
    tokenizer = smol_tokenizer()
    assert call_format(tokenizer) == "hermes"  # no tools in the template: Qwen2.5's Hermes rendering
    tokenizer.chat_template = NATIVE
    assert call_format(tokenizer) == "hermes"
    tokenizer.chat_template = LLAMA_LIKE
    assert call_format(tokenizer) == "json"
    text = render(tokenizer, CONVERSATION, [WEATHER])
    assert '{"name": "get_weather", "parameters": {"city": "Paris"}}' in text and "Tools: {" in text


def test_json_calls_parse_whole_and_streamed():
    names = {"get_weather", "get_time"}
    answer = '{"name": "get_time", "parameters": {"zone": "UTC"}}'
    content, calls = parse_calls(answer, names, "json")
    assert content is None and [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("get_time", '{"zone": "UTC"}')
    ]
    assert parse_calls('{"answer": 42}', names, "json") == ('{"answer": 42}', [])
    assert parse_calls("It is noon.", names, "json") == ("It is noon.", [])
    for text, is_call in ((answer, True), ("It is noon in Paris.", False), ('{"answer": 42}', False)):
        for size in (1, 3, 100):
            stream, shown, got = CallStream(names, "json"), "", []
            pieces = [text[i : i + size] for i in range(0, len(text), size)]
            for k, piece in enumerate(pieces):
                delta, new = stream.feed(piece, final=k == len(pieces) - 1)
                if k == 0 and not text.startswith("{"):
                    assert delta == piece  # plain text streams as it comes
                shown, got = shown + delta, got + new
            assert (len(got) == 1) is is_call and shown == ("" if is_call else text)


def test_tools_and_calls_render_in_qwen_format_when_the_template_has_no_tools():
    tokenizer = smol_tokenizer()
    text = render(tokenizer, CONVERSATION, [WEATHER, TIME])
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert json.dumps(WEATHER) in text and json.dumps(TIME) in text
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response><|im_end|>' in text
    assert text.endswith("<|im_start|>assistant\n")
    assert [m["role"] for m in hermes_messages(CONVERSATION[1:], [WEATHER])] == [
        "system",
        "user",
        "assistant",
        "user",
        "user",
    ]


def test_a_template_that_takes_tools_renders_them_itself():
    tokenizer = smol_tokenizer()
    tokenizer.chat_template = NATIVE
    text = render(tokenizer, CONVERSATION, [WEATHER, TIME])
    assert text.startswith("<|im_start|>system\nTOOLS:get_weather;get_time;<|im_end|>")
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in text
    assert "<|im_start|>tool\n" in text  # the template's own way with tool results


ANSWER = (
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
    '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
)


def test_calls_parse_whole_and_streamed_at_every_split():
    names = {"get_weather", "get_time"}
    content, calls = parse_calls(ANSWER, names)
    assert content == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"}),
        ("get_time", {"zone": "CET"}),
    ]
    assert parse_calls('<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>', names)[1] == []
    assert parse_calls("no calls <tool_call", names) == ("no calls <tool_call", [])
    for size in (1, 2, 3, 5, 7, 11, 400):
        stream, text, got = CallStream(names), "", []
        pieces = [ANSWER[i : i + size] for i in range(0, len(ANSWER), size)]
        for k, piece in enumerate(pieces):
            delta, new = stream.feed(piece, final=k == len(pieces) - 1)
            assert "<" not in delta  # no half tag is ever shown
            text, got = text + delta, got + new
        assert text.strip() == "Let me check." and [c["function"] for c in got] == [c["function"] for c in calls]


def test_forced_calls_are_valid_calls_of_the_named_function(engine):
    tools = [WEATHER, TIME]
    constraints = [forced_calls(tools), forced_calls(tools, "get_time"), forced_calls(tools, parallel=False)]
    out = engine.generate_tokens(
        [[{"role": "user", "content": "call something"}]] * 3,
        ["tool-lora", None, "style-reft"],
        params=[SamplingParams(max_tokens=120, temperature=1.0, seed=s) for s in (4, 5, 6)],
        constraints=constraints,
    )
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for k, completion in enumerate(out):
        content, calls = parse_calls(text_of(engine, completion), set(schemas))
        assert completion.finish_reason == "stop" and calls and content is None, text_of(engine, completion)
        for call in calls:
            jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])
        if k == 1:
            assert {c["function"]["name"] for c in calls} == {"get_time"}
        if k == 2:
            assert len(calls) == 1
    with pytest.raises(InvalidInputError, match="not among the tools"):
        forced_calls(tools, "nope")
    json_form = engine.generate_tokens(
        [[{"role": "user", "content": "call"}]],
        params=[SamplingParams(max_tokens=60, temperature=1.0, seed=8)],
        constraints=[forced_calls(tools, form="json")],
    )[0]
    content, calls = parse_calls(text_of(engine, json_form), set(schemas), "json")
    assert json_form.finish_reason == "stop" and content is None and len(calls) == 1
    jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), schemas[calls[0]["function"]["name"]])
