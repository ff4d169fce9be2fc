"""Multi-adapter serving on one NF4 4-bit SmolLM2-135M-Instruct: ratios measured side by side in one run.

1. Throughput (generated tokens/s) of one workload spread over K = 1, 4, 16, 64 distinct rank-8 LoRA adapters
   (all linear layers): hub_peft's mixed batch, PEFT's ``adapter_names`` mixed batch, and the naive way (group
   by adapter, ``set_adapter``, generate each group); plus hub_peft with a share of ReFT rows.
   Targets: K=16 ours >= 3x naive and >= 1.5x PEFT; ours at K=64 >= 80% of ours at K=1.
2. Overhead of one unmerged rank-8 LoRA on all linear layers vs the bare base (target <= 25% slower).
3. Hot-load latency of a rank-8 LoRA from the local disk and from the local Hub (targets < 100 ms, < 500 ms)
   and resident memory with 64 adapters vs the base alone (target: base + sum of adapter sizes + 10%).
4. A load test: 200 concurrent chat requests over 16 adapters from a client process on loopback; p50/p99
   latency, errors, and every answer compared with its single-request reference.

Run: .venv/bin/python benchmarks/serving.py [--requests 32] [--new-tokens 16] [--ks 1,4,16,64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = [
    "Give me three tips for staying focused.",
    "What is the capital of France?",
    "Write a haiku about autumn.",
    "Explain photosynthesis in one sentence.",
    "Name a famous painter.",
    "How do I boil an egg?",
    "Suggest a name for a cat.",
    "Why is the sky blue?",
]


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(base, root: Path, count: int, targets: list[str] = ALL_LINEAR) -> list[Path]:
    """``count`` random rank-8 LoRAs on ``targets`` (every linear layer by default; B non-zero so each changes
    the answers)."""
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False)
    model = get_peft_model(base, config)
    folders = []
    for i in range(count):
        torch.manual_seed(1000 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_A" in name:
                    p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
                elif "lora_B" in name:
                    p.copy_(torch.randn_like(p) * 0.02)
        folder = root / f"lora{i:02d}"
        model.save_pretrained(folder)
        folders.append(folder)
    model.unload()  # the base back without LoRA layers
    return folders


def make_reft(base, root: Path) -> Path:
    import torch

    from hub_peft import save_adapter
    from hub_peft.reft import ReftConfig, get_reft_model

    torch.manual_seed(7)
    reft = get_reft_model(base, ReftConfig(layers=[8, 16], rank=4, positions="l1"))
    with torch.no_grad():
        for module in reft.interventions.values():
            module.source.bias.normal_(0, 1)
    folder = save_adapter(reft, root / "reft")
    reft.remove_hooks()
    return folder


def workload(n: int, k: int, reft_every: int = 0) -> tuple[list[str], list[str]]:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    names = [f"lora{i % k:02d}" for i in range(n)]
    if reft_every:
        names = ["reft" if i % reft_every == reft_every - 1 else name for i, name in enumerate(names)]
    return prompts, names


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def ours(engine, prompts, names, new_tokens: int) -> tuple[float, int]:
    seconds, completions = timed(
        lambda: engine.generate_tokens(prompts, names, max_new_tokens=new_tokens, ignore_eos=True)
    )
    return seconds, sum(len(c.tokens) for c in completions)


def encode_batch(tokenizer, prompts):
    from hub_peft.chat import format_prompt

    tokenizer.padding_side = "left"
    return tokenizer(
        [format_prompt(tokenizer, p) for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False
    )


GENERATE = dict(do_sample=False, temperature=None, top_p=None, top_k=None)  # greedy, EOS suppressed (see main)


def peft_mixed(peft_model, tokenizer, prompts, names, new_tokens: int) -> tuple[float, int]:
    import torch

    batch = encode_batch(tokenizer, prompts)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id)
    with torch.inference_mode():
        seconds, out = timed(lambda: peft_model.generate(**batch, adapter_names=names, **kwargs, **GENERATE))
    return seconds, out[:, batch["input_ids"].shape[1] :].numel()


def naive(peft_model, tokenizer, prompts, names, new_tokens: int) -> tuple[float, int]:
    import torch

    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id)
    start, tokens = time.perf_counter(), 0
    for name in sorted(set(names)):
        rows = [p for p, n in zip(prompts, names, strict=True) if n == name]
        peft_model.set_adapter(name)
        batch = encode_batch(tokenizer, rows)
        with torch.inference_mode():
            out = peft_model.generate(**batch, **kwargs, **GENERATE)
        tokens += out[:, batch["input_ids"].shape[1] :].numel()
    return time.perf_counter() - start, tokens


def client(url: str, jobs_file: str) -> None:
    """The load-test client (a separate process): all requests at once, answers and latencies to stdout."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    jobs = json.loads(Path(jobs_file).read_text())

    def send(job):
        body = {
            "model": job["model"],
            "messages": [{"role": "user", "content": job["prompt"]}],
            "max_tokens": job["max_tokens"],
            "temperature": 0,
        }
        start = time.perf_counter()
        try:
            r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
            ok = r.status_code == 200
            answer = r.json()["choices"][0]["message"]["content"].strip() if ok else r.text
        except Exception as e:  # a failed request is a result of the load test, not a crash of it
            ok, answer = False, repr(e)
        return {"ok": ok, "answer": answer, "seconds": time.perf_counter() - start}

    with ThreadPoolExecutor(len(jobs)) as pool:
        print(json.dumps(list(pool.map(send, jobs))))


