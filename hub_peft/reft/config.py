"""``ReftConfig``: what a ReFT adapter intervenes on, where, and how. Stored as ``adapter_config.json``."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import InvalidInputError

PEFT_TYPE = "REFT"
LOAD_NOTE = (
    "ReFT adapter made with hub_peft: load it with hub_peft (`pip install hub-peft`, then "
    "`hub_peft.load_adapter(base_model, repo_id)` or `hub-peft chat --adapter REPO`). Plain peft cannot load this type."
)
INTERVENTIONS = ("loreft", "noreft", "direft", "nodireft", "consreft", "lobireft")
COMPONENTS = ("block_output", "block_input", "attention_output", "mlp_output")
ACTIVATIONS = (None, "linear", "relu", "gelu", "tanh", "silu")
DTYPES = ("float32", "bfloat16", "float16", "float64")
_POSITIONS = re.compile(r"^(?:f(\d+)(?:\+l(\d+))?|l(\d+))$")


def parse_positions(spec: str) -> tuple[int, int]:
    """``"f1+l1"`` -> ``(1, 1)``: how many first and last prompt tokens are intervened on."""
    m = _POSITIONS.match(spec.replace(" ", "")) if isinstance(spec, str) else None
    first, last = (int(m.group(1) or 0), int(m.group(2) or m.group(3) or 0)) if m else (0, 0)
    if not m or first + last == 0 or max(first, last) > 64:
        raise InvalidInputError(
            f"Invalid positions {spec!r}: use pyreft's notation, e.g. 'l1' (last prompt token), 'f1+l1' "
            "(first and last), 'f3+l3' (at most 64 each)."
        )
    return first, last


@dataclass
class ReftConfig:
    """A set of ReFT interventions on a decoder-only transformers model.

    Every ``(layer, component)`` pair gets one intervention per position group: ``"f"`` (first n prompt
    tokens) and ``"l"`` (last n), or a single shared one (``"fl"``) when ``share_weights`` is set.
    """

    layers: list[int] = field(default_factory=lambda: [8, 16])
    intervention: str = "loreft"
    rank: int = 4
    positions: str = "l1"
    components: list[str] = field(default_factory=lambda: ["block_output"])
    share_weights: bool = False
    dropout: float = 0.0
    activation: str | None = None
    proj_bias: bool = False  # NoReFT only: R h + c
    dtype: str = "float32"
    base_model_name_or_path: str | None = None
    hidden_size: int | None = None
    prompt_template: str | None = None  # exact text around "{prompt}" used in training; None = the chat template
    peft_type: str = PEFT_TYPE
    loads_with: str = "hub_peft"
    load_note: str = LOAD_NOTE
    hub_peft_version: str | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.peft_type != PEFT_TYPE:
            problems.append(f"peft_type must be {PEFT_TYPE!r}, got {self.peft_type!r}")
        if self.intervention not in INTERVENTIONS:
            problems.append(f"intervention {self.intervention!r} is not one of {list(INTERVENTIONS)}")
        if not self.layers or not all(isinstance(n, int) and n >= 0 for n in self.layers):
            problems.append(f"layers must be a non-empty list of layer indices >= 0, got {self.layers!r}")
        elif len(set(self.layers)) != len(self.layers):
            problems.append(f"layers {self.layers} repeat an index")
        if not isinstance(self.rank, int) or self.rank < 1:
            problems.append(f"rank must be a positive integer, got {self.rank!r}")
        bad = [c for c in self.components if c not in COMPONENTS]
        if bad or not self.components:
            problems.append(f"components {bad or self.components} must be among {list(COMPONENTS)}")
        if self.activation not in ACTIVATIONS:
            problems.append(f"activation {self.activation!r} is not one of {list(ACTIVATIONS)}")
        if not 0.0 <= float(self.dropout) < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype {self.dtype!r} is not one of {list(DTYPES)}")
        if self.prompt_template is not None and "{prompt}" not in self.prompt_template:
            problems.append("prompt_template must contain the placeholder '{prompt}'")
        if problems:
            raise InvalidInputError("Invalid ReFT config: " + "; ".join(problems) + ".")
        parse_positions(self.positions)
        self.layers = sorted(self.layers)

    @property
    def first_last(self) -> tuple[int, int]:
        return parse_positions(self.positions)

    @property
    def groups(self) -> list[str]:
        """Position groups that get their own intervention: ``["f", "l"]``, ``["l"]``, or ``["fl"]`` when shared."""
        first, last = self.first_last
        present = "f" * bool(first) + "l" * bool(last)
        return [present] if self.share_weights or len(present) == 1 else list(present)

    def sites(self) -> list[tuple[int, str, str]]:
        """``(layer, component, group)`` of every intervention, in application order."""
        return [(layer, comp, group) for layer in self.layers for comp in self.components for group in self.groups]

    @staticmethod
    def key_name(layer: int, component: str, group: str) -> str:
        return f"layer{layer}.{component}.{group}"

    def tensor_shapes(self) -> dict[str, list[int]]:
        """Name -> shape of every tensor ``adapter_model.safetensors`` must hold (needs ``hidden_size``)."""
        from .interventions import KINDS

        kind, d, r = KINDS[self.intervention], self.hidden_size or 0, self.rank
        per_key = {"R": [r, d]}
        if self.proj_bias and not kind.orthogonal and kind.subtract_projection:
            per_key["R_bias"] = [r]
        if kind.learned_source:
            per_key["W"] = [r, d]
        per_key["b"] = [r]
        return {f"reft.{self.key_name(*key)}.{name}": shape for key in self.sites() for name, shape in per_key.items()}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReftConfig:
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise InvalidInputError(
                f"Unknown ReFT config fields {unknown}; this hub_peft may be older than the adapter."
            )
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
