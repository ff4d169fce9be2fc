"""Request models of the OpenAI-compatible API (pydantic), so requests are validated by schema and
``/openapi.json`` describes them. A field OpenAI or vLLM defines that this server does not implement is
not declared here, so it is refused with a 400 that names it, never silently ignored.

Defaults follow OpenAI's API: ``temperature`` 1, ``top_p`` 1, ``n`` 1, ``max_tokens`` 16 for
completions and up to the context for chat (here: ``default_max_tokens`` of the server). Extensions
taken from vLLM: ``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``; and hub_peft's own:
``model`` may be a ``{"adapter": weight}`` mix.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

from ..request import MAX_MIX_ADAPTERS, MAX_MIX_WEIGHT
from ..sampling import MAX_TOP_LOGPROBS, SamplingParams


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: StrictBool = False


Probability = Annotated[float, Field(ge=0, le=1)]
ModelName = Annotated[str, Field(max_length=512)]
# hub_peft's mix: {"adapter": weight}, finite weights (a NaN or 1e308 weight only makes garbage)
Weight = Annotated[float, Field(allow_inf_nan=False, ge=-MAX_MIX_WEIGHT, le=MAX_MIX_WEIGHT)]
Mix = Annotated[dict[ModelName, Weight], Field(min_length=1, max_length=MAX_MIX_ADAPTERS)]


class _Sampling(_Strict):
    model: ModelName | Mix | None = None
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

    def wanted_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class AdapterLoad(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=200)]
    source: Annotated[str, Field(min_length=1)]  # a folder or REPO[@REVISION][:SUBFOLDER]
    revision: str | None = None
    subfolder: str | None = None
    pin: StrictBool = False
