"""Hostile adapter folders: adapters come from a Hub anyone can upload to, so each file is untrusted data.

Each hostile folder is a real small adapter (a seeded 2-layer Llama's LoRA or ReFT) with one thing made wrong.
``validate_adapter`` and ``hub-peft validate`` report it (never OK, never a traceback), ``load_adapter`` refuses
it with a hub_peft error, quickly; a regex ``target_modules`` is matched with a bound (the regex cases run in a
child process with a timeout, so a regression fails instead of hanging the suite), and legitimate regexes load
exactly as plain PEFT loads them.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_peft_methods import tiny_llama_config

from hub_peft import load_adapter
from hub_peft.adapters import check_adapter_folder
from hub_peft.cli import main
from hub_peft.errors import IncompatibleAdapterError, InvalidInputError
from hub_peft.target_regex import pasted_problem
from hub_peft.targets import expand_target_modules
from hub_peft.validate import validate_adapter

IDS = torch.tensor([[5, 9, 17, 33, 40, 7]])
QUICK_S = 10.0  # a refusal takes well under this (a regex's whole budget is 1 s)
DROP = object()  # a config value that removes the field


def tiny_llama(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A seeded 2-layer Llama, saved in a folder."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_llama_config(hidden_size=32)
    folder = tmp_path_factory.mktemp("tiny_llama")
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def save_peft(base_dir: Path, folder: Path, config) -> Path:
    from peft import get_peft_model

    torch.manual_seed(3)
    get_peft_model(tiny_llama(base_dir), config).save_pretrained(folder)
    return folder


def lora_config(**kwargs):
    from peft import LoraConfig

    return LoraConfig(
        **{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False, **kwargs}
    )


@pytest.fixture(scope="module")
def lora_dir(base_dir, tmp_path_factory) -> Path:
    """A rank-4 LoRA on q_proj and v_proj, as PEFT saves it."""
    return save_peft(base_dir, tmp_path_factory.mktemp("lora") / "adapter", lora_config())


@pytest.fixture(scope="module")
def reft_dir(base_dir, tmp_path_factory) -> Path:
    """A rank-2 LoReFT adapter on both layers, as hub_peft saves it."""
    from hub_peft.reft import ReftConfig, get_reft_model

    torch.manual_seed(4)
    folder = tmp_path_factory.mktemp("reft") / "adapter"
    get_reft_model(tiny_llama(base_dir), ReftConfig(layers=[0, 1], rank=2)).save_pretrained(folder)
    return folder


def hostile(src: Path, dst: Path, changes: dict | None = None, *, config_text: str | None = None) -> Path:
    """A copy of the adapter ``src`` at ``dst`` with its config's fields changed (DROP removes one), or the config
    file replaced by ``config_text``."""
    shutil.copytree(src, dst)
    path = dst / "adapter_config.json"
    if config_text is None:
        config = json.loads(path.read_text())
        for key, value in (changes or {}).items():
            config.pop(key) if value is DROP else config.__setitem__(key, value)
        config_text = json.dumps(config)
    path.write_text(config_text)
    return dst


def write_weights(
    folder: Path, header: dict | list | str | bytes, data_len: int = 0, length: int | None = None
) -> None:
    """Replace the folder's adapter_model.safetensors with a raw ``header`` (JSON, or text as it is) and
    ``data_len`` zero bytes of data; ``length``: the header length written in the first 8 bytes."""
    raw = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    blob = struct.pack("<Q", len(raw) if length is None else length) + raw + b"\0" * data_len
    (folder / "adapter_model.safetensors").write_bytes(blob)


@pytest.fixture
def refused(base_dir, capsys):
    """``refused(folder, needle, error)``: validate reports a problem holding ``needle``, ``hub-peft validate``
    says FAIL (exit code 1, no OK, no traceback: an exception would fail the test), and load_adapter raises
    ``error`` quickly (with ``load_kwargs``, validate_adapter takes its ``max_bytes`` and the command is left out)."""

    def check(folder: Path, needle: str, error: type[Exception] = InvalidInputError, **load_kwargs) -> str:
        report = validate_adapter(folder, **{k: v for k, v in load_kwargs.items() if k == "max_bytes"})
        problems = " | ".join(str(p) for p in report.problems)
        assert not report.ok and needle in problems, problems
        if not load_kwargs:  # the command takes the default limits
            capsys.readouterr()
            assert main(["validate", str(folder)]) == 1
            out = capsys.readouterr().out
            assert "FAIL:" in out and "fix:" in out and "OK:" not in out, out
        model = tiny_llama(base_dir)
        start = time.monotonic()
        with pytest.raises(error) as caught:
            load_adapter(model, folder, **load_kwargs)
        assert time.monotonic() - start < QUICK_S
        return str(caught.value)

    return check


# -- the config ------------------------------------------------------------------------------------------------


def test_the_untouched_adapters_are_valid_and_load(base_dir, lora_dir, reft_dir, capsys):
    """The hostile folders below are these with one thing made wrong."""
    from hub_peft.reft import ReftModel

    for folder in (lora_dir, reft_dir):
        assert validate_adapter(folder).ok and main(["validate", str(folder)]) == 0
    assert capsys.readouterr().out.count("OK: ") == 2
    assert lora_modules(load_adapter(tiny_llama(base_dir), lora_dir))
    assert isinstance(load_adapter(tiny_llama(base_dir), reft_dir), ReftModel)


CONFIG_CASES = {
    "target_modules is a number": ({"target_modules": 5}, "target_modules must be"),
    "target_modules holds a number": ({"target_modules": ["q_proj", 5]}, "target_modules must be"),
    "exclude_modules is a number": ({"exclude_modules": 3}, "exclude_modules must be"),
    "regex over 1000 characters": ({"target_modules": "a" * 1001}, "too costly"),
    "regex that unrolls to millions": ({"target_modules": "(?:a{1000}){1000}"}, "too costly"),
    "not a regex": ({"target_modules": "(q_proj"}, "not a valid regular expression"),
    "r of three million over rank-4 weights": ({"r": 3_000_000}, "not an integer from 1 to 65536"),
    "r over rank-4 weights": ({"r": 8}, "has rank 4"),
    "r is a boolean": ({"r": True}, "r is True"),
    "r is a string": ({"r": "4"}, "r is '4'"),
    "r is negative": ({"r": -4}, "r is -4"),
    "lora_alpha is a string": ({"lora_alpha": "x"}, "lora_alpha is 'x'"),
    "rank_pattern of three million": ({"rank_pattern": {"q_proj": 3_000_000}}, "rank_pattern gives 'q_proj'"),
    "rank_pattern against the weights": ({"rank_pattern": {"v_proj": 8}}, "rank_pattern['v_proj']"),
    "rank_pattern regex with nested quantifiers": ({"rank_pattern": {"(a+)+$": 4}}, "a quantifier on a group"),
    "rank_pattern is a list": ({"rank_pattern": [4]}, "rank_pattern is a list"),
    "alpha_pattern of a string": ({"alpha_pattern": {"q_proj": "8"}}, "alpha_pattern gives 'q_proj'"),
    "modules_to_save regex": ({"modules_to_save": ["(x+x+)+y"]}, "modules_to_save entry"),
    "modules_to_save is a string": ({"modules_to_save": "lm_head"}, "modules_to_save is a str"),
    "layers_pattern regex": ({"layers_pattern": ".*.*.*.*x", "layers_to_transform": [0]}, "4 quantifiers"),
    "layers_to_transform is a string": ({"layers_to_transform": "0"}, "layers_to_transform is '0'"),
    "r is missing a type": ({"r": None}, "r is None"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_a_bad_config_is_reported_and_refused(case, lora_dir, tmp_path, refused):
    changes, needle = CONFIG_CASES[case]
    refused(hostile(lora_dir, tmp_path / "a", changes), needle)


CONFIG_TEXTS = {
    "not an object": ("[1, 2]", "not an object"),
    "not JSON": ("{", "not valid JSON"),
    "NaN": ('{"peft_type": "LORA", "lora_alpha": NaN}', "does not allow"),
    "a key twice": ('{"peft_type": "LORA", "r": 4, "r": 3000000}', "names 'r' twice"),
    "deep nesting": ("[" * 100_000, "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_TEXTS))
def test_a_config_that_is_not_a_json_object_is_reported_and_refused(case, lora_dir, tmp_path, refused):
    text, needle = CONFIG_TEXTS[case]
    refused(hostile(lora_dir, tmp_path / "a", config_text=text), needle)


def test_an_infinite_lora_alpha_is_refused(lora_dir, tmp_path, refused):
    text = (lora_dir / "adapter_config.json").read_text()
    config = json.loads(text)
    config["lora_alpha"] = 12345
    refused(
        hostile(lora_dir, tmp_path / "a", config_text=json.dumps(config).replace("12345", "1e400")), "lora_alpha is inf"
    )


def test_check_adapter_folder_turns_a_report_into_a_hub_peft_error(lora_dir, tmp_path):
    with pytest.raises(InvalidInputError, match="has rank 4"):
        check_adapter_folder(hostile(lora_dir, tmp_path / "a", {"r": 16}))
    with pytest.raises(InvalidInputError, match="corrupt or truncated"):
        folder = hostile(lora_dir, tmp_path / "b")
        write_weights(folder, {"t": {"dtype": "F32", "shape": [100_000, 100_000], "data_offsets": [0, 1024]}}, 1024)
        check_adapter_folder(folder)


# -- the weights' header ---------------------------------------------------------------------------------------


def f32(n: int, start: int = 0) -> dict:
    return {"dtype": "F32", "shape": [n], "data_offsets": [start, start + 4 * n]}


HEADERS = {
    "an entry that is no object": ({"t": 5}, 0, "is not an object with dtype"),
    "an unknown dtype": ({"t": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, 4, "unknown dtype 'F99'"),
    "a dtype that is no string": ({"t": {"dtype": 4, "shape": [1], "data_offsets": [0, 4]}}, 4, "unknown dtype 4"),
    "a negative dimension": ({"t": {"dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 16]}}, 16, "the shape"),
    "a boolean dimension": ({"t": {"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 16]}}, 16, "the shape"),
    "a fractional dimension": ({"t": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}, 4, "the shape"),
    "a shape that is a string": ({"t": {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}}, 16, "the shape"),
    "one data offset": ({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, 4, "not two integers"),
    "an offset that is a string": (
        {"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, "4"]}},
        4,
        "not two integers",
    ),
    "offsets in reverse": ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, 8, "points past"),
    "offsets past the end": ({"t": f32(4)}, 8, "points past"),
    "a 100000 x 100000 shape in 1 KB": (
        {"t": {"dtype": "F32", "shape": [100_000, 100_000], "data_offsets": [0, 1024]}},
        1024,
        "needs 40000000000 bytes",
    ),
    "overlapping tensors": ({"a": f32(2), "b": f32(2, 4)}, 12, "overlaps"),
    "a gap": ({"a": f32(2, 4)}, 12, "starts 4 bytes after"),
    "bytes after the last tensor": ({"a": f32(2)}, 12, "4 bytes after the last tensor"),
    "metadata of numbers": ({"__metadata__": {"format": 1}, "a": f32(1)}, 4, "__metadata__"),
    "a list": ([1, 2], 0, "not a JSON object"),
    "a key twice": ('{"a": ' + json.dumps(f32(1)) + ', "a": ' + json.dumps(f32(1)) + "}", 4, "names 'a' twice"),
    "NaN": ('{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}', 4, "does not allow"),
    "deep nesting": ("[" * 100_000, 0, "not valid JSON"),
    "not UTF-8": (b'{"\xff": 1}', 0, "not valid JSON"),
    "over 100000 tensors": ({f"t{i}": {} for i in range(100_001)}, 0, "100001 tensors, over hub_peft's limit"),
    "seventeen dimensions": ({"t": {"dtype": "F32", "shape": [1] * 17, "data_offsets": [0, 4]}}, 4, "16"),
    "a dimension of 2**64": ({"t": {"dtype": "U8", "shape": [2**64, 0], "data_offsets": [0, 0]}}, 0, "the shape"),
}


@pytest.mark.parametrize("case", sorted(HEADERS))
def test_a_bad_safetensors_header_is_reported_and_refused(case, lora_dir, tmp_path, refused):
    header, data_len, needle = HEADERS[case]
    folder = hostile(lora_dir, tmp_path / "a")
    write_weights(folder, header, data_len)
    refused(folder, needle)


def test_a_header_length_past_the_file_or_over_16_mib_is_refused(lora_dir, tmp_path, refused):
    folder = hostile(lora_dir, tmp_path / "a")
    write_weights(folder, {"a": f32(1)}, 4, length=2**40)
    refused(folder, "does not fit")
    write_weights(folder, " " * (17 * 2**20), 0)
    refused(folder, "over hub_peft's limit of 16777216")


# -- memory ----------------------------------------------------------------------------------------------------


def test_an_adapter_over_the_memory_budget_is_refused_before_any_tensor_is_read(lora_dir, tmp_path, refused):
    message = refused(lora_dir, "over the limit of 0.0 MiB", max_bytes=1024)
    assert "max_bytes" in message


def test_a_config_that_builds_big_matrices_for_modules_without_weights_is_refused(base_dir, lora_dir, tmp_path):
    """Rank 65536 for every linear layer but q/v_proj, whose saved weights (rank 4, from rank_pattern) are
    consistent: PEFT would build ~200 MiB of matrices the file has no weights for (~a GB per layer on a real
    model). Nothing in the folder alone is wrong; load_adapter counts what PEFT builds against its budget."""
    folder = hostile(
        lora_dir,
        tmp_path / "a",
        {"r": 65536, "target_modules": "all-linear", "rank_pattern": {"q_proj": 4, "v_proj": 4}},
    )
    assert validate_adapter(folder).ok
    with pytest.raises(InvalidInputError, match=r"needs about 2\d\d\.\d MiB .* over the limit of 64\.0 MiB"):
        load_adapter(tiny_llama(base_dir), folder, max_bytes=64 * 2**20)


# -- ReFT ------------------------------------------------------------------------------------------------------

REFT_CASES = {
    "rank is a string": {"rank": "2"},
    "rank of three million": {"rank": 3_000_000},
    "layers is a number": {"layers": 5},
    "layers hold a boolean": {"layers": [True]},
    "dropout is a string": {"dropout": "x"},
    "hidden_size of a trillion": {"hidden_size": 10**12},
    "components is a string": {"components": "block_output"},
    "share_weights is a string": {"share_weights": "yes"},
    "prompt_template is a number": {"prompt_template": 7},
    "an unknown field": {"surprise": 1},
    "intervention is a list": {"intervention": ["loreft"]},
}


@pytest.mark.parametrize("case", sorted(REFT_CASES))
def test_a_bad_reft_config_is_reported_and_refused(case, reft_dir, tmp_path, refused):
    refused(hostile(reft_dir, tmp_path / "a", REFT_CASES[case]), "not a valid ReFT config")


def test_a_reft_rank_against_its_weights_is_refused(reft_dir, tmp_path, refused):
    refused(hostile(reft_dir, tmp_path / "a", {"rank": 3}), "the config says")


# -- regexes: bounded, and the same modules as PEFT's re.fullmatch -------------------------------------------

LEGIT_REGEXES = [
    r".*\.(q_proj|v_proj)",
    r"model\.layers\.\d+\.self_attn\.(q|k|v)_proj",
    r".*mlp\.(up|down)_proj",
    r"model.layers.1.self_attn.o_proj",
    r"(?i).*Q_PROJ",
]


def lora_modules(model) -> list[str]:
    return sorted(name.removesuffix(".lora_A") for name, _ in model.named_modules() if name.endswith(".lora_A"))


@pytest.mark.parametrize("pattern", LEGIT_REGEXES)
def test_expansion_equals_re_fullmatch_on_a_real_models_module_names(pattern, base_dir):
    names = [name for name, _ in tiny_llama(base_dir).named_modules()]
    config = {"peft_type": "LORA", "target_modules": pattern, "exclude_modules": r".*\.1\..*", "r": 4}
    expanded = expand_target_modules(config, names)
    assert expanded["target_modules"] == [n for n in names if n and re.fullmatch(pattern, n)]
    assert expanded["exclude_modules"] == [n for n in names if n and re.fullmatch(r".*\.1\..*", n)]
    assert config["target_modules"] == pattern  # a copy


@pytest.mark.parametrize("pattern", LEGIT_REGEXES[:3])
def test_a_legitimate_regex_loads_as_plain_peft_loads_it(pattern, base_dir, tmp_path):
    from peft import PeftModel

    folder = save_peft(base_dir, tmp_path / "a", lora_config(target_modules=pattern))
    assert json.loads((folder / "adapter_config.json").read_text())["target_modules"] == pattern
    assert validate_adapter(folder).ok
    ours, plain = load_adapter(tiny_llama(base_dir), folder), PeftModel.from_pretrained(tiny_llama(base_dir), folder)
    assert lora_modules(ours) == lora_modules(plain) and lora_modules(ours)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, plain(input_ids=IDS).logits, rtol=0, atol=0)
    # a second adapter on the PeftModel: hub_peft adds it with the expanded config
    first = save_peft(base_dir, tmp_path / "first", lora_config(target_modules=["k_proj"]))
    ours = load_adapter(load_adapter(tiny_llama(base_dir), first), folder, adapter_name="second")
    plain = PeftModel.from_pretrained(tiny_llama(base_dir), first)
    plain.load_adapter(str(folder), adapter_name="second")
    plain.set_adapter("second")
    assert ours.active_adapter == "second" and ours.peft_config["second"].target_modules == {
        n for n in lora_modules(plain.get_base_model()) if re.fullmatch(pattern, n)
    }
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, plain(input_ids=IDS).logits, rtol=0, atol=0)


def test_ia3_regex_with_feedforward_names_loads_as_plain_peft(base_dir, tmp_path):
    from peft import IA3Config, PeftModel

    config = IA3Config(
        target_modules=r".*\.(k_proj|v_proj|down_proj)", feedforward_modules=["down_proj"], init_ia3_weights=False
    )
    folder = save_peft(base_dir, tmp_path / "a", config)
    ours, plain = load_adapter(tiny_llama(base_dir), folder), PeftModel.from_pretrained(tiny_llama(base_dir), folder)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, plain(input_ids=IDS).logits, rtol=0, atol=0)
    assert ours.peft_config["default"].feedforward_modules == {f"model.layers.{i}.mlp.down_proj" for i in range(2)}


def test_expansion_refuses_what_it_cannot_resolve(base_dir):
    names = [name for name, _ in tiny_llama(base_dir).named_modules()]
    for value in (5, ["q_proj", 5], {"q_proj": 1}):
        with pytest.raises(InvalidInputError, match="target_modules must be"):
            expand_target_modules({"target_modules": value}, names)
    with pytest.raises(InvalidInputError, match="1001 characters"):
        expand_target_modules({"target_modules": "q" * 1001}, names)
    with pytest.raises(IncompatibleAdapterError, match="matches no module"):
        expand_target_modules({"target_modules": r".*\.c_attn"}, names)
    with pytest.raises(InvalidInputError, match="layers_to_transform"):
        expand_target_modules({"target_modules": ".*q_proj", "layers_to_transform": [0]}, names)
    with pytest.raises(InvalidInputError, match="ends with the name of a module it matches"):
        expand_target_modules({"target_modules": r"a\.b"}, ["a", "a.b", "x", "x.a", "x.a.b"])
    plain = {"target_modules": ["q_proj"], "r": 4}
    assert expand_target_modules(plain, names) == plain
    assert expand_target_modules({"target_modules": "ALL-LINEAR"}, names) == {"target_modules": "ALL-LINEAR"}
    prompt = {"peft_type": "ADAPTION_PROMPT", "target_modules": "self_attn"}  # an attribute name, not a regex
    assert expand_target_modules(prompt, names) == prompt


@pytest.mark.parametrize(
    ("pattern", "safe"),
    [
        ("q_proj", True),
        ("model.layers.0.self_attn.q_proj", True),
        ("^model.decoder.layers.0.encoder_attn.k_proj", True),
        (r"layers\.\d+\.self_attn\.(q|k|v)_proj", True),
        (r"(model\.)?layers\.0\.mlp", True),
        (".*q_proj", True),
        ("(a+)+$", False),
        (".*.*x", False),
        ("(a|a)(a|a)(a|a)(a|a)(a|a)", False),
        (r"(.)\1", False),
        ("(ab){3}", False),
        ("a?" * 10, False),
        ("[", False),
        ("", False),
        (5, False),
    ],
)
def test_what_peft_may_paste_into_its_own_regexes(pattern, safe):
    assert (pasted_problem(pattern) is None) is safe


REGEX_CHILD = """
import json, re, sys, time
from pathlib import Path
from hub_peft import load_adapter
from hub_peft.errors import HubPeftError
from hub_peft.targets import expand_target_modules
from transformers import AutoModelForCausalLM

