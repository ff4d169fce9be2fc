"""The architecture matrix: tiny seeded random models of the decoder families most used on the Hub, each pushed
to the local Hub and loaded from there with hub_peft, then checked against plain PEFT / transformers:

- format round trip: a LoRA saved, pushed and loaded with ``load_adapter`` gives plain PEFT's logits exactly;
- engine: one batch of two LoRAs (all linear layers, one rsLoRA), an IA3, a weighted LoRA mix, the bare base
  and a trained ReFT adapter; every row's greedy tokens equal its adapter's own ``generate`` alone, and its
  next-token logits are within 1e-4 (full precision and NF4);
- NF4: every linear layer of the decoder blocks is a bitsandbytes ``Linear4bit`` after ``load_base_model``.

``docs/architectures.md`` is this file's table: the last test builds it from what the others measured and
fails when the committed file differs (``HUB_PEFT_WRITE_DOCS=1`` rewrites it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from test_peft_methods import tiny_tokenizer

from hub_peft import load_adapter, load_base_model, push_adapter, save_adapter

DOCS = Path(__file__).resolve().parents[1] / "docs" / "architectures.md"
COMMON = {"vocab_size": 128, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
LLAMA_LIKE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
WINDOW = 6  # sliding windows shorter than the prompts, so the window decides what a token sees


def _config(arch: str):
    import transformers as t

    table = {
        "llama": lambda: t.LlamaConfig(**LLAMA_LIKE),
        "qwen2": lambda: t.Qwen2Config(**LLAMA_LIKE),
        "qwen3": lambda: t.Qwen3Config(**LLAMA_LIKE, head_dim=16),
        "mistral": lambda: t.MistralConfig(**LLAMA_LIKE, sliding_window=WINDOW),
        "gemma2": lambda: t.Gemma2Config(
            **LLAMA_LIKE,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=WINDOW,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=10.0,
        ),
        "gemma3": lambda: t.Gemma3TextConfig(
            **LLAMA_LIKE,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention"],
        ),
        "phi3": lambda: t.Phi3Config(**LLAMA_LIKE),
        "olmo2": lambda: t.Olmo2Config(**LLAMA_LIKE),
        "granite": lambda: t.GraniteConfig(
            **LLAMA_LIKE,
            attention_multiplier=0.2,
            residual_multiplier=0.5,
            embedding_multiplier=2.0,
            logits_scaling=2.0,
        ),
        "stablelm": lambda: t.StableLmConfig(**LLAMA_LIKE),
        "gpt_neox": lambda: t.GPTNeoXConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            rotary_pct=0.5,
        ),
        "gpt2": lambda: t.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256),
        "opt": lambda: t.OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            max_position_embeddings=256,
        ),
        "gpt_bigcode": lambda: t.GPTBigCodeConfig(n_embd=64, n_layer=2, n_head=4, n_positions=256, multi_query=True),
        "falcon": lambda: t.FalconConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            new_decoder_architecture=True,
            num_kv_heads=2,
            alibi=False,
        ),
        "bloom": lambda: t.BloomConfig(hidden_size=64, n_layer=2, n_head=4),
    }
    config = table[arch]()
    for key, value in COMMON.items():
        setattr(config, key, value)
    return config


ARCHS = [
    "llama",
    "qwen2",
    "qwen3",
    "mistral",
    "gemma2",
    "gemma3",
    "phi3",
    "olmo2",
    "granite",
    "stablelm",
    "gpt_neox",
    "gpt2",
    "gpt_bigcode",
    "opt",
    "falcon",
    "bloom",
]
PROMPTS = ["a b c d e f g h", "i j k", "l m n o p q r s t u v", "w x y z a b", "c d e f g h i j k l", "m n o p q r s"]
ROWS = ["lora_a", "lora_b", "ia3", {"lora_a": 0.6, "lora_b": 0.4}, None, "reft"]
LORA_ROWS = ["lora_b", {"lora_a": 0.6, "lora_b": 0.4}, None, "lora_a"]
NEW_TOKENS = 6
PER_SEQUENCE = {"bloom"}  # attention outside transformers' interface (ALiBi): each sequence its own forward
LEAN = ["llama", "qwen2", "qwen3", "mistral"]  # decode steps on hub_peft.serving.lean's step
RESULTS: dict[str, dict[str, str]] = {}


def _record(arch: str, column: str, value: str) -> None:
    RESULTS.setdefault(arch, {})[column] = value


@pytest.fixture(scope="module")
def bases(local_hub, alice, tmp_path_factory):
    """``arch -> repo id`` of its tiny base on the local Hub (pushed on first use)."""
    from huggingface_hub import HfApi
    from transformers import AutoModelForCausalLM

    api, pushed = HfApi(endpoint=local_hub.endpoint, token=alice), {}

    def get(arch: str) -> str:
        if arch not in pushed:
            torch.manual_seed(0)
            folder = tmp_path_factory.mktemp(f"base_{arch}")
            AutoModelForCausalLM.from_config(_config(arch)).save_pretrained(folder)
            tiny_tokenizer().save_pretrained(folder)
            repo = f"alice/tiny-{arch.replace('_', '-')}"
            api.create_repo(repo, exist_ok=True)
            api.upload_folder(repo_id=repo, folder_path=folder)
            pushed[arch] = repo
        return pushed[arch]

    return get


def _block_linears(model) -> dict[str, torch.nn.Module]:
    from hub_peft.modeling import find_decoder_layers, innermost_model
    from hub_peft.serving.row_deltas import is_linear as _is_linear

    core = innermost_model(model)
    prefix = next(n for n, m in core.named_modules() if m is find_decoder_layers(core))
    return {n: m for n, m in core.named_modules() if n.startswith(prefix + ".") and _is_linear(m)}


def _fan_in(module) -> int:
    return module.weight.shape[0] if type(module).__name__ == "Conv1D" else module.in_features


@pytest.fixture(scope="module")
def adapters(bases, tmp_path_factory):
    """``arch -> {name: folder}``: two LoRAs on every linear layer (one rsLoRA), an IA3 (the largest-fan-in
    layer, the MLP's down projection, as its feed-forward layer) and a ReFT adapter trained by hub_peft."""
    from peft import IA3Config, LoraConfig, get_peft_model

    from hub_peft.training import TrainSettings, save_trained, train_adapter

    made = {}

    def get(arch: str) -> dict[str, Path]:
        if arch in made:
            return made[arch]
        root, repo = tmp_path_factory.mktemp(f"adapters_{arch}"), bases(arch)
        folders = {}
        for seed, (name, extra) in enumerate([("lora_a", {"r": 4}), ("lora_b", {"r": 8, "use_rslora": True})]):
            torch.manual_seed(seed + 1)
            model = get_peft_model(
                load_base_model(repo)[0],
                LoraConfig(lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **extra),
            )
            with torch.no_grad():  # large enough deltas to change greedy tokens
                for key, p in model.named_parameters():
                    if "lora_B" in key:
                        p.mul_(8)
            folders[name] = save_adapter(model, root / name)
        base = load_base_model(repo)[0]
        linears = _block_linears(base)
        leaf = {n.rsplit(".", 1)[1] for n in linears}
        down = max(linears.items(), key=lambda item: _fan_in(item[1]))[0].rsplit(".", 1)[1]
        model = get_peft_model(base, IA3Config(target_modules=sorted(leaf), feedforward_modules=[down]))
        torch.manual_seed(5)
        with torch.no_grad():
            for key, p in model.named_parameters():
                if "ia3_l" in key:
                    p.copy_(torch.empty_like(p).uniform_(0.2, 2.5))
        folders["ia3"] = save_adapter(model, root / "ia3")
        rows = [{"prompt": p, "response": " ".join(reversed(p.split()))[:9]} for p in PROMPTS]
        settings = TrainSettings(method="reft", layers=[0, 1], positions="f1+l1", epochs=8, batch_size=6, lr=0.02)
        trained = train_adapter(rows, settings, base=load_base_model(repo))
        losses = [entry["loss"] for entry in trained.result.history]
        assert losses[-1] < losses[0], f"{arch}: ReFT training did not lower the loss ({losses})"
        folders["reft"] = save_trained(trained, root / "reft")
        made[arch] = folders
        return folders

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_a_pushed_lora_loads_as_plain_peft_loads_it(arch, bases, adapters, alice, repo_name):
    from peft import PeftModel

    repo = f"alice/{repo_name}"
    push_adapter(adapters(arch)["lora_a"], repo, token=alice)
    ids = torch.tensor([tiny_tokenizer()(PROMPTS[0])["input_ids"]])
    with torch.no_grad():
        ours = load_adapter(load_base_model(bases(arch))[0], repo)(input_ids=ids).logits
        plain = PeftModel.from_pretrained(load_base_model(bases(arch))[0], repo)(input_ids=ids).logits
        bare = load_base_model(bases(arch))[0](input_ids=ids).logits
    assert torch.equal(ours, plain)
    assert (ours - bare).abs().max() > 1e-2, "the adapter changed nothing"
    _record(arch, "round trip", "exact")


def _alone(repo: str, folders: dict[str, Path], row, prompt: str, nf4: bool) -> tuple[list[int], torch.Tensor]:
    """The ordinary way, one prompt: the row's adapter(s) loaded by PEFT / ReftModel onto a fresh base ->
    (greedy tokens, next-token logits). A mix is PEFT with both LoRAs active, each scaled by its weight."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from hub_peft.chat import encode_prompt, trained_prompt_template

    tokenizer = tiny_tokenizer()
    base = load_base_model(repo, load_in_4bit=nf4)[0]
    if row is None:
        model = base
    elif isinstance(row, dict):
        names = sorted(row)
        model = PeftModel.from_pretrained(base, folders[names[0]], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(folders[name], adapter_name=name)
        model.base_model.set_adapter(names)
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for name in names:
                    module.scaling[name] *= row[name]
    elif row == "reft":
        model = load_adapter(base, folders[row])
    else:
        model = PeftModel.from_pretrained(base, folders[row])
    template = trained_prompt_template(model) if row == "reft" else "{prompt}"
    ids = torch.tensor([encode_prompt(tokenizer, prompt, template)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    return greedy_tokens(model, ids), logits


def greedy_tokens(model, ids: torch.Tensor) -> list[int]:
    """``model``'s greedy ``NEW_TOKENS`` after the one prompt ``ids``, by transformers' ``generate``."""
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=2,
        )
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("nf4", [False, True], ids=["fp32", "nf4"])
@pytest.mark.parametrize("arch", ARCHS)
def test_the_engine_serves_a_mixed_batch_exactly(arch, nf4, bases, adapters):
    from hub_peft.serving import MultiAdapterModel

    repo, folders = bases(arch), adapters(arch)
    model, tokenizer = load_base_model(repo, load_in_4bit=nf4)
    if nf4:
        linears = _block_linears(model)
        four_bit = [n for n, m in linears.items() if type(m).__name__ == "Linear4bit"]
        assert len(four_bit) == len(linears), f"not 4-bit: {sorted(set(linears) - set(four_bit))}"
        assert model.hub_peft_source.quantization == "nf4"
    engine = MultiAdapterModel((model, tokenizer), packed_head=False)
    for name, folder in folders.items():
        engine.add(name, folder)
    raw = [row != "reft" for row in ROWS]
    completions = engine.generate_tokens(PROMPTS, ROWS, max_new_tokens=NEW_TOKENS, raw=raw)
    logits = engine.next_token_logits(PROMPTS, ROWS, raw=raw)
    bare = None
    for i, (prompt, row) in enumerate(zip(PROMPTS, ROWS, strict=True)):
        tokens, expected = _alone(repo, folders, row, prompt, nf4)
        label = f"{arch} row {i} ({row})"
        torch.testing.assert_close(logits[i], expected, rtol=1e-4, atol=1e-4, msg=label)
        assert completions[i].tokens == tokens, label
        if row is None:
            bare = expected
    others = engine.next_token_logits([PROMPTS[4]] * 4, ROWS[:4], raw=True)
    assert all((row - bare).abs().max() > 1e-2 for row in others), "an adapter changed nothing"
    assert (engine.batching == "per-sequence") == (arch in PER_SEQUENCE), engine.ragged_reason
    mode = engine.batching if engine.ragged_reason is None else f"{engine.batching} ({engine.ragged_reason})"
    _record(arch, "engine", mode)
    _record(arch, "nf4" if nf4 else "fp32", "exact")
    assert (engine.lean_reason is None) == (arch in LEAN), engine.lean_reason
    assert (engine.lean_steps > 0) == (arch in LEAN)  # the decode steps above ran on it
    _record(arch, "decode step", "lean" if arch in LEAN else "transformers")
    if nf4:
        _record(arch, "4-bit layers", f"{len(linears)}/{len(linears)}")


@pytest.mark.parametrize("nf4", [False, True], ids=["fp32", "nf4"])
@pytest.mark.parametrize("arch", LEAN)
def test_lean_decode_steps_give_transformers_logits(arch, nf4, bases, adapters):
    """The mixed batch's decode steps on the lean step, then a batch of LoRA rows on the whole-step kernel
    (:class:`hub_peft.serving.lean.NativeStep`), against transformers' forward: the same tokens, and every
    decode step's logits of every row within float32 rounding (both sum in another order)."""
    from hub_peft.serving import MultiAdapterModel

    raw = [row != "reft" for row in ROWS]
    seen = {}
    for lean in (True, False):
        engine = MultiAdapterModel(load_base_model(bases(arch), load_in_4bit=nf4), packed_head=False, lean_decode=lean)
        for name, folder in adapters(arch).items():
            engine.add(name, folder)
        logits = record_logits(engine)
        completions = engine.generate_tokens(PROMPTS, ROWS, max_new_tokens=NEW_TOKENS, raw=raw, ignore_eos=True)
        assert (engine.lean_steps >= NEW_TOKENS - 1) == lean, engine.lean_reason
        assert engine.native_steps == int(lean)  # the engine's one-time check; IA3 rows ran the lean step's Python
        # LoRA rows only (two adapters, a mix, a base row): the whole step in one call of the fused kernels
        completions += engine.generate_tokens(PROMPTS[:4], LORA_ROWS, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        assert (engine.native_steps >= NEW_TOKENS - 1) == lean, engine._lean and engine._lean.native_reason
        seen[lean] = [c.tokens for c in completions], logits
    (tokens, logits), (reference_tokens, reference_logits) = seen[True], seen[False]
    assert tokens == reference_tokens
    assert logits.keys() == reference_logits.keys()
    for prompt, rows in logits.items():
        torch.testing.assert_close(torch.stack(rows), torch.stack(reference_logits[prompt]), rtol=1e-5, atol=1e-5)


def record_logits(engine) -> dict[tuple[int, ...], list[torch.Tensor]]:
    """Every logits row ``engine`` samples from from now on, per prompt (its token ids), in order."""
    logits: dict[tuple[int, ...], list[torch.Tensor]] = {}
    sample = engine.sample

    def recording(seq, row, allowed=None):
        logits.setdefault(tuple(seq.prompt_ids), []).append(row.clone())
        return sample(seq, row, allowed)

    engine.sample = recording
    return logits


def test_a_per_sequence_base_streams_and_shares_steps(bases, adapters):
    """On a base that cannot use the slot cache, requests still go through the scheduler's steps: tokens of
    different requests arrive interleaved, one per step each, not one whole completion after another."""
    from transformers import AutoModelForCausalLM, FalconConfig

    from hub_peft.serving import MultiAdapterModel
    from hub_peft.serving.engine import _ragged_blocker

    alibi = FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, alibi=True, vocab_size=128)
    assert (
        _ragged_blocker(AutoModelForCausalLM.from_config(alibi))
        == "it adds ALiBi position biases to the attention mask"
    )
    engine = MultiAdapterModel(load_base_model(bases("bloom")), packed_head=False)
    assert engine.ragged_reason == "BloomAttention does not dispatch through transformers' attention interface"
    for name, folder in adapters("bloom").items():
        engine.add(name, folder)
    order: list[int] = []
    completions = engine.generate_tokens(
        PROMPTS[:3],
        ["lora_a", "reft", None],
        max_new_tokens=4,
        ignore_eos=True,
        on_token=lambda row, _: order.append(row),
    )
    assert all(len(c.tokens) == 4 for c in completions)
    assert order[:3] == [0, 1, 2] and order[3:6] == [0, 1, 2], order


def test_on_a_per_sequence_base_a_failing_request_fails_alone(bases, adapters):
    """A request whose adapter breaks mid-step fails alone; the others, retried one by one from where they
    were (their caches cropped back), answer what they answer alone and stream nothing twice."""
    from hub_peft.serving import MultiAdapterModel
    from hub_peft.serving.cache import CachedCopy
    from hub_peft.serving.sampling import SamplingParams
    from hub_peft.serving.scheduler import Request, Scheduler

    engine = MultiAdapterModel(load_base_model(bases("bloom")), packed_head=False)
    folders = adapters("bloom")
    for name in ("lora_a", "ia3", "reft"):
        engine.add(name, folders[name])
    engine.add("broken", folders["lora_b"])
    entry = engine.cache.entries["broken"]
    entry.cached = CachedCopy("damaged", entry.kind, entry.folder)  # its own copy of the weights, then damaged
    engine.cache.materialize(entry)
    module = sorted(entry.payload.weights)[-1]  # the last layer's: the earlier layers' caches are written first
    A, B = entry.payload.weights[module]
    entry.payload.weights[module] = (A[:-1], B)  # a shape no matmul accepts
    streamed: dict[int, list[int]] = {}

    def update(request, samples, _):
        streamed.setdefault(request.row, []).extend(s.token for s in samples)

    names = ["lora_a", "reft", "broken", "ia3"]  # the broken one after two that ran in the same step
    jobs = [
        Request(
            PROMPTS[i], name, SamplingParams(max_tokens=4, ignore_eos=True), raw=name != "reft", row=i, on_update=update
        )
        for i, name in enumerate(names)
    ]
    scheduler = Scheduler(engine)
    scheduler.submit(*jobs)
    scheduler.run_until_done()
    assert jobs[2].finish_reason == "error" and "shapes cannot be multiplied" in str(jobs[2].error)
    for job in (jobs[0], jobs[1], jobs[3]):
        alone = engine.generate_tokens([job.prompt], [job.adapter], max_new_tokens=4, ignore_eos=True, raw=job.raw)
        assert job.error is None and job.tokens == alone[0].tokens, job.adapter
        assert streamed[job.row] == job.tokens


def _sinks_or_multi_query(kind: str):
    import transformers as t

    if kind == "gpt_oss":  # attention sinks: a learned logit per head that every softmax includes
        config = t.GptOssConfig(
            **LLAMA_LIKE,
            head_dim=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention"],
        )
    else:  # differential attention: two softmax maps per head, subtracted
        config = t.DiffLlamaConfig(**LLAMA_LIKE)
    for key, value in COMMON.items():
        setattr(config, key, value)
    return config


@pytest.mark.parametrize("kind", ["gpt_oss", "diffllama"])
def test_what_the_slot_cache_cannot_reproduce_runs_per_sequence_exactly(kind, tmp_path):
    """The static checks pass these (attention interface, numbered modules), but the slot cache's attention
    would be wrong: GPT-OSS's attention sinks from the first token, DiffLlama's differential attention from the
    first decode step. The one-time check at the first admission sends them to per-sequence mode, and every row
    is then exactly its own."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from hub_peft.serving import MultiAdapterModel
    from hub_peft.serving.engine import _ragged_blocker

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(_sinks_or_multi_query(kind)).eval()
    base.save_pretrained(tmp_path / "base")
    assert _ragged_blocker(base) is None
    torch.manual_seed(1)
    lora = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    folder = save_adapter(lora, tmp_path / "lora")
    engine = MultiAdapterModel((base, tiny_tokenizer()), packed_head=False)
    engine.add("lora", folder)
    got = engine.generate_tokens(PROMPTS[:3], ["lora", None, "lora"], max_new_tokens=NEW_TOKENS, raw=True)
    step = "step 1" if kind == "gpt_oss" else "step 2"
    assert engine.batching == "per-sequence" and "does not reproduce" in engine.ragged_reason, engine.ragged_reason
    assert step in engine.ragged_reason
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), folder).eval()
    for completion, prompt, row in zip(got, PROMPTS, ["lora", None, "lora"], strict=False):
        ids = torch.tensor([tiny_tokenizer()(prompt)["input_ids"]])
        with plain.disable_adapter() if row is None else torch.no_grad():
            expected = greedy_tokens(plain, ids)
        assert completion.tokens == expected, (kind, row)


def test_reft_hooks_are_attached_only_for_what_loaded_adapters_use(bases, tmp_path):
    """OPT's blocks have no MLP sub-module: the engine still builds and serves LoRA and block-output ReFT, and
    only an adapter that edits the missing component (made on a Llama of the same width) is refused, by name,
    leaving nothing behind."""
    from hub_peft.errors import IncompatibleAdapterError
    from hub_peft.reft import ReftConfig, get_reft_model
    from hub_peft.serving import MultiAdapterModel

    engine = MultiAdapterModel(load_base_model(bases("opt")), packed_head=False)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in engine._layers.modules())
    mlp = get_reft_model(load_base_model(bases("llama"))[0], ReftConfig(layers=[1], components=["mlp_output"]))
    folder = save_adapter(mlp, tmp_path / "mlp-reft")
    with pytest.raises(IncompatibleAdapterError, match="OPTDecoderLayer has no MLP sub-module"):
        engine.add("mlp", folder)
    assert engine.cache.loaded() == [] and engine._reft_sites == set()
    block = get_reft_model(load_base_model(bases("opt"))[0], ReftConfig(layers=[1], components=["block_output"]))
    engine.add("block", save_adapter(block, tmp_path / "block-reft"))
    assert engine._reft_sites == {(1, "block_output")}
    hooked = [m for m in engine._layers.modules() if m._forward_hooks or m._forward_pre_hooks]
    assert hooked == [engine._layers[1]]


def test_a_model_without_4bit_layers_is_never_called_nf4(bases, tmp_path):
    """transformers' bitsandbytes loader skips nn.Linear subclasses (Falcon's FalconLinear): a Falcon loaded
    with it directly has zero 4-bit layers although its config says 4-bit; its adapter's card says full
    precision. hub_peft's loader quantizes those layers and records how many are 4-bit."""
    from huggingface_hub import ModelCard
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(bases("falcon"), quantization_config=bnb, device_map="cpu")
    assert not any(type(m).__name__ == "Linear4bit" for m in plain.modules())
    folder = save_adapter(get_peft_model(plain, LoraConfig(target_modules="all-linear")), tmp_path / "plain")
    card = (folder / "README.md").read_text()
    assert "NF4" not in card and "qlora" not in ModelCard(card).data.tags
    ours = load_base_model(bases("falcon"), load_in_4bit=True)[0]
    assert ours.hub_peft_source.quantization == "nf4" and ours.hub_peft_source.four_bit_layers == "8/8"
    folder = save_adapter(get_peft_model(ours, LoraConfig(target_modules="all-linear")), tmp_path / "ours")
    assert "NF4 4-bit (bitsandbytes), 8 of 8 decoder linear layers" in (folder / "README.md").read_text()


