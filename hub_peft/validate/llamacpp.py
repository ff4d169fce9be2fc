"""llama.cpp's LoRA contract: which adapters its GGUF LoRA layout can carry exactly, and where each tensor goes.

llama.cpp applies ``scale · B·(A·x)`` to a base tensor ``blk.N.attn_q.weight`` from the pair ``….lora_a`` /
``….lora_b``, with ``scale = adapter.lora.alpha / rank`` (rank read from the tensor); it loads plain LoRA on the
tensors its converter maps, nothing else. :func:`llamacpp_layout` maps an adapter's tensors onto that layout and
lists what cannot go (each problem with its fix); ``hub_peft.bridges.gguf`` writes the file from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .report import Report
from .vllm import base_changing_init

# HF model_type -> (gguf architecture, whether llama.cpp's converter permutes q/k rows for its RoPE layout).
# NOTE(bridges): each row mirrors the class convert_hf_to_gguf.py registers for the architecture (LlamaModel:
# undo_permute = True; Qwen2Model, Qwen3Model, GemmaModel, Gemma2Model: no permutation). An architecture not here
# is refused, not guessed: a wrong permutation gives a file that loads and answers wrongly.
ARCHITECTURES = {
    "llama": ("LLAMA", True),
    "mistral": ("LLAMA", True),
    "qwen2": ("QWEN2", False),
    "qwen3": ("QWEN3", False),
    "gemma": ("GEMMA", False),
    "gemma2": ("GEMMA2", False),
}


DORA_POINT = (
    "DoRA rescales every output row of W + s·BA by m/‖W + s·BA‖, a full-rank change a LoRA file cannot hold "
    "(exact only where every m equals that norm; `hub-peft export` checks it given the base's weights)"
)


NEEDS_BASE = "the base model's config is needed to name llama.cpp's tensors"


@dataclass
class LoraTensor:
    """One adapted module in llama.cpp's terms."""

    module: str  # PEFT's module name (model.layers.0.self_attn.q_proj)
    gguf_name: str  # the base tensor llama.cpp adapts (blk.0.attn_q.weight)
    permute: tuple[int, int] | None = None  # (n_head, n_head_kv) when B's rows take llama.cpp's q/k permutation
    embedding: bool = False  # the input embeddings: PEFT's lora_embedding_A/B, A written transposed


@dataclass
class LlamaCppLayout:
    architecture: str | None = None  # gguf's name of it (llama, qwen2...)
    tensors: list[LoraTensor] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (what, fix)


