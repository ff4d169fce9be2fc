"""Limits on untrusted adapter files (see SECURITY.md), shared by the validator and the config classes."""

MAX_SANE_BYTES = 4 * 2**30  # adapter_model.safetensors, and what load_adapter takes by default (max_bytes)
# Limits on untrusted files (see SECURITY.md): safetensors itself allows a 100 MB header; 100k tensors of an
# adapter (~150 bytes of header each) fit in 16 MiB
MAX_HEADER_BYTES = 16 * 2**20
MAX_TENSORS = 100_000
MAX_CONFIG_BYTES = 16 * 2**20  # adapter_config.json (a big rank_pattern takes ~100 KB)
MAX_RANK = 65_536  # r, rank_pattern values, ReFT's rank: a LoRA rank over a model's width buys nothing