base_dir, lora_dir, work = map(Path, sys.argv[1:4])
results = {}
for case, pattern in json.loads(sys.argv[4]).items():
    folder = work / case
    config = json.loads((lora_dir / "adapter_config.json").read_text())
    config.update(target_modules=pattern, use_dora=True)
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").write_bytes((lora_dir / "adapter_model.safetensors").read_bytes())
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    start = time.monotonic()
    try:
        load_adapter(model, folder)
        results[case] = ["loaded", time.monotonic() - start, ""]
    except HubPeftError as e:
        results[case] = [type(e).__name__, time.monotonic() - start, str(e)]
names = [n for n, _ in AutoModelForCausalLM.from_pretrained(base_dir).named_modules()]
start = time.monotonic()
try:
    expand_target_modules({"target_modules": r"(.|.)*[!#]"}, names)
except HubPeftError as e:
    results["expand"] = [type(e).__name__, time.monotonic() - start, str(e)]
print(json.dumps(results))
"""
CATASTROPHIC = {  # each backtracks for ever in Python's re on a module name such as model.layers.0.self_attn.k_proj
    "report": r"(.|.)*!",  # the reviewed adapter (with use_dora): the regex module rules it out at once
    "timeout": r"(.|.)*[!#]",  # the regex module backtracks too: stopped by its time budget
    "hidden": r"model\.layers\.\d+\.self_attn\.(q|v)_proj|(.|.)*!",  # matches the weights' modules first
}


def test_python_re_really_hangs_on_these_regexes():
    for pattern in CATASTROPHIC.values():
        with pytest.raises(subprocess.TimeoutExpired):
            code = f"import re; re.fullmatch({pattern!r}, 'model.layers.0.self_attn.k_proj')"
            subprocess.run([sys.executable, "-c", code], timeout=2)


def test_a_catastrophic_regex_is_refused_quickly(base_dir, lora_dir, tmp_path):
    """In a child process with a timeout: a regression hangs it (re holds the GIL), and fails this test."""
    done = subprocess.run(
        [sys.executable, "-c", REGEX_CHILD, str(base_dir), str(lora_dir), str(tmp_path), json.dumps(CATASTROPHIC)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(results) == {*CATASTROPHIC, "expand"}
    for case, (error, seconds, message) in results.items():
        assert error == "InvalidInputError" and seconds < 5, (case, error, seconds, message)
    assert "match no target module" in results["report"][2]
    for case in ("timeout", "hidden", "expand"):
        assert "is too costly to match" in results[case][2] and "list the module names" in results[case][2]


def test_the_validate_command_reports_a_catastrophic_regex_without_a_traceback(lora_dir, tmp_path):
    folder = hostile(lora_dir, tmp_path / "a", {"target_modules": CATASTROPHIC["timeout"]})
    done = subprocess.run(
        [sys.executable, "-m", "hub_peft.cli", "validate", str(folder)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "FAIL: The target_modules regex" in done.stdout and "too costly" in done.stdout
    assert "fix: list the module names" in done.stdout


def test_a_regex_in_a_field_peft_pastes_into_its_own_regexes_never_reaches_peft(base_dir, lora_dir, tmp_path):
    config = {"peft_type": "LORA", "target_modules": ["q_proj"], "rank_pattern": {"(x+x+)+y": 8}}
    with pytest.raises(InvalidInputError, match="rank_pattern entry the regex"):
        expand_target_modules(config, ["model.layers.0.self_attn.q_proj"])
