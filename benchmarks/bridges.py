"""Bridges: merging, per-request merges, and GGUF export against llama.cpp's own converter.

SmolLM2-135M-Instruct (float32) and two rank-16 LoRAs on every linear layer of its decoder blocks (the second an
rsLoRA). Three sections, each side by side in one run:

1. **Merge**: ``hub-peft merge`` (PEFT's ``add_weighted_adapter`` on a zero-memory skeleton of the base) against
   PEFT's own route (load the base, load both adapters, ``add_weighted_adapter``, save), for ``cat``, ``ties`` and
   ``svd``: wall time and peak resident memory, each in a fresh process (alternating, best of ``--repeats``), and
   whether the two give the same tensors.
2. **Per-request merge in the engine**: 8 greedy rows of 32 tokens, ``{"a": 0.5, "b": 0.5}`` as a weighted mix
   (both LoRAs applied per row) against the same mix merged by TIES (one rank-16 LoRA per row); and the first
   merge's cost (computed once, then reused).
3. **GGUF export** (with ``--llama-cpp DIR --convert-python PY``): ``hub-peft export`` against llama.cpp's
   ``convert_lora_to_gguf.py`` for a plain LoRA, the rsLoRA and a LoRA with an ``alpha_pattern``: wall time as
   commands (fresh processes, alternating), and how far each file's update ``scale·B·A`` (as llama.cpp computes it)
   is from PEFT's ``get_delta_weight``.

Run: .venv/bin/python benchmarks/bridges.py [--llama-cpp DIR --convert-python PY] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _machine import cpu_description

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = {"cat": {}, "ties": {"density": 0.5}, "svd": {}}

PEFT_ROUTE = """
import sys, torch, resource
from peft import PeftModel
from hub_peft import load_base_model
a, b, method, density, out = sys.argv[1:6]
model = PeftModel.from_pretrained(load_base_model(None)[0], a, adapter_name="a")
model.load_adapter(b, adapter_name="b")
kwargs = {"density": float(density)} if density != "-" else {}
torch.manual_seed(0)
model.add_weighted_adapter(["a", "b"], [0.6, 0.4], "merged", combination_type=method, **kwargs)
model.save_pretrained(out, selected_adapters=["merged"])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
HUB_PEFT_ROUTE = """
import sys, resource
from hub_peft.bridges import MergeSpec, merge_adapters
a, b, method, density, out = sys.argv[1:6]
spec = MergeSpec(method, float(density)) if density != "-" else MergeSpec(method)
merge_adapters([a, b], [0.6, 0.4], out, spec)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def timed(command: list[str], env: dict | None = None) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return time.perf_counter() - start, done.stdout


def make_adapters(root: Path) -> dict[str, Path]:
    import torch
    from peft import LoraConfig, get_peft_model

    from hub_peft import load_base_model, save_adapter

    configs = {
        "a": {"r": 16, "lora_alpha": 32},
        "b": {"r": 16, "lora_alpha": 8, "use_rslora": True},
        "pattern": {"r": 16, "lora_alpha": 32, "alpha_pattern": {"v_proj": 8}},
    }
    folders = {}
    for seed, (name, kwargs) in enumerate(configs.items()):
        torch.manual_seed(seed)
        model = get_peft_model(
            load_base_model(None)[0], LoraConfig(target_modules=TARGETS, init_lora_weights=False, **kwargs)
        )
        with torch.no_grad():
            for key, p in model.named_parameters():
                if "lora_B" in key:
                    p.mul_(0.3)
        folders[name] = save_adapter(model, root / name)
    return folders


def section_merge(folders: dict[str, Path], root: Path, repeats: int) -> None:
    import torch
    from safetensors.torch import load_file

    print("\n## 1. Merge two rank-16 LoRAs (weights 0.6, 0.4): hub-peft merge vs PEFT on the loaded base")
    from hub_peft.base_model import resolve_base

    checkpoint = sum(p.stat().st_size for p in Path(resolve_base(None)[1]).glob("*.safetensors"))
    print(
        f"base weights read: hub-peft merge none (a skeleton from config.json); PEFT route the whole checkpoint, "
        f"{checkpoint / 2**20:.0f} MiB (mmapped: its pages count in RSS only as far as they are touched)"
    )
    print("| method | hub-peft merge | PEFT route | ratio | peak RSS hub_peft | peak RSS PEFT | same tensors |")
    print("|---|---|---|---|---|---|---|")
    for method, kwargs in METHODS.items():
        density = str(kwargs.get("density", "-"))
        best = {"hub_peft": (1e9, 0), "peft": (1e9, 0)}
        for i in range(repeats):
            for route, script in (("hub_peft", HUB_PEFT_ROUTE), ("peft", PEFT_ROUTE)):
                out = root / f"{route}-{method}-{i}"
                seconds, printed = timed(
                    [sys.executable, "-c", script, str(folders["a"]), str(folders["b"]), method, density, str(out)]
                )
                rss = int(printed.strip().splitlines()[-1]) * 1024
                best[route] = min(best[route], (seconds, rss))
        ours = load_file(str(root / f"hub_peft-{method}-0" / "adapter_model.safetensors"))
        theirs = load_file(str(root / f"peft-{method}-0" / "merged" / "adapter_model.safetensors"))
        same = set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
        (t1, m1), (t2, m2) = best["hub_peft"], best["peft"]
        print(
            f"| {method} | {t1:.2f} s | {t2:.2f} s | {t2 / t1:.2f}x | {m1 / 2**20:.0f} MiB | {m2 / 2**20:.0f} MiB |"
            f" {same} |"
        )


def section_large_base(root: Path) -> None:
    """hub-peft merge on a base of Llama-3.1-8B's shape whose weights are not on this machine at all."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    base = root / "llama-8b-config-only"
    base.mkdir()
    LlamaConfig(  # Llama-3.1-8B's shape; only config.json is written
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
    ).save_pretrained(base)
    shapes = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096)}
    parents = []
    for seed in range(2):
        folder = root / f"8b-lora-{seed}"
        folder.mkdir()
        torch.manual_seed(seed)
        tensors = {}
        for layer in range(32):
            for module, (out, inp) in shapes.items():
                key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(16, inp) * 0.01
                tensors[f"{key}.lora_B.weight"] = torch.randn(out, 16) * 0.01
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = {
            "peft_type": "LORA",
            "r": 16,
            "lora_alpha": 32,
            "target_modules": list(shapes),
            "base_model_name_or_path": str(base),
            "task_type": "CAUSAL_LM",
        }
        (folder / "adapter_config.json").write_text(json.dumps(config))
        parents.append(folder)
    print("\n## 1b. The same merge on a base of Llama-3.1-8B's shape (only its config.json on disk)")
    print(
        "PEFT's route would load the 8B checkpoint first (16 GB in bfloat16, 32 GB in float32; this machine has 24 GB):"
    )
    print("not run. hub-peft merge builds the skeleton from config.json:")
    for method, kwargs in (("cat", {}), ("ties", {"density": 0.5})):
        density = str(kwargs.get("density", "-"))
        out = root / f"8b-{method}"
        seconds, printed = timed(
            [sys.executable, "-c", HUB_PEFT_ROUTE, str(parents[0]), str(parents[1]), method, density, str(out)]
        )
        rss = int(printed.strip().splitlines()[-1]) / 1024
        size = (out / "adapter_model.safetensors").stat().st_size / 2**20
        print(f"- {method}: {seconds:.1f} s, peak RSS {rss:.0f} MiB, merged adapter {size:.0f} MiB")


