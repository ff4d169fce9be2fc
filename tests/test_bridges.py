"""Bridges: merges equal PEFT's own add_weighted_adapter (and the engine's weighted mix for the exact method),
conversions to LoRA report their error, GGUF exports read back in llama.cpp's layout."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_engine import make_ia3, make_lora
from test_peft_methods import load_tiny, tiny_base_repo, tiny_tokenizer  # noqa: F401 - shared session fixture

from hub_peft import save_adapter
from hub_peft.bridges import LORA_METHODS, MergeSpec, merge_adapters
from hub_peft.errors import IncompatibleAdapterError, InvalidInputError

WEIGHTS = [0.7, -0.4]


@pytest.fixture(scope="module")
def parents(tiny_base_repo, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("merge_parents")
    return {
        "a": save_adapter(make_lora(11, 4), root / "a"),
        "b": save_adapter(make_lora(12, 4, use_rslora=True), root / "b"),
        "c": save_adapter(make_lora(13, 8), root / "c"),
        "ia3": save_adapter(make_ia3(14), root / "ia3"),
        "ia3b": save_adapter(make_ia3(15), root / "ia3b"),
    }


def peft_merge(folders, weights, method, **kwargs):
    """PEFT's own add_weighted_adapter on the real base: the reference."""
    from peft import PeftModel, get_peft_model_state_dict

    model = PeftModel.from_pretrained(load_tiny(), str(folders[0]), adapter_name="p0")
    for i, folder in enumerate(folders[1:], 1):
        model.load_adapter(str(folder), adapter_name=f"p{i}")
    names = [f"p{i}" for i in range(len(folders))]
    torch.manual_seed(kwargs.pop("seed", 0))
    if method is None:  # IA3 has no combination_type
        model.add_weighted_adapter(names, weights, "merged")
    else:
        model.add_weighted_adapter(names, weights, "merged", combination_type=method, **kwargs)
    return get_peft_model_state_dict(model, adapter_name="merged")


@pytest.mark.parametrize("method", LORA_METHODS)
def test_lora_merges_equal_peft(parents, tmp_path, method):
    density = {"density": 0.5} if method.startswith(("ties", "dare", "magnitude")) else {}
    spec = MergeSpec(method, seed=3, **density)
    folders = [parents["a"], parents["b"]]
    out = merge_adapters(folders, WEIGHTS, tmp_path / "merged", spec)
    got = load_file(str(out / "adapter_model.safetensors"))
    expected = peft_merge(folders, WEIGHTS, method, seed=3, **density)
    assert set(got) == set(expected)
    for key, tensor in expected.items():
        torch.testing.assert_close(got[key], tensor, rtol=0, atol=0, msg=key)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_rslora"] is False and config["r"] == config["lora_alpha"]


def test_exact_merge_equals_the_engines_weighted_mix(parents, tmp_path):
    """cat is exact: the merged adapter (ranks 4 + 8, an rsLoRA parent) computes Σ wᵢ·ΔWᵢ, which the engine's
    per-row weighted mix computes without merging."""
    from hub_peft import load_adapter
    from hub_peft.serving import MultiAdapterModel

    out = merge_adapters([parents["b"], parents["c"]], WEIGHTS, tmp_path / "cat", MergeSpec("cat"))
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 12
    ids = torch.tensor([tiny_tokenizer()("a b c d e").input_ids])
    with torch.no_grad():
        merged = load_adapter(load_tiny(), out)(input_ids=ids).logits[0, -1]
    engine = MultiAdapterModel((load_tiny(), tiny_tokenizer()))
    engine.add("b", parents["b"])
    engine.add("c", parents["c"])
    mixed = engine.next_token_logits(["a b c d e"], [{"b": WEIGHTS[0], "c": WEIGHTS[1]}])[0]
    torch.testing.assert_close(merged, mixed, rtol=1e-4, atol=1e-4)


