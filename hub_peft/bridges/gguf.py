"""Export a LoRA adapter as a GGUF LoRA file for llama.cpp (``llama-server --lora``) and Ollama (``ADAPTER``).

The file is what llama.cpp's ``convert_lora_to_gguf.py`` writes, with the ``gguf`` package: ``general.type =
adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``, and per adapted base tensor a ``.lora_a`` / ``.lora_b``
pair (q/k rows permuted as llama.cpp's base converter permutes them). Which adapters fit, and where each tensor
goes, is decided in ``hub_peft.validate.llamacpp``.

NOTE(bridges): llama.cpp scales every pair by ``alpha / rank`` with one ``alpha`` per file. A plain LoRA with one
rank keeps its factors as they are and writes ``alpha = s·r`` (``s`` PEFT's scale: ``α/r``, or ``α/√r`` for rsLoRA,
so ``α·√r``). With per-module ranks or alphas no single alpha fits: each ``B`` then carries its own ``s`` and the
file says ``alpha = 0``, which llama.cpp reads as scale 1.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from ..errors import IncompatibleAdapterError, InvalidInputError

GGUF_DTYPES = ("f32", "f16")


def export_gguf(
    source: str | Path,
    out: str | Path | None = None,
    *,
    base_config: Any = None,
    dtype: str = "f32",
    ollama_from: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``source``'s LoRA (a folder or ``REPO[@REVISION][:SUBFOLDER]``) as a GGUF LoRA to ``out`` (default:
    ``adapter.gguf`` in the adapter's folder name, in the current folder), atomically. ``base_config``: the base's
    transformers config (default: read from ``base_model_name_or_path``). ``ollama_from``: also write an Ollama
    ``Modelfile`` beside it, ``FROM ollama_from`` + ``ADAPTER``. Raises :class:`IncompatibleAdapterError` listing
    every reason an adapter cannot go, each with its fix."""
    from safetensors.torch import load_file

    from ..adapters import check_adapter_folder, resolve_adapter
    from ..validate.llamacpp import llamacpp_layout

    if dtype not in GGUF_DTYPES:
        raise InvalidInputError(f"dtype must be one of {GGUF_DTYPES}, got {dtype!r}.")
    folder = resolve_adapter(str(source)).folder
    config = check_adapter_folder(folder)
    if base_config is None:
        from ..base_model import load_base_config

        base_config = load_base_config(config["base_model_name_or_path"])
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    layout = llamacpp_layout(config, list(tensors), base_config)
    if layout.problems:
        raise IncompatibleAdapterError(
            f"{source} cannot be exported for llama.cpp: "
            + "; ".join(f"{point} (fix: {fix})" for point, fix in layout.problems)
        )
    pairs, alpha = _pairs(config, tensors, layout)
    out = Path(out) if out is not None else Path(f"{Path(str(source)).name.replace(':', '_')}.gguf")
    if out.exists() and not overwrite:
        raise InvalidInputError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it.")
    _write(out, layout.architecture or "", alpha, pairs, config, dtype)
    if ollama_from is not None:
        modelfile = out.parent / "Modelfile"
        from .._atomic import write_text

        write_text(
            modelfile,
            f"# Ollama: `ollama create NAME -f {modelfile.name}` (FROM must be the base this adapter was trained on)\n"
            f"FROM {ollama_from}\nADAPTER ./{out.name}\n",
        )
    return out


def _pairs(config: dict, tensors: dict, layout: Any) -> tuple[list[tuple[str, Any, Any]], float]:
    """``(gguf base tensor name, lora_a, lora_b)`` per module, as float32 torch tensors, and the file's alpha."""
    prefix = "base_model.model."
    scales, ranks = {}, {}
    for t in layout.tensors:
        r, alpha = _rank_alpha(config, t.module)
        scales[t.module] = alpha / r**0.5 if config.get("use_rslora") else alpha / r
        ranks[t.module] = r
    uniform = len(set(scales.values())) == 1 and len(set(ranks.values())) == 1
    pairs = []
    for t in layout.tensors:
        if t.embedding:
            A, B = tensors[f"{prefix}{t.module}.lora_embedding_A"], tensors[f"{prefix}{t.module}.lora_embedding_B"]
            A = A.float().T  # llama.cpp takes token rows of lora_a: [vocab, r] (convert_lora_to_gguf.py does this)
        else:
            A, B = tensors[f"{prefix}{t.module}.lora_A.weight"], tensors[f"{prefix}{t.module}.lora_B.weight"]
        B = B.float() if uniform else B.float() * scales[t.module]
        if t.permute is not None:
            B = permute_rows(B, *t.permute)
        pairs.append((t.gguf_name, A.float().contiguous(), B.contiguous()))
    first = layout.tensors[0].module
    alpha = scales[first] * ranks[first] if uniform else 0.0
    return pairs, float(alpha)


def _rank_alpha(config: dict, module: str) -> tuple[int, float]:
    """PEFT's rank and alpha of one module: ``r``/``lora_alpha`` unless ``rank_pattern``/``alpha_pattern`` name it."""
    from peft.utils.other import get_pattern_key

    r, alpha = config["r"], config.get("lora_alpha", config["r"])
    for field, default in (("rank_pattern", r), ("alpha_pattern", alpha)):
        pattern = config.get(field) or {}
        if pattern:
            key = get_pattern_key(list(pattern), module)
            value = pattern.get(key, default)
            r, alpha = (value, alpha) if field == "rank_pattern" else (r, value)
    return int(r), float(alpha)


def permute_rows(weights: Any, n_head: int, n_head_kv: int) -> Any:
    """llama.cpp's ``LlamaModel.permute`` of q/k rows (from HF's rotate-half RoPE to its interleaved one)."""
    if n_head_kv != n_head:
        n_head = n_head_kv
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _write(out: Path, architecture: str, alpha: float, pairs: list, config: dict, dtype: str) -> None:
    import gguf
    import numpy as np

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, architecture)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        if config.get("alora_invocation_tokens"):
            writer.add_array(
                gguf.Keys.Adapter.ALORA_INVOCATION_TOKENS, [int(t) for t in config["alora_invocation_tokens"]]
            )
        writer.add_string("general.base_model.0.repo_url", str(config.get("base_model_name_or_path", "")))
        np_dtype = np.float16 if dtype == "f16" else np.float32
        for name, A, B in pairs:
            writer.add_tensor(f"{name}.lora_a", A.numpy().astype(np_dtype))
            writer.add_tensor(f"{name}.lora_b", B.numpy().astype(np_dtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_gguf_lora(path: str | Path) -> dict[str, Any]:
    """A GGUF LoRA file read back: ``{"metadata": {key: value}, "tensors": {name: numpy array}}`` (the arrays
    in PEFT's orientation: ``lora_a`` [r, in], ``lora_b`` [out, r]; the embeddings' ``lora_a`` [vocab, r])."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    metadata = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        metadata[key] = f.contents()
    tensors = {t.name: t.data.reshape([int(d) for d in reversed(t.shape)]) for t in reader.tensors}
    return {"metadata": metadata, "tensors": tensors}


__all__ = ["GGUF_DTYPES", "export_gguf", "permute_rows", "read_gguf_lora"]
