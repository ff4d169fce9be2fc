"""Convert a directory written by pyreft's ``ReftModel.save`` into hub_peft's ReFT format.

pyreft writes pyvene's ``config.json`` plus one pickled state dict per intervention
(``intkey_<key>.bin``). Pickle can run code, so the files are read only with
``torch.load(weights_only=True)`` (plain tensors), and anything else is refused. pyreft does not
record the prompt format or the positions it trained with; the caller says them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .._atomic import atomic_dir
from .._version import __version__
from ..cards import CardInfo, write_card
from ..errors import InvalidInputError, NotFoundError, UnsafeFileError
from .config import COMPONENTS, ReftConfig
from .interventions import Intervention
from .model import CONFIG_NAME, WEIGHTS_NAME

_KINDS = {"LoreftIntervention": "loreft", "NoreftIntervention": "noreft", "NodireftIntervention": "nodireft"}
_KEY = re.compile(r"^layer_(\d+)_comp_([a-z_]+)_unit_pos_nunit_(\d+)#(\d+)$")


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise NotFoundError(f"{path.name} is missing from the pyreft directory {path.parent}.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses any pickled object that is not plain tensors/containers
        raise UnsafeFileError(f"{path.name} holds more than plain tensors; refusing to unpickle it ({e}).") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UnsafeFileError(f"{path.name} is not a flat dict of tensors.")
    return state


def _to_ours(kind: str, state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    def need(*keys: str) -> None:
        if not set(keys) <= set(state):
            raise InvalidInputError(
                f"{name}: expected tensors {list(keys)} in a pyreft {kind} save, found {sorted(state)}."
            )

    if kind == "loreft":  # rotate_layer is Rᵀ (d×r, orthonormal columns); weight, bias are W, b
        need("rotate_layer", "weight", "bias")
        return {"R": state["rotate_layer"].T, "W": state["weight"], "b": state["bias"]}
    need("proj_layer.weight", "learned_source.weight", "learned_source.bias")
    out = {"R": state["proj_layer.weight"], "W": state["learned_source.weight"], "b": state["learned_source.bias"]}
    if kind == "noreft" and "proj_layer.bias" in state:
        out["R_bias"] = state["proj_layer.bias"]
    return out


def import_pyreft(
    src: str | Path,
    dst: str | Path,
    *,
    base: str | None = None,
    positions: str = "l1",
    prompt_template: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a hub_peft ReFT adapter folder (config, safetensors, card) from a pyreft save in ``src``."""
    from ..base_model import DEFAULT_BASE

    src = Path(src)
    keys, dims, kind = _read_pyvene_config(src)
    sites = _sites(keys)
    layers = sorted({layer for layer, _ in sites})
    components = sorted({comp for _, comp in sites})
    if set(sites) != {(layer, comp) for layer in layers for comp in components}:
        raise InvalidInputError("Every intervened layer must use the same components to import into one ReftConfig.")
    per_site = {len(v) for v in sites.values()}
    probe = ReftConfig(layers=layers, components=components, positions=positions, share_weights=per_site == {1})
    if per_site != {len(probe.groups)}:
        raise InvalidInputError(
            f"The save has {sorted(per_site)} intervention(s) per layer, which does not fit positions {positions!r}: "
            "pass --positions as trained (e.g. 'f1+l1' for two per layer)."
        )
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for (layer, comp), entries in sites.items():
        for group, (_, key) in zip(probe.groups, sorted(entries), strict=True):
            tensors[ReftConfig.key_name(layer, comp, group)] = _to_ours(
                kind, _read_state(src / f"intkey_{key}.bin"), key
            )
    first = next(iter(tensors.values()))
    rank, hidden = first["R"].shape
    if set(int(d) for d in dims) != {hidden}:
        raise InvalidInputError(f"intervention_dimensions {sorted(set(dims))} do not match the weights' {hidden}.")
    if base is None:
        # NOTE(pyreft-base): a pyreft save does not name its base; 576 is the hidden size of hub_peft's default base
        if hidden != 576:
            raise InvalidInputError("pyreft saves do not name their base model; pass --base HUB_ID.")
        base = DEFAULT_BASE
    config = ReftConfig(
        layers=layers,
        intervention=kind,
        rank=int(rank),
        positions=positions,
        components=components,
        share_weights=probe.share_weights,
        proj_bias=any("R_bias" in t for t in tensors.values()),
        base_model_name_or_path=base,
        hidden_size=int(hidden),
        prompt_template=prompt_template,
    )
    _write(Path(dst), src, config, _state(kind, tensors, config, int(hidden)), overwrite=overwrite)
    return Path(dst)


