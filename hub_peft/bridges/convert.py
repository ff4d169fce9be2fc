"""Convert an adapter that changes weights (DoRA, LoHa, LoKr, IA3, OFT, VeRA...) into a plain LoRA, by SVD.

The algorithm is PEFT's ``convert_to_lora`` (per linear layer: the SVD of the update, ``B = U·S`` and ``A = Vᵀ`` at
the chosen rank, ``r = lora_alpha``), run on the *true* update of each layer: what PEFT's own ``merge`` adds to the
weight (``W_merged − W``). The result is then a LoRA that vLLM and llama.cpp load (``validate --for``, ``export``).

NOTE(bridges): PEFT's ``convert_to_lora`` takes ``get_delta_weight``, which for DoRA is ``s·BA`` without the
magnitude rescaling, so a converted DoRA drops what made it DoRA; and IA3 has no ``get_delta_weight`` at all. The
merge-based update covers both exactly (it reads the base's full-precision weights, which DoRA's and IA3's updates
depend on); for the types where PEFT is right the two agree (``tests/test_bridges.py``). Each layer's relative error
``‖B·A − ΔW‖_F / ‖ΔW‖_F`` is measured and recorded on the card.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import IncompatibleAdapterError, InvalidInputError

NO_WEIGHT_UPDATE = {  # types that do not change weights: nothing for a LoRA to hold
    "REFT": "ReFT edits hidden states at chosen positions, not weights",
    "PREFIX_TUNING": "prefix tuning adds virtual keys and values, not weight updates",
    "PROMPT_TUNING": "prompt tuning adds virtual tokens, not weight updates",
    "P_TUNING": "P-tuning adds virtual tokens, not weight updates",
    "ADAPTION_PROMPT": "LLaMA-Adapter adds gated prompts, not weight updates",
    "MULTITASK_PROMPT_TUNING": "multitask prompt tuning adds virtual tokens, not weight updates",
    "CPT": "CPT adds virtual tokens, not weight updates",
}
MAX_CONVERT_RANK = 1024


def convert_to_lora(
    source: str | Path, out_dir: str | Path, *, rank: int = 16, overwrite: bool = False
) -> tuple[Path, dict[str, Any]]:
    """Convert ``source`` (a folder or ``REPO[@REVISION][:SUBFOLDER]``) to a LoRA of ``rank`` in ``out_dir``
    (written atomically, with its card); returns the folder and the reconstruction error (``mean``, ``max``,
    ``worst_layer``, ``layers``). Loads the base the adapter names in full precision."""
    import torch
    from peft import LoraConfig, PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer
    from tqdm.auto import tqdm

    from ..adapters import check_adapter_folder, resolve_adapter
    from ..base_model import load_base_model
    from ..cards import CardInfo
    from .folders import write_adapter_folder
    from .merge import _parent_record

    if not isinstance(rank, int) or not 1 <= rank <= MAX_CONVERT_RANK:
        raise InvalidInputError(f"rank must be an integer in [1, {MAX_CONVERT_RANK}], got {rank!r}.")
    resolved = resolve_adapter(str(source))
    config = check_adapter_folder(resolved.folder)
    peft_type = str(config.get("peft_type"))
    if peft_type in NO_WEIGHT_UPDATE:
        raise IncompatibleAdapterError(
            f"{source} cannot become a LoRA: {NO_WEIGHT_UPDATE[peft_type]}. Serve it with `hub-peft serve`."
        )
    if peft_type == "LORA" and not config.get("use_dora"):
        raise IncompatibleAdapterError(f"{source} is a plain LoRA already: nothing to convert.")
    if config.get("modules_to_save") or config.get("trainable_token_indices"):
        raise IncompatibleAdapterError(
            f"{source} trains whole modules or token rows (modules_to_save / trainable_token_indices), which a "
            "LoRA of its linear layers cannot hold; merge it into the base instead (PEFT's merge_and_unload)."
        )
    base, _ = load_base_model(config["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base, str(resolved.folder))
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    tensors, errors, clipped = {}, {}, {}
    with torch.no_grad():
        for name, layer in tqdm(layers, desc="Converting to LoRA", disable=len(layers) < 8):
            weight = layer.get_base_layer().weight
            if not isinstance(layer.get_base_layer(), torch.nn.Linear) or weight.dim() != 2:
                raise IncompatibleAdapterError(
                    f"{name} is a {type(layer.get_base_layer()).__name__}: only linear layers convert to LoRA "
                    "(as in PEFT's convert_to_lora)."
                )
            before = weight.detach().float().clone()
            layer.merge(adapter_names=["default"])
            delta = weight.detach().float() - before
            layer.unmerge()
            U, S, V = torch.linalg.svd(delta, full_matrices=False)
            k = min(rank, S.shape[0])
            if k < rank:  # a layer narrower than the rank: its full rank, said per module as PEFT's patterns say
                clipped[name.removeprefix("base_model.model.")] = k
            B, A = U[:, :k] * S[:k], V[:k]
            norm = torch.linalg.norm(delta)
            errors[name.removeprefix("base_model.model.")] = (
                float(torch.linalg.norm(B @ A - delta) / norm) if norm else 0.0
            )
            module = name.removeprefix("base_model.model.")
            tensors[f"base_model.model.{module}.lora_A.weight"] = A.contiguous()
            tensors[f"base_model.model.{module}.lora_B.weight"] = B.contiguous()
    lora = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=sorted(errors),
        base_model_name_or_path=config["base_model_name_or_path"],
        revision=config.get("revision"),
        task_type=config.get("task_type"),
        inference_mode=True,
    ).to_dict()
    lora["target_modules"] = sorted(errors)
    lora["rank_pattern"], lora["alpha_pattern"] = dict(clipped), dict(clipped)
    worst = max(errors, key=lambda k: errors[k])
    error = {
        "mean": sum(errors.values()) / len(errors),
        "max": errors[worst],
        "worst_layer": worst,
        "layers": len(errors),
    }
    first = CardInfo.load(resolved.folder)
    lineage = {
        "operation": "convert",
        "source": _parent_record(resolved),
        "source_type": "DORA" if config.get("use_dora") else peft_type,
        "rank": rank,
        "error": error,
    }
    info = CardInfo(
        base=first.base,
        license=first.license,
        prompt_template=first.prompt_template,
        example_prompt=first.example_prompt,
        lineage=lineage,
    )
    folder = write_adapter_folder(out_dir, lora, tensors, info, overwrite=overwrite, base_config=base.config)
    return folder, error
