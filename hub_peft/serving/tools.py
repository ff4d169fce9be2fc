"""Function calling: tools shown to the model through its chat template, calls read back out of its answer.

Two call formats (:func:`call_format` picks the template's):

- ``"hermes"``, which Qwen2.5/Qwen3, Hermes and many fine-tunes are trained on, one block per call::

      <tool_call>
      {"name": "get_weather", "arguments": {"city": "Paris"}}
      </tool_call>

- ``"json"``, Llama 3.1/3.2's: the whole answer is one JSON object ``{"name": ..., "parameters": {...}}``.

A chat template that takes ``tools`` renders them itself (``apply_chat_template(tools=...)``); one that does not
(SmolLM2's) gets them the way Qwen2.5's template writes them, in the Hermes format: a ``<tools>`` block at the end
of the system prompt, earlier calls as ``<tool_call>`` blocks in the assistant's turn, tool results as
``<tool_response>`` blocks in a user turn. :func:`forced_calls` is the grammar that makes the answer calls of the
given functions in the template's format, each's arguments valid under that function's ``parameters`` schema
(``tool_choice`` ``"required"`` or a named function); :func:`parse_calls` and :class:`CallStream` read calls out
of a whole answer or a stream of text.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from typing import Any, Literal

from ..errors import InvalidInputError
from .structured import JSON_OPTIONS, Constraint

Format = Literal["hermes", "json"]
OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CLOSE) + r"|\Z)", re.S)

# the words of Qwen2.5's chat template, for templates that do not render tools themselves
_SYSTEM_TOOLS = """

# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def _tool_template(tokenizer: Any) -> str:
    """The chat template ``apply_chat_template(tools=...)`` uses ("" when there is none)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("tool_use") or template.get("default")
    return template if isinstance(template, str) else ""


def template_takes_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders a ``tools`` argument."""
    return "tools" in _tool_template(tokenizer)


def call_format(tokenizer: Any) -> Format:
    """The call format the tokenizer's chat template teaches: ``"json"`` for a template that renders tools without
    Hermes blocks (Llama 3.1's asks for a bare JSON object), else ``"hermes"`` (also for templates without tools,
    which get Qwen2.5's Hermes rendering)."""
    template = _tool_template(tokenizer)
    return "json" if "tools" in template and OPEN not in template else "hermes"


def render(tokenizer: Any, messages: Sequence[dict], tools: list[dict] | None) -> str:
    """The prompt text of a conversation (tool calls and results in it) and the ``tools`` the model may call."""
    if template_takes_tools(tokenizer):
        return tokenizer.apply_chat_template(
            list(messages), tools=tools or None, tokenize=False, add_generation_prompt=True
        )
    return tokenizer.apply_chat_template(hermes_messages(messages, tools), tokenize=False, add_generation_prompt=True)


def hermes_messages(messages: Sequence[dict], tools: list[dict] | None) -> list[dict]:
    """``messages`` in plain system/user/assistant turns, tools and calls written as Qwen2.5's template writes them."""
    out: list[dict] = []
    listed = "\n".join(json.dumps(tool) for tool in tools or [])
    if tools:
        if messages and messages[0]["role"] == "system":
            out.append({"role": "system", "content": messages[0]["content"] + _SYSTEM_TOOLS.format(tools=listed)})
            messages = messages[1:]
        else:
            out.append(
                {"role": "system", "content": "You are a helpful assistant." + _SYSTEM_TOOLS.format(tools=listed)}
            )
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            functions = [c["function"] for c in message["tool_calls"]]
            calls = [{"name": f["name"], "arguments": f["arguments"]} for f in functions]
            blocks = [f"{OPEN}\n{json.dumps(call)}\n{CLOSE}" for call in calls]
            out.append({"role": "assistant", "content": "\n".join([content, *blocks] if content else blocks)})
        elif role == "tool":
            block = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("tool_results"):  # consecutive results share one user turn
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "tool_results": True})
        else:
            out.append({"role": role, "content": content})
    return [{"role": m["role"], "content": m["content"]} for m in out]


