"""Which grammar engine for structured output: llguidance or xgrammar, on the work the server gives it.

Same tokenizer (the embedded SmolLM2-135M-Instruct's, 49,152 tokens), same constraints, in one process,
alternating: for each constraint (a JSON schema of a small record, a forced tool call, OpenAI's ``json_object``,
a regex), the time to compile it cold (a new compiler's first compile of that constraint) and the time per generated
token to compute the allowed-token mask and advance the matcher, walking a valid answer token by token (the
server's per-row work at every step); median over ``--repeats``. Also the installed size of each package with what
it pulls in (xgrammar requires torch's ``triton``).

Run: .venv/bin/python benchmarks/grammar.py [--repeats 5]   (needs ``pip install xgrammar``; llguidance is a
dependency of hub_peft)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _machine import cpu_description

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {
        "name": {"const": "get_weather"},
        "arguments": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "arguments"],
    "additionalProperties": False,
}
CASES = {
    "json_schema": (
        ("json", PERSON),
        '{"name": "Ada Lovelace", "age": 36, "email": "ada@example.org", "tags": ["math", "poetry"]}',
    ),
    "tool_call": (("json", WEATHER), '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'),
    "json_object": (("json", {"type": "object"}), '{"answer": [1, 2, 3], "ok": true, "note": "fine"}'),
    "regex": (("regex", r"\d{3}-\d{4} [A-Z][a-z]+"), "555-1234 Smith"),
}


def size_mb(dist: str, seen: set[str] | None = None) -> float:
    """Installed megabytes of ``dist`` and everything it requires that hub_peft does not already install."""
    seen = set() if seen is None else seen
    key = dist.lower().replace("_", "-")
    if key in seen or key in ("torch", "numpy", "pydantic", "transformers", "typing-extensions"):
        return 0.0
    seen.add(key)
    try:
        d = metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        return 0.0
    total = sum(f.size or 0 for f in d.files or []) / 2**20
    for req in d.requires or []:
        if "extra ==" in req:
            continue
        name = req.split(";")[0].split("[")[0]
        for sep in "<>=!~ ":
            name = name.split(sep)[0]
        total += size_mb(name.strip(), seen)
    return total


class Llg:
    name = "llguidance"

    def __init__(self, tokenizer) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg, self.torch = llguidance, llguidance.torch
        self.tok = llguidance.hf.from_tokenizer(tokenizer)
        self.mask = llguidance.torch.allocate_token_bitmask(1, self.tok.vocab_size)

    def compile(self, kind: str, spec) -> object:
        if kind == "json":
            grammar = self.llg.LLMatcher.grammar_from_json_schema(json.dumps(spec))
        else:
            grammar = self.llg.LLMatcher.grammar_from_regex(spec)
        matcher = self.llg.LLMatcher(self.tok, grammar)
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    def walk(self, matcher, ids: list[int]) -> None:
        for t in ids:
            self.torch.fill_next_token_bitmask(matcher, self.mask, 0)
            assert matcher.consume_token(t), matcher.get_error()


class Xgr:
    name = "xgrammar"

    def __init__(self, tokenizer) -> None:
        import xgrammar

        self.xgr = xgrammar
        self.info = xgrammar.TokenizerInfo.from_huggingface(tokenizer)
        self.mask = xgrammar.allocate_token_bitmask(1, self.info.vocab_size)

    def compile(self, kind: str, spec) -> object:
        compiler = self.xgr.GrammarCompiler(self.info, cache_enabled=False)
        if kind == "json":
            compiled = compiler.compile_json_schema(json.dumps(spec), any_whitespace=False)
        else:
            compiled = compiler.compile_regex(spec)
        return self.xgr.GrammarMatcher(compiled)

    def walk(self, matcher, ids: list[int]) -> None:
        for t in ids:
            matcher.fill_next_token_bitmask(self.mask)
            assert matcher.accept_token(t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from hub_peft.base_model import load_base_model

    print(cpu_description())
    _, tokenizer = load_base_model(None, load_in_4bit=False)
    engines = [Llg(tokenizer), Xgr(tokenizer)]
    print(f"installed size: llguidance {size_mb('llguidance'):.0f} MB, xgrammar {size_mb('xgrammar'):.0f} MB")
    print(f"{'constraint':12} {'tokens':>6} | " + " | ".join(f"{e.name:>10} compile ms, µs/token" for e in engines))
    for case, ((kind, spec), answer) in CASES.items():
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        compile_ms: dict[str, list[float]] = {e.name: [] for e in engines}
        per_token: dict[str, list[float]] = {e.name: [] for e in engines}
        for _ in range(args.repeats):
            for e in engines:  # alternating
                started = time.perf_counter()
                matcher = e.compile(kind, spec)
                compiled = time.perf_counter()
                e.walk(matcher, ids)
                compile_ms[e.name].append((compiled - started) * 1e3)
                per_token[e.name].append((time.perf_counter() - compiled) / len(ids) * 1e6)
        cells = [
            f"{statistics.median(compile_ms[e.name]):>21.1f} {statistics.median(per_token[e.name]):>9.0f}"
            for e in engines
        ]
        print(f"{case:12} {len(ids):>6} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
