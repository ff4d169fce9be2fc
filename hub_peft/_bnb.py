"""A guard for training through bitsandbytes 4-bit layers on the CPU."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def trainable_4bit(model: nn.Module) -> Iterator[None]:
    """Make gradients through ``Linear4bit`` layers correct for the duration of the block.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a ``Linear4bit`` weight for its fast
    inference kernel (``gemv_4bit``) the first time the layer runs in eval mode on an input without
    grad, and uses that kernel from then on. The kernel has no backward, so autograd silently drops
    the gradient through it. Here the weights are unpacked and the layers flagged as training (they
    hold no dropout, so their output is unchanged) so that they do not repack mid-training.
    """
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    if not layers:
        yield
        return
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    flags = []
    for layer in layers:
        state = layer.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                layer.weight.data, state
            )
        flags.append(layer.training)
        layer.training = True
    try:
        yield
    finally:
        for layer, flag in zip(layers, flags, strict=True):
            layer.training = flag
