"""``ReftModel``: ReFT interventions on a frozen transformers model, with plain PyTorch forward hooks.

The interventions edit hidden states at chosen prompt positions of chosen layers. Positions are
computed per row from the attention mask, so left/right padding and mixed prompt lengths in one
batch give each row the same result as running it alone. In ``generate`` only the prefill forward
is intervened (prompt positions); decoding then runs on the KV cache like any transformers model.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._atomic import write_text
from .._version import __version__
from ..errors import ConcurrentUseError, IncompatibleAdapterError, InvalidInputError, NotFoundError
from ..modeling import component_module, find_decoder, find_decoder_layers, innermost_model, text_config
from .config import ReftConfig
from .interventions import Intervention

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_TENSOR_PREFIX = "reft."


@dataclass
class _Call:
    """Where to intervene in the next forward of the base model: group -> [batch, n] sequence indices."""

    positions: dict[str, torch.Tensor]
    forwards_seen: int = 0


def prompt_positions(
    attention_mask: torch.Tensor, first: int, last: int, prompt_lengths: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Sequence indices of the first ``first`` and last ``last`` prompt tokens of every row.

    A row's prompt starts at its first unmasked token (so left padding is skipped) and is
    ``prompt_lengths[i]`` tokens long (all unmasked tokens when not given). Prompts shorter than
    ``n`` repeat their edge token, which edits it once.
    """
    mask = attention_mask.bool()
    start = mask.int().argmax(dim=1)
    length = mask.sum(dim=1) if prompt_lengths is None else prompt_lengths.to(start.device)
    length = length.clamp(min=1)
    out = {}
    if first:
        offset = torch.arange(first, device=start.device)
        out["f"] = start[:, None] + torch.minimum(offset[None, :], length[:, None] - 1)
    if last:
        offset = torch.arange(last, device=start.device) - last
        out["l"] = start[:, None] + (length[:, None] + offset[None, :]).clamp(min=0)
    return out


def edit_positions(
    hidden: torch.Tensor, positions: dict[str, torch.Tensor], group: str, module: Callable
) -> torch.Tensor:
    """``hidden`` [batch, seq, d] with ``module`` applied at the positions of ``group`` (all groups for shared
    weights); a new tensor, the input is left as is."""
    index = positions[group] if group in positions else torch.cat([positions[g] for g in sorted(positions)], dim=1)
    gather = index[..., None].expand(-1, -1, hidden.shape[-1])
    return hidden.scatter(1, gather, module(hidden.gather(1, gather)))


Edit = Callable[[int, str, torch.Tensor], torch.Tensor]  # (layer, component, hidden) -> edited hidden


def output_edit_hook(edit: Edit, layer: int, component: str) -> Callable:
    """A forward hook passing a module's hidden-state output (bare or first of a tuple) through ``edit``."""

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (edit(layer, component, output[0]), *output[1:])
        return edit(layer, component, output)

    return hook


