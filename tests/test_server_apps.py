"""The OpenAI surface apps and agents use, through the official SDK and LangChain against a real server: structured
output and forced tool calls in one busy mixed batch (two LoRAs, a ReFT, a weighted mix, the base), tool calls
streamed, a tool conversation's history, completions' echo, embeddings against transformers and PEFT, and vLLM's
runtime adapter routes.

The base is the tiny random Llama with SmolLM2's tokenizer of ``test_structured``; the last test runs the real
SmolLM2-135M-Instruct, where the answers must also make sense."""

from __future__ import annotations

import base64
import json
import struct
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import jsonschema
import openai
import pytest
import torch
from test_server import serving
from test_structured import (  # noqa: F401
    LLAMA_LIKE,
    PERSON,
    TIME,
    WEATHER,
    load_smol_tiny,
    smol_adapters,
    smol_base,
)

from hub_peft.serving import MultiAdapterModel

ADMIN = "admin-secret"
MIX = {"json-lora": 0.7, "style-reft": 0.5}


@pytest.fixture(scope="module")
def server(smol_base, smol_adapters):  # noqa: F811
    engine = MultiAdapterModel(load_smol_tiny(smol_base))
    for name in ("json-lora", "tool-lora", "style-reft"):
        engine.add(name, smol_adapters[name], pin=True)
    with serving(
        engine, admin_token=ADMIN, adapter_dirs=[Path(smol_adapters["json-lora"]).parent], max_prompt_tokens=600
    ) as client:
        yield client


@pytest.fixture(scope="module")
def sdk(server):
    return openai.OpenAI(base_url=str(server.base_url).rstrip("/") + "/v1", api_key="unused", max_retries=0)


def person_format(name: str = "person") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": PERSON, "strict": True}}


def ask(sdk, model, content, **extra):
    body = {"temperature": 0, "max_tokens": 120, **extra}
    extra_body = {}
    if isinstance(model, dict):  # hub_peft's mix rides in the body: the SDK types `model` as a string
        extra_body["model"], model = model, "mix"
    if "structured_outputs" in body:
        extra_body["structured_outputs"] = body.pop("structured_outputs")
    return sdk.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], extra_body=extra_body or None, **body
    )