def llamacpp_layout(config: dict, tensor_names: list[str], base_config: Any) -> LlamaCppLayout:
    """Where each LoRA pair of an adapter goes in llama.cpp, or why it cannot go there."""
    layout = LlamaCppLayout()
    problems = layout.problems
    peft_type = config.get("peft_type")
    convert = "convert it to LoRA first: `hub-peft convert ADAPTER --to lora` (its reconstruction error is printed)"
    if peft_type != "LORA":
        fix = "serve it with `hub-peft serve`" if peft_type == "REFT" else convert
        problems.append((f"peft_type is {peft_type}; llama.cpp loads only LoRA adapters", fix))
        return layout
    if config.get("use_dora"):
        problems.append((DORA_POINT, convert))
    for key, what in (("lora_bias", "LoRA biases"), ("use_qalora", "QALoRA"), ("use_bdlora", "block-diagonal LoRA")):
        if config.get(key):
            problems.append((f"llama.cpp has no {what} ({key})", "retrain as a plain LoRA, or serve with hub-peft"))
    if init := base_changing_init(config):
        problems.append((f"init_lora_weights={init!r} changes the base weights, which llama.cpp keeps", convert))
    if config.get("modules_to_save") or config.get("trainable_token_indices"):
        problems.append(
            (
                "the adapter trains whole modules or token rows (modules_to_save / trainable_token_indices), "
                "which a GGUF LoRA cannot carry",
                "merge it into the base (PEFT's merge_and_unload) and convert the merged model with "
                "llama.cpp's convert_hf_to_gguf.py",
            )
        )
    if base_config is None:
        problems.append((NEEDS_BASE, "pass --base"))
        return layout
    model_type = getattr(base_config, "model_type", None)
    if model_type not in ARCHITECTURES:
        problems.append(
            (
                f"hub_peft's GGUF export does not know llama.cpp's tensor layout for {model_type!r}",
                f"use llama.cpp's convert_lora_to_gguf.py; hub_peft exports {', '.join(sorted(ARCHITECTURES))}",
            )
        )
        return layout
    import gguf

    arch_name, permute = ARCHITECTURES[model_type]
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    layout.architecture = gguf.MODEL_ARCH_NAMES[arch]
    names = gguf.get_tensor_name_map(arch, int(base_config.num_hidden_layers))
    n_head = int(base_config.num_attention_heads)
    n_kv = int(getattr(base_config, "num_key_value_heads", None) or n_head)
    kept = [n for n in tensor_names if ".base_layer." not in n and "lora_magnitude_vector" not in n]  # (DoRA: above)
    odd = [n for n in kept if _module_of(n) is None]
    if odd:
        problems.append((f"tensors {odd[:3]} are not LoRA A/B weights", "keep only lora_A/lora_B weights"))
    for module in sorted({m for n in kept if (m := _module_of(n)) is not None}):
        gguf_name = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if gguf_name is None:
            problems.append((f"llama.cpp has no tensor for {module}", "target the attention/MLP projections only"))
            continue
        if gguf_name == "output.weight" and getattr(base_config, "tie_word_embeddings", False):
            problems.append(
                (
                    "LoRA on lm_head of a base with tied embeddings: llama.cpp's base file has no output tensor "
                    "to adapt (llama.cpp issue 9065)",
                    "retrain without lm_head in target_modules",
                )
            )
            continue
        rows = None
        if permute and module.endswith("q_proj"):
            rows = (n_head, n_head)
        elif permute and module.endswith("k_proj"):
            rows = (n_head, n_kv)
        layout.tensors.append(LoraTensor(module, gguf_name, rows, embedding=gguf_name == "token_embd.weight"))
    return layout


def read_base_config(name: str, *, local_only: bool = False) -> Any:
    """What llama.cpp's layout needs of a base's ``config.json`` (a Hub id, a folder, the embedded base), read as
    JSON: no transformers (which imports torch), so the verdict and the export read the same fields the same way.
    ``tie_word_embeddings``, when the file omits it, takes the default of the architecture's transformers config
    class (true for Gemma, false for the other architectures of :data:`ARCHITECTURES`). ``local_only``: from this
    machine only (a folder, the embedded base, the Hub cache), never the network. Raises NotFoundError when the
    file cannot be read."""
    import json
    from types import SimpleNamespace

    from ..base_model import EMBEDDED_BASE, embedded_installed, resolve_base
    from ..errors import InvalidInputError, NotFoundError

    try:
        if local_only and not (Path(name).is_dir() or (name == EMBEDDED_BASE and embedded_installed())):
            from huggingface_hub import hf_hub_download

            data = json.loads(Path(hf_hub_download(name, "config.json", local_files_only=True)).read_text())
        else:
            path = Path(resolve_base(name)[1])
            if path.is_dir():
                data = json.loads((path / "config.json").read_text())
            else:
                from huggingface_hub import hf_hub_download

                data = json.loads(Path(hf_hub_download(str(path), "config.json")).read_text())
    except (OSError, ValueError) as e:  # huggingface_hub's errors are OSErrors or ValueErrors too
        raise NotFoundError(f"Could not read the config.json of base model {name!r} ({e}); pass --base.") from e
    if not isinstance(data, dict):
        raise InvalidInputError(f"The config.json of base model {name!r} is not a JSON object.")
    data.setdefault("tie_word_embeddings", str(data.get("model_type", "")).startswith("gemma"))
    return SimpleNamespace(**data)


def _module_of(tensor_name: str) -> str | None:
    stem = tensor_name.removeprefix("base_model.model.")
    for suffix in (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B"):
        if stem.endswith(suffix):
            return stem.removesuffix(suffix)
    return None


def check_llamacpp(report: Report, base_config: Any) -> None:
    """Add llama.cpp's verdict to ``report`` (``hub-peft validate --for llama.cpp``)."""
    for point, fix in llamacpp_layout(report.config, list(report.tensors), base_config).problems:
        report.add(point, fix)
