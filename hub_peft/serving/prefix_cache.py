"""Prefix caching: keys and values of prompt blocks already computed, reused by later prompts on the same adapters.

A chat template puts the same system prompt (and often the same few-shot turns) before every request; computing
it again for each request is most of a short request's prefill. The engine keeps the keys and values of every
finished prompt's whole blocks of :data:`BLOCK` tokens here, each block named by a chain hash of the adapters'
content keys (the resolved Hub commit or the files' digest, with the mix weights) and every token up to the
block's end, as vLLM's automatic prefix caching names its blocks. A new sequence copies the longest run of its
prompt's blocks found here into its slot and computes only the rest: at least its last token, whose logits start
the reply. The hash is BLAKE2b (a stranger cannot craft a prompt whose blocks collide with another's). Blocks
are dropped least recently used first beyond ``max_bytes``.

NOTE(reft): a ReFT adapter edits prompt positions counted from the prompt's end ("l1"), so the keys of a prefix
depend on the whole prompt; sequences with a ReFT adapter neither store nor reuse blocks.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

BLOCK = 16  # tokens per cached block


@dataclass
class Block:
    keys: torch.Tensor  # [layers, kv_heads, BLOCK, head_dim]
    values: torch.Tensor


class PrefixCache:
    """Blocks of prompt keys/values by chain hash, at most ``max_bytes`` of them (least recently used go first)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.blocks: OrderedDict[bytes, Block] = OrderedDict()
        self.nbytes = 0
        self.hits = 0  # prompt tokens served from here, all sequences together

    @staticmethod
    def names(adapters: Sequence[tuple[str, float]], tokens: Sequence[int], count: int) -> list[bytes]:
        """The chain hashes of the first ``count`` whole blocks of ``tokens`` under ``adapters`` (content keys and
        weights): a block's name covers every token before it."""
        parent = hashlib.blake2b(repr(sorted(adapters)).encode(), digest_size=16).digest()
        names = []
        for b in range(count):
            block = tokens[b * BLOCK : (b + 1) * BLOCK]
            parent = hashlib.blake2b(parent + b"".join(t.to_bytes(4, "little") for t in block), digest_size=16).digest()
            names.append(parent)
        return names

    def match(self, adapters: Sequence[tuple[str, float]], tokens: Sequence[int]) -> list[Block]:
        """The longest run of ``tokens``' first blocks held here, leaving at least the last token to compute."""
        found = []
        for name in self.names(adapters, tokens, (len(tokens) - 1) // BLOCK):
            block = self.blocks.get(name)
            if block is None:
                break
            self.blocks.move_to_end(name)
            found.append(block)
        self.hits += len(found) * BLOCK
        return found

    def store(
        self,
        adapters: Sequence[tuple[str, float]],
        tokens: Sequence[int],
        keys: Sequence[torch.Tensor],
        values: Sequence[torch.Tensor],
        slot: int,
    ) -> None:
        """Keep the whole blocks of ``tokens`` whose keys/values sit in ``slot`` of the per-layer ``keys``/``values``
        (``[slots, kv_heads, positions, head_dim]``), those not held already."""
        for b, name in enumerate(self.names(adapters, tokens, len(tokens) // BLOCK)):
            if name in self.blocks:
                self.blocks.move_to_end(name)
                continue
            span = slice(b * BLOCK, (b + 1) * BLOCK)
            block = Block(
                torch.stack([k[slot, :, span] for k in keys]), torch.stack([v[slot, :, span] for v in values])
            )
            size = 2 * block.keys.numel() * block.keys.element_size()
            if size > self.max_bytes:
                return
            self.blocks[name] = block
            self.nbytes += size
            while self.nbytes > self.max_bytes:
                _, dropped = self.blocks.popitem(last=False)
                self.nbytes -= 2 * dropped.keys.numel() * dropped.keys.element_size()

    def clear(self) -> None:
        self.blocks.clear()
        self.nbytes = 0
