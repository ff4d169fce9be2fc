"""ReFT training speed: hub_peft's cached trainer vs a plain full-forward loop, same math, one run.

The workload is the "answer only in emoji" demo on the embedded SmolLM2-135M-Instruct: ten
prompt → emoji pairs (hub_peft's preset), chat template, rank-4 LoReFT on the last prompt token of
layer 8, AdamW lr 4e-3 with linear decay, batch 10 (pyreft's demo settings). Both loops start from
the same seed and weights; their per-step losses must agree. Then the cached trainer runs the demo
to the end: the original 100 epochs, and hub_peft's default demo config (layers 8 and 16, lr 1e-2).

Run: .venv/bin/python benchmarks/reft_train.py [--steps 8] [--epochs 100]
"""

from __future__ import annotations

import argparse
import time


def run(model, examples, template, *, method: str, epochs: int, layers: list[int], lr: float):
    import torch

    from hub_peft.reft import ReftConfig, get_reft_model, train_reft

    torch.manual_seed(0)
    reft = get_reft_model(model, ReftConfig(layers=layers, rank=4, positions="l1", prompt_template=template))
    result = train_reft(reft, examples, epochs=epochs, lr=lr, batch_size=10, method=method)
    reft.remove_hooks()
    return result


def _median_step(result) -> float:
    times = [b["seconds"] - a["seconds"] for a, b in zip(result.history, result.history[1:], strict=False)]
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="Steps of the side-by-side comparison.")
    parser.add_argument("--epochs", type=int, default=100, help="Epochs of the full original demo run.")
    args = parser.parse_args()

    import torch

    from hub_peft.base_model import load_base_model
    from hub_peft.chat import generate_reply, prompt_template
    from hub_peft.presets import held_out_prompts, load_preset
    from hub_peft.reft import ReftConfig, encode_examples, get_reft_model, train_reft

    model, tokenizer = load_base_model(None)
    template = prompt_template(tokenizer)
    examples = encode_examples(tokenizer, load_preset(), template)
    tokens = sum(len(e) for e in examples)
    print(f"workload: {len(examples)} examples, {tokens} tokens, torch threads {torch.get_num_threads()}")

    with torch.no_grad():  # warm up the allocator and kernels once, so neither loop pays for it
        model(input_ids=torch.tensor([examples[0].prompt_ids + examples[0].response_ids] * 10))
    same = {"epochs": args.steps, "layers": [8], "lr": 4e-3}
    full = run(model, examples, template, method="full", **same)
    cached = run(model, examples, template, method="cached", **same)
    diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(full.history, cached.history, strict=True))
    full_rate, cached_rate = full.steps / full.seconds, cached.steps / cached.seconds
    print(f"\n{args.steps} steps each, same seed (times include the cached trainer's one-off precompute):")
    for name, result, rate in (
        ("plain full-forward loop", full, full_rate),
        ("hub_peft cached trainer", cached, cached_rate),
    ):
        print(f"  {name} : {rate:6.3f} steps/s ({result.seconds:5.1f} s), final loss {result.history[-1]['loss']:.5f}")
    print(f"  speed-up                : {cached_rate / full_rate:.2f}x   (largest per-step loss difference {diff:.1e})")
    print(
        f"  median step after the first: plain {_median_step(full):.2f} s, cached {_median_step(cached):.2f} s "
        f"({_median_step(full) / _median_step(cached):.2f}x)"
    )

    demo = run(model, examples, template, method="cached", epochs=args.epochs, layers=[8], lr=4e-3)
    print(
        f"\noriginal demo ({args.epochs} epochs, layer 8, lr 4e-3), cached trainer: {demo.seconds:.1f} s, "
        f"final loss {demo.history[-1]['loss']:.3f}; the plain loop would take ~{args.epochs / full_rate:.0f} s"
    )

    torch.manual_seed(0)
    reft = get_reft_model(model, ReftConfig(layers=[8, 16], rank=4, positions="l1", prompt_template=template))
    started = time.perf_counter()
    quick = train_reft(reft, examples, epochs=12, lr=1e-2)
    answers = {p: generate_reply(reft, tokenizer, p, max_new_tokens=12) for p in held_out_prompts()}
    print(f"hub_peft demo config (layers 8+16, lr 1e-2, 12 epochs): trained in {quick.seconds:.1f} s "
          f"(+ answers in {time.perf_counter() - started - quick.seconds:.1f} s), final loss "
          f"{quick.history[-1]['loss']:.3f}")  # fmt: skip
    for prompt, answer in answers.items():
        print(f"  {prompt!r} -> {answer!r}")


if __name__ == "__main__":
    main()
