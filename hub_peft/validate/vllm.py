"""vLLM's LoRA contract, checked on an adapter's config and tensor names."""

from __future__ import annotations

import re

from .report import Report

VLLM_MAX_RANK = 512

# vLLM 0.32: the linear layers of its decoder models (packed and unpacked names) and their embedding_modules
VLLM_TARGETS = {
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "qkv_proj",
    "gate_up_proj",
    "embed_tokens",
    "lm_head",
}

VLLM_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")  # inits that leave the base as it is

VLLM_TENSOR = re.compile(r"^(?:base_model\.model\.)?(.+?)\.(?:(?:lora_A|lora_B)\.weight|lora_embedding_[AB])$")


def base_changing_init(config: dict) -> str | None:
    """A LoRA config's ``init_lora_weights`` when it is one that changes the base's weights as PEFT loads the
    adapter (PiSSA, OLoRA, CorDA, LoftQ...), so that its B·A alone is not its update; None otherwise."""
    init = config.get("init_lora_weights", True)
    return init if isinstance(init, str) and init.lower() not in VLLM_INITS else None


def lora_ranks(config: dict) -> list:
    """A LoRA config's ranks: ``r`` and every ``rank_pattern`` override."""
    patterns = config.get("rank_pattern")
    return [config.get("r", 0), *(patterns.values() if isinstance(patterns, dict) else [])]


def check_vllm(report: Report) -> None:
    """vLLM's LoRA contract, rule for rule as vLLM 0.32 decides it: ``PEFTHelper.validate_legal`` (config
    features) and ``LoRAModel.from_local_checkpoint`` (every tensor name must parse as a LoRA weight of a
    module vLLM can wrap). Decided by the tensors present, not by ``target_modules`` (vLLM's "source of
    truth"). ``tests/test_vllm.py`` checks these verdicts against vLLM itself."""
    c = report.config
    if c.get("peft_type") != "LORA":
        report.add(
            f"peft_type is {c.get('peft_type')}; vLLM serves only LoRA adapters",
            "serve it with `hub-peft serve`, which runs every adapter type",
        )
        return
    retrain = "serve it with `hub-peft serve`, or retrain it as a plain LoRA"
    unsupported_features = {
        "use_dora": "DoRA (use_dora)",
        "lora_bias": "LoRA bias (lora_bias)",
        "use_qalora": "QALoRA (use_qalora)",
        "alora_invocation_tokens": "Activated LoRA (alora_invocation_tokens)",
        "layer_replication": "layer_replication",
        "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    }
    for key, what in unsupported_features.items():
        if c.get(key):
            report.add(f"vLLM does not support {what}", retrain)
    if init := base_changing_init(c):
        report.add(
            f"init_lora_weights is {init!r}: PEFT changes the base weights when it loads this adapter, vLLM does not",
            "convert it to a plain LoRA with PEFT's "
            "path_initial_model_for_weight_conversion, or serve it with `hub-peft serve`",
        )
    extra = [m for m in c.get("modules_to_save") or [] if m not in ("classifier", "score")]
    if extra:
        report.add(f"modules_to_save is {extra}; vLLM takes only classifier/score heads there", retrain)
    if c.get("bias", "none") != "none":
        report.add(f"bias is {c.get('bias')!r}; vLLM needs 'none'", "retrain with bias='none'")
    ranks = lora_ranks(c)
    if any(not isinstance(r, int) or r <= 0 for r in ranks):
        report.add(f"ranks {ranks} include one that is not a positive integer", "fix r / rank_pattern")
    elif max(ranks) > VLLM_MAX_RANK:
        report.add(f"rank {max(ranks)} exceeds vLLM's maximum {VLLM_MAX_RANK}", f"retrain with r <= {VLLM_MAX_RANK}")
    if c.get("trainable_token_indices") or any("trainable_tokens" in t for t in report.tensors):
        report.add(
            "the adapter trains token embeddings (trainable_token_indices), which vLLM cannot load",
            "serve it with `hub-peft serve`",
        )
    modules, odd = set(), []
    for name in report.tensors:
        if "base_layer" in name or "trainable_tokens" in name:  # saved base embeddings: vLLM skips them
            continue  # (trainable tokens are reported above)
        m = VLLM_TENSOR.match(name)
        if m:
            modules.add(m.group(1).rsplit(".", 1)[-1])
        else:
            odd.append(name)
    if odd:
        report.add(f"tensors {odd[:3]} are not LoRA weights vLLM can parse", "keep only lora_A/lora_B weights")
    unsupported = sorted(modules - VLLM_TARGETS)
    if unsupported:
        report.add(f"LoRA on {unsupported}: not modules vLLM's LoRA wraps", f"target only {sorted(VLLM_TARGETS)}")
    if (report.folder / "added_tokens.json").is_file():
        report.warnings.append("vLLM ignores added_tokens.json: serve it with a base tokenizer that has those tokens")
