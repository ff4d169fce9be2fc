"""Many adapters stay cheap: one batch of requests spread over K distinct LoRAs, K from 1 to 1,000, NF4 base.

The same workload (``--requests`` chat requests x ``--new-tokens`` tokens, EOS ignored) on one engine over an NF4
SmolLM2-135M-Instruct, its rows spread over K distinct rank-8 LoRAs: K = 1 and K = 64 alternate for
``--rounds`` rounds (the ratio of every round is printed: the target is K=64 >= 0.8 of K=1 in every one), then
K = 1,000, each batch on the next ``--requests`` adapters of the thousand, all resident in RAM (the adapter
cache's budget, LRU by bytes, holds them; its bytes are printed). The LoRAs are on ``q_proj``/``v_proj`` (PEFT's
default targets for Llama) so that a thousand fit in a few GB; every K uses the same kind.

Run: .venv/bin/python benchmarks/adapters_k.py [--requests 32] [--new-tokens 16] [--rounds 4] [--thousand 1000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _machine import cpu_description
from serving import PROMPTS, make_adapters


def rate(engine, names: list[str], new_tokens: int) -> float:
    """Generated tokens/s of one batch, request ``i`` on adapter ``names[i]``."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]
    start = time.perf_counter()
    done = engine.generate_tokens(prompts, names, max_new_tokens=new_tokens, ignore_eos=True)
    return sum(len(c.tokens) for c in done) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--thousand", type=int, default=1000, help="Adapters of the last point.")
    args = parser.parse_args()
    import torch

    from hub_peft import load_base_model
    from hub_peft.serving import MultiAdapterModel

    print(f"cpu: {cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory(prefix="hub_peft_k_") as tmp:
        base = load_base_model(None, load_in_4bit=True)
        start = time.perf_counter()
        folders = make_adapters(base[0], Path(tmp), args.thousand, targets=["q_proj", "v_proj"])
        print(f"{args.thousand} rank-8 q/v LoRAs written in {time.perf_counter() - start:.0f} s")
        engine = MultiAdapterModel(base, memory_budget=16 * 2**30)
        start = time.perf_counter()
        names = [engine.add(f"a{i:04d}", folder)["name"] for i, folder in enumerate(folders)]
        count = sum(entry["resident"] for entry in engine.cache.loaded())
        print(
            f"loaded in {time.perf_counter() - start:.0f} s; {count} resident, "
            f"{engine.cache.resident_bytes() / 2**30:.2f} GiB of adapter weights"
        )
        n = args.requests
        rate(engine, names[:4], 2)  # warm-up: the packed head's timing, the kernels' build
        ratios = []
        print(f"{n} requests x {args.new_tokens} tokens, generated tokens/s:")
        for r in range(args.rounds):
            one = rate(engine, [names[0]] * n, args.new_tokens)
            many = rate(engine, [names[i % 64] for i in range(n)], args.new_tokens)
            ratios.append(many / one)
            print(f"  round {r + 1}: K=1 {one:6.1f}  K=64 {many:6.1f}  ratio {many / one:.2f}")
        thousand = [rate(engine, names[b : b + n], args.new_tokens) for b in range(0, len(names) - n + 1, n)][:8]
        print(
            f"  K={len(names)} (each batch the next {n} adapters, {len(thousand)} batches): "
            f"median {sorted(thousand)[len(thousand) // 2]:.1f}, min {min(thousand):.1f}"
        )
        verdict = "met" if min(ratios) >= 0.8 else "NOT met"
        print(f"target K=64 >= 0.8 of K=1 in every round: {verdict} (min {min(ratios):.2f}, max {max(ratios):.2f})")


if __name__ == "__main__":
    main()