def streamed_calls(stream) -> tuple[str, list[dict], str]:
    """Content, tool calls (accumulated from their deltas by index, as OpenAI's clients do) and finish reason."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = delta.id or call["id"]
            call["name"] += (delta.function.name or "") if delta.function else ""
            call["arguments"] += (delta.function.arguments or "") if delta.function else ""
        finish = choice.finish_reason or finish
    return content, [calls[k] for k in sorted(calls)], finish


def test_one_busy_mixed_batch_gives_valid_json_parsed_calls_and_batch_invariant_answers(server, sdk):
    jobs = {
        "json greedy, LoRA": lambda: ask(sdk, "json-lora", "Who?", response_format=person_format()),
        "json sampled, mix": lambda: ask(sdk, MIX, "Who?", response_format=person_format(), temperature=1.0, seed=11),
        "choice, base": lambda: ask(sdk, "tiny-base", "Yes?", structured_outputs={"choice": ["yes", "no"]}),
        "named call, other LoRA": lambda: ask(
            sdk,
            "tool-lora",
            "Weather?",
            tools=[WEATHER, TIME],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        ),
        "required call streamed, ReFT": lambda: streamed_calls(
            ask(
                sdk,
                "style-reft",
                "Time?",
                tools=[WEATHER, TIME],
                tool_choice="required",
                parallel_tool_calls=False,
                stream=True,
            )
        ),
        "free, base": lambda: ask(sdk, "tiny-base", "Say something", max_tokens=24),
        "seeded sample, ReFT": lambda: ask(sdk, "style-reft", "Say something", temperature=1.0, seed=5, max_tokens=24),
        "seeded sample, mix": lambda: ask(sdk, MIX, "Say more", temperature=0.8, top_p=0.9, seed=6, max_tokens=24),
    }
    busy = [  # long free requests keep the batch full while the others run
        partial(ask, sdk, name, f"busy {i}", max_tokens=60, temperature=1.0, seed=i)
        for i, name in enumerate(["json-lora", "tool-lora", "style-reft", "tiny-base"])
    ]
    scheduler, sizes = server.app.state.scheduler, []
    metrics_hook = scheduler.on_step
    scheduler.on_step = lambda s, seconds: (sizes.append(len(s.running)), metrics_hook(s, seconds))
    try:
        with ThreadPoolExecutor(len(jobs) + len(busy)) as pool:
            running = [pool.submit(job) for job in busy]
            together = {name: pool.submit(job) for name, job in jobs.items()}
            together = {name: future.result() for name, future in together.items()}
            for future in running:
                assert future.result().choices[0].finish_reason in ("stop", "length")
    finally:
        scheduler.on_step = metrics_hook
    assert max(sizes) >= 8, sizes  # they did run together

    for name in ("json greedy, LoRA", "json sampled, mix"):
        choice = together[name].choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    assert together["choice, base"].choices[0].message.content in ("yes", "no")

    named = together["named call, other LoRA"].choices[0]
    assert named.finish_reason == "tool_calls" and named.message.content is None
    assert {c.function.name for c in named.message.tool_calls} == {"get_weather"}
    for call in named.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
        assert call.id.startswith("call_") and call.type == "function"
    content, calls, finish = together["required call streamed, ReFT"]
    assert finish == "tool_calls" and content == "" and len(calls) == 1
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for call in calls:
        jsonschema.validate(json.loads(call["arguments"]), schemas[call["name"]])

    # alone, one at a time, the same requests give the same answers
    for name in ("json greedy, LoRA", "json sampled, mix", "free, base", "seeded sample, ReFT", "seeded sample, mix"):
        alone = jobs[name]()
        assert alone.choices[0].message.content == together[name].choices[0].message.content, name
    alone_call = jobs["named call, other LoRA"]().choices[0].message.tool_calls
    assert [c.function.arguments for c in alone_call] == [c.function.arguments for c in named.message.tool_calls]


def test_a_tool_conversation_continues_with_the_calls_and_results_in_its_history(sdk):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = sdk.chat.completions.create(
        model="tool-lora", messages=messages, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=80
    )
    message = first.choices[0].message
    messages.append(message)  # as apps do: the SDK's own message object goes back
    for call in message.tool_calls:
        messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})})
    second = sdk.chat.completions.create(
        model="tool-lora", messages=messages, tools=[WEATHER], temperature=0, max_tokens=8
    )
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + 20  # the call and the result were rendered
    none = sdk.chat.completions.create(
        model="tool-lora", messages=messages, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=8
    )
    assert none.choices[0].message.tool_calls is None
    bad = dict(
        message.model_dump(), tool_calls=[{"id": "x", "type": "function", "function": {"name": "f", "arguments": "["}}]
    )
    with pytest.raises(openai.BadRequestError, match="not a JSON object"):
        sdk.chat.completions.create(model="tool-lora", messages=[messages[0], bad], max_tokens=2)


def test_a_template_that_asks_for_json_calls_gets_them_parsed_and_forced(smol_base, smol_adapters):  # noqa: F811
    model, tokenizer = load_smol_tiny(smol_base)
    tokenizer.chat_template = LLAMA_LIKE  # Llama 3.1's way: a bare JSON object per call
    engine = MultiAdapterModel((model, tokenizer))
    engine.add("tool-lora", smol_adapters["tool-lora"])
    with serving(engine) as client:
        sdk = openai.OpenAI(base_url=str(client.base_url).rstrip("/") + "/v1", api_key="unused", max_retries=0)
        for stream in (False, True):
            response = sdk.chat.completions.create(
                model="tool-lora",
                messages=[{"role": "user", "content": "Time?"}],
                tools=[WEATHER, TIME],
                tool_choice="required",
                temperature=0,
                max_tokens=60,
                stream=stream,
            )
            if stream:
                content, calls, finish = streamed_calls(response)
            else:
                message = response.choices[0].message
                content, finish = message.content, response.choices[0].finish_reason
                calls = [{"name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls]
            assert finish == "tool_calls" and not content and len(calls) == 1
            schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
            jsonschema.validate(json.loads(calls[0]["arguments"]), schemas[calls[0]["name"]])


def test_structured_output_errors_are_400s_that_name_the_field(server):
    def post(**extra):
        body = {"model": "json-lora", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, **extra}
        return server.post("/v1/chat/completions", json=body)

    for extra, field, words in [
        ({"structured_outputs": {"regex": "(("}}, "structured_outputs", "unclosed group"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "no"}}},
            "response_format",
            "",
        ),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "nope",
        ),
        ({"response_format": {"type": "json_object"}, "ignore_eos": True}, None, "ignore_eos"),
    ]:
        response = post(**extra)
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == field and words in error["message"], response.text


def test_langchain_with_structured_output_and_tools(server):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str = Field(max_length=12)
        age: int = Field(ge=0, le=120)

    llm = ChatOpenAI(
        base_url=str(server.base_url).rstrip("/") + "/v1",
        api_key="unused",
        model="json-lora",
        temperature=0,
        max_tokens=60,
        max_retries=0,
    )
    person = llm.with_structured_output(Person, method="json_schema").invoke("Invent a person.")
    assert isinstance(person, Person) and 0 <= person.age <= 120
    forced = llm.bind_tools([WEATHER], tool_choice="get_weather", parallel_tool_calls=False).invoke("Weather in Oslo?")
    assert forced.tool_calls and forced.tool_calls[0]["name"] == "get_weather"
    jsonschema.validate(forced.tool_calls[0]["args"], WEATHER["function"]["parameters"])


def test_completions_echo_the_prompt_and_take_structured_output(sdk):
    whole = sdk.completions.create(model="json-lora", prompt="Once upon", max_tokens=5, temperature=0, echo=True)
    plain = sdk.completions.create(model="json-lora", prompt="Once upon", max_tokens=5, temperature=0)
    assert whole.choices[0].text == "Once upon" + plain.choices[0].text
    stream = sdk.completions.create(
        model="json-lora", prompt="Once upon", max_tokens=5, temperature=0, echo=True, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == whole.choices[0].text
    held = sdk.completions.create(
        model="json-lora",
        prompt="Is it?",
        max_tokens=5,
        temperature=1.0,
        seed=3,
        extra_body={"structured_outputs": {"regex": "(yes|no), [0-9]"}},
    )
    assert held.choices[0].text in {f"{a}, {d}" for a in ("yes", "no") for d in range(10)}


def test_echo_with_logprobs_scores_the_prompt_as_peft_does(sdk, smol_base, smol_adapters):  # noqa: F811
    from peft import PeftModel

    prompt = "The weather in Paris is"
    scored = sdk.completions.create(
        model="json-lora", prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=2
    ).choices[0]
    model, tokenizer = load_smol_tiny(smol_base)
    model = PeftModel.from_pretrained(model, smol_adapters["json-lora"]).eval()
    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        expected = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    lp = scored.logprobs
    n = len(ids)
    assert len(lp.tokens) == n + 3 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for position in range(1, n):
        assert lp.token_logprobs[position] == pytest.approx(float(expected[position - 1, ids[position]]), abs=1e-4)
        assert len(lp.top_logprobs[position]) == 2
    assert "".join(lp.tokens) == scored.text and scored.text.startswith(prompt)
    assert lp.text_offset == [sum(map(len, lp.tokens[:k])) for k in range(len(lp.tokens))]
    plain = sdk.completions.create(model="json-lora", prompt=prompt, max_tokens=3, temperature=0, logprobs=2)
    assert lp.token_logprobs[n:] == pytest.approx(plain.choices[0].logprobs.token_logprobs, abs=1e-5)
    stream = sdk.completions.create(
        model="json-lora", prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=2, stream=True
    )
    streamed = [
        t for chunk in stream if chunk.choices and chunk.choices[0].logprobs for t in chunk.choices[0].logprobs.tokens
    ]
    assert streamed == lp.tokens


def reference_embedding(text: str, smol_base, adapter=None) -> torch.Tensor:  # noqa: F811
    """The last token's final hidden state, normalized: transformers (and PEFT for a LoRA), loaded the usual way."""
    model, tokenizer = load_smol_tiny(smol_base)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1]
    return torch.nn.functional.normalize(hidden, dim=-1)


