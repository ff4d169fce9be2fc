"""Solo adapters: the ones that cannot share a forward (DoRA, LoHa, prefix tuning...), attached by PEFT once.

PEFT attaches an adapter by replacing modules of the model it is given. The engine's base is shared by
every request, so a solo adapter is attached to a *shadow* of it instead: a copy of the module tree in which
every module is a new object (its own children, parameter and hook tables) but every parameter and buffer is
the base's own tensor. PEFT's replacements land in the shadow only; the shared base never changes, and the
only new memory is the adapter's own tensors (plus anything PEFT copies, such as ``modules_to_save``).

NOTE(security): the attach is the expensive, adapter-controlled part of serving a solo adapter (reading its
weights, DoRA's weight norms, module copies). It runs once, when the adapter is loaded or reloaded after an
eviction, on the caller's thread (the server's load pool or a request's submission thread), never on the
step loop; a step only picks the already built model by reference.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

# the per-module tables nn.Module.__init__ creates (children, tensors, hooks): each shadow module gets its own
_TABLES = tuple(name for name, value in nn.Module().__dict__.items() if isinstance(value, (dict, set)))


def shadow(root: nn.Module, swap: Mapping[int, nn.Module] = {}) -> nn.Module:
    """A copy of ``root``'s module tree sharing every parameter and buffer with it.

    Each module is copied shallowly with its own tables, so setting a child, a parameter or a hook on the
    copy leaves ``root`` as it was. A module that appears twice (a shared rotary embedding) is copied once.
    ``swap`` maps ``id(module)`` to the module to copy in its place (the engine's row-delta wrappers give
    way to the layers they wrap)."""
    copies: dict[int, nn.Module] = {}

    def copy(module: nn.Module) -> nn.Module:
        module = swap.get(id(module), module)
        if id(module) not in copies:
            clone = module.__class__.__new__(module.__class__)
            clone.__dict__.update(module.__dict__)
            for table in _TABLES:
                if table in module.__dict__:
                    clone.__dict__[table] = type(module.__dict__[table])(module.__dict__[table])
            copies[id(module)] = clone
            clone._modules = {name: None if child is None else copy(child) for name, child in module._modules.items()}
        return copies[id(module)]

    return copy(root)


def own_bytes(model: nn.Module, base: nn.Module) -> int:
    """Bytes of the tensors ``model`` holds that ``base`` does not (a solo adapter's share of memory)."""
    shared = {id(t) for t in (*base.parameters(), *base.buffers())}
    own = {id(t): t for t in (*model.parameters(), *model.buffers()) if id(t) not in shared}
    return sum(t.numel() * t.element_size() for t in own.values())


def attach(
    base: nn.Module,
    folder: Path,
    config: Any,
    *,
    swap: Mapping[int, nn.Module] = {},
    lock: AbstractContextManager[Any] | None = None,
) -> nn.Module:
    """``base`` with the adapter in ``folder`` attached the ordinary PEFT way, on a shadow of ``base``.

    ``config`` is the adapter's checked :class:`~peft.PeftConfig` (its ``target_modules`` resolved to explicit
    names, so PEFT runs no regex of the adapter's); the module tree is copied under ``lock`` (the engine's: no
    hook is added meanwhile)."""
    from peft import PeftModel

    with lock or nullcontext():
        copy = shadow(base, swap)
    with torch.inference_mode():  # as the engine's forwards run: DoRA's norms of 4-bit weights dequantize here
        return PeftModel.from_pretrained(copy, folder, config=config).eval()