def test_merge_card_records_lineage(parents, tmp_path):
    out = merge_adapters([parents["a"], parents["b"]], WEIGHTS, tmp_path / "m", MergeSpec("ties", density=0.5))
    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "alice/tiny-llama" and meta["base_model_relation"] == "adapter"
    assert "merge" in meta["tags"]
    lineage = json.loads((out / "hub_peft_card.json").read_text())["lineage"]
    assert lineage["method"] == "ties" and lineage["density"] == 0.5
    assert [p["weight"] for p in lineage["parents"]] == WEIGHTS
    assert [p["folder"] for p in lineage["parents"]] == ["a", "b"] and len(lineage["parents"][0]["sha256"]) == 64
    assert "## Lineage" in card and "`ties`" in card and "density 0.5" in card
    assert "| vLLM | yes | vLLM-compatible LoRA: `vllm serve alice/tiny-llama --enable-lora" in card
    assert f"| llama.cpp, Ollama | yes | `hub-peft export {out} --to gguf" in card
    assert str(parents["a"].parent) not in card  # a local parent: its folder's name and digest, never its path


def test_ia3_merge_equals_peft_where_peft_is_right(parents, tmp_path):
    """Same targets, weights summing to 1: PEFT's Σ wᵢ·lᵢ equals hub_peft's 1 + Σ wᵢ·(lᵢ − 1)."""
    folders = [parents["ia3"], parents["ia3b"]]
    out = merge_adapters(folders, [0.25, 0.75], tmp_path / "ia3", MergeSpec("linear"))
    got = load_file(str(out / "adapter_model.safetensors"))
    expected = peft_merge(folders, [0.25, 0.75], None)
    assert set(got) == set(expected)
    for key, tensor in expected.items():
        torch.testing.assert_close(got[key], tensor, rtol=1e-6, atol=1e-6)


