"""Keep bitsandbytes 4-bit layers trainable on the CPU."""

from __future__ import annotations

from typing import Any

from torch import nn

from .errors import InvalidInputError


def keep_4bit_trainable(model: nn.Module) -> nn.Module:
    """Stop bitsandbytes from switching ``Linear4bit`` layers to its packed CPU inference format.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a ``Linear4bit`` weight the first time the
    layer runs in eval mode on an input without grad, and then always uses ``gemv_4bit``, which
    computes in bfloat16, has no backward (autograd silently drops the gradient), and whose inverse
    conversion corrupts the weights. So a model that chatted once could no longer be trained. hub_peft
    calls this on every 4-bit base it loads and before training; the plain dequantize-and-matmul path
    it keeps is exact in float32 and differentiable.
    """
    for name, layer in model.named_modules():
        if type(layer).__name__ != "Linear4bit":
            continue
        if getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
            raise InvalidInputError(
                f"{name} already switched to bitsandbytes' packed CPU inference format, which cannot be trained "
                "through or converted back (bitsandbytes 0.50). Load the model with hub_peft.load_base_model, or "
                "call hub_peft._bnb.keep_4bit_trainable(model) right after loading it, before any inference."
            )
        layer.support_avx512bf16_for_cpu = False
    return model


def quantize_linear_subclasses(
    model: nn.Module, *, compute_dtype: Any, double_quant: bool = False, only_under: str = ""
) -> list[str]:
    """Quantize to NF4 the linear layers transformers' bitsandbytes loader leaves in full precision.

    That loader converts only modules whose type *is* ``nn.Linear`` (or ``Conv1D``), so subclasses such as
    Falcon's ``FalconLinear`` keep full-precision weights in a model that says it is 4-bit. Each such layer under
    ``only_under`` (a module path prefix: the decoder blocks, never the output head) becomes a ``Linear4bit``
    holding the same weight quantized as the loader would (NF4, blocksize 64, ``double_quant`` as configured).
    Returns the names of the layers it converted.
    """
    import bitsandbytes as bnb

    converted = []
    for name, module in list(model.named_modules()):
        if not name.startswith(only_under) or type(module) is nn.Linear or not isinstance(module, nn.Linear):
            continue
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            continue
        layer = bnb.nn.Linear4bit(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=double_quant,
            quant_type="nf4",
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            module.weight.data.float(), requires_grad=False, quant_type="nf4", compress_statistics=double_quant
        )._quantize("cpu")
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.data.to(compute_dtype), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
        converted.append(name)
    return converted


def four_bit_layers(model: nn.Module, only_under: str = "") -> tuple[int, int]:
    """``(4-bit, all)`` counts of the linear layers (``nn.Linear`` and subclasses, ``Conv1D``) under a prefix."""
    from transformers.pytorch_utils import Conv1D

    linears = [m for n, m in model.named_modules() if n.startswith(only_under) and isinstance(m, (nn.Linear, Conv1D))]
    return sum(type(m).__name__ == "Linear4bit" for m in linears), len(linears)
