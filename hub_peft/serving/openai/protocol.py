"""Request models of the OpenAI-compatible API (pydantic), so requests are validated by schema and
``/openapi.json`` describes them. A field OpenAI or vLLM defines that this server does not implement is
not declared here, so it is refused with a 400 that names it, never silently ignored.

Defaults follow OpenAI's API: ``temperature`` 1, ``top_p`` 1, ``n`` 1, ``max_tokens`` 16 for
completions and up to the context for chat (here: ``default_max_tokens`` of the server). Structured output:
OpenAI's ``response_format`` (``json_object``, ``json_schema``) and vLLM's ``structured_outputs`` (``json``,
``regex``, ``choice``, ``grammar``, ``json_object``); tools: ``tools``, ``tool_choice``, ``parallel_tool_calls``,
assistant ``tool_calls`` and ``tool`` messages. Extensions taken from vLLM: ``top_k``, ``min_p``,
``repetition_penalty``, ``ignore_eos``; and hub_peft's own: ``model`` may be a ``{"adapter": weight}`` mix.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

from ..request import MAX_MIX_ADAPTERS, MAX_MIX_WEIGHT
from ..sampling import MAX_TOP_LOGPROBS, SamplingParams
from ..structured import MAX_CHOICES, Constraint
from ..tools import Format, forced_calls


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


FunctionName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")]


class CalledFunction(_Strict):
    name: FunctionName
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: Annotated[str, Field(max_length=128)]
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=64)] | None = None  # an assistant's earlier calls
    tool_call_id: Annotated[str, Field(max_length=128)] | None = None  # a tool message: the call it answers
    # an assistant message sent back as the SDK received it carries these (null, or ignored)
    refusal: str | None = None
    annotations: list[dict[str, Any]] | None = None
    audio: None = None
    function_call: None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionDefinition(_Strict):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments
    strict: StrictBool | None = None  # calls are held to ``parameters`` when forced (tool_choice), not otherwise


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: FunctionName


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Strict):
    name: FunctionName
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None  # the schema is enforced either way


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Strict):
    """vLLM's ``structured_outputs``: exactly one of its fields."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: Annotated[list[str], Field(min_length=1, max_length=MAX_CHOICES)] | None = None
    grammar: str | None = None
    json_object: StrictBool | None = None

    def constraint(self) -> Constraint:
        given = [
            k for k in ("json_", "regex", "choice", "grammar", "json_object") if getattr(self, k) not in (None, False)
        ]
        if len(given) != 1:
            raise ValueError("structured_outputs takes exactly one of json, regex, choice, grammar, json_object")
        if self.json_ is not None:
            try:
                schema = json.loads(self.json_) if isinstance(self.json_, str) else self.json_
            except ValueError:
                raise ValueError("structured_outputs.json is not valid JSON") from None
            return Constraint.json_schema(schema)
        if self.regex is not None:
            return Constraint.regex(self.regex)
        if self.choice is not None:
            return Constraint.choice(self.choice)
        if self.grammar is not None:
            return Constraint.grammar(self.grammar)
        return Constraint.json_schema()


class StreamOptions(_Strict):
    include_usage: StrictBool = False


Probability = Annotated[float, Field(ge=0, le=1)]
ModelName = Annotated[str, Field(max_length=512)]
# hub_peft's mix: {"adapter": weight}, finite weights (a NaN or 1e308 weight only makes garbage)
Weight = Annotated[float, Field(allow_inf_nan=False, ge=-MAX_MIX_WEIGHT, le=MAX_MIX_WEIGHT)]
Mix = Annotated[dict[ModelName, Weight], Field(min_length=1, max_length=MAX_MIX_ADAPTERS)]


class MergeOptions(_Strict):
    """hub_peft's per-request merge of a ``model`` mix (``hub-peft merge``'s options): PEFT's combination method,
    its density (TIES/DARE/magnitude pruning), SVD rank, majority sign method and DARE's seed."""

    method: Annotated[str, Field(max_length=32)] = "cat"  # one of hub_peft.bridges.LORA_METHODS (MergeSpec checks)
    density: Annotated[float, Field(gt=0, le=1)] | None = None
    svd_rank: Annotated[StrictInt, Field(ge=1, le=1024)] | None = None
    majority_sign_method: Literal["total", "frequency"] = "total"
    seed: Annotated[StrictInt, Field(ge=0, le=2**31 - 1)] = 0