def section_engine(folders: dict[str, Path], repeats: int) -> None:
    from hub_peft import load_base_model
    from hub_peft.bridges import MergeSpec
    from hub_peft.serving import MultiAdapterModel

    print("\n## 2. Per-request merge in the engine: 8 rows x 32 greedy tokens")
    engine = MultiAdapterModel(load_base_model(None), max_running=8)
    engine.add("a", folders["a"])
    engine.add("b", folders["b"])
    mix = {"a": 0.5, "b": 0.5}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        merged = engine.merge(mix, MergeSpec("ties", density=0.5), Path(tmp))
        first = time.perf_counter() - start
        start = time.perf_counter()
        assert engine.merge(mix, MergeSpec("ties", density=0.5), Path(tmp)) == merged
        again = time.perf_counter() - start
        prompts = [f"Tell me a fact about the number {i}." for i in range(8)]
        best = {"mix": 1e9, "merged": 1e9}
        for _ in range(repeats):
            for label, spec in (("mix", mix), ("merged", merged)):
                start = time.perf_counter()
                out = engine.generate_tokens(prompts, [spec] * 8, max_new_tokens=32, ignore_eos=True)
                best[label] = min(best[label], time.perf_counter() - start)
                assert all(len(c.tokens) == 32 for c in out)
        tokens = 8 * 32
        print(
            f"first merge (TIES, computed and loaded): {first * 1000:.0f} ms; the same merge again: "
            f"{again * 1000:.2f} ms (reused)"
        )
        print(
            f"weighted mix of 2 LoRAs: {tokens / best['mix']:.1f} tok/s; their TIES merge: "
            f"{tokens / best['merged']:.1f} tok/s ({best['mix'] / best['merged']:.2f}x)"
        )


