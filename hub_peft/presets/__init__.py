"""Small example datasets shipped with hub_peft (the Space's and ``hub-peft train``'s presets)."""

from __future__ import annotations

import json
from importlib import resources

PRESETS = {"emoji": "Answer only in emoji: ten prompt → emoji pairs, written for hub_peft."}


def load_preset(name: str = "emoji") -> list[dict[str, str]]:
    """The preset's ``{"prompt", "response"}`` rows."""
    from ..errors import NotFoundError

    if name not in PRESETS:
        raise NotFoundError(f"No preset {name!r}; presets: {sorted(PRESETS)}.")
    text = resources.files(__name__).joinpath(f"{name}.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def held_out_prompts(name: str = "emoji") -> list[str]:
    """Prompts that are not in the preset, to see whether training generalised."""
    return json.loads(resources.files(__name__).joinpath("held_out.json").read_text(encoding="utf-8"))