def input_edit_hook(edit: Edit, layer: int) -> Callable:
    """A forward pre-hook (``with_kwargs=True``) passing a decoder layer's input through ``edit``."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if args:
            return (edit(layer, "block_input", args[0]), *args[1:]), kwargs
        kwargs["hidden_states"] = edit(layer, "block_input", kwargs["hidden_states"])
        return args, kwargs

    return hook


class ReftModel(nn.Module):
    """A frozen base model plus trainable ReFT interventions.

    ``base`` may be a transformers model (full precision or bitsandbytes 4-bit) or a ``PeftModel``
    (e.g. with a LoRA adapter): the interventions hook into its decoder layers either way.
    """

    def __init__(self, base: nn.Module, config: ReftConfig) -> None:
        super().__init__()
        self.base_model = base
        self.reft_config = config
        core = innermost_model(base)
        self._layers = find_decoder_layers(core)
        hidden = text_config(core.config).hidden_size
        if config.hidden_size not in (None, hidden):
            raise IncompatibleAdapterError(
                f"This ReFT adapter was made for hidden size {config.hidden_size} "
                f"({config.base_model_name_or_path}), but the base model has {hidden}."
            )
        if config.layers[-1] >= len(self._layers):
            raise IncompatibleAdapterError(
                f"This ReFT adapter intervenes on layer {config.layers[-1]}, but the base model has only "
                f"{len(self._layers)} layers (0..{len(self._layers) - 1}); "
                f"it was made for {config.base_model_name_or_path}."
            )
        config.hidden_size = hidden
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = _base_name(core)
        for p in base.parameters():
            p.requires_grad_(False)
        dtype = getattr(torch, config.dtype)
        self.interventions = nn.ModuleDict()
        self._by_site: dict[tuple[int, str], list[tuple[str, Intervention]]] = {}
        for layer, component, group in config.sites():
            module = Intervention(
                config.intervention,
                hidden,
                config.rank,
                activation=config.activation,
                dropout=config.dropout,
                proj_bias=config.proj_bias,
                dtype=dtype,
            )
            self.interventions[ReftConfig.key_name(layer, component, group).replace(".", "__")] = module
            self._by_site.setdefault((layer, component), []).append((group, module))
        self._call: _Call | None = None
        self._handles = [find_decoder(core).register_forward_pre_hook(self._count_forward)]
        for (layer, component), _ in self._by_site.items():
            target = component_module(self._layers[layer], component)
            if component == "block_input":
                hook = target.register_forward_pre_hook(input_edit_hook(self._edit, layer), with_kwargs=True)
            else:
                hook = target.register_forward_hook(output_edit_hook(self._edit, layer, component))
            self._handles.append(hook)

    # --- hooks ---------------------------------------------------------------------------------

    def _count_forward(self, module: nn.Module, args: Any) -> None:
        if self._call is not None:
            self._call.forwards_seen += 1

    def _edit(self, layer: int, component: str, hidden: torch.Tensor) -> torch.Tensor:
        call = self._call
        if call is None or call.forwards_seen != 1:  # only the first (prefill) forward of a call is intervened
            return hidden
        for group, module in self._by_site[(layer, component)]:
            hidden = edit_positions(hidden, call.positions, group, module)
        return hidden

    @contextlib.contextmanager
    def intervening(self, positions: dict[str, torch.Tensor]) -> Iterator[None]:
        """Intervene at ``positions`` (group -> [batch, n] indices) in the next forward of the base model."""
        if self._call is not None:
            raise ConcurrentUseError("ReftModel calls cannot be nested or run concurrently on one instance.")
        self._call = _Call(positions)
        try:
            yield
        finally:
            self._call = None

    def positions_for(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        prompt_lengths: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        if attention_mask is None:
            if input_ids is None:
                raise InvalidInputError("ReftModel needs input_ids or an attention_mask to find prompt positions.")
            attention_mask = torch.ones(input_ids.shape[:2], dtype=torch.long, device=input_ids.device)
        first, last = self.reft_config.first_last
        return prompt_positions(attention_mask, first, last, prompt_lengths)

    # --- the transformers-like API ---------------------------------------------------------------

    def forward(self, input_ids=None, attention_mask=None, *, prompt_lengths=None, **kwargs):
        """Like the base model's forward. ``prompt_lengths`` ([batch]) marks where each row's prompt
        ends when the sequence also holds a response (training); without it the whole unpadded input is
        the prompt. A forward that continues from a non-empty KV cache is not intervened."""
        past = kwargs.get("past_key_values")
        if past is not None and past.get_seq_length() > 0:
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        with self.intervening(self.positions_for(input_ids, attention_mask, prompt_lengths)):
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        """``base.generate`` with the interventions applied to the prompt during prefill."""
        if input_ids is None:
            raise InvalidInputError("ReftModel.generate needs input_ids (a batch of tokenized prompts).")
        with self.intervening(self.positions_for(input_ids, attention_mask)):
            return self.base_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    @property
    def config(self):
        return innermost_model(self.base_model).config

    @property
    def device(self) -> torch.device:
        return next(self.interventions.parameters()).device

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.interventions.parameters())  # the adapter's own parameters
        return trainable, trainable + _count_base_params(self.base_model)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    def remove_hooks(self) -> nn.Module:
        """Detach the interventions and return the untouched base model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return self.base_model

    # --- files -----------------------------------------------------------------------------------

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for layer, component, group in self.reft_config.sites():
            key = ReftConfig.key_name(layer, component, group)
            for name, tensor in self.interventions[key.replace(".", "__")].export().items():
                out[f"{_TENSOR_PREFIX}{key}.{name}"] = tensor
        return out

    def load_adapter_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in tensors.items():
            if not name.startswith(_TENSOR_PREFIX) or name.count(".") != 4:
                raise InvalidInputError(f"Unexpected tensor {name!r} in a ReFT adapter.")
            key, param = name[len(_TENSOR_PREFIX) :].rsplit(".", 1)
            grouped.setdefault(key, {})[param] = tensor
        expected = {ReftConfig.key_name(*k) for k in self.reft_config.sites()}
        if set(grouped) != expected:
            raise InvalidInputError(
                f"The weights hold interventions {sorted(grouped)}, the config names {sorted(expected)}."
            )
        for key, params in grouped.items():
            self.interventions[key.replace(".", "__")].load(params, name=key)

    def save_pretrained(self, folder: str | Path, **_: Any) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (the plain adapter files)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.reft_config.hub_peft_version = __version__
        tmp = folder / (WEIGHTS_NAME + ".tmp")
        save_file(self.adapter_state_dict(), str(tmp), metadata={"format": "pt", "peft_type": "REFT"})
        tmp.replace(folder / WEIGHTS_NAME)
        write_text(folder / CONFIG_NAME, self.reft_config.to_json())

    @classmethod
    def from_pretrained(cls, base: nn.Module, folder: str | Path, *, is_trainable: bool = False) -> ReftModel:
        """Load a ReFT adapter folder onto ``base`` (use :func:`hub_peft.load_adapter` for Hub repos)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
            raise NotFoundError(f"{folder} needs {CONFIG_NAME} and {WEIGHTS_NAME} to load a ReFT adapter.")
        config = ReftConfig.from_dict(json.loads((folder / CONFIG_NAME).read_text()))
        model = cls(base, config)
        model.load_adapter_state_dict(load_file(str(folder / WEIGHTS_NAME)))
        if is_trainable:
            model.interventions.requires_grad_(True).train()
        else:
            for module in model.interventions.values():
                module.freeze()
        return model


def _base_name(core: nn.Module) -> str | None:
    source = getattr(core, "hub_peft_source", None)
    return getattr(source, "hub_id", None) or getattr(core.config, "_name_or_path", None) or None


def _count_base_params(model: nn.Module) -> int:
    total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":  # bitsandbytes packs two 4-bit values per byte
            n *= 2
        total += n
    return total
