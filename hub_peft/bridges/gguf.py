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
    base_weights: str | Path | None = None,
) -> Path:
    """Write ``source``'s LoRA (a folder or ``REPO[@REVISION][:SUBFOLDER]``) as a GGUF LoRA to ``out`` (default:
    ``adapter.gguf`` in the adapter's folder name, in the current folder), atomically. ``base_config``: the base's
    transformers config (default: read from ``base_model_name_or_path``). ``ollama_from``: also write an Ollama
    ``Modelfile`` beside it, ``FROM ollama_from`` + ``ADAPTER``. Raises :class:`IncompatibleAdapterError` listing
    every reason an adapter cannot go, each with its fix. A DoRA goes only where it is exactly a LoRA (every
    magnitude equal to its row's norm ``‖W + s·BA‖``), which takes the base's weights: ``base_weights``, a folder of
    the base's safetensors (default: the base's own folder when it is one on this machine)."""
    from ..adapters import check_adapter_folder, resolve_adapter
    from ..validate.llamacpp import llamacpp_layout, read_base_config

    if dtype not in GGUF_DTYPES:
        raise InvalidInputError(f"dtype must be one of {GGUF_DTYPES}, got {dtype!r}.")
    folder = resolve_adapter(str(source)).folder
    # NOTE(bridges): the export reads only the fields it uses, with numpy: no torch, transformers or PEFT import
    # (seconds of a command's time; see benchmarks/README.md#bridges)
    config = check_adapter_folder(folder, parse_with_peft=False)
    if base_config is None:
        base_config = read_base_config(config["base_model_name_or_path"])
    tensors = _load_float32(folder / "adapter_model.safetensors")
    layout = llamacpp_layout(config, list(tensors), base_config)
    problems = layout.problems
    if config.get("use_dora"):
        problems = _dora_as_lora(config, tensors, layout, base_weights)
    if problems:
        raise IncompatibleAdapterError(
            f"{source} cannot be exported for llama.cpp: "
            + "; ".join(f"{point} (fix: {fix})" for point, fix in problems)
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


def _load_float32(path: Path) -> dict[str, Any]:
    """An adapter's tensors as float32 numpy arrays (bfloat16 ones through torch, which numpy cannot read)."""
    import numpy as np

    from ..validate import read_safetensors_header

    if any(dtype == "BF16" for dtype, _ in read_safetensors_header(path).values()):
        from safetensors.torch import load_file as load_torch

        return {k: v.float().numpy() for k, v in load_torch(str(path)).items()}
    from safetensors.numpy import load_file

    return {k: v.astype(np.float32) for k, v in load_file(str(path)).items()}


DORA_EXACT = 1e-5  # the largest |m/‖W + s·BA‖ − 1| of a DoRA exported as the LoRA it then is


def _dora_as_lora(config: dict, tensors: dict, layout: Any, base_weights: str | Path | None) -> list:
    """The problems left of a DoRA's export: none when every magnitude equals its row's norm ``‖W + s·BA‖`` (then
    DoRA's rescaling is 1 and the adapter is its LoRA), else DoRA's problem with what was measured."""
    import numpy as np

    from ..validate.llamacpp import DORA_POINT

    others = [p for p in layout.problems if p[0] != DORA_POINT]
    folder = Path(base_weights) if base_weights is not None else _local_base_folder(config)
    fix = next(fix for point, fix in layout.problems if point == DORA_POINT)
    if any(t.embedding for t in layout.tensors):  # DoRA's norm runs along another axis there: not checked
        return [*others, (DORA_POINT, fix)]
    if folder is None or not any(folder.glob("*.safetensors")):
        return [*others, (DORA_POINT, f"pass the base's weights (--base-weights DIR) to check it, or {fix}")]
    scales = _scales(config, tensors, layout)
    weights = _base_tensors(folder, [f"{t.module}.weight" for t in layout.tensors])
    worst = 0.0
    for t in layout.tensors:
        stem = f"base_model.model.{t.module}"
        A, B, m = (tensors[f"{stem}.{k}"] for k in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"))
        W = weights[f"{t.module}.weight"]
        norm = np.linalg.norm(W + scales[t.module][0] * (B @ A), axis=1)
        worst = max(worst, float(np.abs(m / norm - 1).max()))
    if worst <= DORA_EXACT:
        return others
    return [*others, (f"{DORA_POINT}; here max |m/‖W + s·BA‖ − 1| = {worst:.2e}", fix)]


def _local_base_folder(config: dict) -> Path | None:
    from ..base_model import resolve_base

    try:
        path = Path(resolve_base(config.get("base_model_name_or_path"))[1])
    except Exception:  # a Hub id that is not reachable: no local weights
        return None
    return path if path.is_dir() else None


def _base_tensors(folder: Path, names: list[str]) -> dict[str, Any]:
    """The named weights of a base checkpoint (one or more safetensors files) as float32 numpy arrays."""
    from safetensors import safe_open

    from ..errors import NotFoundError

    found: dict[str, Any] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for name in set(names) & set(f.keys()):
                found[name] = f.get_tensor(name).float().numpy()
    missing = sorted(set(names) - set(found))
    if missing:
        raise NotFoundError(f"The base weights in {folder} lack {missing[:3]}: give the folder of the right base.")
    return found


def _scales(config: dict, tensors: dict, layout: Any) -> dict[str, tuple[float, int]]:
    """PEFT's ``(scale, rank)`` of each module: the rank is the tensor's (``rank_pattern`` decided it at save), the
    alpha ``alpha_pattern``'s (matched with a bound) or ``lora_alpha``."""
    from ..target_regex import pattern_lookup

    prefix = "base_model.model."
    alphas = config.get("alpha_pattern") or {}
    alpha_of = pattern_lookup(list(alphas), "alpha_pattern")
    out = {}
    for t in layout.tensors:
        key = f"{prefix}{t.module}.lora_embedding_A" if t.embedding else f"{prefix}{t.module}.lora_A.weight"
        r = int(tensors[key].shape[0])
        found = alpha_of(t.module)
        alpha = float(alphas[found] if found is not None else config.get("lora_alpha", config["r"]))
        out[t.module] = (alpha / r**0.5 if config.get("use_rslora") else alpha / r, r)
    return out


def _pairs(config: dict, tensors: dict, layout: Any) -> tuple[list[tuple[str, Any, Any]], float]:
    """``(gguf base tensor name, lora_a, lora_b)`` per module, as float32 numpy arrays, and the file's alpha."""
    import numpy as np

    prefix = "base_model.model."
    scales = _scales(config, tensors, layout)
    uniform = len(set(scales.values())) == 1  # one (scale, rank) for every module: one alpha fits the file
    pairs = []
    for t in layout.tensors:
        if t.embedding:
            A, B = tensors[f"{prefix}{t.module}.lora_embedding_A"], tensors[f"{prefix}{t.module}.lora_embedding_B"]
            A = A.T  # llama.cpp takes token rows of lora_a: [vocab, r] (convert_lora_to_gguf.py does this)
        else:
            A, B = tensors[f"{prefix}{t.module}.lora_A.weight"], tensors[f"{prefix}{t.module}.lora_B.weight"]
        B = B if uniform else B * scales[t.module][0]
        if t.permute is not None:
            B = permute_rows(B, *t.permute)
        pairs.append((t.gguf_name, np.ascontiguousarray(A), np.ascontiguousarray(B)))
    scale, rank = scales[layout.tensors[0].module]
    return pairs, scale * rank if uniform else 0.0


def permute_rows(weights: Any, n_head: int, n_head_kv: int) -> Any:
    """llama.cpp's ``LlamaModel.permute`` of q/k rows (from HF's rotate-half RoPE to its interleaved one)."""
    if n_head_kv != n_head:
        n_head = n_head_kv
    shape = weights.shape  # numpy arrays and torch tensors alike
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
            writer.add_tensor(f"{name}.lora_a", A.astype(np_dtype))
            writer.add_tensor(f"{name}.lora_b", B.astype(np_dtype))
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