def test_embeddings_match_transformers_and_peft_and_do_not_depend_on_their_batch(sdk, smol_base, smol_adapters):  # noqa: F811
    texts = ["a short text", "another, longer text about the weather in Paris"]
    base = sdk.embeddings.create(model="tiny-base", input=texts)
    assert [d.index for d in base.data] == [0, 1] and base.usage.prompt_tokens > 6
    for text, item in zip(texts, base.data, strict=True):
        expected = reference_embedding(text, smol_base)
        assert torch.allclose(torch.tensor(item.embedding), expected, atol=1e-5)
    lora = sdk.embeddings.create(model="json-lora", input=texts[1]).data[0].embedding
    expected = reference_embedding(texts[1], smol_base, adapter=smol_adapters["json-lora"])
    assert torch.allclose(torch.tensor(lora), expected, atol=1e-5)
    assert not torch.allclose(torch.tensor(lora), torch.tensor(base.data[1].embedding), atol=1e-3)
    alone = sdk.embeddings.create(model="tiny-base", input=texts[1]).data[0].embedding
    assert alone == base.data[1].embedding
    with pytest.raises(openai.APIStatusError, match="limit is 600") as too_long:  # the server's max_prompt_tokens
        sdk.embeddings.create(model="tiny-base", input=[texts[0], " ".join(["the"] * 700)])
    assert too_long.value.status_code == 413 and too_long.value.body["code"] == "context_length_exceeded"
    raw = sdk.embeddings.with_raw_response.create(model="tiny-base", input=texts[1], encoding_format="base64")
    packed = base64.b64decode(json.loads(raw.text)["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(packed) // 4}f", packed)) == pytest.approx(alone, abs=1e-6)


