"""A working example configuration for every PEFT method on a Llama-style causal LM.

The catalog serves three purposes: the parametrized round-trip tests, the README's table of what
applies, and the model cards' method names and citations. An entry with ``unsupported`` set says
why the method cannot apply here; a test checks that this is still true.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ATTN = ["q_proj", "v_proj"]

# Methods that cannot apply to a Llama causal LM with the installed peft at all, and why.
UNSUPPORTED: dict[str, str] = {
    "XLORA": "broken upstream in peft 0.21.2: X-LoRA's forward raises KeyError on its expert names "
    "inside disable_adapter_layers (tuners_utils.py), so it cannot train or run.",
}

# Methods that cannot sit on a bitsandbytes 4-bit (Linear4bit) base in the installed peft, and why.
# tests/test_peft_methods.py checks that each still fails there, so this table cannot silently rot.
NO_4BIT: dict[str, str] = {
    "LORA:pissa": "PiSSA initialisation needs float weights (PEFT: init in float, then re-quantize the residual).",
    "LOHA": "peft's LoHa layer has no Linear4bit variant (shape error on the packed weight).",
    "LOKR": "peft's LoKr layer has no Linear4bit variant (shape error on the packed weight).",
    "HRA": "peft's HRA layer has no Linear4bit variant (multiplies the packed uint8 weight).",
    "ADAMSS": "AdaMSS initialisation reads the base weight as a float tensor.",
    "FROD": "FRoD initialisation reads the base weight as a float tensor.",
    "GLORA": "GLoRA only wraps plain torch.nn.Linear layers.",
    "OSF": "OSF's SVD of the packed 4-bit weight yields an effective rank of 0.",
    "DELORA": "DeLoRA takes the norm of the packed uint8 weight.",
    "TINYLORA": "TinyLoRA initialisation reads the base weight as a float tensor.",
    "PSOFT": "PSOFT initialisation needs float32/float16/bfloat16 weights.",
    "PEANUT": "peft's PEANUT layer has no Linear4bit variant (shape error on the packed weight).",
    "SUPERTUNING": "peft's SuperTuning layer has no Linear4bit variant (shape error on the packed weight).",
    "DEFT": "peft's DEFT layer has no Linear4bit variant (shape error on the packed weight).",
}


@dataclass(frozen=True)
class MethodCase:
    """How to build one PEFT method for a model whose linear layers are ``hidden`` wide."""

    key: str  # unique test id: the PeftType value, plus ":variant"
    make: Callable[[Any], Any]  # model config -> PeftConfig
    needs_task_ids: bool = False
    needs_no_cache: bool = False
    # CPT's loss only flows through its delta embeddings on structured in-context examples; on the
    # tests' random tokens its gradient is exactly zero, so the test sets those weights at random.
    zero_grad_on_random_data: bool = False

    @property
    def peft_type(self) -> str:
        return self.key.split(":")[0]

    @property
    def no_4bit_reason(self) -> str | None:
        return NO_4BIT.get(self.key)


def _cfg(name: str, **kwargs):
    import peft

    return getattr(peft, name)(task_type="CAUSAL_LM", **kwargs)


def _xlora(model_config) -> Any:
    """X-LoRA mixes existing LoRA adapters, so two small ones are created on the fly."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tempfile.mkdtemp(prefix="xlora_experts_")
    adapters = {}
    for i in range(2):
        torch.manual_seed(100 + i)
        base = AutoModelForCausalLM.from_config(model_config)
        expert = get_peft_model(base, LoraConfig(r=4, target_modules=ATTN, init_lora_weights=False))
        expert.save_pretrained(f"{folder}/expert_{i}")
        adapters[f"expert_{i}"] = f"{folder}/expert_{i}"
    return _cfg(
        "XLoraConfig",
        hidden_size=model_config.hidden_size,
        adapters=adapters,
        xlora_depth=1,
        layerwise_scalings=False,
    )


