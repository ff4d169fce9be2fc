"""CPU kernels for the cached ReFT trainer: frozen linear layers through whichever GEMM is faster
here, and a cross-entropy over the output layer that allocates one vocabulary-sized tensor per step
instead of four.

Both compute the same float32 math as ``nn.Linear`` / ``F.cross_entropy`` (up to float rounding).
They exist because a step of the cached trainer multiplies few rows (the response tokens) by every
weight of the upper layers, forward and backward. At that shape which of oneDNN and the MKL GEMM behind
``nn.Linear`` wins depends on the CPU, and can differ between the forward and the backward, so
:func:`faster_gemms` times both, each way, on the real shape once.
And on a CPU every fresh allocation of tens of MB costs more in page faults than the arithmetic done on it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .._onednn import best_of, is_frozen_float32_linear, onednn_available, runs_on_onednn
from .._onednn import linear as _linear
from ..errors import InvalidInputError

__all__ = [
    "Gemms",
    "OneDnnLinear",
    "OneDnnLinears",
    "faster_gemms",
    "is_frozen_float32_linear",
    "linear_cross_entropy",
    "matmul",
    "matmul_back",
    "onednn_available",
]


@dataclass(frozen=True)
class Gemms:
    """Which of a frozen linear layer's two products run on oneDNN rather than torch's default GEMM:
    the forward ``x @ weight.T`` and the backward's input gradient ``g @ weight``. They are separate
    choices: on one CPU oneDNN can win one and lose the other."""

    forward: bool = False
    backward: bool = False

    def __bool__(self) -> bool:
        return self.forward or self.backward


def faster_gemms(weight: torch.Tensor, rows: int) -> Gemms:
    """For ``rows`` rows, whether oneDNN computes ``x @ weight.T`` and, separately, ``g @ weight``
    faster than torch's default GEMM, timed on this CPU (best of two, alternating; a few ms). An
    output layer is timed on one vocabulary chunk, the width :func:`linear_cross_entropy` multiplies by."""
    if not onednn_available() or weight.dtype != torch.float32 or weight.device.type != "cpu":
        return Gemms()
    w = weight.detach()[:_VOCAB_CHUNK]
    x, g = torch.full((rows, w.shape[1]), 0.5), torch.full((rows, w.shape[0]), 0.5)  # values do not matter
    forward, forward_default, backward, backward_default = best_of(
        lambda: _linear(x, w), lambda: x @ w.T, lambda: _linear(g, w.T), lambda: g @ w
    )
    return Gemms(forward=forward < forward_default, backward=backward < backward_default)


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, onednn: bool) -> torch.Tensor:
    """``x @ weight.T + bias``, by oneDNN if ``onednn``."""
    if onednn:
        return _linear(x, weight, bias)
    return nn.functional.linear(x, weight, bias)


def matmul_back(grad: torch.Tensor, weight: torch.Tensor, onednn: bool) -> torch.Tensor:
    """``grad @ weight`` (the input gradient of :func:`matmul`), by oneDNN if ``onednn``."""
    return _linear(grad, weight.T) if onednn else grad @ weight


class _FrozenMatmul(torch.autograd.Function):
    """``x @ weight.T + bias`` and its gradient for ``x`` only (the weight is frozen)."""

    @staticmethod
    def forward(ctx, x, weight, bias, gemms):
        ctx.weight, ctx.gemms = weight, gemms
        return matmul(x, weight, bias, gemms.forward)

    @staticmethod
    def backward(ctx, grad):
        return matmul_back(grad.contiguous(), ctx.weight, ctx.gemms.backward), None, None, None


class OneDnnLinear(nn.Module):
    """A frozen float32 ``nn.Linear`` with its forward and/or backward product computed by oneDNN
    (``gemms``; same weight tensor, nothing copied)."""

    def __init__(self, linear: nn.Linear, gemms: Gemms = Gemms(forward=True, backward=True)) -> None:
        super().__init__()
        self.linear, self.gemms = linear, gemms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FrozenMatmul.apply(x.contiguous(), self.linear.weight, self.linear.bias, self.gemms)


class OneDnnLinears:
    """The frozen float32 ``nn.Linear`` layers under ``modules`` with a product that oneDNN computes
    faster than torch's default GEMM at ``rows`` rows (:func:`faster_gemms`, timed once per weight
    shape), swapped for :class:`OneDnnLinear` inside :meth:`active`."""

    def __init__(self, modules: list[nn.Module], rows: int) -> None:
        found = [
            (parent, name, child)
            for m in modules
            for parent in m.modules()
            for name, child in parent.named_children()
            if runs_on_onednn(child)
        ]
        faster: dict[tuple[int, ...], Gemms] = {}
        for _, _, child in found:
            if child.weight.shape not in faster:
                faster[child.weight.shape] = faster_gemms(child.weight, rows)
        self.swaps = [(p, n, c, OneDnnLinear(c, faster[c.weight.shape])) for p, n, c in found if faster[c.weight.shape]]
        self.gemms = {id(c.weight): fast.gemms for _, _, c, fast in self.swaps}

    @contextmanager
    def active(self) -> Iterator[None]:
        for parent, name, _, fast in self.swaps:
            setattr(parent, name, fast)
        try:
            yield
        finally:
            for parent, name, plain, _ in self.swaps:
                setattr(parent, name, plain)


_VOCAB_CHUNK = 8192  # logits of a few hundred rows by 8192 words: a few MB, which malloc recycles without page faults


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, over vocabulary chunks. Each
    chunk's logits are turned in place into ``exp(logits - max)``, which the backward turns in place
    into the logits' gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, gemms):
        starts = range(0, weight.shape[0], _VOCAB_CHUNK)
        chunks = [matmul(hidden, part, None, gemms.forward) for part in (weight[a : a + _VOCAB_CHUNK] for a in starts)]
        in_chunk = [
            c.gather(1, (targets - a).clamp(0, c.shape[1] - 1)[:, None])[:, 0]
            for a, c in zip(starts, chunks, strict=True)
        ]
        picked = torch.stack(in_chunk).gather(0, (targets // _VOCAB_CHUNK)[None])[0]  # from the target's own chunk
        top = torch.stack([c.amax(1) for c in chunks]).amax(0, keepdim=True).T
        total = sum(c.sub_(top).exp_().sum(1) for c in chunks)
        ctx.save_for_backward(weight, targets, total)
        ctx.gemms, ctx.chunks = gemms, chunks  # not in saved_tensors: the backward overwrites them in place
        return (top[:, 0] + total.log() - picked).mean()

    @staticmethod
    def backward(ctx, grad):
        weight, targets, total = ctx.saved_tensors
        grad_hidden = None
        for a, probs in zip(range(0, weight.shape[0], _VOCAB_CHUNK), ctx.chunks, strict=True):
            probs.div_(total[:, None])
            rows = ((targets >= a) & (targets < a + probs.shape[1])).nonzero()[:, 0]
            probs[rows, targets[rows] - a] -= 1
            probs.mul_(grad / len(targets))
            part = matmul_back(probs, weight[a : a + probs.shape[1]], ctx.gemms.backward)
            grad_hidden = part if grad_hidden is None else grad_hidden.add_(part)
        ctx.chunks = None
        return grad_hidden, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, linear: nn.Linear, targets: torch.Tensor, *, gemms: Gemms = Gemms()
) -> torch.Tensor:
    """``F.cross_entropy(linear(hidden), targets)`` for a frozen bias-free ``linear`` (see the module
    doc), its forward and backward products by oneDNN where ``gemms`` says so and this torch build
    has it, else by torch's GEMM."""
    if linear.bias is not None or linear.weight.requires_grad:
        raise InvalidInputError("linear_cross_entropy needs a frozen linear layer without bias.")
    return _LinearCrossEntropy.apply(hidden, linear.weight, targets, gemms if runs_on_onednn(linear) else Gemms())