def forced_calls(
    tools: list[dict], name: str | None = None, parallel: bool = True, form: Format = "hermes"
) -> Constraint:
    """The grammar of an answer that is only tool calls in the format ``form``: of the function ``name`` (else any
    of ``tools``), each call's arguments valid under the function's ``parameters``; Hermes: one block
    (``parallel`` False) or more, JSON: one object."""
    functions = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    if not functions:
        raise InvalidInputError(f"tool_choice names {name!r}, which is not among the tools.")
    key = "arguments" if form == "hermes" else "parameters"
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, key: f.get("parameters") or {"type": "object"}},
            "required": ["name", key],
            "additionalProperties": False,
        }
        for f in functions
    ]
    schema = {"x-guidance": JSON_OPTIONS, **(options[0] if len(options) == 1 else {"anyOf": options})}
    if form == "json":
        return Constraint.grammar(f"start: body\nbody: %json {json.dumps(schema)}\n")
    repeat = ' ("\\n" call)*' if parallel else ""
    lark = (
        f"start: call{repeat}\n"
        f"call: {json.dumps(OPEN + chr(10))} body {json.dumps(chr(10) + CLOSE)}\n"
        f"body: %json {json.dumps(schema)}\n"
    )
    return Constraint.grammar(lark)


def parse_calls(text: str, names: set[str], form: Format = "hermes") -> tuple[str | None, list[dict]]:
    """The content and the calls of an answer: each ``<tool_call>`` block (``form`` ``"json"``: the whole answer)
    that holds ``{"name", "arguments" or "parameters"}`` of a known function becomes an OpenAI tool call; an answer
    with a block that does not parse stays all text."""
    if form == "json":
        call = _call(text.strip(), names) if text.lstrip().startswith("{") else None
        return (text, []) if call is None else (None, [call])
    calls = []
    for body in _CALL.findall(text):
        call = _call(body, names)
        if call is None:
            return text, []
        calls.append(call)
    if not calls:
        return text, []
    content = _CALL.sub("", text).strip()
    return content or None, calls


def _call(body: str, names: set[str]) -> dict | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": value["name"], "arguments": json.dumps(arguments)},
    }


class CallStream:
    """Streams an answer's text as content and completed tool calls. Hermes: text is passed on until a
    ``<tool_call>`` starts (a tail that may still become one is held back), a call is handed over once its block
    closes. JSON: an answer that starts with ``{`` is held to its end, then is a call or, if not one, its text."""

    def __init__(self, names: set[str], form: Format = "hermes") -> None:
        self.names, self.form, self.text, self.done, self.in_call, self.calls = names, form, "", 0, False, 0

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[dict]]:
        """The content to emit and the calls completed, after ``delta`` (``final``: the answer ended)."""
        self.text += delta
        if self.form == "json":
            return self._feed_json(final)
        content, calls = "", []
        while True:
            if self.in_call:
                end = self.text.find(CLOSE, self.done)
                if end < 0 and not final:
                    break
                body = self.text[self.done : end if end >= 0 else len(self.text)]
                call = _call(body.strip(), self.names)
                if call is None:  # not a call after all: show it as it was
                    content += OPEN + body + (CLOSE if end >= 0 else "")
                else:
                    calls.append(call)
                    self.calls += 1
                self.done, self.in_call = (end + len(CLOSE) if end >= 0 else len(self.text)), False
                continue
            start = self.text.find(OPEN, self.done)
            if start >= 0:
                content += self.text[self.done : start]
                self.done, self.in_call = start + len(OPEN), True
                continue
            safe = len(self.text) if final else _safe_end(self.text, self.done)
            content += self.text[self.done : safe]
            self.done = safe
            break
        if self.calls and not content.strip():
            content = ""  # the newlines between calls
        return content, calls

    def _feed_json(self, final: bool) -> tuple[str, list[dict]]:
        if self.done == 0 and self.text.lstrip().startswith("{"):  # maybe a call: nothing is shown before the end
            if not final:
                return "", []
            content, calls = parse_calls(self.text, self.names, "json")
            self.done, self.calls = len(self.text), len(calls)
            return content or "", calls
        if self.done == 0 and not self.text.strip() and not final:
            return "", []  # leading whitespace: the answer may still open a call
        content, self.done = self.text[self.done :], len(self.text)
        return content, []


def _safe_end(text: str, start: int) -> int:
    """Where ``text`` may be cut so that no tail that could still begin ``<tool_call>`` is passed on."""
    for k in range(min(len(OPEN) - 1, len(text) - start), 0, -1):
        if text.endswith(OPEN[:k]):
            return len(text) - k
    return len(text)
