"""DoRA requests three ways: attached per request, attached once to a shadow (the solo path), and in the engine's
shared batch (DoRA now joins continuous batching).

SmolLM2-135M-Instruct in float32 and a rank-8 DoRA adapter on every linear layer of its decoder blocks. One
request is a greedy 16-token completion. Measured side by side in one process, alternating, best of five:

A. attach per request: ``PeftModel.from_pretrained`` on the base, ``generate``, ``unload`` (the engine's
   solo path before it attached once; the attach then ran on the step loop, under the engine's lock);
B. attached once: ``hub_peft.serving.solo.attach`` builds the PEFT model on a shadow of the base (at load,
   off the step loop), and a request only runs ``generate`` on it (PEFT's DoRA recomputes each layer's weight
   norm in every forward);
C. the engine: the DoRA shares the step like a LoRA (its norms computed once, at load).

Then 8 requests at once: B's ``generate`` on the batch of 8 against C's ``generate_tokens`` of 8 rows. Also
printed: the one-time attach, the memory the shadow adds next to the adapter file's size, and whether A, B and
C give the same tokens.

Run: .venv/bin/python benchmarks/solo_adapters.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _machine import cpu_description

PROMPT = "Give me three tips for staying focused."


def main() -> None:
    import torch
    from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model

    from hub_peft import load_base_model, save_adapter
    from hub_peft.chat import encode_prompt, prompt_template
    from hub_peft.serving import MultiAdapterModel, SamplingParams, solo

    print(f"CPU: {cpu_description()}")
    base, tokenizer = load_base_model(None, load_in_4bit=False)
    base.eval()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        trained = get_peft_model(
            base, LoraConfig(r=8, lora_alpha=16, target_modules=targets, use_dora=True, init_lora_weights=False)
        )
        folder = save_adapter(trained, Path(tmp) / "dora")
        base = trained.unload()
        ids = torch.tensor([encode_prompt(tokenizer, PROMPT, prompt_template(tokenizer))])
        mask = torch.ones_like(ids)

        def generate(model) -> list[int]:
            with torch.inference_mode():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=16,
                    min_new_tokens=16,
                    do_sample=False,
                    pad_token_id=tokenizer.eos_token_id,
                )
            return out[0, ids.shape[1] :].tolist()

        def per_request() -> list[int]:
            with torch.inference_mode():
                model = PeftModel.from_pretrained(base, folder).eval()
            try:
                return generate(model)
            finally:
                model.unload()

        started = time.perf_counter()
        shadow = solo.attach(base, folder, PeftConfig.from_pretrained(str(folder)))
        attach_s = time.perf_counter() - started
        engine = MultiAdapterModel(load_base_model(None, load_in_4bit=False))  # a base of its own: it wraps layers
        engine.add("dora", folder)
        one = [SamplingParams(max_tokens=16, ignore_eos=True)]

        def in_engine(rows: int = 1) -> list[int]:
            out = engine.generate_tokens([PROMPT] * rows, ["dora"] * rows, params=one * rows)
            return out[0].tokens

        times: dict[str, list[float]] = {"A": [], "B": [], "C": [], "B8": [], "C8": []}
        tokens = {}
        batch = ids.repeat(8, 1)

        def solo_batch() -> list[int]:
            with torch.inference_mode():
                out = shadow.generate(
                    input_ids=batch,
                    attention_mask=torch.ones_like(batch),
                    max_new_tokens=16,
                    min_new_tokens=16,
                    do_sample=False,
                    pad_token_id=tokenizer.eos_token_id,
                )
            return out[0, ids.shape[1] :].tolist()

        runs = (
            ("A", per_request),
            ("B", lambda: generate(shadow)),
            ("C", in_engine),
            ("B8", solo_batch),
            ("C8", lambda: in_engine(8)),
        )
        for _ in range(5):
            for label, run in runs:
                started = time.perf_counter()
                tokens[label] = run()
                times[label].append(time.perf_counter() - started)
        a, b, c, b8, c8 = (min(times[k]) for k in ("A", "B", "C", "B8", "C8"))
        own = solo.own_bytes(shadow, base)
        file_bytes = (folder / "adapter_model.safetensors").stat().st_size
        print(
            f"one request, 16 tokens (best of 5): A attach per request {a * 1000:.0f} ms, "
            f"B attached once {b * 1000:.0f} ms, C in the engine's batch {c * 1000:.0f} ms; "
            f"A/B {a / b:.2f}x, B/C {b / c:.2f}x"
        )
        print(f"8 requests at once: B {b8 * 1000:.0f} ms, C {c8 * 1000:.0f} ms; B/C {b8 / c8:.2f}x")
        print(
            f"the one-time attach to a shadow: {attach_s * 1000:.0f} ms; memory it adds {own / 2**20:.2f} MiB "
            f"(adapter file {file_bytes / 2**20:.2f} MiB)"
        )
        same = tokens["A"] == tokens["B"] == tokens["C"] == tokens["B8"] == tokens["C8"]
        print(f"same tokens: {same}")


if __name__ == "__main__":
    main()
