"""The multi-adapter engine: a mixed batch (LoRA, rsLoRA, ReFT, weighted mixes, bare base) must give every
row what that row gets alone with only its adapter loaded the ordinary way; the LRU cache and revisions."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from test_peft_methods import load_tiny, tiny_base_repo, tiny_llama_config, tiny_tokenizer  # noqa: F401 - shared session fixture

from hub_peft import load_adapter, push_adapter, save_adapter
from hub_peft.errors import InvalidInputError, NotFoundError
from hub_peft.reft import ReftConfig, get_reft_model
from hub_peft.serving import MultiAdapterModel

PROMPTS = ["a b c", "d e f g h i", "j", "k l m n", "o p q r s t u v", "w x"]


def make_lora(seed: int, r: int, **kwargs):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    targets = ["q_proj", "v_proj", "down_proj"]
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, **kwargs)
    model = get_peft_model(load_tiny(), config)
    with torch.no_grad():  # make the deltas large enough to change greedy tokens
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(20)
    return model


@pytest.fixture(scope="module")
def adapters(tiny_base_repo, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("engine_adapters")
    folders = {
        "lora": save_adapter(make_lora(1, 4), root / "lora"),
        "rslora": save_adapter(make_lora(2, 8, use_rslora=True), root / "rslora"),
    }
    torch.manual_seed(3)
    reft = get_reft_model(load_tiny(), ReftConfig(layers=[0, 1], positions="f1+l1", prompt_template="w1 {prompt} w2"))
    with torch.no_grad():
        for module in reft.interventions.values():
            module.source.weight.mul_(5)
    folders["reft"] = save_adapter(reft, root / "reft")
    folders["ia3"] = save_adapter(make_ia3(5), root / "ia3")
    return folders


def make_loha(seed: int):
    """LoHa on q/v with non-initial weights: a type that cannot share a batch (its solo path)."""
    from peft import LoHaConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], init_weights=False)
    return get_peft_model(load_tiny(), config)


def make_ia3(seed: int):
    """IA3 on k/v (output scaling) and down_proj (feed-forward input scaling), vectors away from 1."""
    from peft import IA3Config, get_peft_model

    config = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    model = get_peft_model(load_tiny(), config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(torch.empty_like(p).uniform_(-1.5, 3.5))
    return model


@pytest.fixture
def engine(adapters):
    engine = MultiAdapterModel((load_tiny(), tiny_tokenizer()))
    for name, folder in adapters.items():
        engine.add(name, folder)
    return engine


def alone(folder, prompt: str, max_new_tokens: int = 5, load_in_4bit: bool = False):
    """The ordinary way: one adapter on a fresh base, one prompt -> (greedy reply, next-token logits)."""
    from hub_peft._bnb import keep_4bit_trainable
    from hub_peft.chat import encode_prompt, generate_reply, prompt_template, trained_prompt_template

    base = keep_4bit_trainable(load_tiny(load_in_4bit))  # what load_base_model does for 4-bit bases
    model = load_adapter(base, folder) if folder else base
    tokenizer = tiny_tokenizer()
    ids = torch.tensor([encode_prompt(tokenizer, prompt, trained_prompt_template(model) or prompt_template(tokenizer))])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    return generate_reply(model, tokenizer, prompt, max_new_tokens=max_new_tokens), logits


def check_mixed_batch(adapters, rows, load_in_4bit: bool = False, max_new_tokens: int = 5):
    engine = MultiAdapterModel((load_tiny(load_in_4bit), tiny_tokenizer()))
    for name, folder in adapters.items():
        engine.add(name, folder)
    prompts = PROMPTS[: len(rows)]
    got = engine.generate(prompts, rows, max_new_tokens=max_new_tokens)
    logits = engine.next_token_logits(prompts, rows)
    replies = []
    for i, (prompt, name) in enumerate(zip(prompts, rows, strict=True)):
        reply, expected = alone(adapters[name] if name else None, prompt, max_new_tokens, load_in_4bit)
        replies.append(reply)
        torch.testing.assert_close(logits[i], expected, rtol=1e-4, atol=1e-4, msg=f"row {i} ({name})")
    assert got == replies
    return engine, got


def test_a_mixed_batch_gives_each_row_its_single_adapter_result(adapters):
    rows = ["lora", None, "reft", "rslora", "ia3", "reft"]
    engine, got = check_mixed_batch(adapters, rows)
    base_only = engine.generate(PROMPTS, None, max_new_tokens=5)
    assert sum(a != b for a, b in zip(got, base_only, strict=True)) >= 3, "the adapters changed nothing"


def test_a_mixed_batch_on_an_nf4_base(adapters):
    check_mixed_batch(adapters, ["reft", "lora", None, "rslora", "ia3"], load_in_4bit=True)


@pytest.mark.parametrize("load_in_4bit", [False, True])
def test_dora_joins_the_mixed_batch(adapters, tmp_path, load_in_4bit):
    """DoRA shares the batch (its norms from the dequantized weights, computed once at load): its rows answer as
    PEFT alone does, the rows beside them as their own adapters do, in full precision and on NF4 layers."""
    dora = save_adapter(make_lora(4, 4, use_dora=True), tmp_path / "dora")
    engine, _ = check_mixed_batch(
        {**adapters, "dora": dora}, ["dora", "lora", None, "dora", "ia3", "reft"], load_in_4bit=load_in_4bit
    )
    assert engine.cache.info("dora")["mixable"] is True
    assert engine.generate_tokens(PROMPTS[:2], ["dora", "dora"], max_new_tokens=3)  # a decode step of DoRA alone


def test_a_mix_of_dora_lora_and_ia3_on_one_layer_is_the_weighted_sum_of_their_peft_deltas(tmp_path):
    """One biased linear layer under PEFT's DoRA, LoRA and IA3 (output scaling includes the bias, DoRA's rescaling
    excludes it): the engine's layer with the mix {dora: 0.6, lora: -0.3, ia3: 0.5} adds exactly
    0.6·Δdora − 0.3·Δlora + 0.5·Δia3, each Δ the PEFT layer's output minus the base's, on batch rows and packed."""
    from peft import IA3Config, LoraConfig, get_peft_model

    from hub_peft.serving.cache import _load_ia3, _load_lora
    from hub_peft.serving.row_deltas import Group, Plan, PlanSlot, RowDeltas

    class One(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(16, 12)

    torch.manual_seed(0)
    base = One()
    configs = {
        "dora": LoraConfig(r=4, lora_alpha=8, target_modules=["lin"], use_dora=True, init_lora_weights=False),
        "lora": LoraConfig(r=2, lora_alpha=2, target_modules=["lin"], init_lora_weights=False),
        "ia3": IA3Config(target_modules=["lin"], feedforward_modules=[], init_ia3_weights=False),
    }
    x = torch.randn(5, 16)
    deltas, payloads = {}, {}
    for name, config in configs.items():
        model = get_peft_model(copy.deepcopy(base), config)
        with torch.no_grad():
            for key, p in model.named_parameters():
                if "lora_magnitude" in key or "ia3_l" in key:
                    p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
            deltas[name] = model.base_model.model.lin(x) - base.lin(x)
        model.save_pretrained(tmp_path / name)
        folder = tmp_path / name
        loader = _load_ia3 if name == "ia3" else partial(_load_lora, base_weight=lambda _: base.lin.weight.detach())
        payloads[name] = loader(folder, {"lin"})
    weights = {"dora": 0.6, "lora": -0.3, "ia3": 0.5}
    expected = base.lin(x) + sum(w * deltas[n] for n, w in weights.items())
    slot = PlanSlot()
    layer = RowDeltas(slot, "lin", base.lin)
    for packed in (False, True):
        group = Group(torch.arange(5), span=None)
        group.loras = [(payloads["dora"], 0.6), (payloads["lora"], -0.3)]
        group.ia3s = [(payloads["ia3"], 0.5)]
        slot.current = Plan([group], packed=packed)
        with torch.no_grad():
            got = layer(x[None] if packed else x)
        slot.current = None
        torch.testing.assert_close(got.reshape(5, 12), expected, rtol=1e-5, atol=1e-5)


def test_a_weighted_lora_mix_is_the_exact_sum_of_deltas(engine, adapters):
    """0.7·Δlora + 0.3·Δrslora equals one PEFT LoRA whose A/B stack both (rank 4+8), never averaged A and B."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    parts = {name: load_file(str(adapters[name] / "adapter_model.safetensors")) for name in ("lora", "rslora")}
    scales = {"lora": 8 / 4, "rslora": 16 / 8**0.5}
    weights = {"lora": 0.7, "rslora": 0.3}
    stacked = get_peft_model(
        load_tiny(), LoraConfig(r=12, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    with torch.no_grad():
        for name, param in stacked.named_parameters():
            if "lora_" not in name:
                continue
            key = name.replace(".default", "")
            A = [parts[n][key.replace("lora_B", "lora_A")] for n in ("lora", "rslora")]
            B = [parts[n][key.replace("lora_A", "lora_B")] * weights[n] * scales[n] for n in ("lora", "rslora")]
            param.copy_(torch.cat(A, 0) if "lora_A" in name else torch.cat(B, 1))
    mix = {"lora": 0.7, "rslora": 0.3}
    logits = engine.next_token_logits(PROMPTS[:3], [mix, "lora", mix])
    from hub_peft.chat import encode_prompt, prompt_template

    tokenizer = tiny_tokenizer()
    for i in (0, 2):
        ids = torch.tensor([encode_prompt(tokenizer, PROMPTS[i], prompt_template(tokenizer))])
        with torch.no_grad():
            expected = stacked(input_ids=ids).logits[0, -1]
        torch.testing.assert_close(logits[i], expected, rtol=1e-4, atol=1e-4, msg=f"mixed row {i}")
    torch.testing.assert_close(logits[1], alone(adapters["lora"], PROMPTS[1])[1], rtol=1e-4, atol=1e-4)


def test_a_weighted_ia3_mix_is_the_exact_sum_of_deltas(engine, adapters, tmp_path):
    """IA3 deltas are linear in (l − 1): 0.25·Δa + 0.75·Δb is one IA3 with l = 1 + 0.25(la − 1) + 0.75(lb − 1)."""
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    engine.add("ia3_b", save_adapter(make_ia3(6), tmp_path / "ia3_b"))
    a = load_file(str(adapters["ia3"] / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "ia3_b" / "adapter_model.safetensors"))
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "adapter_config.json").write_text((adapters["ia3"] / "adapter_config.json").read_text())
    save_file({k: 1 + 0.25 * (a[k] - 1) + 0.75 * (b[k] - 1) for k in a}, str(merged / "adapter_model.safetensors"))
    reference = PeftModel.from_pretrained(load_tiny(), merged)
    logits = engine.next_token_logits(PROMPTS[:2], [{"ia3": 0.25, "ia3_b": 0.75}, "ia3_b"])
    from hub_peft.chat import encode_prompt, prompt_template

    ids = torch.tensor([encode_prompt(tiny_tokenizer(), PROMPTS[0], prompt_template(tiny_tokenizer()))])
    with torch.no_grad():
        expected = reference(input_ids=ids).logits[0, -1]
    torch.testing.assert_close(logits[0], expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[1], alone(tmp_path / "ia3_b", PROMPTS[1])[1], rtol=1e-4, atol=1e-4)


def test_a_weighted_mix_with_reft_is_the_weighted_sum_of_edits(engine, adapters, tmp_path):
    """{"reft": 0.6, "reft_b": 0.25, "lora": 0.15} is, by definition: LoRA's delta times 0.15 in its layers, and at each
    intervened block output h ← h + Σ wᵢ·(Φᵢ(h) − h), each ReFT on its own prompt positions. Written out here with
    PEFT for the LoRA and plain forward hooks for the ReFT edits, independently of the engine's code."""
    from peft import PeftModel

    from hub_peft.chat import encode_prompt

    torch.manual_seed(8)
    reft_b = get_reft_model(load_tiny(), ReftConfig(layers=[1], positions="l2", prompt_template="w1 {prompt} w2"))
    with torch.no_grad():
        for module in reft_b.interventions.values():
            module.source.weight.mul_(5)
    engine.add("reft_b", save_adapter(reft_b, tmp_path / "reft_b"))
    mix = {"reft": 0.6, "reft_b": 0.25, "lora": 0.15}
    prompts = [PROMPTS[1], PROMPTS[3], PROMPTS[1]]
    logits = engine.next_token_logits(prompts, [mix, mix, "reft"])

    reference = PeftModel.from_pretrained(load_tiny(), adapters["lora"]).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_B" in name:
                p.mul_(mix["lora"])
    edits = []  # (weight, layer, group, first/last count, intervention)
    for name in ("reft", "reft_b"):
        folder = adapters["reft"] if name == "reft" else tmp_path / "reft_b"
        loaded = load_adapter(load_tiny(), folder)
        first, last = loaded.reft_config.first_last
        for layer, component, group in loaded.reft_config.sites():
            assert component == "block_output"
            module = loaded.interventions[ReftConfig.key_name(layer, component, group).replace(".", "__")]
            edits.append((name, layer, group, first if group == "f" else last, module))
    layers = reference.base_model.model.model.layers

    def hook_for(layer_index: int, n_tokens: int):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            total = torch.zeros_like(h)
            for name in ("reft", "reft_b"):
                edited = h.clone()
                for adapter, layer, group, count, intervention in edits:
                    if adapter != name or layer != layer_index:
                        continue
                    index = list(range(count)) if group == "f" else list(range(n_tokens - count, n_tokens))
                    edited[:, index] = intervention(edited[:, index])
                total = total + mix[name] * (edited - h)
            return (h + total, *output[1:]) if isinstance(output, tuple) else h + total

        return hook

    for i, prompt in enumerate(prompts[:2]):
        ids = torch.tensor([encode_prompt(tiny_tokenizer(), prompt, "w1 {prompt} w2")])
        handles = [layers[j].register_forward_hook(hook_for(j, ids.shape[1])) for j in range(len(layers))]
        with torch.no_grad():
            expected = reference(input_ids=ids).logits[0, -1]
        for handle in handles:
            handle.remove()
        torch.testing.assert_close(logits[i], expected, rtol=1e-4, atol=1e-4, msg=f"mixed row {i}")
    torch.testing.assert_close(logits[2], alone(adapters["reft"], PROMPTS[1])[1], rtol=1e-4, atol=1e-4)
    assert (logits[0] - logits[2]).abs().max() > 1e-2, "the mix should differ from its largest part alone"


def test_chat_messages_use_the_chat_template_or_the_adapters_own_format(adapters):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}w9 {{ m['content'] }} w10 {% endfor %}w11"
    engine = MultiAdapterModel((load_tiny(), tokenizer))
    engine.add("reft", adapters["reft"])
    conversation = [{"role": "system", "content": "a b"}, {"role": "user", "content": "c d"}]
    logits = engine.next_token_logits(
        [conversation, "w9 a b w10 w9 c d w10 w11", conversation, "c d"],
        [None, None, "reft", "reft"],
        raw=[False, True, False, False],
    )
    torch.testing.assert_close(logits[0], logits[1])  # the whole conversation in the chat format
    torch.testing.assert_close(logits[2], logits[3])  # ReFT recorded "w1 {prompt} w2": the last user turn in it
    with pytest.raises(InvalidInputError, match="at least one user message"):
        engine.generate([[{"role": "system", "content": "x"}]])


