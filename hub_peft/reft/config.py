"""``ReftConfig``: what a ReFT adapter intervenes on, where, and how. Stored as ``adapter_config.json``."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import InvalidInputError
from ..limits import MAX_RANK

MAX_LAYER = 10_000  # layer indices (models have at most a few hundred layers)
MAX_HIDDEN = 2**20  # hidden_size

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
        # NOTE(security): a config comes from an untrusted adapter_config.json: every field's type is checked
        # here, so a wrong one is an InvalidInputError, never a TypeError, and sizes are bounded
        def is_int(value: Any, low: int, high: int) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high

        def text(value: Any, limit: int = 80) -> str:
            return repr(value if not isinstance(value, (str, list, dict)) or len(value) <= 8 else str(value)[:limit])

        problems = []
        if self.peft_type != PEFT_TYPE:
            problems.append(f"peft_type must be {PEFT_TYPE!r}, got {text(self.peft_type)}")
        if not isinstance(self.intervention, str) or self.intervention not in INTERVENTIONS:
            problems.append(f"intervention {text(self.intervention)} is not one of {list(INTERVENTIONS)}")
        layers = self.layers
        if not isinstance(layers, (list, tuple)) or not layers or not all(is_int(n, 0, MAX_LAYER) for n in layers):
            problems.append(
                f"layers must be a non-empty list of layer indices from 0 to {MAX_LAYER}, got {text(self.layers)}"
            )
        elif len(set(self.layers)) != len(self.layers):
            problems.append(f"layers {text(self.layers)} repeat an index")
        if not is_int(self.rank, 1, MAX_RANK):
            problems.append(f"rank must be an integer from 1 to {MAX_RANK}, got {text(self.rank)}")
        if (
            not isinstance(self.components, (list, tuple))
            or not self.components
            or not all(isinstance(c, str) and c in COMPONENTS for c in self.components)
        ):
            problems.append(f"components {text(self.components)} must be a list of some of {list(COMPONENTS)}")
        if not (self.activation is None or isinstance(self.activation, str)) or self.activation not in ACTIVATIONS:
            problems.append(f"activation {text(self.activation)} is not one of {list(ACTIVATIONS)}")
        dropout = self.dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            problems.append(f"dropout must be a number in [0, 1), got {text(dropout)}")
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            problems.append(f"dtype {text(self.dtype)} is not one of {list(DTYPES)}")
        if self.prompt_template is not None and (
            not isinstance(self.prompt_template, str) or "{prompt}" not in self.prompt_template
        ):
            problems.append("prompt_template must be a string with the placeholder '{prompt}'")
        if self.hidden_size is not None and not is_int(self.hidden_size, 1, MAX_HIDDEN):
            problems.append(f"hidden_size must be an integer from 1 to {MAX_HIDDEN}, got {text(self.hidden_size)}")
        for name in ("share_weights", "proj_bias"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be true or false, got {text(getattr(self, name))}")
        for name in ("base_model_name_or_path", "hub_peft_version", "loads_with", "load_note"):
            value = getattr(self, name)
            if not (value is None or isinstance(value, str)) or (value is None and name in ("loads_with", "load_note")):
                problems.append(f"{name} must be a string, got {text(value)}")
        if problems:
            raise InvalidInputError("Invalid ReFT config: " + "; ".join(problems) + ".")
        parse_positions(self.positions)
        self.layers, self.components = sorted(self.layers), list(self.components)

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
        """The config of an adapter_config.json; InvalidInputError naming every problem (never a TypeError)."""
        if not isinstance(data, dict):
            raise InvalidInputError(f"A ReFT config is a JSON object, not a {type(data).__name__}.")
        unknown = sorted(str(k)[:80] for k in set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise InvalidInputError(
                f"Unknown ReFT config fields {unknown}; this hub_peft may be older than the adapter."
            )
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
