"""A working example configuration for every PEFT method on a Llama-style causal LM.

Every ``peft.PeftType`` needs a hand-written entry here (a test fails on a new one without it). The
catalog serves the parametrized round-trip tests and the README's tables of what applies;
``UNSUPPORTED`` and ``NO_4BIT`` say why a method cannot apply here, with the exact failure that a
test checks still happens.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ATTN = ["q_proj", "v_proj"]


@dataclass(frozen=True)
class KnownFailure:
    """Why a method cannot apply here, and the exact failure that shows it (checked by the tests, so a row
    cannot rot: when upstream fixes it, or fails differently, the test says so)."""

    reason: str  # the README's wording
    error: str  # the exception's class name
    match: str  # a regex its message must match


_FLOAT_PARAM = "Only Tensors of floating point and complex dtype can require gradients"

# Methods that cannot apply to a Llama causal LM with the installed peft at all, and why.
UNSUPPORTED: dict[str, KnownFailure] = {
    "XLORA": KnownFailure(
        "broken upstream in peft 0.21.2: X-LoRA's forward raises KeyError on its expert names inside "
        "disable_adapter_layers (tuners_utils.py), so it cannot train or run.",
        "KeyError",
        r"^'expert_0'$",
    ),
}

# Methods that cannot sit on a bitsandbytes 4-bit (Linear4bit) base in the installed peft, and why.
NO_4BIT: dict[str, KnownFailure] = {
    "LORA:pissa": KnownFailure(
        "PiSSA initialisation needs float weights (PEFT: init in float, then re-quantize the residual).",
        "TypeError",
        r"Please initialize PiSSA under float32, float16, or bfloat16",
    ),
    "LOHA": KnownFailure(
        "peft's LoHa layer has no Linear4bit variant (shape error on the packed weight).",
        "RuntimeError",
        r"mat1 and mat2 shapes cannot be multiplied \(24x64 and 1x2048\)",
    ),
    "LOKR": KnownFailure(
        "peft's LoKr layer has no Linear4bit variant (shape error on the packed weight).",
        "RuntimeError",
        r"shape '\[2048, 1\]' is invalid for input of size 4096",
    ),
    "HRA": KnownFailure(
        "peft's HRA layer has no Linear4bit variant (multiplies the packed uint8 weight).",
        "RuntimeError",
        r"mat1 and mat2 shapes cannot be multiplied \(2048x1 and 64x64\)",
    ),
    "ADAMSS": KnownFailure(
        "AdaMSS initialisation makes parameters of the packed uint8 weight.", "RuntimeError", _FLOAT_PARAM
    ),
    "FROD": KnownFailure(
        "FRoD initialisation makes parameters of the packed uint8 weight.", "RuntimeError", _FLOAT_PARAM
    ),
    "GLORA": KnownFailure(
        "GLoRA only wraps plain torch.nn.Linear layers.",
        "ValueError",
        r"Linear4bit.*is not a plain torch\.nn\.Linear.*GLoRA does not support this layer type",
    ),
    "OSF": KnownFailure(
        "OSF decomposes the base weight and makes parameters of the packed uint8 weight.", "RuntimeError", _FLOAT_PARAM
    ),
    "DELORA": KnownFailure(
        "DeLoRA takes the norm of the packed uint8 weight.",
        "RuntimeError",
        r"linalg\.vector_norm: Expected a floating point or complex tensor as input\. Got Byte",
    ),
    "TINYLORA": KnownFailure(
        "TinyLoRA initialisation makes parameters of the packed uint8 weight.", "RuntimeError", _FLOAT_PARAM
    ),
    "PSOFT": KnownFailure(
        "PSOFT initialisation needs float32/float16/bfloat16 weights.",
        "TypeError",
        r"PSOFT init requires float32/float16/bfloat16",
    ),
    "PEANUT": KnownFailure(
        "peft's PEANUT layer has no Linear4bit variant (shape error on the packed weight).",
        "RuntimeError",
        r"mat1 and mat2 shapes cannot be multiplied \(1x2048 and 64x4\)",
    ),
    "SUPERTUNING": KnownFailure(
        "peft's SuperTuning layer has no Linear4bit variant (shape error on the packed weight).",
        "RuntimeError",
        r"mat1 and mat2 shapes cannot be multiplied \(24x64 and 1x2048\)",
    ),
    "DEFT": KnownFailure(
        "peft's DEFT layer has no Linear4bit variant (shape error on the packed weight).",
        "RuntimeError",
        r"mat1 and mat2 shapes cannot be multiplied \(4x64 and 2048x1\)",
    ),
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
        failure = NO_4BIT.get(self.key)
        return failure.reason if failure else None


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
    add(MethodCase("ADAMSS", lambda m: _cfg("AdamssConfig", r=8, num_subspaces=2, target_modules=ATTN)))
    add(MethodCase("BEFT", lambda m: _cfg("BeftConfig", target_modules=ATTN)))
    add(MethodCase("DEFT", lambda m: _cfg("DeftConfig", r=4, target_modules=ATTN)))
    add(MethodCase("DELORA", lambda m: _cfg("DeloraConfig", r=4, target_modules=ATTN)))
    add(MethodCase("FROD", lambda m: _cfg("FrodConfig", sparse_rate=0.05, progressbar=False, target_modules=ATTN)))
    add(MethodCase("GLORA", lambda m: _cfg("GloraConfig", r=4, target_modules=ATTN)))
    add(MethodCase("GRALORA", lambda m: _cfg("GraloraConfig", r=8, alpha=16, gralora_k=2, target_modules=ATTN)))
    add(MethodCase("HIRA", lambda m: _cfg("HiraConfig", r=4, target_modules=ATTN)))
    add(MethodCase("LILY", lambda m: _cfg("LilyConfig", r=4, num_B=2, target_modules=ATTN)))
    add(MethodCase("OSF", lambda m: _cfg("OSFConfig", effective_rank=8, target_modules=ATTN)))
    add(MethodCase("PEANUT", lambda m: _cfg("PeanutConfig", r=4, target_modules=ATTN)))
    add(MethodCase("PSOFT", lambda m: _cfg("PsoftConfig", r=4, psoft_alpha=4, target_modules=ATTN)))
    add(MethodCase("PVERA", lambda m: _cfg("PveraConfig", r=8, target_modules=ATTN)))
    add(MethodCase("SUPERTUNING", lambda m: _cfg("SupertuningConfig", sparsity=0.9, target_modules=ATTN)))
    add(MethodCase("TINYLORA", lambda m: _cfg("TinyLoraConfig", r=2, u=8, target_modules=ATTN)))
    add(MethodCase("UNILORA", lambda m: _cfg("UniLoraConfig", r=4, theta_d_length=64, target_modules=ATTN)))
    return c