def load_test(engine, names: list[str], requests: int, new_tokens: int) -> None:
    import threading

    import uvicorn

    from hub_peft.hub.process import free_port
    from hub_peft.serving import create_app

    jobs = [
        {"model": names[i % len(names)], "prompt": PROMPTS[(i // len(names)) % 4], "max_tokens": new_tokens}
        for i in range(requests)
    ]
    references = {}
    for job in jobs:
        key = (job["model"], job["prompt"])
        if key not in references:
            references[key] = engine.generate([job["prompt"]], [job["model"]], max_new_tokens=new_tokens)[0]
    port = free_port()
    app = create_app(engine, base_name="HuggingFaceTB/SmolLM2-135M-Instruct")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(jobs, f)
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, __file__, "--client", f"http://127.0.0.1:{port}", f.name],
        capture_output=True,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - start
    server.should_exit = True
    results = json.loads(out.stdout)
    latencies = sorted(r["seconds"] for r in results)
    errors = sum(not r["ok"] for r in results)
    mismatches = sum(
        r["ok"] and r["answer"] != references[j["model"], j["prompt"]] for r, j in zip(results, jobs, strict=True)
    )
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    print(
        f"load test: {requests} concurrent chat requests over {len(names)} adapters, {new_tokens} tokens each: "
        f"wall {wall:.1f} s, p50 {statistics.median(latencies):.2f} s, p99 {p99:.2f} s, errors {errors}, "
        f"answers differing from their single-request reference {mismatches}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32, help="Requests per throughput batch.")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--ks", default="1,4,16,64")
    parser.add_argument("--load-requests", type=int, default=200)
    parser.add_argument("--client", nargs=2, metavar=("URL", "JOBS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        return client(*args.client)

    from hub_peft.hub import start_local_hub  # before huggingface_hub is imported: it reads HF_ENDPOINT once

    root = Path(tempfile.mkdtemp(prefix="hub_peft_serving_"))
    hub = start_local_hub(root / "hub", tokens={"bench": HUB_TOKEN})
    os.environ.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(root / "hf_home"), HF_HUB_DISABLE_PROGRESS_BARS="1")
    try:
        benchmark(args, root)
    finally:
        hub.stop()


HUB_TOKEN = "hf_bench_0123456789abcdef"


def benchmark(args: argparse.Namespace, root: Path) -> None:
    import torch
    from peft import PeftModel

    from hub_peft import load_base_model
    from hub_peft.serving import MultiAdapterModel

    ks = [int(k) for k in args.ks.split(",")]
    base, tokenizer = load_base_model(None, load_in_4bit=True)
    rss_base = rss_mb()
    folders = make_adapters(base, root, max(ks))
    reft_folder = make_reft(base, root)
    size = folders[0].joinpath("adapter_model.safetensors").stat().st_size / 2**20
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(folders)} rank-8 LoRAs on all linear "
        f"layers ({size:.1f} MiB each) + 1 ReFT; each row generates exactly its token budget (EOS off)"
    )

    # 3. hot-load latency and memory (first, while the process holds only the base)
    engine = MultiAdapterModel((base, tokenizer), memory_budget=2**40)
    rss_engine = rss_mb()
    loads = []
    for i, folder in enumerate(folders):
        seconds, _ = timed(lambda folder=folder, i=i: engine.add(f"lora{i:02d}", folder))
        loads.append(seconds)
    engine.add("reft", reft_folder)
    adapter_mb = sum(e["bytes"] for e in engine.cache.loaded()) / 2**20
    rss_loaded = rss_mb()
    print(
        f"hot-load from local disk: median {1000 * statistics.median(loads):.0f} ms, max {1000 * max(loads):.0f} ms "
        f"(target < 100 ms)"
    )
    print(
        f"memory: base process {rss_base:.0f} MiB; with {len(folders) + 1} adapters {rss_loaded:.0f} MiB = base "
        f"+ {rss_loaded - rss_engine:.0f} MiB for {adapter_mb:.0f} MiB of adapter weights "
        f"(ratio {(rss_loaded - rss_engine) / adapter_mb:.2f}; target <= base + sizes + 10%: "
        f"{rss_loaded / (rss_engine + adapter_mb):.2f}x of base + sizes)"
    )
    hub_load_ms = hub_load_latency(engine, folders[:4])
    print(f"hot-load from the local Hub (download + load): median {hub_load_ms:.0f} ms (target < 500 ms)")

    # 2. overhead of one unmerged LoRA
    prompts, _ = workload(args.requests, 1)
    ours(engine, prompts[:4], [None] * 4, 2)  # warm-up
    t_base, n_base = ours(engine, prompts, [None] * len(prompts), args.new_tokens)
    t_one, n_one = ours(engine, prompts, ["lora00"] * len(prompts), args.new_tokens)
    print(
        f"overhead: base {n_base / t_base:.1f} tok/s, one rank-8 LoRA on all linears {n_one / t_one:.1f} tok/s "
        f"-> {100 * ((n_base / t_base) / (n_one / t_one) - 1):.0f}% slower (target <= 25%)"
    )

    # 1. throughput over K adapters: ours, PEFT adapter_names, naive
    peft_model = None
    for i, folder in enumerate(folders):
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(base_for_peft(), folder, adapter_name=f"lora{i:02d}")
        else:
            peft_model.load_adapter(folder, adapter_name=f"lora{i:02d}")
    peft_model.eval()
    rates: dict[str, dict[int, float]] = {"ours": {}, "peft": {}, "naive": {}}
    print(f"throughput, {args.requests} requests x up to {args.new_tokens} new tokens (generated tokens/s):")
    runners = {
        "ours": lambda p, n: ours(engine, p, n, args.new_tokens),
        "peft": lambda p, n: peft_mixed(peft_model, tokenizer, p, n, args.new_tokens),
        "naive": lambda p, n: naive(peft_model, tokenizer, p, n, args.new_tokens),
    }
    for k in ks:
        prompts, names = workload(args.requests, k)
        for label, run in runners.items():
            seconds, tokens = run(prompts, names)
            rates[label][k] = tokens / seconds
        print(
            f"  K={k:>2}: ours {rates['ours'][k]:6.1f}  peft adapter_names {rates['peft'][k]:6.1f}  naive "
            f"{rates['naive'][k]:6.1f}   ours/naive {rates['ours'][k] / rates['naive'][k]:.2f}x  "
            f"ours/peft {rates['ours'][k] / rates['peft'][k]:.2f}x"
        )
    prompts, names = workload(args.requests, 16, reft_every=4)
    seconds, tokens = ours(engine, prompts, names, args.new_tokens)
    print(f"  K=16 with every 4th row a ReFT adapter: ours {tokens / seconds:.1f} tok/s")
    if 1 in ks and max(ks) > 1:
        k = max(ks)
        print(f"ours at K={k} / ours at K=1: {rates['ours'][k] / rates['ours'][1]:.2f} (target >= 0.80)")
    if 16 in ks:
        print(
            f"K=16: ours/naive {rates['ours'][16] / rates['naive'][16]:.2f}x (target >= 3), ours/peft "
            f"{rates['ours'][16] / rates['peft'][16]:.2f}x (target >= 1.5)"
        )

    # 4. the server under load
    load_test(engine, [f"lora{i:02d}" for i in range(16)], args.load_requests, max(4, args.new_tokens // 2))


def base_for_peft():
    from hub_peft import load_base_model

    return load_base_model(None, load_in_4bit=True)[0]


def hub_load_latency(engine, folders: list[Path]) -> float:
    """Push a few adapters to the local Hub, then time engine.add(repo_id) with nothing downloaded yet."""
    from huggingface_hub import HfApi

    api = HfApi(token=HUB_TOKEN)
    times = []
    for i, folder in enumerate(folders):
        repo = f"bench/hot-{i}"
        api.create_repo(repo)
        api.upload_folder(repo_id=repo, folder_path=folder)
        seconds, _ = timed(lambda repo=repo: engine.add(repo, repo))
        times.append(seconds)
        engine.remove(repo)
    return 1000 * statistics.median(times)


if __name__ == "__main__":
    main()
