"""Sampling parameters and the per-row sampler, batch-invariant by construction.

A row's next token depends only on its own logits, its own parameters, and (when it samples) noise
drawn from a counter-based generator keyed by ``(seed, position of the token in the completion,
token id)``: no generator state is shared by the batch, so a seeded request gives the same tokens
whatever it is batched with and wherever it sits in the batch. Sampling uses the Gumbel-max trick,
``argmax(logits / T + g)`` with ``g = -log(-log(u))``, over the tokens that top-k / top-p / min-p keep,
which draws exactly from the renormalised softmax over those tokens.

Logprobs are the model's own (``log_softmax`` of the raw logits), as vLLM reports them by default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..errors import GenerationError, InvalidInputError

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """How one completion is decoded. ``temperature=0`` is greedy (the default here)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    seed: int | None = None  # None: fresh random noise per request (still independent of batch mates)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's and the top k
    noise_key: int = field(default=0, compare=False)  # derived from seed (or random) in __post_init__

    def __post_init__(self) -> None:
        checks = [
            ("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens >= 1, "an integer >= 1"),
            ("temperature", 0 <= self.temperature <= 100, "between 0 and 100"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0 (0 turns it off)"),
            ("min_p", 0 <= self.min_p <= 1, "in [0, 1]"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "between -2 and 2"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "between -2 and 2"),
            ("repetition_penalty", 0 < self.repetition_penalty <= 10, "in (0, 10]"),
            (
                "logprobs",
                self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS,
                f"between 0 and {MAX_TOP_LOGPROBS}",
            ),
            (
                "stop",
                all(isinstance(s, str) and s for s in self.stop) and len(self.stop) <= 16,
                "at most 16 non-empty strings",
            ),
        ]
        for name, ok, what in checks:
            if not ok:
                raise InvalidInputError(f"{name} must be {what}, got {getattr(self, name)!r}.")
        key = self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little")
        object.__setattr__(self, "noise_key", _mix_int(key & _MASK64))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


_C1, _C2, _GOLDEN = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB), _signed(0x9E3779B97F4A7C15)


def _mix_int(x: int) -> int:
    """splitmix64's finalizer on a Python int (as a signed 64-bit value)."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return _signed(x ^ (x >> 31))


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 tensors (wrapping multiplication, logical shifts)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _C1
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _C2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def uniform_noise(key: int, position: int, token_ids: torch.Tensor) -> torch.Tensor:
    """Uniform (0, 1) float64 noise for ``token_ids``, a pure function of ``(key, position, token id)``."""
    base = _mix_int(key ^ _mix_int(position + 1))
    bits = _mix(token_ids.to(torch.int64) * _GOLDEN + base)
    return (((bits >> 11) & ((1 << 53) - 1)).to(torch.float64) + 0.5) * 2.0**-53


@dataclass
class Sampled:
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)


def sample_row(
    logits: torch.Tensor,
    params: SamplingParams,
    position: int,
    prompt_ids: list[int],
    output_ids: list[int],
    *,
    eos: int | None = None,
    suppress_eos: bool = False,
    allowed: torch.Tensor | None = None,
) -> Sampled:
    """The next token of one row from its raw ``logits`` [vocab]; ``position`` counts the tokens already
    generated for this completion (it keys the noise). ``allowed`` (booleans [vocab], a grammar's mask, see
    :mod:`.structured`) drops every other token before the draw; logprobs stay the model's own."""
    raw = logits.float()
    scores = raw.clone()
    if params.repetition_penalty != 1.0 and (prompt_ids or output_ids):
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long)
        picked = scores[seen]
        scores[seen] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and output_ids:
        ids, counts = torch.tensor(output_ids, dtype=torch.long).unique(return_counts=True)
        scores[ids] -= params.frequency_penalty * counts.float() + params.presence_penalty
    if suppress_eos and eos is not None:
        scores[eos] = float("-inf")
    if allowed is not None:
        scores.masked_fill_(~allowed[: scores.shape[0]], float("-inf"))
        if not torch.isfinite(scores).any():
            raise GenerationError("The answer's grammar allows no next token here.")
    token = int(scores.argmax()) if params.greedy else _gumbel_choice(scores / params.temperature, params, position)
    out = Sampled(token)
    if params.logprobs is not None:
        logprobs = torch.log_softmax(raw, dim=-1)
        out.logprob = float(logprobs[token])
        if params.logprobs:
            values, ids = logprobs.topk(params.logprobs)
            out.top = list(zip(ids.tolist(), values.tolist(), strict=True))
    return out


def _gumbel_choice(scores: torch.Tensor, params: SamplingParams, position: int) -> int:
    keep = torch.isfinite(scores)
    if params.top_k and params.top_k < int(keep.sum()):
        threshold = scores.topk(params.top_k).values[-1]
        keep &= scores >= threshold
    if params.top_p < 1.0 or params.min_p > 0.0:
        probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
        if params.min_p > 0.0:
            keep &= probs >= params.min_p * probs.max()
        if params.top_p < 1.0:
            order = probs.argsort(descending=True)
            cumulative = probs[order].cumsum(0)
            outside = cumulative - probs[order] >= params.top_p  # the mass before a token already reaches top_p
            drop = torch.zeros_like(keep)
            drop[order[outside]] = True
            keep &= ~drop
    candidates = keep.nonzero().squeeze(1)
    noise = uniform_noise(params.noise_key, position, candidates)
    gumbel = -torch.log(-torch.log(noise))
    return int(candidates[(scores[candidates].double() + gumbel).argmax()])