def catalog() -> list[MethodCase]:
    """Every method in the installed peft, with a configuration that fits a small Llama."""
    c = []
    add = c.append
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ATTN}
    add(MethodCase("LORA", lambda m: _cfg("LoraConfig", **lora)))
    add(MethodCase("LORA:all-linear", lambda m: _cfg("LoraConfig", r=4, target_modules="all-linear")))
    add(MethodCase("LORA:rslora", lambda m: _cfg("LoraConfig", use_rslora=True, **lora)))
    add(MethodCase("LORA:dora", lambda m: _cfg("LoraConfig", use_dora=True, **lora)))
    add(MethodCase("LORA:pissa", lambda m: _cfg("LoraConfig", init_lora_weights="pissa", **lora)))
    add(MethodCase("LORA:olora", lambda m: _cfg("LoraConfig", init_lora_weights="olora", **lora)))
    add(
        MethodCase(
            "LORA:patterns",
            lambda m: _cfg("LoraConfig", rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 16}, **lora),
        )
    )
    add(
        MethodCase(
            "ADALORA",
            lambda m: _cfg(
                "AdaLoraConfig", init_r=6, target_r=4, total_step=20, tinit=2, tfinal=2, target_modules=ATTN
            ),
        )
    )
    add(
        MethodCase(
            "IA3",
            lambda m: _cfg(
                "IA3Config", target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
            ),
        )
    )
    add(MethodCase("LOHA", lambda m: _cfg("LoHaConfig", r=4, target_modules=ATTN)))
    add(MethodCase("LOKR", lambda m: _cfg("LoKrConfig", r=4, target_modules=ATTN)))
    add(MethodCase("OFT", lambda m: _cfg("OFTConfig", r=0, oft_block_size=8, target_modules=ATTN)))
    add(MethodCase("BOFT", lambda m: _cfg("BOFTConfig", boft_block_size=8, target_modules=ATTN)))
    add(MethodCase("VERA", lambda m: _cfg("VeraConfig", r=8, target_modules=ATTN)))
    add(MethodCase("FOURIERFT", lambda m: _cfg("FourierFTConfig", n_frequency=32, target_modules=ATTN)))
    add(MethodCase("HRA", lambda m: _cfg("HRAConfig", r=4, target_modules=ATTN)))
    add(
        MethodCase(
            "VBLORA",
            lambda m: _cfg("VBLoRAConfig", r=4, num_vectors=16, vector_length=8, target_modules=ATTN),
        )
    )
    add(MethodCase("LN_TUNING", lambda m: _cfg("LNTuningConfig", target_modules=["input_layernorm"])))
    add(MethodCase("MISS", lambda m: _cfg("MissConfig", r=8, target_modules=ATTN)))
    add(MethodCase("RANDLORA", lambda m: _cfg("RandLoraConfig", r=8, target_modules=ATTN)))
    add(MethodCase("C3A", lambda m: _cfg("C3AConfig", block_size=8, target_modules=ATTN)))
    add(MethodCase("SHIRA", lambda m: _cfg("ShiraConfig", r=4, target_modules=ATTN)))
    add(MethodCase("ROAD", lambda m: _cfg("RoadConfig", group_size=8, target_modules=ATTN)))
    add(
        MethodCase(
            "TRAINABLE_TOKENS",
            lambda m: _cfg("TrainableTokensConfig", token_indices=[1, 2, 3], target_modules=["embed_tokens"]),
        )
    )
    add(MethodCase("PROMPT_TUNING", lambda m: _cfg("PromptTuningConfig", num_virtual_tokens=4)))
    add(MethodCase("P_TUNING", lambda m: _cfg("PromptEncoderConfig", num_virtual_tokens=4, encoder_hidden_size=16)))
    add(MethodCase("PREFIX_TUNING", lambda m: _cfg("PrefixTuningConfig", num_virtual_tokens=4)))
    add(
        MethodCase(
            "ADAPTION_PROMPT",
            lambda m: _cfg("AdaptionPromptConfig", adapter_len=4, adapter_layers=1),
        )
    )
    add(
        MethodCase(
            "MULTITASK_PROMPT_TUNING",
            lambda m: _cfg("MultitaskPromptTuningConfig", num_virtual_tokens=4, num_tasks=2),
            needs_task_ids=True,
        )
    )
    add(
        MethodCase(
            "CPT",
            lambda m: _cfg(
                "CPTConfig", cpt_token_ids=[5, 6, 7, 8], cpt_mask=[1, 1, 1, 1], cpt_tokens_type_mask=[1, 2, 2, 2]
            ),
            zero_grad_on_random_data=True,
        )
    )
    add(
        MethodCase(
            "POLY",
            lambda m: _cfg("PolyConfig", r=4, n_tasks=2, n_skills=2, target_modules=ATTN),
            needs_task_ids=True,
        )
    )
    add(MethodCase("XLORA", _xlora, needs_no_cache=True))
    add(MethodCase("WAVEFT", lambda m: _cfg("WaveFTConfig", n_frequency=64, target_modules=ATTN)))
    add(MethodCase("CARTRIDGE", lambda m: _cfg("CartridgeConfig", num_virtual_tokens=4)))
    add(MethodCase("SHADOW", lambda m: _cfg("ShadowConfig", r=4)))
    return c


def _generic(peft_type: str) -> MethodCase:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    cls = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]
    fields = cls.__dataclass_fields__

    def make(model_config):
        kwargs: dict[str, Any] = {"task_type": "CAUSAL_LM"}
        if "target_modules" in fields:
            kwargs["target_modules"] = ATTN
        if "r" in fields:
            kwargs["r"] = 4
        return cls(**kwargs)

    return MethodCase(peft_type, make)


def all_cases() -> list[MethodCase]:
    """The catalog plus a generic configuration for any method added to peft since it was written."""
    import peft

    cases = catalog()
    known = {case.peft_type for case in cases}
    cases += [_generic(t.value) for t in peft.PeftType if t.value not in known]
    return cases