def test_vllm_runtime_adapter_routes_need_the_admin_token(server, sdk, smol_adapters):  # noqa: F811
    folder = str(smol_adapters["tool-lora"])
    body = {"lora_name": "late-lora", "lora_path": folder}
    assert server.post("/v1/load_lora_adapter", json=body).status_code == 401
    auth = {"authorization": f"Bearer {ADMIN}"}
    loaded = server.post("/v1/load_lora_adapter", json=body, headers=auth)
    assert loaded.status_code == 200 and loaded.text == "Success: LoRA adapter 'late-lora' added successfully."
    again = server.post("/v1/load_lora_adapter", json=body, headers=auth)
    assert again.status_code == 400 and "already been loaded" in again.text
    inplace = server.post("/v1/load_lora_adapter", json={**body, "load_inplace": True}, headers=auth)
    assert inplace.status_code == 200
    outside = server.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/etc"}, headers=auth)
    assert outside.status_code == 403 and outside.json()["error"]["param"] == "lora_path"
    late = ask(sdk, "late-lora", "Weather?", max_tokens=6).choices[0].message.content
    assert late == ask(sdk, "tool-lora", "Weather?", max_tokens=6).choices[0].message.content  # the same files
    unload = server.post("/v1/unload_lora_adapter", json={"lora_name": "late-lora"}, headers=auth)
    assert unload.status_code == 200 and unload.text == "Success: LoRA adapter 'late-lora' removed successfully."
    gone = server.post("/v1/unload_lora_adapter", json={"lora_name": "late-lora"}, headers=auth)
    assert gone.status_code == 404
    with pytest.raises(openai.NotFoundError):
        ask(sdk, "late-lora", "Weather?", max_tokens=2)


@pytest.mark.slow
def test_the_real_smollm2_answers_in_schema_and_calls_tools_with_sensible_arguments():
    engine = MultiAdapterModel()  # SmolLM2-135M-Instruct in NF4; its chat template has no tools: Hermes rendering
    capital = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}, "country": {"type": "string", "maxLength": 30}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    with serving(engine) as client:
        sdk = openai.OpenAI(base_url=str(client.base_url).rstrip("/") + "/v1", api_key="unused", max_retries=0)
        answer = sdk.chat.completions.create(
            model="tiny-base",
            messages=[
                {"role": "user", "content": "What is the capital of France? Answer with the city and its country."}
            ],
            response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": capital}},
            temperature=0,
            max_tokens=60,
        ).choices[0]
        assert answer.finish_reason == "stop"
        value = json.loads(answer.message.content)
        jsonschema.validate(value, capital)
        assert value["city"] == "Paris"
        call = sdk.chat.completions.create(
            model="tiny-base",
            messages=[{"role": "user", "content": "What's the weather like in Paris today?"}],
            tools=[WEATHER, TIME],
            tool_choice="required",
            parallel_tool_calls=False,
            temperature=0,
            max_tokens=80,
        ).choices[0]
        assert call.finish_reason == "tool_calls" and len(call.message.tool_calls) == 1
        function = call.message.tool_calls[0].function
        assert function.name == "get_weather" and json.loads(function.arguments)["city"] == "Paris"
