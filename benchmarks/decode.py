"""Single-stream decode against the physical limit: how fast one chat answers, fp32 and NF4.

A decode step of one sequence reads every weight once, so its speed limit is the memory bandwidth divided by the
bytes read per token. Measured here in one process, on SmolLM2-135M-Instruct (the embedded default base):

1. the bandwidth: a streaming read (``sum``) of a buffer as large as the bytes read per token, best of 5;
2. the bytes read per token of each precision: fp32 weights (the tied head counted once, as it is read once),
   and NF4 decoder weights (4-bit codes and their block scales) with the fp32 head and norms;
3. decode tokens/s of one greedy request (128 new tokens after a short chat prompt, EOS ignored; the time from the
   first to the last token, so prefill is left out), best of 3, alternating: transformers' own ``generate`` on
   the bare base (a reference, no adapters) and ``MultiAdapterModel`` bare and with one rank-8 LoRA on every
   linear layer of the blocks, with one LoRA on transformers' forward (``lean_decode=False``) and with the opt-in
   8-bit LM head (``head_bits=8``; its ratio is still to the float32-head limit); for NF4 also the engine with
   ``fused=False`` (bitsandbytes' own path);
4. the ratios to the limit and the issue's targets (fp32 >= 0.75 of its limit, NF4 >= 0.5 of its own and
   >= 1.5x fp32), each printed met or not; and whether the engine's greedy tokens equal transformers' (bare).

Opt-in, llama.cpp (``--llama-cpp DIR --convert-python PY``, see ``_llama_cpp.py``): ``llama-server`` with one slot
on the same base (F32 GGUF; Q4_1 beside NF4) and the same LoRA, the same prompt tokens, 128 tokens streamed to the
same kind of client (a stamp per streamed chunk), best of the same repeats; and the target "at least llama.cpp".

Run: .venv/bin/python benchmarks/decode.py [--tokens 128] [--repeats 3] [--llama-cpp DIR --convert-python PY]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _llama_cpp import LlamaCpp
from _machine import cpu_description
from online import wait_ready
from serving import make_adapters

PROMPT = "Tell me a short story about a lighthouse keeper."


def bytes_per_token(model) -> int:
    """Bytes one decode step reads: every parameter and buffer of the model once (a tied head once), 4-bit
    layers as their packed codes plus their quantization statistics."""
    import torch

    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
        state = getattr(tensor, "quant_state", None)
        while state is not None:  # NF4: absmax per block (and, double-quantized, its own statistics)
            total += sum(t.numel() * t.element_size() for t in (state.absmax, state.code) if torch.is_tensor(t))
            state = getattr(state, "state2", None)
    return total


def stream_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Bytes/s of a streaming read of ``nbytes`` (torch's ``sum`` on every thread), best of ``repeats``."""
    import torch

    buffer = torch.ones(nbytes // 4)
    best = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def decode_rate(run) -> tuple[float, list[int]]:
    """Tokens/s from the first token to the last of ``run(on_token)``, and the tokens."""
    stamps: list[float] = []
    tokens = run(lambda: stamps.append(time.perf_counter()))
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), tokens


def contenders(reference, load, folder: Path, n: int, four_bit: bool) -> dict:
    """The runs to time: transformers' ``generate`` on ``reference``, each engine on a base of its own from
    ``load`` (an engine wraps the layers of the base it is given)."""
    import torch
    from transformers import StoppingCriteria

    from hub_peft.chat import encode_prompt, prompt_template
    from hub_peft.modeling import GREEDY_GENERATE
    from hub_peft.serving import MultiAdapterModel

    model, tokenizer = reference
    engine = MultiAdapterModel(load())
    engine.add("lora", folder)
    ids = torch.tensor([encode_prompt(tokenizer, PROMPT, prompt_template(tokenizer))])

    class Stamp(StoppingCriteria):
        def __init__(self, tick) -> None:
            self.tick = tick

        def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
            self.tick()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    def transformers_generate(tick) -> list[int]:
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                pad_token_id=tokenizer.eos_token_id,
                stopping_criteria=[Stamp(tick)],
                **GREEDY_GENERATE,
            )
        return out[0, ids.shape[1] :].tolist()

    def engine_run(adapter, engine=engine):
        def run(tick) -> list[int]:
            done = engine.generate_tokens(
                [PROMPT], [adapter], max_new_tokens=n, ignore_eos=True, on_token=lambda i, token: tick()
            )
            return done[0].tokens

        return run

    runs = {
        "transformers generate, bare": transformers_generate,
        "hub_peft engine, bare": engine_run(None),
        "hub_peft engine, 1 LoRA": engine_run("lora"),
    }
    transformers_steps = MultiAdapterModel(load(), lean_decode=False)  # every step through transformers' forward
    transformers_steps.add("lora", folder)
    runs["engine, 1 LoRA, no lean step"] = engine_run("lora", transformers_steps)
    int8_head = MultiAdapterModel(load(), head_bits=8)  # opt-in: the head read in 8 bits (changes the logits)
    int8_head.add("lora", folder)
    runs["engine, 1 LoRA, 8-bit head"] = engine_run("lora", int8_head)
    if four_bit:  # the engine's NF4 decode before the fused kernel: bitsandbytes' dequantize-then-matmul
        dequantizing = MultiAdapterModel(load(), fused=False)
        dequantizing.add("lora", folder)
        runs["engine, 1 LoRA, bnb dequantize"] = engine_run("lora", dequantizing)
    return runs