def test_lru_eviction_pinning_and_transparent_reload(adapters):
    engine = MultiAdapterModel((load_tiny(), tiny_tokenizer()), memory_budget=1)
    engine.add("reft", adapters["reft"], pin=True)
    engine.add("lora", adapters["lora"])
    engine.add("rslora", adapters["rslora"])
    state = {e["name"]: e["resident"] for e in engine.cache.loaded()}
    assert state == {"reft": True, "lora": False, "rslora": False}  # over budget: only the pinned one stays
    assert engine.cache.stats["evictions"] >= 2 and all(e["bytes"] > 0 for e in engine.cache.loaded())
    reply = engine.generate([PROMPTS[0]], ["lora"], max_new_tokens=5)
    assert reply == [alone(adapters["lora"], PROMPTS[0])[0]] and engine.cache.stats["loads"] == 4  # reloaded from disk
    engine.cache.memory_budget = 10**9
    engine.generate(PROMPTS[:2], ["lora", "rslora"], max_new_tokens=2)
    assert all(e["resident"] for e in engine.cache.loaded())
    engine.remove("lora")
    with pytest.raises(NotFoundError, match=r"No adapter named 'lora'; loaded: \['reft', 'rslora'\]"):
        engine.generate([PROMPTS[0]], ["lora"])