def test_ia3_merge_of_a_module_one_parent_targets(tiny_base_repo, parents, tmp_path):  # noqa: F811
    """A module only one parent targets gets 1 + w·(l − 1), not PEFT's w·l (which shrinks the layer's output)."""
    from peft import IA3Config, get_peft_model

    other = get_peft_model(load_tiny(), IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    with torch.no_grad():
        for name, p in other.named_parameters():
            if "ia3_l" in name:
                p.fill_(2.0)
    q_only = save_adapter(other, tmp_path / "q_only")
    out = merge_adapters([parents["ia3"], q_only], [0.5, 0.5], tmp_path / "m", MergeSpec("linear"))
    got = load_file(str(out / "adapter_model.safetensors"))
    first = load_file(str(parents["ia3"] / "adapter_model.safetensors"))
    q = next(k for k in got if "q_proj" in k)
    torch.testing.assert_close(got[q], torch.full_like(got[q], 1.5))  # 1 + 0.5 · (2 − 1)
    k = next(k for k in got if "k_proj" in k)
    torch.testing.assert_close(got[k], 1 + 0.5 * (first[k] - 1))


def test_merge_refusals(parents, tmp_path, tiny_base_repo):  # noqa: F811
    with pytest.raises(IncompatibleAdapterError, match=r"different types.*weighted mix"):
        merge_adapters([parents["a"], parents["ia3"]], [0.5, 0.5], tmp_path / "x")
    with pytest.raises(IncompatibleAdapterError, match=r"same r.*cat"):
        merge_adapters([parents["a"], parents["c"]], [0.5, 0.5], tmp_path / "x", MergeSpec("ties", density=0.5))
    with pytest.raises(IncompatibleAdapterError, match="low-rank factors"):
        merge_adapters([parents["ia3"], parents["ia3b"]], [0.5, 0.5], tmp_path / "x", MergeSpec("svd"))
    dora = save_adapter(make_lora(16, 4, use_dora=True), tmp_path / "dora")
    with pytest.raises(IncompatibleAdapterError, match=r"DoRA.*convert"):
        merge_adapters([parents["a"], dora], [0.5, 0.5], tmp_path / "x")
    with pytest.raises(InvalidInputError, match="density"):
        MergeSpec("dare_ties")
    with pytest.raises(InvalidInputError, match="one weight per adapter"):
        merge_adapters([parents["a"], parents["b"]], [1.0], tmp_path / "x")
    assert not (tmp_path / "x").exists()


# --- GGUF export -------------------------------------------------------------------------------------------------


def gguf_deltas(path, config):
    """Each adapted base tensor's ΔW as llama.cpp computes it from the file: scale·B·A, scale = alpha/rank (1
    when alpha is 0), q/k rows permuted back; the embeddings' [vocab, hidden] ΔW from their transposed lora_a."""
    from hub_peft.bridges.gguf import read_gguf_lora

    data = read_gguf_lora(path)
    alpha = float(data["metadata"]["adapter.lora.alpha"])
    out = {}
    for name in {n.rsplit(".", 1)[0] for n in data["tensors"]}:
        a = torch.from_numpy(data["tensors"][f"{name}.lora_a"].copy()).float()
        b = torch.from_numpy(data["tensors"][f"{name}.lora_b"].copy()).float()
        scale = alpha / b.shape[1] if alpha else 1.0
        out[name] = scale * (a @ b.T if name == "token_embd.weight" else b @ a)
    return data["metadata"], out


def unpermute(w, n_head):
    """The inverse of llama.cpp's q/k permutation."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"r": 4},
        {"r": 8, "use_rslora": True},
        {"r": 4, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"down_proj": 3}},
    ],
    ids=["lora", "rslora", "patterns"],
)
def test_gguf_export_reads_back_as_peft_deltas(tiny_base_repo, tmp_path, kwargs):  # noqa: F811
    from peft import LoraConfig, PeftModel, get_peft_model

    from hub_peft.bridges.gguf import export_gguf

    torch.manual_seed(7)
    targets = ["q_proj", "k_proj", "v_proj", "down_proj", "embed_tokens", "lm_head"]
    config = LoraConfig(target_modules=targets, init_lora_weights=False, lora_alpha=16, **kwargs)
    folder = save_adapter(get_peft_model(load_tiny(), config), tmp_path / "adapter")
    path = export_gguf(folder, tmp_path / "adapter.gguf")
    metadata, deltas = gguf_deltas(path, json.loads((folder / "adapter_config.json").read_text()))
    assert metadata["general.type"] == "adapter" and metadata["adapter.type"] == "lora"
    assert metadata["general.architecture"] == "llama"
    assert (metadata["adapter.lora.alpha"] == 0) == ("rank_pattern" in kwargs)  # one alpha cannot fit mixed scales
    model = PeftModel.from_pretrained(load_tiny(), str(folder))
    base = model.base_model.model.config
    expected = {}
    for layer in range(base.num_hidden_layers):
        attn, mlp = f"model.layers.{layer}.self_attn", f"model.layers.{layer}.mlp"
        for module, gguf_name in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v")):
            expected[f"blk.{layer}.{gguf_name}.weight"] = (
                model.get_submodule(f"base_model.model.{attn}.{module}"),
                module,
            )
        expected[f"blk.{layer}.ffn_down.weight"] = (model.get_submodule(f"base_model.model.{mlp}.down_proj"), "down")
    expected["token_embd.weight"] = (model.get_submodule("base_model.model.model.embed_tokens"), "embed")
    expected["output.weight"] = (model.get_submodule("base_model.model.lm_head"), "head")
    assert set(deltas) == set(expected)
    for name, (layer, kind) in expected.items():
        delta = deltas[name]
        if kind == "q_proj":
            delta = unpermute(delta, base.num_attention_heads)
        elif kind == "k_proj":
            delta = unpermute(delta, base.num_key_value_heads)
        torch.testing.assert_close(delta, layer.get_delta_weight("default"), rtol=1e-5, atol=1e-6, msg=name)


def test_gguf_export_refusals_name_the_fix(tiny_base_repo, parents, tmp_path):  # noqa: F811
    from hub_peft.bridges.gguf import export_gguf

    dora = save_adapter(make_lora(16, 4, use_dora=True), tmp_path / "dora")
    with pytest.raises(IncompatibleAdapterError, match=r"DoRA.*hub-peft convert"):
        export_gguf(dora, tmp_path / "x.gguf")
    serving = (dora / "README.md").read_text().split("## Serving")[1]
    assert "| vLLM | no | Not vLLM-compatible: vLLM does not support DoRA" in serving
    assert "| llama.cpp, Ollama | no | DoRA rescales every output row" in serving
    with pytest.raises(IncompatibleAdapterError, match=r"IA3.*convert it to LoRA"):
        export_gguf(parents["ia3"], tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_validate_for_llamacpp_and_ollama_modelfile(tiny_base_repo, parents, tmp_path, capsys):  # noqa: F811
    from hub_peft.cli import main

    assert main(["validate", str(parents["a"]), "--for", "llama.cpp"]) == 0
    assert "llama.cpp-compatible" in capsys.readouterr().out
    assert main(["validate", str(parents["ia3"]), "--for", "llama.cpp"]) == 1
    assert "convert it to LoRA" in capsys.readouterr().out
    out = tmp_path / "a.gguf"
    assert main(["export", str(parents["a"]), "--to", "gguf", "--out", str(out), "--ollama", "./base-f32.gguf"]) == 0
    assert (tmp_path / "Modelfile").read_text().splitlines()[1:] == ["FROM ./base-f32.gguf", "ADAPTER ./a.gguf"]


# --- per-request merges in the server ----------------------------------------------------------------------------


def test_per_request_merges_equal_the_offline_merge(parents, tmp_path):
    """{"model": {"a": 0.7, "b": -0.4}, "merge": {...}} answers exactly as the adapter `hub-peft merge` wrote
    (same tokens, same logprobs), for TIES and seeded DARE; cat equals the plain weighted mix."""
    from test_server import serving

    from hub_peft.serving import MultiAdapterModel

    engine = MultiAdapterModel((load_tiny(), tiny_tokenizer()))
    engine.add("a", parents["a"])
    engine.add("b", parents["b"])
    merges = {
        "ties": {"method": "ties", "density": 0.5},
        "dare": {"method": "dare_linear", "density": 0.7, "seed": 5},
        "svd": {"method": "svd", "svd_rank": 3},
    }
    for name, options in merges.items():
        spec = MergeSpec(**options)
        engine.add(f"offline-{name}", merge_adapters([parents["a"], parents["b"]], WEIGHTS, tmp_path / name, spec))
    mix = {"a": WEIGHTS[0], "b": WEIGHTS[1]}
    body = {"prompt": "a b c d", "max_tokens": 6, "temperature": 0, "logprobs": 2}

    def complete(client, **fields):
        response = client.post("/v1/completions", json={**body, **fields})
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        return choice["text"], choice["logprobs"]["token_logprobs"]

    from hub_peft.serving.openai.settings import MERGE_METHODS

    with serving(engine, merge_methods=(*MERGE_METHODS, "svd")) as client:  # the operator allows svd
        for name, options in merges.items():
            text, logprobs = complete(client, model=mix, merge=options)
            expected_text, expected_logprobs = complete(client, model=f"offline-{name}")
            assert text == expected_text, name
            assert logprobs == pytest.approx(expected_logprobs, abs=1e-5), name
        assert complete(client, model=mix, merge={"method": "cat"})[0] == complete(client, model=mix)[0]
        merged = [m["id"] for m in client.get("/v1/models").json()["data"] if m["id"].startswith("merge-")]
        assert len(merged) == 4  # one adapter per distinct merge, reused by later requests
        complete(client, model=mix, merge=merges["ties"])
        assert len([m for m in client.get("/v1/models").json()["data"] if m["id"].startswith("merge-")]) == 4
        bad = client.post("/v1/completions", json={**body, "model": "a", "merge": {"method": "ties"}})
        assert bad.status_code == 400 and "mix" in bad.json()["error"]["message"]
        bad = client.post("/v1/completions", json={**body, "model": mix, "merge": {"method": "ties"}})
        assert bad.status_code == 400 and "density" in bad.json()["error"]["message"]
        bad = client.post("/v1/completions", json={**body, "model": mix, "merge": {"method": "median"}})
        assert bad.status_code == 400
        bad = client.post("/v1/completions", json={**body, "model": mix, "merge": {"method": "ties_svd", "density": 1}})
        assert bad.status_code == 400 and "--merge-methods" in bad.json()["error"]["message"]  # not allowed here
        merge_root = client.app.state.server.merge_root
        assert len(list(merge_root.iterdir())) == 4
    assert not merge_root.exists()  # removed at shutdown


# --- conversion to LoRA ------------------------------------------------------------------------------------------


def merged_delta(folder, module):
    """A layer's true update, by PEFT's own merge_and_unload: W_merged − W."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(load_tiny(), str(folder)).merge_and_unload()
    return merged.get_submodule(module).weight.detach() - load_tiny().get_submodule(module).weight.detach()


def test_convert_loha_equals_peft_and_reports_its_error(tiny_base_repo, tmp_path, capsys):  # noqa: F811
    from peft import PeftModel
    from peft.tuners.lora.conversion import convert_to_lora as peft_convert
    from test_engine import make_loha

    from hub_peft.cli import main

    folder = save_adapter(make_loha(21), tmp_path / "loha")
    assert main(["convert", str(folder), "--to", "lora", "--rank", "4", "--out", str(tmp_path / "lora")]) == 0
    printed = capsys.readouterr().out
    got = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    _, expected = peft_convert(PeftModel.from_pretrained(load_tiny(), str(folder)), 4)
    module = "model.layers.0.self_attn.q_proj"
    ours = got[f"base_model.model.{module}.lora_B.weight"] @ got[f"base_model.model.{module}.lora_A.weight"]
    peft_ba = (
        expected[f"base_model.model.{module}.lora_B.weight"] @ expected[f"base_model.model.{module}.lora_A.weight"]
    )
    torch.testing.assert_close(ours, peft_ba, rtol=1e-4, atol=1e-5)
    truth = merged_delta(folder, module)
    error = float(torch.linalg.norm(ours - truth) / torch.linalg.norm(truth))
    lineage = json.loads((tmp_path / "lora" / "hub_peft_card.json").read_text())["lineage"]
    assert lineage["source_type"] == "LOHA" and lineage["rank"] == 4 and lineage["error"]["layers"] == 4
    assert lineage["error"]["mean"] <= lineage["error"]["max"] and error <= lineage["error"]["max"] + 1e-6
    assert 0.01 < error < 1  # rank 4 of a rank-16 LoHa update: a real, reported approximation
    assert f"{lineage['error']['max']:.3g}" in printed
    assert "Reconstruction error" in (tmp_path / "lora" / "README.md").read_text()
    # the converted LoHa is a plain LoRA: vLLM's contract holds and it exports for llama.cpp
    from hub_peft.bridges.gguf import export_gguf
    from hub_peft.validate import validate_adapter

    assert validate_adapter(tmp_path / "lora", for_engine="vllm").ok
    assert validate_adapter(tmp_path / "lora", for_engine="llama.cpp").ok
    assert export_gguf(tmp_path / "lora", tmp_path / "lora.gguf").is_file()
    serving = (tmp_path / "lora" / "README.md").read_text().split("## Serving")[1]
    assert "| vLLM | yes |" in serving and "| llama.cpp, Ollama | yes |" in serving


def test_convert_dora_at_full_rank_is_exact_where_peft_drops_the_magnitude(tiny_base_repo, tmp_path):  # noqa: F811
    from peft import PeftModel
    from peft.tuners.lora.conversion import convert_to_lora as peft_convert

    from hub_peft import load_adapter
    from hub_peft.bridges.convert import convert_to_lora

    dora = make_lora(22, 4, use_dora=True)
    with torch.no_grad():
        for name, p in dora.named_parameters():
            if "magnitude" in name:
                p.mul_(1.5)  # a trained magnitude: away from the norm it starts at
    folder = save_adapter(dora, tmp_path / "dora")
    out, error = convert_to_lora(folder, tmp_path / "lora", rank=64)
    assert error["max"] < 1e-5
    ids = torch.tensor([tiny_tokenizer()("a b c d e").input_ids])
    with torch.no_grad():
        expected = load_adapter(load_tiny(), folder)(input_ids=ids).logits
        got = load_adapter(load_tiny(), out)(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    _, tensors = peft_convert(PeftModel.from_pretrained(load_tiny(), str(folder)), 1.0)  # every singular value
    module = "model.layers.0.self_attn.q_proj"
    peft_ba = tensors[f"base_model.model.{module}.lora_B.weight"] @ tensors[f"base_model.model.{module}.lora_A.weight"]
    truth = merged_delta(folder, module)
    assert torch.linalg.norm(peft_ba - truth) / torch.linalg.norm(truth) > 0.1  # PEFT's misses the rescaling


def test_convert_refusals(parents, tmp_path):
    from hub_peft.bridges.convert import convert_to_lora

    with pytest.raises(IncompatibleAdapterError, match="plain LoRA already"):
        convert_to_lora(parents["a"], tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_gguf_export_of_a_bfloat16_adapter(tiny_base_repo, tmp_path):  # noqa: F811
    """numpy cannot read bfloat16: those weights go through torch, to the same file as their float32 values."""
    from hub_peft.bridges.gguf import export_gguf, read_gguf_lora

    model = make_lora(31, 4)
    folder = save_adapter(model, tmp_path / "f32")
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(torch.bfloat16)
    bf16 = save_adapter(model, tmp_path / "bf16")
    assert {str(t.dtype) for t in load_file(str(bf16 / "adapter_model.safetensors")).values()} == {"torch.bfloat16"}
    ours = read_gguf_lora(export_gguf(bf16, tmp_path / "bf16.gguf"))["tensors"]
    reference = read_gguf_lora(export_gguf(folder, tmp_path / "f32.gguf"))["tensors"]
    assert set(ours) == set(reference)
    for name, array in reference.items():
        torch.testing.assert_close(
            torch.from_numpy(ours[name].copy()), torch.from_numpy(array.copy()), rtol=1e-2, atol=1e-2
        )


# --- ReFT merges -------------------------------------------------------------------------------------------------


def make_reft(seed: int, **kwargs):
    from hub_peft.reft import ReftConfig, get_reft_model

    torch.manual_seed(seed)
    config = ReftConfig(positions="f1+l1", prompt_template="w1 {prompt} w2", **kwargs)
    model = get_reft_model(load_tiny(), config)
    with torch.no_grad():
        for module in model.interventions.values():  # away from the identity edit (R stays orthonormal)
            for name, p in module.named_parameters():
                if "parametrizations" not in name:
                    p.add_(torch.randn_like(p) * 0.5)
    return model


def test_reft_cat_merge_is_the_weighted_sum_of_edits(tiny_base_repo, tmp_path):  # noqa: F811
    """Stacked interventions (LoReFT with a projection bias... ConsReFT, NoDiReFT, on different layers) edit as the
    engine's weighted mix of the parents does, the merged adapter loaded the ordinary way."""
    from hub_peft import load_adapter
    from hub_peft.chat import encode_prompt
    from hub_peft.serving import MultiAdapterModel

    parents = {
        "lo": save_adapter(make_reft(41, layers=[0, 1], rank=2), tmp_path / "lo"),
        "no": save_adapter(make_reft(42, layers=[1], rank=3, intervention="noreft", proj_bias=True), tmp_path / "no"),
        "cons": save_adapter(make_reft(43, layers=[0], rank=2, intervention="consreft"), tmp_path / "cons"),
        "dir": save_adapter(make_reft(44, layers=[1], rank=2, intervention="nodireft"), tmp_path / "dir"),
    }
    weights = {"lo": 0.7, "no": -0.4, "cons": 0.5, "dir": 1.3}
    out = merge_adapters(list(parents.values()), list(weights.values()), tmp_path / "merged")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["intervention"] == "noreft" and config["rank"] == 9 and config["layers"] == [0, 1]
    engine = MultiAdapterModel((load_tiny(), tiny_tokenizer()))
    for name, folder in parents.items():
        engine.add(name, folder)
    prompt = "a b c d e"
    mixed = engine.next_token_logits([prompt], [weights])[0]
    model = load_adapter(load_tiny(), out)
    ids = torch.tensor([encode_prompt(tiny_tokenizer(), prompt, "w1 {prompt} w2")])
    with torch.no_grad():
        merged = model(input_ids=ids).logits[0, -1]
        base = load_tiny()(input_ids=ids).logits[0, -1]
    torch.testing.assert_close(merged, mixed, rtol=1e-4, atol=1e-4)
    assert (merged - base).abs().max() > 0.1  # the edits are there
    per_request = engine.merge(weights, MergeSpec("cat"), tmp_path / "merges")  # what the server's merge runs
    torch.testing.assert_close(engine.next_token_logits([prompt], [per_request])[0], mixed, rtol=1e-4, atol=1e-4)


def test_reft_merge_refusals(tiny_base_repo, tmp_path):  # noqa: F811
    a = save_adapter(make_reft(45, layers=[0], rank=2, activation="relu"), tmp_path / "a")
    b = save_adapter(make_reft(46, layers=[1], rank=2), tmp_path / "b")
    with pytest.raises(IncompatibleAdapterError, match="non-linear activation"):
        merge_adapters([a, b], [0.5, 0.5], tmp_path / "x")
    with pytest.raises(IncompatibleAdapterError, match="cat only"):
        merge_adapters([b, b], [0.5, 0.5], tmp_path / "x", MergeSpec("ties", density=0.5))


def test_merge_cli_from_hub_repos_and_push(parents, alice, repo_name, tmp_path, monkeypatch, capsys):
    """Parents named by Hub repo: the card names each as repo@commit; --push commits the merge, whose card the
    Hub's validator accepts and which plain PEFT loads from the Hub."""
    from huggingface_hub import HfApi, ModelCard
    from peft import PeftModel

    from hub_peft import push_adapter
    from hub_peft.cli import main

    monkeypatch.setenv("HF_TOKEN", alice)
    repos = [f"alice/{repo_name}-{p}" for p in ("a", "b")]
    for repo, name in zip(repos, ("a", "b"), strict=True):
        push_adapter(parents[name], repo)
    commits = [HfApi(token=alice).model_info(r).sha for r in repos]
    merged = f"alice/{repo_name}-merged"
    argv = ["merge", *repos, "--weights", "0.7,-0.4", "--method", "dare_ties", "--density", "0.6", "--seed", "2"]
    assert main([*argv, "--out", str(tmp_path / "m"), "--push", merged]) == 0
    assert "Merged 2 adapters (dare_ties)" in capsys.readouterr().out
    card = ModelCard.load(merged, token=alice)
    card.validate()
    meta = card.data.to_dict()
    assert meta["base_model"] == "alice/tiny-llama" and meta["base_model_relation"] == "adapter"
    for repo, commit in zip(repos, commits, strict=True):
        assert f"[`{repo}`]" in card.text and f"@ `{commit}`" in card.text
    assert "density 0.6, seed 2 (DARE's random drops)" in card.text
    model = PeftModel.from_pretrained(load_tiny(), merged)
    reference = load_file(str(tmp_path / "m" / "adapter_model.safetensors"))
    got = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    for key, tensor in reference.items():
        torch.testing.assert_close(got[key], tensor)


def test_gguf_export_of_a_dora_that_is_exactly_its_lora(tiny_base_repo, tmp_path):  # noqa: F811
    """A DoRA whose every magnitude equals its row's norm ‖W + s·BA‖ is its LoRA: exported, given the base's
    weights; 1% off, it is refused with what was measured."""
    from huggingface_hub import snapshot_download
    from peft import PeftModel

    from hub_peft.bridges.gguf import export_gguf

    model = make_lora(51, 4, use_dora=True)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lora_magnitude_vector") and "default" in module.lora_magnitude_vector:
                W = module.get_base_layer().weight
                delta = module.lora_B["default"].weight @ module.lora_A["default"].weight * module.scaling["default"]
                module.lora_magnitude_vector["default"].weight.copy_(torch.linalg.norm(W + delta, dim=1))
    exact = save_adapter(model, tmp_path / "exact")
    weights = snapshot_download(tiny_base_repo)
    with pytest.raises(IncompatibleAdapterError, match="--base-weights"):
        export_gguf(exact, tmp_path / "x.gguf")  # the base is a Hub id here: its weights are not looked for
    path = export_gguf(exact, tmp_path / "exact.gguf", base_weights=weights)
    _, deltas = gguf_deltas(path, {})
    peft = PeftModel.from_pretrained(load_tiny(), str(exact))
    merged = peft.merge_and_unload()  # DoRA's true update, by PEFT
    base = load_tiny()
    module = "model.layers.1.self_attn.v_proj"
    truth = merged.get_submodule(module).weight - base.get_submodule(module).weight
    torch.testing.assert_close(deltas["blk.1.attn_v.weight"], truth, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "magnitude" in name:
                p.mul_(1.01)
    off = save_adapter(model, tmp_path / "off")
    with pytest.raises(IncompatibleAdapterError, match=r"here max \|m/‖W \+ s·BA‖ − 1\| = 1\.0"):
        export_gguf(off, tmp_path / "off.gguf", base_weights=weights)


def test_a_parents_regex_is_never_run_unbounded(parents, tmp_path):
    """A stranger's target_modules regex goes through hub_peft's bounded matcher, never PEFT's re.fullmatch: a
    catastrophic one is refused at once instead of holding the merge (and, per request, a server thread)."""
    import shutil
    import time

    from hub_peft.errors import HubPeftError

    hostile = tmp_path / "hostile"
    shutil.copytree(parents["a"], hostile)
    config = json.loads((hostile / "adapter_config.json").read_text())
    config["target_modules"] = "(.|.)*" + "x" * 40 + "!"
    (hostile / "adapter_config.json").write_text(json.dumps(config))
    start = time.monotonic()
    with pytest.raises(HubPeftError):
        merge_adapters([parents["b"], hostile], [0.5, 0.5], tmp_path / "x")
    assert time.monotonic() - start < 10