class _Sampling(_Strict):
    model: ModelName | Mix | None = None
    merge: MergeOptions | None = None  # hub_peft: merge the `model` mix into one adapter (see MergeOptions)
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: StrictInt | None = None  # vLLM: -1 or 0 turn it off
    min_p: Probability | None = None
    seed: StrictInt | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] | None = None
    stop: str | list[str] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=16)] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool = False
    user: str | None = None  # OpenAI's end-user id: recorded by nothing, changes nothing
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None

    def constraint(self) -> Constraint | None:
        """What the answer must match (``ValueError`` naming the problem when the fields contradict)."""
        form = self.response_format
        wanted = None if form is None or form.type == "text" else form
        if wanted is not None and self.structured_outputs is not None:
            raise ValueError("give response_format or structured_outputs, not both")
        if self.structured_outputs is not None:
            return self.structured_outputs.constraint()
        if wanted is None:
            return None
        if wanted.type == "json_object":
            return Constraint.json_schema()
        if wanted.json_schema is None:
            raise ValueError("response_format of type json_schema needs its json_schema")
        return Constraint.json_schema(wanted.json_schema.schema_ or {})

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int | None) -> int | None:
        if value is not None and value < -1:
            raise ValueError("top_k must be -1 or 0 (off) or a positive number of tokens")
        return value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 16 or any(not s or len(s) > 256 for s in stops):
            raise ValueError("stop takes at most 16 non-empty strings of at most 256 characters")
        return value

    def sampling(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(0, self.top_k or 0),
            min_p=self.min_p or 0.0,
            seed=self.seed,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            stop=stop,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
        )


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = True

    def offered_tools(self) -> list[dict] | None:
        """The tools shown to the model (none when ``tool_choice`` is ``"none"``), as plain dicts."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def constraint(self, call_format: Format = "hermes") -> Constraint | None:
        """``tool_choice`` ``"required"`` or a named function: the answer is the grammar of calls in the chat
        template's ``call_format``; else the response format's."""
        choice = self.tool_choice
        if choice is not None and choice != "none" and not self.tools:
            raise ValueError("tool_choice needs tools")
        forced = choice == "required" or isinstance(choice, NamedToolChoice)
        if not forced:
            return super().constraint()
        if (self.response_format is not None and self.response_format.type != "text") or self.structured_outputs:
            raise ValueError("a forced tool call (tool_choice) cannot also follow a response_format")
        name = choice.function.name if isinstance(choice, NamedToolChoice) else None
        return forced_calls(self.offered_tools() or [], name, parallel=self.parallel_tool_calls, form=call_format)

    def wanted_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: StrictBool = False  # the prompt's text before the completion's

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class AdapterLoad(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=200)]
    source: Annotated[str, Field(min_length=1)]  # a folder or REPO[@REVISION][:SUBFOLDER]
    revision: str | None = None
    subfolder: str | None = None
    pin: StrictBool = False


class EmbeddingRequest(_Strict):
    """OpenAI's embeddings request: texts only (token-id inputs and ``dimensions`` are not implemented)."""

    model: ModelName | Mix | None = None
    input: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=64)]
    )
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class LoadLoraAdapter(_Strict):
    """vLLM's ``/v1/load_lora_adapter`` body (any adapter type here, not only LoRA)."""

    lora_name: Annotated[str, Field(min_length=1, max_length=200)]
    lora_path: Annotated[str, Field(min_length=1)]  # a folder under --adapter-dir, or REPO[@REVISION][:SUBFOLDER]
    load_inplace: StrictBool = False  # replace an adapter of that name (else: 400 when it exists)


class UnloadLoraAdapter(_Strict):
    """vLLM's ``/v1/unload_lora_adapter`` body."""

    lora_name: Annotated[str, Field(min_length=1, max_length=200)]
    lora_int_id: StrictInt | None = None  # vLLM's numeric id: accepted, unused (names identify adapters here)