def test_the_cache_is_keyed_by_the_resolved_commit_or_the_files(adapters, alice, repo_name, tmp_path):
    """Names that resolve to the same commit (or a folder to the same files) share one copy; a new revision is a new
    copy; a folder is never taken for a commit, whatever its name."""
    import shutil

    repo_id = f"alice/{repo_name}"
    first = push_adapter(adapters["lora"], repo_id, token=alice).rsplit("/", 1)[-1]
    engine = MultiAdapterModel((load_tiny(), tiny_tokenizer()))
    v1 = engine.add("v1", repo_id)
    assert v1["commit"] == first and v1["key"] == f"hub:{repo_id}@{first}"
    assert engine.add("main", repo_id, revision="main")["key"] == v1["key"]  # one commit, two names, one copy
    assert engine.cache.stats["loads"] == 1 and engine.cache.resident_bytes() == v1["bytes"]
    push_adapter(adapters["rslora"], repo_id, token=alice)
    v2 = engine.add("v2", repo_id)
    second = v2["commit"]
    assert second != first and engine.add("old", repo_id, revision=first)["commit"] == first
    # "main" stays on what it resolved
    assert engine.cache.stats["loads"] == 2 and engine.cache.info("main")["key"] == v1["key"]
    copy = shutil.copytree(adapters["rslora"], tmp_path / ("0123456789abcdef" * 3)[:40])
    local = engine.add("local", copy)
    assert local["commit"] is None and local["key"].startswith("sha256:") and len(local["key"]) == 7 + 64
    assert engine.add("same-files", adapters["rslora"])["key"] == local["key"] and engine.cache.stats["loads"] == 3
    engine.remove("local")
    assert engine.cache.info("same-files")["resident"]  # the copy stays while a name uses it
    logits = engine.next_token_logits([PROMPTS[1]] * 2, ["v1", "v2"])
    torch.testing.assert_close(logits[0], alone(adapters["lora"], PROMPTS[1])[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[1], alone(adapters["rslora"], PROMPTS[1])[1], rtol=1e-4, atol=1e-4)


def test_what_cannot_share_a_batch_runs_in_a_sub_batch_of_its_own(engine, adapters, tmp_path):
    """LoHa, prefix tuning, a LoRA on the head...: attached the ordinary PEFT way for their own rows; the rest stays
    mixed."""
    from peft import LoHaConfig, LoraConfig, PeftModel, PrefixTuningConfig, get_peft_model

    from hub_peft.chat import encode_prompt, prompt_template

    folders = {
        "loha": save_adapter(get_peft_model(load_tiny(), LoHaConfig(target_modules=["k_proj"])), tmp_path / "loha"),
        "prefix": save_adapter(
            get_peft_model(load_tiny(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)),
            tmp_path / "prefix",
        ),
        "head": save_adapter(
            get_peft_model(load_tiny(), LoraConfig(target_modules=["lm_head", "q_proj"], init_lora_weights=False)),
            tmp_path / "head",
        ),
    }
    for name, folder in folders.items():
        assert engine.add(name, folder)["mixable"] is False
    rows = ["loha", "lora", "prefix", None, "loha", "reft", "head"]  # two LoHa rows share their sub-batch
    prompts = [*PROMPTS, "c d"]
    streamed: dict[int, list[int]] = {}

    def on_token(row: int, token: int) -> None:
        streamed.setdefault(row, []).append(token)

    completions = engine.generate_tokens(prompts, rows, max_new_tokens=5, on_token=on_token)
    logits = engine.next_token_logits(prompts, rows)
    for i, name in enumerate(rows):
        assert streamed.get(i, []) == completions[i].tokens
        if name not in folders:  # the mixed rows are compared in the mixed-batch tests
            continue
        model = PeftModel.from_pretrained(load_tiny(), folders[name]).eval()  # the ordinary PEFT way, one row
        ids = torch.tensor([encode_prompt(tiny_tokenizer(), prompts[i], prompt_template(tiny_tokenizer()))])
        with torch.inference_mode():
            expected = model(input_ids=ids).logits[0, -1]
            tokens = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=2
            )[0, ids.shape[1] :].tolist()
        assert completions[i].tokens == tokens[: len(completions[i].tokens)], (i, name)
        torch.testing.assert_close(logits[i], expected, rtol=1e-4, atol=1e-4, msg=f"row {i} ({name})")
    after = engine.next_token_logits(PROMPTS[:2], ["lora", None])  # the base is back as it was
    torch.testing.assert_close(after[1], alone(None, PROMPTS[1])[1], rtol=1e-4, atol=1e-4)
    with pytest.raises(InvalidInputError, match=r"LOHA.*cannot be part of a weighted mix"):
        engine.generate(["a"], [{"loha": 0.5, "lora": 0.5}])
    with pytest.raises(InvalidInputError, match="2 prompts but 1 adapter"):
        engine.generate(["a", "b"], ["lora"])
    with pytest.raises(InvalidInputError, match="Mix weight"):
        engine.generate(["a"], [{"lora": "lots"}])