def llama_cpp_run(peer: LlamaCpp, four_bit: bool, folder: Path, out: Path, n: int, ids: list[int]):
    """llama-server with one slot on the converted base and LoRA: the server process and a run that streams ``n``
    tokens after the prompt ``ids`` with the LoRA applied (EOS ignored, greedy)."""
    import httpx

    from hub_peft.base_model import embedded_model_dir
    from hub_peft.hub.process import free_port

    base_dir = embedded_model_dir()
    model = peer.base(base_dir, out, "Q4_1" if four_bit else None)
    port = free_port()
    command = [*peer.command(model, [peer.lora(base_dir, folder, out)], parallel=1), "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, timeout=300)
    except RuntimeError:
        process.kill()
        raise
    body = {"prompt": ids, "n_predict": n, "ignore_eos": True, "temperature": 0, "stream": True}
    body |= {"return_tokens": True, "cache_prompt": False, "lora": [{"id": 0, "scale": 1.0}]}

    def run(tick) -> list[int]:
        tokens: list[int] = []
        with httpx.stream("POST", f"{url}/completion", json=body, timeout=600) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    for token in json.loads(line[6:]).get("tokens") or []:
                        tick()
                        tokens.append(token)
        return tokens

    return process, run


def measure(
    label: str, four_bit: bool, folder: Path, n: int, repeats: int, peer: LlamaCpp | None, out: Path
) -> dict[str, float]:
    from hub_peft.base_model import load_base_model
    from hub_peft.chat import encode_prompt, prompt_template

    def load():
        return load_base_model(None, load_in_4bit=four_bit)

    reference = load()
    nbytes = bytes_per_token(reference[0])
    bandwidth = stream_bandwidth(nbytes)
    limit = bandwidth / nbytes
    print(
        f"\n{label}: {nbytes / 1e6:.0f} MB read per token; stream read {bandwidth / 1e9:.1f} GB/s; "
        f"limit {limit:.1f} tok/s"
    )
    runs = contenders(reference, load, folder, n, four_bit)
    server = None
    if peer is not None:
        ids = encode_prompt(reference[1], PROMPT, prompt_template(reference[1]))
        server, runs["llama.cpp, 1 LoRA"] = llama_cpp_run(peer, four_bit, folder, out, n, ids)
    try:
        best, tokens = time_runs(runs, repeats)
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
    for name, rate in best.items():
        print(f"  {name:<30} {rate:6.1f} tok/s  {rate / limit:5.2f} of the limit")
    same = tokens["hub_peft engine, bare"] == tokens["transformers generate, bare"]
    print(f"  engine's greedy tokens equal transformers' (bare): {same}")
    lean = tokens["hub_peft engine, 1 LoRA"] == tokens["engine, 1 LoRA, no lean step"]
    print(f"  lean step's greedy tokens equal transformers' forward's (1 LoRA): {lean}")
    if four_bit:
        fused = tokens["hub_peft engine, 1 LoRA"] == tokens["engine, 1 LoRA, bnb dequantize"]
        print(f"  fused kernel's greedy tokens equal bitsandbytes' path (1 LoRA): {fused}")
    if peer is not None:
        same = tokens["llama.cpp, 1 LoRA"] == tokens["hub_peft engine, 1 LoRA"]
        print(f"  llama.cpp's greedy tokens equal the engine's (1 LoRA): {same}")
    return {"limit": limit, **best}


def time_runs(runs: dict, repeats: int) -> tuple[dict[str, float], dict[str, list[int]]]:
    """Best tokens/s of each run over ``repeats`` rounds (alternating), after one warm-up round; the tokens."""
    for run in runs.values():  # warm-up: first-step timings (the packed head), caches
        decode_rate(run)
    best: dict[str, float] = dict.fromkeys(runs, 0.0)
    tokens: dict[str, list[int]] = {}
    for _ in range(repeats):
        for name, run in runs.items():
            rate, tokens[name] = decode_rate(run)
            best[name] = max(best[name], rate)
    return best, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--llama-cpp", default=None, help="llama.cpp's source folder with llama-server built (opt-in).")
    parser.add_argument("--convert-python", default=sys.executable, help="A Python for llama.cpp's converters.")
    args = parser.parse_args()
    peer = LlamaCpp(args.llama_cpp, args.convert_python) if args.llama_cpp else None
    import torch

    from hub_peft.base_model import load_base_model

    print(f"CPU: {cpu_description()}; torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = load_base_model(None, load_in_4bit=False)
        folder = make_adapters(fp32[0], Path(tmp), 1)[0]
        del fp32
        full = measure("fp32", False, folder, args.tokens, args.repeats, peer, Path(tmp))
        nf4 = measure("NF4", True, folder, args.tokens, args.repeats, peer, Path(tmp))
    key, peer_key = "hub_peft engine, 1 LoRA", "llama.cpp, 1 LoRA"
    checks = [
        ("fp32 engine >= 0.75 of its limit", full[key] / full["limit"], 0.75),
        ("NF4 engine >= 0.5 of its own limit", nf4[key] / nf4["limit"], 0.5),
        ("NF4 engine >= 1.5x fp32 engine", nf4[key] / full[key], 1.5),
    ]
    if peer is not None:
        checks += [
            ("fp32 engine >= llama.cpp F32", full[key] / full[peer_key], 1.0),
            ("NF4 engine >= llama.cpp Q4_1", nf4[key] / nf4[peer_key], 1.0),
        ]
    print("\ntargets (one LoRA):")
    for what, value, target in checks:
        print(f"  {what}: {value:.2f} -> {'met' if value >= target else 'NOT met'}")


if __name__ == "__main__":
    main()
