"""Keep bitsandbytes 4-bit layers trainable on the CPU."""

from __future__ import annotations

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