def section_gguf(folders: dict[str, Path], root: Path, llama_cpp: str, convert_python: str, repeats: int) -> None:
    import torch
    from peft import PeftModel

    from hub_peft import load_base_model
    from hub_peft.base_model import resolve_base
    from hub_peft.bridges.gguf import read_gguf_lora

    source = Path(llama_cpp)
    env = {**os.environ, "PYTHONPATH": str(source / "gguf-py")}
    base_dir = resolve_base(None)[1]
    print("\n## 3. GGUF export: hub-peft export vs llama.cpp's convert_lora_to_gguf.py")
    print(
        "| adapter | hub-peft export | convert_lora_to_gguf.py | ratio | worst rel. error of scale*B*A vs PEFT: "
        "hub_peft | llama.cpp's |"
    )
    print("|---|---|---|---|---|---|")
    hub_peft_cli = str(Path(sys.executable).parent / "hub-peft")
    for name in ("a", "b", "pattern"):
        best = {"ours": 1e9, "theirs": 1e9}
        for i in range(repeats):
            ours, theirs = root / f"{name}-ours-{i}.gguf", root / f"{name}-theirs-{i}.gguf"
            seconds, _ = timed([hub_peft_cli, "export", str(folders[name]), "--to", "gguf", "--out", str(ours)])
            best["ours"] = min(best["ours"], seconds)
            command = [convert_python, str(source / "convert_lora_to_gguf.py"), "--base", base_dir, "--outtype", "f32"]
            seconds, _ = timed([*command, "--outfile", str(theirs), str(folders[name])], env=env)
            best["theirs"] = min(best["theirs"], seconds)
        model = PeftModel.from_pretrained(load_base_model(None)[0], str(folders[name]))
        errors = {}
        for label in ("ours", "theirs"):
            data = read_gguf_lora(root / f"{name}-{label}-0.gguf")
            alpha = float(data["metadata"]["adapter.lora.alpha"])
            worst = 0.0
            for layer in range(3):  # v_proj and down_proj rows are not permuted: compare those
                for module, gguf_name in (("self_attn.v_proj", "attn_v"), ("mlp.down_proj", "ffn_down")):
                    a = torch.from_numpy(data["tensors"][f"blk.{layer}.{gguf_name}.weight.lora_a"].copy()).float()
                    b = torch.from_numpy(data["tensors"][f"blk.{layer}.{gguf_name}.weight.lora_b"].copy()).float()
                    scale = alpha / b.shape[1] if alpha else 1.0
                    peft = model.get_submodule(f"base_model.model.model.layers.{layer}.{module}")
                    truth = peft.get_delta_weight("default")
                    worst = max(worst, float(torch.linalg.norm(scale * b @ a - truth) / torch.linalg.norm(truth)))
            errors[label] = worst
        label = {"a": "plain LoRA", "b": "rsLoRA", "pattern": "alpha_pattern"}[name]
        print(
            f"| {label} | {best['ours']:.2f} s | {best['theirs']:.2f} s | {best['theirs'] / best['ours']:.2f}x |"
            f" {errors['ours']:.1e} | {errors['theirs']:.1e} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llama-cpp", default=None, help="llama.cpp source folder (build_llama_server.sh prints it)")
    parser.add_argument("--convert-python", default=None, help="a Python with torch, transformers, sentencepiece")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"CPU: {cpu_description()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folders = make_adapters(root / "adapters")
        section_merge(folders, root, args.repeats)
        section_large_base(root)
        section_engine(folders, args.repeats)
        if args.llama_cpp:
            section_gguf(folders, root, args.llama_cpp, args.convert_python or sys.executable, args.repeats)
    print(f"\n(this process's peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)")


if __name__ == "__main__":
    main()
