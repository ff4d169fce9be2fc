"""Where things are in a causal LM of transformers: the model under wrappers, its text config, the decoder
blocks and their components, found by shape rather than by a per-architecture table."""

from __future__ import annotations

from typing import Any

from torch import nn

from .errors import IncompatibleAdapterError

# NOTE: greedy ``generate`` keywords: a model's generation_config may set sampling fields, which transformers
# warns about (and ignores) when do_sample is False; clearing them keeps greedy runs quiet and exact.
GREEDY_GENERATE: dict[str, Any] = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


def innermost_model(model: nn.Module) -> nn.Module:
    """The transformers ``PreTrainedModel`` under PEFT / ReFT wrappers."""
    while True:
        if hasattr(model, "get_base_model") and model.get_base_model() is not model:
            model = model.get_base_model()
        else:
            return model


def text_config(config: Any) -> Any:
    """A model config's text part (the config itself unless it is a multimodal one)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ``ModuleList`` of decoder blocks, found by shape rather than by a per-architecture table:
    the ``ModuleList`` with ``config.num_hidden_layers`` entries (``model.layers``, ``transformer.h``, ...)."""
    return _decoder_and_layers(model)[1]


def find_decoder(model: nn.Module) -> nn.Module:
    """The module that runs the decoder blocks and returns the final hidden states (``model.model``, ...)."""
    return _decoder_and_layers(model)[0]


def _decoder_and_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    core = innermost_model(model)
    config = text_config(getattr(core, "config", None))
    n_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    candidates = [(name, m) for name, m in core.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if n_layers:
        candidates = [(name, m) for name, m in candidates if len(m) == n_layers]
    candidates = [(name, m) for name, m in candidates if len({type(x) for x in m}) == 1]
    if not candidates:
        raise IncompatibleAdapterError(
            f"Cannot find the decoder layers of {type(core).__name__}: ReFT needs a decoder-only transformers model "
            "with a ModuleList of config.num_hidden_layers blocks."
        )
    name, layers = min(candidates, key=lambda item: item[0].count("."))  # the outermost such list
    return core.get_submodule(name.rpartition(".")[0]), layers


def _child(layer: nn.Module, words: tuple[str, ...], what: str) -> nn.Module:
    for name, child in layer.named_children():
        if "norm" in type(child).__name__.lower():  # Falcon's ln_attn, GPT-2's ln_1: a norm is never the component
            continue
        label = (name + type(child).__name__).lower()
        if any(w in label for w in words):
            return child
    raise IncompatibleAdapterError(f"{type(layer).__name__} has no {what} sub-module (looked for {words}).")


def component_module(layer: nn.Module, component: str) -> nn.Module:
    if component == "attention_output":
        return _child(layer, ("attn", "attention"), "attention")
    if component == "mlp_output":
        return _child(layer, ("mlp", "feed_forward", "ffn"), "MLP")
    return layer