def _read_pyvene_config(src: Path) -> tuple[list, list, str]:
    """``(sorted_keys, intervention_dimensions, kind)`` of a pyreft save's pyvene ``config.json``."""
    config_path = src / "config.json"
    if not config_path.is_file():
        raise NotFoundError(f"{src} has no config.json; point at a directory written by pyreft's ReftModel.save.")
    try:
        pyvene = json.loads(config_path.read_text())
        keys, types, dims = pyvene["sorted_keys"], pyvene["intervention_types"], pyvene["intervention_dimensions"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise InvalidInputError(f"{config_path} is not a pyvene/pyreft config ({e}).") from None
    if not keys or not len(keys) == len(types) == len(dims):
        raise InvalidInputError(f"{config_path}: sorted_keys, intervention_types and intervention_dimensions differ.")
    kinds = {re.sub(r"^.*\.|'>$", "", str(t)) for t in types}
    if len(kinds) != 1 or next(iter(kinds)) not in _KINDS:
        raise InvalidInputError(
            f"Cannot import pyreft interventions {sorted(kinds)}: supported are {sorted(_KINDS)} (one type per save)."
        )
    return keys, dims, _KINDS[next(iter(kinds))]


def _sites(keys: list) -> dict[tuple[int, str], list[tuple[int, str]]]:
    """(layer, component) -> [(unit position, pyreft key)] of the save's intervention keys."""
    sites: dict[tuple[int, str], list[tuple[int, str]]] = {}
    for key in keys:
        m = _KEY.match(str(key))
        if not m or m.group(2) not in COMPONENTS:
            raise InvalidInputError(f"Unsupported pyreft intervention key {key!r} (need pos units on {COMPONENTS}).")
        sites.setdefault((int(m.group(1)), m.group(2)), []).append((int(m.group(4)), str(key)))
    return sites


def _state(
    kind: str, tensors: dict[str, dict[str, torch.Tensor]], config: ReftConfig, hidden_size: int
) -> dict[str, torch.Tensor]:
    """hub_peft's state dict of the interventions, each loaded (and checked) as an :class:`Intervention` of
    ``hidden_size`` (the weights' own, which ``config`` records)."""
    state: dict[str, torch.Tensor] = {}
    for key, params in tensors.items():
        module = Intervention(kind, hidden_size, config.rank, proj_bias=config.proj_bias)
        module.load({k: v.float() for k, v in params.items()}, name=key)  # checks shapes and R's orthonormality
        state.update({f"reft.{key}.{name}": t for name, t in module.export().items()})
    return state


def _write(dst: Path, src: Path, config: ReftConfig, state: dict[str, torch.Tensor], *, overwrite: bool) -> None:
    """The adapter folder, atomically: weights, config, card inputs and the card (validated here, see cards.py)."""
    from safetensors.torch import save_file

    from ..validate import card_facts

    config.hub_peft_version = __version__
    base, kind = config.base_model_name_or_path, config.intervention
    with atomic_dir(dst, overwrite=overwrite) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "peft_type": "REFT"})
        (tmp / CONFIG_NAME).write_text(config.to_json())
        CardInfo(
            description=f"A {kind} ReFT adapter for `{base}`, imported from a pyreft save (`{src.name}`).",
            base={"hub_id": base},
            params={"trainable": sum(t.numel() for t in state.values())},
        ).save(tmp)
        write_card(tmp, name=str(dst), **card_facts(tmp))