def test_continuous_batching_with_admission_waves_and_early_finishers(adapters):
    """More requests than cache slots, each with its own length: slots are reused as rows finish, a finished
    row's slot gets the next waiting request, and every row still equals running it alone."""
    engine = MultiAdapterModel((load_tiny(), tiny_tokenizer()), max_running=3)
    for name, folder in adapters.items():
        engine.add(name, folder)
    rows = ["lora", None, "reft", "rslora", "ia3", "reft", "lora", None]
    limits = [7, 1, 4, 9, 2, 6, 3, 5]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(rows))]
    got = engine.generate_tokens(prompts, rows, max_new_tokens=limits, ignore_eos=True)
    for prompt, name, limit, completion in zip(prompts, rows, limits, got, strict=True):
        alone_tokens = engine.generate_tokens([prompt], [name], max_new_tokens=limit, ignore_eos=True)[0].tokens
        assert completion.tokens == alone_tokens and len(alone_tokens) == limit
        assert completion.finish_reason == "length"
    assert engine.running() == []  # every slot was given back


def test_every_step_is_one_forward_over_prompt_chunks_and_decode_tokens_together(adapters):
    """Requests arrive while others decode: each step is a single forward of the model whose rows mix prompt
    chunks (a long one chunked) of LoRA, ReFT, IA3 and mixes with one token of every decoding request, and every
    request still gets exactly the tokens it gets alone."""
    from hub_peft.modeling import find_decoder
    from hub_peft.serving.sampling import SamplingParams
    from hub_peft.serving.scheduler import Request, Scheduler

    engine = MultiAdapterModel((load_tiny(), tiny_tokenizer()), max_running=8, max_model_len=256)  # rotary: any length
    for name, folder in adapters.items():
        engine.add(name, folder)
    engine.generate(["a"], max_new_tokens=1)  # the slot cache's one-time check runs at the first admission
    assert engine.batching == "continuous"
    forwards, layouts = [0], []
    find_decoder(engine.core).register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    original = engine.forward_ragged

    def spy(rows):
        layouts.append(sorted(n for _, n in rows))
        return original(rows)

    engine.forward_ragged = spy
    scheduler = Scheduler(engine, prefill_budget=128)
    long_prompt = " ".join(f"w{i % 90}" for i in range(200))
    waves = [
        [("lora", PROMPTS[1]), ("ia3", PROMPTS[3])],
        [("reft", PROMPTS[4]), (None, long_prompt), ({"lora": 0.6, "reft": 0.4}, PROMPTS[0])],
        [("rslora", PROMPTS[5]), ({"ia3": 0.5, "rslora": 0.5}, PROMPTS[2])],
    ]
    requests = []
    for wave in waves:
        batch = [Request(prompt, name, SamplingParams(max_tokens=6, ignore_eos=True)) for name, prompt in wave]
        scheduler.submit(*batch)
        requests += batch
        for _ in range(2):
            before = forwards[0] + engine.lean_steps
            scheduler.step()
            assert forwards[0] + engine.lean_steps - before == 1  # one forward per step (decode-only: the lean one)
    scheduler.run_until_done()
    mixed = [layout for layout in layouts if layout[0] == 1 and layout[-1] > 1]
    assert len(mixed) >= 3 and any(layout[-1] == 128 for layout in mixed)  # decode tokens beside prompt chunks
    for request in requests:
        alone_tokens = engine.generate_tokens([request.prompt], [request.adapter], max_new_tokens=6, ignore_eos=True)[
            0
        ].tokens
        assert request.tokens == alone_tokens, request.adapter


