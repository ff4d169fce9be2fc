"""oneDNN for frozen float32 linear layers on the CPU: the plain call, and a weight reordered once.

torch's ``nn.Linear`` on a CPU calls MKL's GEMM, which is slow when few rows meet a wide weight (an
LM head by the 1-64 rows of a decode step); oneDNN with the weight reordered once into its blocked layout
can be faster there (the same product vLLM's CPU backend runs for its linear layers). Whether it is
depends on the CPU, and the reorder is a copy of the weight, so :class:`PackedLinear` is made only where
:func:`packed_is_faster` measured a gain on this CPU (figures: ``benchmarks/README.md``, "Engine CPU facts").
Results equal ``nn.Linear``'s up to float32 rounding (a different summation order).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import cache

import torch
from torch import nn

from .errors import InvalidInputError


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` by oneDNN; ``weight`` may be a transposed view (no copy is made) or a
    weight reordered by :func:`reorder`."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


ROWS = 32  # the row count weights are reordered for; 1-256 rows all ran well on it


def reorder(weight: torch.Tensor, rows: int = ROWS) -> torch.Tensor:
    """``weight`` ``[out, in]`` copied into oneDNN's blocked layout for products with about ``rows`` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)


@cache
def onednn_available() -> bool:
    """Whether this torch build runs float32 linear layers through oneDNN, and gets them right."""
    try:
        x, w = torch.randn(3, 5, generator=torch.Generator().manual_seed(0)), torch.randn(4, 5)
        return (
            torch.backends.mkldnn.is_available()
            and torch.allclose(linear(x, w), x @ w.T, atol=1e-5)
            and torch.allclose(linear(x @ w.T, w.T), x @ w.T @ w, atol=1e-4)
            and torch.allclose(linear(x, reorder(w)), x @ w.T, atol=1e-5)
        )
    except (AttributeError, RuntimeError):
        return False


def best_of(*candidates: Callable[[], object], repeats: int = 2) -> list[float]:
    """Each candidate's best time over ``repeats`` alternating rounds, after one warm-up round."""
    for run in candidates:
        run()
    best = [float("inf")] * len(candidates)
    for _ in range(repeats):
        for i, run in enumerate(candidates):
            started = time.perf_counter()
            run()
            best[i] = min(best[i], time.perf_counter() - started)
    return best


def is_frozen_float32_linear(module: nn.Module | None) -> bool:
    return (
        module is not None
        and type(module) is nn.Linear
        and module.weight.dtype == torch.float32
        and not module.weight.requires_grad
        and (module.bias is None or not module.bias.requires_grad)
    )


def packable(module: nn.Module | None) -> bool:
    """A float32 ``nn.Linear`` on the CPU, with oneDNN in this torch build (:class:`PackedLinear` sends
    products that need a gradient through the layer itself)."""
    return (
        module is not None
        and type(module) is nn.Linear
        and module.weight.dtype == torch.float32
        and module.weight.device.type == "cpu"
        and onednn_available()
    )


def runs_on_onednn(module: nn.Module | None) -> bool:
    """A frozen float32 ``nn.Linear`` on the CPU, with oneDNN in this torch build."""
    return packable(module) and is_frozen_float32_linear(module)


def packed_is_faster(module: nn.Linear, rows: Sequence[int]) -> bool:
    """Whether the reordered weight beats ``nn.Linear`` at every row count in ``rows``, timed on this CPU
    (best of three, alternating; tens of ms for an LM head)."""
    if not packable(module):
        return False
    packed = reorder(module.weight)
    for n in rows:
        x = torch.full((n, module.in_features), 0.5)  # values do not matter
        with torch.inference_mode():
            ours, theirs = best_of(lambda: linear(x, packed), lambda: module(x), repeats=3)  # noqa: B023
        if ours >= theirs:
            return False
    return True


class PackedLinear(nn.Module):
    """A float32 ``nn.Linear`` whose products run on a copy of its weight reordered for oneDNN.

    The layer itself is kept (``self.linear``: its weight may be tied to an embedding). The copy is
    remade when the weight changes in place, and a product that needs a gradient goes through the layer."""

    def __init__(self, module: nn.Linear, rows: int = ROWS) -> None:
        super().__init__()
        if not packable(module):
            raise InvalidInputError("PackedLinear needs a float32 nn.Linear on the CPU and a torch with oneDNN.")
        self.linear, self.rows = module, rows
        self._packed, self._version = reorder(module.weight, rows), module.weight._version

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.linear.weight.requires_grad)
        if x.dtype != torch.float32 or needs_grad:
            return self.linear(x)
        if self.linear.weight._version != self._version:
            self._packed, self._version = reorder(self.linear.weight, self.rows), self.linear.weight._version
        return linear(x, self._packed, self.linear.bias)
