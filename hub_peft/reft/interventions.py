"""The ReFT interventions (Wu et al. 2024), one module for all six.

With ``h`` a hidden vector, ``R`` an r×d projection and ``W h + b`` a learned linear map d→r:

=========  ==============================  =================
type       edited h                        R
=========  ==============================  =================
loreft     h + Rᵀ(act(W h + b) − R h)      orthonormal rows
noreft     h + Rᵀ(act(W h + b) − R h)      unconstrained (optional bias in R h)
direft     h + Rᵀ act(W h + b)             orthonormal rows
nodireft   h + Rᵀ act(W h + b)             unconstrained
consreft   h + Rᵀ(b − R h)                 orthonormal rows
lobireft   h + Rᵀ b                        orthonormal rows
=========  ==============================  =================

Parameters live in the intervention's dtype (float32 by default) whatever the base model's dtype;
the edited ``h`` is cast back to ``h``'s dtype. Dropout (training only) applies to the edit Rᵀ(...).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from ..errors import InvalidInputError


@dataclass(frozen=True)
class _Kind:
    orthogonal: bool  # R has orthonormal rows (torch's orthogonal parametrization keeps them so while training)
    learned_source: bool  # act(W h + b); otherwise just the bias vector b
    subtract_projection: bool  # the "− R h" term


KINDS = {
    "loreft": _Kind(orthogonal=True, learned_source=True, subtract_projection=True),
    "noreft": _Kind(orthogonal=False, learned_source=True, subtract_projection=True),
    "direft": _Kind(orthogonal=True, learned_source=True, subtract_projection=False),
    "nodireft": _Kind(orthogonal=False, learned_source=True, subtract_projection=False),
    "consreft": _Kind(orthogonal=True, learned_source=False, subtract_projection=True),
    "lobireft": _Kind(orthogonal=True, learned_source=False, subtract_projection=False),
}
_ACTIVATIONS = {
    None: nn.Identity,
    "linear": nn.Identity,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
}


class Intervention(nn.Module):
    """One ReFT intervention acting on ``[..., hidden_size]`` tensors."""

    def __init__(
        self,
        kind: str,
        hidden_size: int,
        rank: int,
        *,
        activation: str | None = None,
        dropout: float = 0.0,
        proj_bias: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise InvalidInputError(f"Unknown intervention {kind!r}; use one of {sorted(KINDS)}.")
        if not 0 < rank <= hidden_size:
            raise InvalidInputError(f"rank {rank} must be between 1 and the hidden size {hidden_size}.")
        self.kind, self.spec = kind, KINDS[kind]
        self.hidden_size, self.rank = hidden_size, rank
        has_bias = proj_bias and not self.spec.orthogonal and self.spec.subtract_projection  # only R h takes a bias
        self.proj = nn.Linear(hidden_size, rank, bias=has_bias, dtype=dtype)
        if self.spec.orthogonal:
            nn.init.orthogonal_(self.proj.weight)
            parametrizations.orthogonal(self.proj)
        if self.spec.learned_source:
            self.source = nn.Linear(hidden_size, rank, dtype=dtype)
        else:
            self.source_bias = nn.Parameter(torch.zeros(rank, dtype=dtype))  # starts as the identity edit
        self.act = _ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout)

    @property
    def R(self) -> torch.Tensor:
        return self.proj.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.to(self.proj.weight.dtype)
        R = self.proj.weight  # computed once: with the parametrization each access re-orthogonalises
        target = self.act(self.source(x)) if self.spec.learned_source else self.source_bias
        if self.spec.subtract_projection:
            projected = x @ R.T
            if self.proj.bias is not None:
                projected = projected + self.proj.bias
            target = target - projected
        edit = self.dropout(target @ R)
        return (x + edit).to(h.dtype)

    def export(self) -> dict[str, torch.Tensor]:
        """Plain tensors for ``adapter_model.safetensors``: R, and W/b or b, and the optional R bias."""
        out = {"R": self.proj.weight.detach()}
        if self.proj.bias is not None:
            out["R_bias"] = self.proj.bias.detach()
        if self.spec.learned_source:
            out["W"], out["b"] = self.source.weight.detach(), self.source.bias.detach()
        else:
            out["b"] = self.source_bias.detach()
        return {k: v.contiguous().clone() for k, v in out.items()}

    def expected_shapes(self) -> dict[str, list[int]]:
        return {k: list(v.shape) for k, v in self.export().items()}

    def freeze(self) -> Intervention:
        """For inference: store R as a plain tensor (computed once) instead of re-deriving it from the
        orthogonal parametrization at every call. Training needs the parametrization; inference does not."""
        if parametrize.is_parametrized(self.proj, "weight"):
            parametrize.remove_parametrizations(self.proj, "weight", leave_parametrized=True)
        self.requires_grad_(False)
        return self.eval()

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor], *, name: str = "intervention") -> None:
        """Set parameters from :meth:`export`-style tensors (shapes and R's orthonormality checked)."""
        expected = self.expected_shapes()
        if set(tensors) != set(expected):
            raise InvalidInputError(f"{name}: expected tensors {sorted(expected)}, found {sorted(tensors)}.")
        for key, shape in expected.items():
            if list(tensors[key].shape) != shape:
                raise InvalidInputError(f"{name}.{key} has shape {list(tensors[key].shape)}, expected {shape}.")
        dtype = self.proj.weight.dtype
        R = tensors["R"].to(dtype)
        if self.spec.orthogonal:
            gram = (R.double() @ R.double().T) - torch.eye(self.rank, dtype=torch.float64)
            if gram.abs().max() > 1e-3:
                raise InvalidInputError(
                    f"{name}.R should have orthonormal rows for {self.kind} (|RRᵀ − I| = {gram.abs().max():.2e}); "
                    f"the file is corrupt or not a {self.kind} adapter."
                )
            self.proj.weight = R  # the parametrization's right-inverse stores it
        else:
            self.proj.weight.copy_(R)
        if "R_bias" in tensors:
            self.proj.bias.copy_(tensors["R_bias"].to(dtype))
        if self.spec.learned_source:
            self.source.weight.copy_(tensors["W"].to(dtype))
            self.source.bias.copy_(tensors["b"].to(dtype))
        else:
            self.source_bias.copy_(tensors["b"].to(dtype))