def test_a_chunked_prefill_keeps_reft_positions_and_matches_the_plain_model(tmp_path):
    """A prompt longer than the step's token budget is fed in chunks; the ReFT edits of its first and last
    tokens land in the chunks that hold them, and the logits equal one plain forward of the ReftModel."""
    from transformers import AutoModelForCausalLM

    from hub_peft.serving.sampling import SamplingParams
    from hub_peft.serving.scheduler import Request, Scheduler

    torch.manual_seed(0)
    config = tiny_llama_config(max_position_embeddings=512)
    base = AutoModelForCausalLM.from_config(config).eval()
    reft = get_reft_model(base, ReftConfig(layers=[0, 1], positions="f3+l2", prompt_template="{prompt}"))
    with torch.no_grad():
        for module in reft.interventions.values():
            module.source.weight.mul_(5)
    folder = save_adapter(reft, tmp_path / "reft")
    reft.remove_hooks()
    prompt = " ".join(f"w{i % 90}" for i in range(300))
    ids = torch.tensor([tiny_tokenizer()(prompt)["input_ids"]])
    plain = load_adapter(base, folder)
    with torch.no_grad():
        expected = plain(input_ids=ids).logits[0, -1]
    plain.remove_hooks()
    engine = MultiAdapterModel((base, tiny_tokenizer()))
    engine.add("reft", folder)
    engine.generate(["a"], max_new_tokens=1)  # the slot cache's one-time check runs at the first admission
    chunks = []
    original = engine.forward_ragged

    def spy(rows):
        chunks.append([n for _, n in rows])
        return original(rows)

    engine.forward_ragged = spy
    scheduler = Scheduler(engine, prefill_budget=128)
    request = Request(prompt, "reft", SamplingParams(max_tokens=1, logprobs=0), raw=True)
    scheduler.submit(request)
    scheduler.run_until_done()
    assert len(ids[0]) == 300 and [c[0] for c in chunks] == [128, 108, 64]  # the last chunk holds the last 64
    assert request.generation.samples[0].logprob == pytest.approx(
        torch.log_softmax(expected, -1).max().item(), abs=1e-4
    )
    logits = engine.next_token_logits([prompt], ["reft"], raw=True)[0]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_adaption_prompt_multitask_prompt_tuning_and_cpt_are_served_as_plain_peft_runs_them(adapters, tmp_path):
    """They cannot share a forward, so each runs in a sub-batch of its own through PEFT (multitask prompt
    tuning with task 0), with the same tokens as PEFT's own generate; the base is restored after each."""
    from peft import AdaptionPromptConfig, CPTConfig, MultitaskPromptTuningConfig, PeftModel, get_peft_model

    from hub_peft.chat import encode_prompt, prompt_template

    configs = {
        "adaption": AdaptionPromptConfig(adapter_len=2, adapter_layers=1, task_type="CAUSAL_LM"),
        "mpt": MultitaskPromptTuningConfig(num_virtual_tokens=4, num_tasks=2, task_type="CAUSAL_LM"),
        "cpt": CPTConfig(
            cpt_token_ids=[5, 6, 7, 8], cpt_mask=[1, 1, 1, 1], cpt_tokens_type_mask=[1, 2, 2, 2], task_type="CAUSAL_LM"
        ),
    }
    engine = MultiAdapterModel((load_tiny(), tiny_tokenizer()))
    engine.add("lora", adapters["lora"])
    folders = {}
    for name, config in configs.items():
        torch.manual_seed(len(name))
        model = get_peft_model(load_tiny(), config)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p))
        folders[name] = save_adapter(model, tmp_path / name)
        assert engine.add(name, folders[name])["mixable"] is False
    rows = ["adaption", "lora", "mpt", "cpt", None]
    got = engine.generate_tokens(PROMPTS[:5], rows, max_new_tokens=4, ignore_eos=True)
    for i, name in enumerate(rows):
        if name not in folders:
            continue
        model = PeftModel.from_pretrained(load_tiny(), folders[name]).eval()
        ids = torch.tensor([encode_prompt(tiny_tokenizer(), PROMPTS[i], prompt_template(tiny_tokenizer()))])
        extra = {"task_ids": torch.zeros(1, dtype=torch.long)} if name == "mpt" else {}
        with torch.inference_mode():
            tokens = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=4,
                min_new_tokens=4,
                do_sample=False,
                pad_token_id=2,
                **extra,
            )
        assert got[i].tokens == tokens[0, ids.shape[1] :].tolist(), name
    assert [type(layer.self_attn).__name__ for layer in engine.core.model.layers] == ["LlamaAttention"] * 2
    fresh = MultiAdapterModel((load_tiny(), tiny_tokenizer()))  # a base that never had them attached
    fresh.add("lora", adapters["lora"])
    shared = [
        [c.tokens for c in e.generate_tokens(PROMPTS[:2], ["lora", None], max_new_tokens=4)] for e in (engine, fresh)
    ]
    assert shared[0] == shared[1]


def test_one_adapter_at_different_mix_weights_in_one_batch(engine):
    """Rows whose specs name the same adapters with other weights are different specs: each row, in prefill
    and in every decode step, equals that spec run alone."""
    rows = [{"lora": 0.25}, {"lora": 1.0}, "lora", {"lora": 0.25, "reft": 1.0}, {"lora": 0.75, "reft": 0.5}, None]
    prompts = [PROMPTS[1]] * len(rows)  # one prompt: only the weights tell the rows apart
    logits = engine.next_token_logits(prompts, rows)
    got = engine.generate_tokens(prompts, rows, max_new_tokens=6, ignore_eos=True)
    for i, spec in enumerate(rows):
        alone_logits = engine.next_token_logits([prompts[i]], [spec])[0]
        torch.testing.assert_close(logits[i], alone_logits, rtol=1e-4, atol=1e-4, msg=f"row {i} ({spec})")
        alone_tokens = engine.generate_tokens([prompts[i]], [spec], max_new_tokens=6, ignore_eos=True)[0].tokens
        assert got[i].tokens == alone_tokens
    assert not torch.allclose(logits[0], logits[1], atol=1e-3), "the weights changed nothing"
