"""Every causal LM architecture of the installed transformers through the engine, as far as a generic tiny
model goes: for each model type in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` build a seeded random model from its
config class with the sizes shrunk (2 layers, hidden 64, vocabulary 128), put a LoRA on all its linear layers,
and check one engine batch (the LoRA row and a bare-base row, prompts of different lengths) against
transformers / PEFT alone: greedy tokens equal and next-token logits within 1e-4.

    .venv/bin/python scripts/architecture_census.py [--only llama,gpt2] [--write docs/architecture_census.md]

Each architecture ends in one of: *continuous* / *per-sequence* (exact, with the engine's batching mode),
*refused* (the engine says why at construction), *differs* (served, but not exactly: a bug to fix), or *not
built* (the generic shrinking gives no working model: the architecture needs hand-made sizes, as
``tests/test_architectures.py`` has for 15 families). Runs in a few minutes; not part of the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import signal
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

SIZES = {  # config attribute -> tiny value, set where the config has it
    "hidden_size": 64,
    "n_embd": 64,
    "d_model": 64,
    "dim": 64,
    "embed_dim": 64,
    "num_hidden_layers": 2,
    "n_layer": 2,
    "num_layers": 2,
    "n_layers": 2,
    "num_attention_heads": 4,
    "n_head": 4,
    "num_heads": 4,
    "n_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "ffn_dim": 128,
    "n_inner": 128,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 256,
    "n_positions": 256,
    "vocab_size": 128,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}
PROMPTS = ["a b c d e f g h", "i j k"]


class _Timeout(Exception):
    pass


def _tiny_config(model_type: str):
    from transformers import CONFIG_MAPPING

    config = CONFIG_MAPPING[model_type]()
    for part in {id(config): config, id(config.get_text_config()): config.get_text_config()}.values():
        for key, value in SIZES.items():
            if hasattr(part, key) and not isinstance(getattr(part, key), (list, dict)):
                setattr(part, key, value)
        with contextlib.suppress(AttributeError, TypeError):  # some configs derive it (a read-only property)
            if getattr(part, "layer_types", None) is not None:
                part.layer_types = part.layer_types[:2]
    return config


def check(model_type: str) -> tuple[str, str]:
    """``(outcome, detail)`` for one model type (see the module docstring)."""
    from peft import LoraConfig, get_peft_model
    from test_peft_methods import tiny_tokenizer
    from transformers import AutoModelForCausalLM

    from hub_peft import save_adapter
    from hub_peft.serving import MultiAdapterModel

    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_tiny_config(model_type)).eval()
        ids = torch.tensor([tiny_tokenizer()(PROMPTS[0])["input_ids"]])
        with torch.no_grad():
            model(input_ids=ids)
    except _Timeout:
        raise
    except Exception as e:  # the generic sizes do not fit this architecture
        return "not built", f"{type(e).__name__}: {str(e).splitlines()[0][:140]}"
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        note = ""  # PEFT cannot put LoRA on every linear layer of some (Mamba): then the base rows alone
        try:
            torch.manual_seed(1)
            lora = get_peft_model(
                copy.deepcopy(model), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
            )
            folder = save_adapter(lora, Path(tmp) / "lora")
        except _Timeout:
            raise
        except Exception as e:
            lora, folder, note = None, None, f"base rows only (PEFT: {str(e).splitlines()[0][:80]})"
        rows = ["lora" if folder else None, None]
        references = []  # row 0: the LoRA, row 1: the bare base (adapter disabled); PEFT/transformers alone
        for row, prompt in enumerate(PROMPTS):
            ids = torch.tensor([tiny_tokenizer()(prompt)["input_ids"]])
            reference = lora if lora is not None else model
            context = lora.disable_adapter() if row == 1 and lora is not None else contextlib.nullcontext()
            try:
                with torch.no_grad(), context:
                    expected = reference(input_ids=ids).logits[0, -1]
                    tokens = reference.generate(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=4,
                        do_sample=False,
                        pad_token_id=2,
                        eos_token_id=2,
                    )  # the engine's EOS
                references.append((expected, tokens[0, ids.shape[1] :].tolist()))
            except _Timeout:
                raise
            except Exception as e:  # PEFT's or transformers' own generate fails: nothing to compare with
                return "not built", f"reference generate: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        try:
            engine = MultiAdapterModel((model, tiny_tokenizer()), packed_head=False)
            if folder:
                engine.add("lora", folder)
        except _Timeout:
            raise
        except Exception as e:
            return "refused", f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        try:
            got = engine.generate_tokens(PROMPTS, rows, max_new_tokens=4, raw=True)
            logits = engine.next_token_logits(PROMPTS, rows, raw=True)
        except _Timeout:
            raise
        except Exception as e:
            return "differs", f"engine failed: {type(e).__name__}: {str(e).splitlines()[0][:140]}"
        for row, (expected, tokens) in enumerate(references):
            gap = (logits[row] - expected).abs().max().item()
            if gap > 1e-4 or got[row].tokens != tokens:
                return "differs", f"row {row}: logits off by {gap:.2e}, tokens {got[row].tokens} vs {tokens}"
        if engine.ragged_reason is None:
            return "continuous", note
        return "per-sequence", "; ".join(filter(None, [engine.ragged_reason, note]))


def main() -> int:
    from _machine import cpu_description
    from transformers import __version__
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated model types")
    parser.add_argument("--seconds", type=int, default=60, help="per architecture")
    parser.add_argument("--write", type=Path, help="also write the table to this Markdown file")
    args = parser.parse_args()
    types = args.only.split(",") if args.only else sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")

    def on_alarm(*_):
        raise _Timeout

    signal.signal(signal.SIGALRM, on_alarm)
    rows, started = [], time.perf_counter()
    for model_type in types:
        signal.alarm(args.seconds)
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                outcome, detail = check(model_type)
        except _Timeout:
            outcome, detail = "not built", f"over {args.seconds} s"
        finally:
            signal.alarm(0)
        rows.append((model_type, outcome, detail.replace("|", "/")))
        print(f"{model_type:28s} {outcome:13s} {detail}", flush=True)
    outcomes = ("continuous", "per-sequence", "refused", "differs", "not built")
    counts = {o: sum(r[1] == o for r in rows) for o in outcomes}
    summary = ", ".join(f"{n} {o}" for o, n in counts.items())
    print(f"\n{len(rows)} model types in {time.perf_counter() - started:.0f} s: {summary}\n{cpu_description()}")
    if args.write:
        lines = [
            "# Architecture census",
            "",
            f"`scripts/architecture_census.py` over the {len(rows)} causal LM model types of transformers {__version__}"
            f" (generic tiny models; see the script's docstring for what each outcome means): {summary}. "
            f"Run on {cpu_description()}.",
            "",
            "Most *not built* rows are the generic sizes not fitting the architecture (per-layer head sizes, hybrid "
            "layer layouts, multimodal configs), or plain PEFT failing on its own (an all-linear LoRA on MoE routers "
            "that return a tuple, Mamba's `out_proj`); `tests/test_architectures.py` builds 16 families by hand "
            "instead. Most *differs* rows are encoders with a causal-LM head used without `is_decoder=True` "
            "(RoBERTa, XLM, ELECTRA...): their attention is bidirectional, so an earlier position's state changes "
            "with every new token and no KV cache reproduces `generate`; they are not served as decoders.",
            "",
            "| model type | outcome | detail |",
            "|---|---|---|",
            *(f"| {t} | {o} | {d} |" for t, o, d in rows),
        ]
        args.write.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
