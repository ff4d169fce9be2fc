"""Bridges to other tools: merge adapters, convert them to LoRA, export LoRA to GGUF for llama.cpp and Ollama.

By subject: merge.py (PEFT's add_weighted_adapter and task arithmetic), convert.py (PEFT's conversion to LoRA),
gguf.py (llama.cpp's LoRA layout, written with the ``gguf`` package), folders.py (writing the results). Importing
the package loads neither torch nor gguf (the CLI's parser reads the method names).
"""

from __future__ import annotations

from .convert import convert_to_lora
from .gguf import export_gguf, read_gguf_lora
from .merge import IA3_METHODS, LORA_METHODS, MergeSpec, merge_adapters, merge_weights

__all__ = [
    "IA3_METHODS",
    "LORA_METHODS",
    "MergeSpec",
    "convert_to_lora",
    "export_gguf",
    "merge_adapters",
    "merge_weights",
    "read_gguf_lora",
]