def _table() -> str:
    from transformers import __version__

    lines = [
        "# Architectures",
        "",
        "Generated by `tests/test_architectures.py` (tiny seeded random models built from transformers "
        f"{__version__.rsplit('.', 1)[0]}'s config classes, pushed to the local Hub; do not edit by hand: "
        "`HUB_PEFT_WRITE_DOCS=1 pytest tests/test_architectures.py` rewrites it). *exact*: every row of a batch "
        "(two LoRAs on all linear layers, an IA3, a weighted LoRA mix, the bare base and a ReFT adapter trained by "
        "hub_peft) gives its own adapter's greedy tokens alone with PEFT / `ReftModel`, next-token logits within "
        "1e-4. *continuous*: the rows share one packed forward per step on the engine's slot cache; "
        "*per-sequence*: same scheduler, streaming and adapters, but each sequence runs its own forward on "
        "transformers' cache. *lean*: decode steps run hub_peft's lean step (`hub_peft/serving/lean.py`, the "
        "same maths with fewer operations; and, where the rows carry LoRAs or nothing, the whole step in one "
        "call of the fused kernels, `hub_peft/_fused.c`; logits equal transformers' forward's within 1e-5 on that "
        "batch and on a batch of LoRA rows); *transformers*: every step runs the model's own forward.",
        "",
        "| architecture | engine batching | decode step | LoRA round trip vs PEFT | engine fp32 | engine NF4 | "
        "decoder linears in 4-bit |",
        "|---|---|---|---|---|---|---|",
    ]
    for arch in ARCHS:
        r = RESULTS[arch]
        lines.append(
            f"| {arch} | {r['engine']} | {r['decode step']} | {r['round trip']} | {r['fp32']} | {r['nf4']} "
            f"| {r['4-bit layers']} |"
        )
    return "\n".join(lines) + "\n"


def test_the_docs_table_is_this_matrix():
    columns = ("engine", "decode step", "round trip", "fp32", "nf4", "4-bit layers")
    missing = [a for a in ARCHS if any(c not in RESULTS.get(a, {}) for c in columns)]
    if missing:
        pytest.skip(f"run the whole file to build the table (not run here: {missing})")
    table = _table()
    if os.environ.get("HUB_PEFT_WRITE_DOCS") == "1":
        DOCS.parent.mkdir(exist_ok=True)
        DOCS.write_text(table)
    assert DOCS.read_text() == table, "docs/architectures.md is stale: HUB_PEFT_WRITE_DOCS=1 pytest " + __file__
