"""Two CPU facts the serving engine is built on, each measured side by side in one run.

The LM head on a oneDNN-reordered weight vs torch's ``nn.Linear`` (MKL):
1. The product alone: SmolLM2-135M-Instruct's head (49152 words x 576) by 1-256 rows, the rows a decode step
   sends it (one per running request), best of five each way, alternating.
2. The engine: the same requests (all at once, greedy, 16 rank-8 LoRAs on all linear layers, fp32 base)
   through the continuous-batching scheduler with the packed head and with the plain one, alternating
   twice; tokens/s, the ratio, and whether every request's tokens are equal.
One thread for the model's work:
3. A decode step (32 requests, 16 LoRAs) alone, while another thread that once ran a parallel torch op is
   alive (libgomp then sleeps instead of spinning between parallel regions), and after that thread ended.

Run: .venv/bin/python benchmarks/engine_cpu.py [--requests 4,64]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _machine import cpu_description
from online import workload
from serving import make_adapters


def product(head) -> None:
    import torch

    from hub_peft._onednn import best_of, linear, reorder

    packed = reorder(head.weight)
    print(f"\n1. the head's product, {head.out_features} x {head.in_features}, ms (best of 5):")
    print(f"  {'rows':>5} {'nn.Linear':>10} {'oneDNN reordered':>17} {'speed-up':>9}")
    with torch.inference_mode():
        for rows in (1, 4, 16, 64, 256):
            x = torch.randn(rows, head.in_features)
            ours, theirs = best_of(lambda: linear(x, packed), lambda: head(x), repeats=5)  # noqa: B023
            print(f"  {rows:>5} {theirs * 1e3:>10.2f} {ours * 1e3:>17.2f} {theirs / ours:>8.2f}x")


def engine_runs(engine, counts: list[int]) -> None:
    from hub_peft.serving import SamplingParams
    from hub_peft.serving.scheduler import Request, Scheduler

    def run(n: int):
        jobs = workload(n, 16, float("inf"))
        scheduler = Scheduler(engine)
        requests = [
            Request(
                [{"role": "user", "content": j["prompt"]}],
                j["model"],
                SamplingParams(max_tokens=j["max_tokens"], temperature=0),
            )
            for j in jobs
        ]
        scheduler.submit(*requests)
        start = time.perf_counter()
        scheduler.run_until_done()
        seconds = time.perf_counter() - start
        return sum(len(r.tokens) for r in requests) / seconds, [r.tokens for r in requests]

    packed = engine._head
    print("\n2. the engine, requests all at once (max_tokens 8-64, greedy), tok/s:")
    print(f"  {'requests':>8} {'plain head':>11} {'packed head':>12} {'ratio':>6}  tokens equal")
    run(4)  # warm-up
    for n in [*counts, *counts]:
        result = {}
        for head in (None, packed):
            engine._head = head
            result[head is not None] = run(n)
        (plain, plain_tokens), (ours, our_tokens) = result[False], result[True]
        same = sum(a == b for a, b in zip(plain_tokens, our_tokens, strict=True))
        print(f"  {n:>8} {plain:>11.1f} {ours:>12.1f} {ours / plain:>5.2f}x  {same}/{n}")
    engine._head = packed


def decode_step_ms(engine, rows: int = 32, steps: int = 8) -> float:
    from hub_peft.serving import SamplingParams

    jobs = workload(rows, 16, float("inf"))
    gens = [
        engine.generation(
            [{"role": "user", "content": j["prompt"]}], j["model"], SamplingParams(max_tokens=64, ignore_eos=True)
        )
        for j in jobs
    ]
    for gen in gens:
        engine.admit(gen)
    gens.sort(key=lambda g: g.slot)
    try:
        for _ in range(steps + 1):  # the first is the prefill
            fed = [(g, len(g.prompt_ids) if g.prefilling else 1) for g in gens]
            for gen, row in zip(gens, engine.forward_ragged(fed), strict=True):
                engine.sample(gen, row)
        start = time.perf_counter()
        for _ in range(steps):
            for gen, row in zip(gens, engine.forward_ragged([(g, 1) for g in gens]), strict=True):
                engine.sample(gen, row)
        return (time.perf_counter() - start) / steps * 1e3
    finally:
        for gen in gens:
            engine.release(gen)


def threads(engine) -> None:
    import threading

    import torch

    print("\n3. a decode step of 32 requests over 16 LoRAs, ms:")
    alone = decode_step_ms(engine)
    done = threading.Event()

    def other() -> None:
        torch.randn(512, 512) @ torch.randn(512, 512)  # one parallel region: this thread keeps OpenMP threads
        done.wait()

    thread = threading.Thread(target=other)
    thread.start()
    time.sleep(0.5)
    beside = decode_step_ms(engine)
    done.set()
    thread.join()
    after = decode_step_ms(engine)
    print(
        f"  alone {alone:.0f}; another OpenMP thread alive {beside:.0f} ({beside / alone:.2f}x); "
        f"after it ended {after:.0f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", default="4,64", help="Request counts of the engine runs.")
    args = parser.parse_args()

    import torch

    from hub_peft.base_model import load_base_model
    from hub_peft.serving import MultiAdapterModel

    print(f"cpu: {cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    base, tokenizer = load_base_model(None, load_in_4bit=False)
    product(base.lm_head)
    root = Path(tempfile.mkdtemp(prefix="hub_peft_engine_cpu_"))
    folders = make_adapters(base, root, 16)
    engine = MultiAdapterModel((base, tokenizer), max_running=64, max_model_len=1024, packed_head=True)
    for i, folder in enumerate(folders):
        engine.add(f"lora{i:02d}", folder)
    engine_runs(engine, [int(n) for n in args.requests.split(",")])
    threads(engine)


if __name__ == "__main__":
    main()
