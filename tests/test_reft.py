"""Native ReFT on tiny seeded models: formulas, positions and padding, KV-cache generation, the cached
trainer against the plain loop, 4-bit, LoRA + ReFT, the repo format through the local Hub, pyreft import."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from huggingface_hub import ModelCard
from packaging.version import Version
from test_peft_methods import (  # noqa: F401 - tiny_base_repo: a shared session fixture
    load_tiny,
    tiny_base_repo,
    tiny_decoder_config,
    tiny_tokenizer,
)
from transformers import __version__ as transformers_version

from hub_peft import load_adapter, push_adapter, save_adapter
from hub_peft.errors import IncompatibleAdapterError, InvalidInputError, UnsafeFileError
from hub_peft.reft import INTERVENTIONS, Intervention, ReftConfig, get_reft_model
from hub_peft.training import Example, train_reft
from hub_peft.validate import validate_adapter

HIDDEN = 64
EOS = 2  # LlamaConfig's default eos_token_id


def tiny_llama(layers: int = 4, seed: int = 0):
    from transformers import LlamaConfig

    return tiny_causal_lm(LlamaConfig, layers, seed)


def tiny_causal_lm(config_class, layers: int, seed: int = 0, **fields):
    """A seeded causal LM of ``config_class`` (Llama-like), width ``HIDDEN``, ``fields`` set on its config."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_decoder_config(
        config_class, hidden_size=HIDDEN, num_hidden_layers=layers, max_position_embeddings=128, **fields
    )
    return AutoModelForCausalLM.from_config(config).eval()


def random_examples(n: int = 7, seed: int = 1, shared: list[int] = ()) -> list[Example]:
    """Random prompts (after the ``shared`` tokens, like a chat template's system prompt) and responses."""
    g = torch.Generator().manual_seed(seed)

    def tokens(lo: int, hi: int) -> list[int]:
        return torch.randint(3, 128, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    return [Example([*shared, *tokens(3, 12)], [*tokens(2, 8), 2]) for _ in range(n)]


# --- the formulas ---------------------------------------------------------------------------------


def reference_edit(kind: str, h: torch.Tensor, t: dict[str, torch.Tensor], act=lambda x: x) -> torch.Tensor:
    """The paper's formulas written out directly, from the exported tensors."""
    R, b = t["R"], t["b"]
    x = h.float()
    if kind in ("loreft", "noreft"):
        projected = x @ R.T + t.get("R_bias", 0)
        out = x + (act(x @ t["W"].T + b) - projected) @ R
    elif kind in ("direft", "nodireft"):
        out = x + act(x @ t["W"].T + b) @ R
    elif kind == "consreft":
        out = x + (b - x @ R.T) @ R
    else:  # lobireft
        out = x + b @ R
    return out.to(h.dtype)


@pytest.mark.parametrize("kind", INTERVENTIONS)
@pytest.mark.parametrize("activation", [None, "relu"])
def test_each_intervention_matches_its_formula(kind, activation):
    torch.manual_seed(0)
    module = Intervention(kind, HIDDEN, 4, activation=activation, proj_bias=True).eval()
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "parametrizations" not in name:  # R's own parameters must stay a valid orthogonal parametrization
                p.add_(0.3 * torch.randn_like(p))  # b starts at zero for the bias-only kinds
    h = torch.randn(3, 5, HIDDEN)
    tensors = module.export()
    act = torch.relu if activation == "relu" else (lambda x: x)
    torch.testing.assert_close(module(h), reference_edit(kind, h, tensors, act), rtol=1e-5, atol=1e-5)
    R = tensors["R"]
    if module.spec.orthogonal:
        torch.testing.assert_close(R @ R.T, torch.eye(4), rtol=0, atol=1e-5)
    assert ("R_bias" in tensors) == (kind == "noreft")


def test_parameters_stay_float32_and_output_keeps_the_input_dtype():
    module = Intervention("loreft", HIDDEN, 4)
    h = torch.randn(2, HIDDEN, dtype=torch.bfloat16)
    out = module(h)
    assert out.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in module.parameters())
    expected = reference_edit("loreft", h.float(), module.export()).to(torch.bfloat16)
    torch.testing.assert_close(out, expected)


def test_loreft_R_stays_orthonormal_while_training():
    model = get_reft_model(tiny_llama(), ReftConfig(layers=[1, 2], rank=4))
    before = {k: m.R.detach().clone() for k, m in model.interventions.items()}
    result = train_reft(model, random_examples(), epochs=5, batch_size=4, lr=5e-2)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    for key, module in model.interventions.items():
        R = module.R.detach()
        assert not torch.allclose(R, before[key]), "R never moved"
        torch.testing.assert_close(R @ R.T, torch.eye(4), rtol=0, atol=1e-5)


def test_bad_configs_say_what_is_wrong():
    with pytest.raises(InvalidInputError, match="intervention 'lora'"):
        ReftConfig(intervention="lora")
    with pytest.raises(InvalidInputError, match="positions"):
        ReftConfig(positions="last")
    with pytest.raises(InvalidInputError, match="components"):
        ReftConfig(components=["residual"])
    with pytest.raises(InvalidInputError, match=r"\{prompt\}"):
        ReftConfig(prompt_template="no placeholder")
    assert ReftConfig(positions="f2+l3").first_last == (2, 3)
    assert ReftConfig(positions="f1+l1").groups == ["f", "l"]
    assert ReftConfig(positions="f1+l1", share_weights=True).groups == ["fl"]
    with pytest.raises(IncompatibleAdapterError, match="only 4 layers"):
        get_reft_model(tiny_llama(), ReftConfig(layers=[7]))


# --- where and when: positions, padding, generation ---------------------------------------------

ALL_COMPONENTS = ["block_output", "block_input", "attention_output", "mlp_output"]


def reft_on_tiny(**kwargs):
    torch.manual_seed(4)
    return get_reft_model(tiny_llama(), ReftConfig(**{"layers": [1, 3], "rank": 3, **kwargs}))


def pad(prompts: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        span = slice(width - len(p), width) if side == "left" else slice(0, len(p))
        ids[i, span], mask[i, span] = torch.tensor(p), 1
    return ids, mask


PROMPTS = [[5, 9, 17, 33, 4, 8, 100], [7, 3], [60, 61, 62, 63, 64], [11]]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"positions": "l1"},
        {"positions": "f2+l2", "components": ALL_COMPONENTS},
        {"positions": "f1+l3", "share_weights": True},
    ],
    ids=["l1", "f2+l2-all-components", "f1+l3-shared"],
)
def test_a_padded_batch_gives_each_row_what_it_gets_alone(side, kwargs):
    model = reft_on_tiny(**kwargs)
    ids, mask = pad(PROMPTS, side)
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask).logits
        plain = model.base_model(input_ids=ids, attention_mask=mask).logits
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([prompt])).logits[0]
        rows = mask[i].bool()
        torch.testing.assert_close(batch[i][rows], alone, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(batch, plain, atol=1e-3), "the interventions changed nothing"


def test_only_the_chosen_positions_are_edited():
    model = reft_on_tiny(layers=[0], positions="f1+l1")
    seen = {}
    layer0 = model._layers[0]
    handle = layer0.register_forward_hook(lambda m, a, out: seen.__setitem__("h", out))  # runs after the edit hook
    ids = torch.tensor([[5, 9, 17, 33, 4, 8]])
    with torch.no_grad():
        model(input_ids=ids)
        edited = seen["h"].clone()
        model.base_model(input_ids=ids)
        plain = seen["h"].clone()
    handle.remove()
    changed = (edited - plain).abs().amax(dim=-1)[0] > 1e-6
    assert changed.tolist() == [True, False, False, False, False, True]


def greedy_without_cache(model, prompt: list[int], steps: int) -> list[int]:
    seq = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(
                input_ids=torch.tensor([seq]), prompt_lengths=torch.tensor([len(prompt)]), use_cache=False
            ).logits
        seq.append(int(logits[0, -1].argmax()))
        if seq[-1] == EOS:
            break
    return seq[len(prompt) :]


def test_generate_uses_the_kv_cache_and_equals_a_no_cache_greedy_decode():
    model = reft_on_tiny(positions="f1+l2", components=["block_output", "mlp_output"])
    ids, mask = pad(PROMPTS, "left")
    calls = []
    handle = model._layers[0].register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[1]))
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    handle.remove()
    assert calls[0] == ids.shape[1] and set(calls[1:]) == {1}, "decoding must run one token at a time on the cache"
    plain = model.base_model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0
    )
    assert not torch.equal(out, plain), "the interventions changed no generated token"
    for i, prompt in enumerate(PROMPTS):
        expected = greedy_without_cache(model, prompt, 6)
        assert out[i, ids.shape[1] :].tolist() == expected + [0] * (6 - len(expected))  # padded after EOS


# --- training ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "onednn",
    [(True, True), (False, False), (True, False), (False, True)],
    ids=["onednn-gemm", "default-gemm", "onednn-forward-only", "onednn-backward-only"],
)
@pytest.mark.parametrize(
    ("kwargs", "shared"),
    [
        ({"layers": [1, 3], "positions": "l1"}, []),
        ({"layers": [1, 3], "positions": "l1"}, [9, 4, 7, 7, 30]),  # every prompt starts with these tokens
        ({"layers": [0, 2], "positions": "f2+l2", "components": ALL_COMPONENTS}, []),
        ({"layers": [1], "positions": "f1+l3", "share_weights": True, "intervention": "noreft", "proj_bias": True}, []),
        ({"layers": [2], "positions": "l2", "intervention": "direft", "activation": "gelu"}, [5, 6]),
    ],
    ids=["l1", "l1-shared-prefix", "f2+l2-all-components", "noreft-shared", "direft-l2-shared-prefix"],
)
def test_the_cached_trainer_gives_the_plain_loops_losses(kwargs, shared, onednn, monkeypatch):
    """Same seed and data: the fast path (cached prefix, packed, skipped layers) and the plain
    full-forward loop must follow the same loss trajectory and end with the same weights, whichever
    GEMM the cached trainer picks for its linear layers."""
    from hub_peft.training import reft_cache as trainer

    force_gemm(monkeypatch, onednn)
    computed_once = []  # how many leading tokens the cached trainer ran once for all examples
    length = trainer._shared_prefix_length
    monkeypatch.setattr(trainer, "_shared_prefix_length", lambda *a: computed_once.append(length(*a)) or length(*a))
    runs = {}
    base = tiny_llama()
    for method in ("full", "cached"):
        torch.manual_seed(5)
        model = get_reft_model(base, ReftConfig(**kwargs))
        examples = random_examples(shared=shared)
        result = train_reft(model, examples, epochs=4, batch_size=3, lr=1e-2, method=method)
        assert result.args["method"] == method  # the cached path ran: no fallback to the plain loop
        runs[method] = ([h["loss"] for h in result.history], model.adapter_state_dict())
        model.remove_hooks()
    (full, full_state), (cached, cached_state) = runs["full"], runs["cached"]
    assert computed_once[-1] == len(shared)  # the precompute's call (the memory estimate's comes first)
    assert len(full) == len(cached) == 12
    assert full[-1] < full[0]
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(full), rtol=0, atol=1e-4)
    for name in full_state:
        torch.testing.assert_close(cached_state[name], full_state[name], rtol=0, atol=1e-4)


def force_gemm(monkeypatch, onednn: tuple[bool, bool]) -> None:
    """Make the cached trainer pick oneDNN (where this torch build has it) or the default GEMM everywhere,
    for the forward and the backward products as ``onednn`` says."""
    from hub_peft.reft import _kernels
    from hub_peft.training import reft_cache as trainer

    available = _kernels.onednn_available()
    gemms = _kernels.Gemms(forward=onednn[0] and available, backward=onednn[1] and available)
    monkeypatch.setattr(_kernels, "faster_gemms", lambda weight, rows: gemms)
    monkeypatch.setattr(trainer, "faster_gemms", lambda weight, rows: gemms)


def test_the_gemm_choice_is_timed_on_the_real_shape_and_cached_per_shape(monkeypatch):
    from hub_peft.reft import _kernels

    weights = torch.randn(96, HIDDEN)
    gemms = _kernels.faster_gemms(weights, rows=17)  # timed here, either may win, each way
    assert isinstance(gemms.forward, bool) and isinstance(gemms.backward, bool)
    assert not _kernels.faster_gemms(weights.double(), rows=17)  # oneDNN is used for float32 only

    timed = []
    monkeypatch.setattr(
        _kernels,
        "faster_gemms",
        lambda w, rows: timed.append((w.shape, rows)) or _kernels.Gemms(forward=w.shape[0] == 96, backward=False),
    )
    layers = [torch.nn.Sequential(torch.nn.Linear(HIDDEN, 96), torch.nn.Linear(96, HIDDEN)) for _ in range(3)]
    layers[2][0].weight.requires_grad_(True)  # trainable: never swapped
    for layer in layers[:2]:
        layer.requires_grad_(False)
    linears = _kernels.OneDnnLinears(layers, rows=23)
    assert timed == ([((96, HIDDEN), 23), ((HIDDEN, 96), 23)] if _kernels.onednn_available() else [])
    assert [c for _, _, c, _ in linears.swaps] == ([layers[0][0], layers[1][0]] if _kernels.onednn_available() else [])
    assert linears.gemms == (
        {id(layers[i][0].weight): _kernels.Gemms(True, False) for i in (0, 1)} if _kernels.onednn_available() else {}
    )
    with linears.active():
        assert all(isinstance(layer[0], _kernels.OneDnnLinear) for layer in layers[:2])
        assert isinstance(layers[1][1], torch.nn.Linear) and isinstance(layers[2][0], torch.nn.Linear)
    assert all(type(layer[0]) is torch.nn.Linear for layer in layers)


def test_the_cached_trainers_kernels_compute_what_plain_torch_computes(monkeypatch):
    """The fused output-layer cross-entropy (one vocabulary chunk, or several) and the oneDNN linear
    layer give plain torch's values and input gradients."""
    from hub_peft.reft import _kernels

    g = torch.Generator().manual_seed(0)
    for chunk in (8192, 48):  # 128 words: one chunk, then three (the last one short)
        monkeypatch.setattr(_kernels, "_VOCAB_CHUNK", chunk)
        head = torch.nn.Linear(HIDDEN, 128, bias=False).requires_grad_(False)
        hidden = torch.randn(37, HIDDEN, generator=g, requires_grad=True)
        targets = torch.randint(0, 128, (37,), generator=g)
        gemms = _kernels.Gemms(forward=chunk == 48, backward=chunk == 8192)  # each product on each GEMM once
        fused = _kernels.linear_cross_entropy(hidden, head, targets, gemms=gemms)
        (fused_grad,) = torch.autograd.grad(fused * 3, hidden)
        plain = torch.nn.functional.cross_entropy(head(hidden), targets)
        (plain_grad,) = torch.autograd.grad(plain * 3, hidden)
        torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(fused_grad, plain_grad, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="frozen linear layer without bias"):
        _kernels.linear_cross_entropy(hidden, torch.nn.Linear(HIDDEN, 128), targets)

    linear = torch.nn.Linear(HIDDEN, 96).requires_grad_(False)
    x = torch.randn(2, 11, HIDDEN, generator=g, requires_grad=True)
    (expected,) = torch.autograd.grad(linear(x.transpose(0, 1)).square().sum(), x)
    for forward, backward in [(True, True), (True, False), (False, True)]:
        gemms = _kernels.Gemms(forward, backward)
        fast = _kernels.OneDnnLinear(linear, gemms) if _kernels.onednn_available() else linear
        out = fast(x.transpose(0, 1))  # a non-contiguous input
        torch.testing.assert_close(out, linear(x.transpose(0, 1)), rtol=1e-5, atol=1e-5)
        (grad,) = torch.autograd.grad(out.square().sum(), x)
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-5)


def test_the_cached_trainer_checks_its_shortcuts_against_the_model(monkeypatch):
    """The fast loss is used only where the model's logits are exactly its output layer on the decoder's
    output. Gemma 2 soft-caps its logits (and its attention scores, which sends the packed attention to
    Gemma's own attention function): it gets the generic loss, and the plain loop's losses all the same."""
    from transformers import Gemma2Config

    from hub_peft.reft import _kernels
    from hub_peft.training.reft_cache import _CachedSteps

    model = get_reft_model(tiny_llama(), ReftConfig(layers=[1], positions="l1"))
    steps = _CachedSteps(model, random_examples(), batch_size=4)
    assert steps.fused_loss

    force_gemm(monkeypatch, (True, True))
    steps = _CachedSteps(model, random_examples(), batch_size=4)
    assert len(steps.linears.swaps) == (7 * 2 if _kernels.onednn_available() else 0)  # the 7 linears of layers 2, 3
    assert steps.head_gemms == _kernels.Gemms(_kernels.onednn_available(), _kernels.onednn_available())
    base = tiny_causal_lm(Gemma2Config, 4, head_dim=16, final_logit_softcapping=2.0, attn_logit_softcapping=0.3)
    losses = {}
    for method in ("full", "cached"):
        torch.manual_seed(5)
        model = get_reft_model(base, ReftConfig(layers=[1], positions="f1+l1"))
        if method == "cached":
            steps = _CachedSteps(model, random_examples(), batch_size=4)
            assert not steps.fused_loss and not steps.lean_layers  # Gemma 2's layers are not Llama's
        result = train_reft(model, random_examples(), epochs=3, batch_size=4, lr=1e-2, method=method)
        assert result.args["method"] == method
        losses[method] = [h["loss"] for h in result.history]
        model.remove_hooks()
    torch.testing.assert_close(torch.tensor(losses["cached"]), torch.tensor(losses["full"]), rtol=0, atol=1e-4)


def step_loss_and_grads(steps, lean: bool, rows: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    steps.lean = lean
    params = list(steps.model.interventions.parameters())
    loss = steps.loss(rows)
    return loss.detach(), torch.autograd.grad(loss, params)


def tiny_qwen2(layers: int):
    from transformers import Qwen2Config

    return tiny_causal_lm(Qwen2Config, layers)


@pytest.mark.parametrize(
    ("base", "shared"),
    [(tiny_llama, []), (tiny_llama, [9, 4, 7]), (tiny_qwen2, [9, 4, 7])],
    ids=["llama", "llama-shared-prefix", "qwen2-biases-shared-prefix"],
)
def test_the_lean_layers_give_the_models_own_loss_and_gradients(base, shared):
    """The cached trainer's written-out Llama-family layer (forward and backward): same loss and
    intervention gradients as the model's own layers through autograd, with cached prefixes, grouped
    key/value heads, padding in the per-example attention, and an intervention on an upper layer's output."""
    from hub_peft.training.reft_cache import _CachedSteps

    torch.manual_seed(3)
    model = get_reft_model(base(layers=5), ReftConfig(layers=[1, 3], positions="f1+l2", rank=3))
    for p in model.interventions.parameters():
        p.requires_grad_(True)
    steps = _CachedSteps(model, random_examples(n=6, shared=shared), batch_size=6)
    steps.loss([0, 1, 2])
    assert steps.lean is True and sorted(steps.lean_layers) == [2, 3, 4]  # checked on the first batch, then used
    for rows in ([0, 1, 2], [5, 3, 4, 1]):
        loss, grads = step_loss_and_grads(steps, True, rows)
        expected_loss, expected = step_loss_and_grads(steps, False, rows)
        torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-6)
        for grad, want in zip(grads, expected, strict=True):
            torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-7)
            assert want.abs().max() > 0


def test_lean_layers_are_used_only_where_they_reproduce_the_model(monkeypatch):
    """Not inside a layer with an intervention on its attention or MLP output (the lean layer has no hooks
    there), and not at all when the first batch shows a different output: then training falls back to
    the model's own layers and still gives the plain loop's losses."""
    from hub_peft.reft import _lean_layer
    from hub_peft.training.reft_cache import _CachedSteps

    model = get_reft_model(tiny_llama(), ReftConfig(layers=[1, 2], components=["block_output", "mlp_output"]))
    assert sorted(_CachedSteps(model, random_examples(), batch_size=4).lean_layers) == [3]
    model.remove_hooks()

    monkeypatch.setattr(_lean_layer, "_rotate", lambda x: x)  # a lean layer that gets rotary embeddings wrong
    losses = {}
    for method in ("full", "cached"):
        torch.manual_seed(5)
        model = get_reft_model(tiny_llama(), ReftConfig(layers=[1], positions="l1"))
        if method == "cached":
            steps = _CachedSteps(model, random_examples(), batch_size=4)
            steps.loss([0, 1])
            assert steps.lean is False and steps.lean_layers
        result = train_reft(model, random_examples(), epochs=3, batch_size=4, lr=1e-2, method=method)
        losses[method] = [h["loss"] for h in result.history]
        model.remove_hooks()
    torch.testing.assert_close(torch.tensor(losses["cached"]), torch.tensor(losses["full"]), rtol=0, atol=1e-4)


def plain_and_cached_losses(base, examples: list[Example], epochs: int) -> tuple[dict[str, torch.Tensor], str]:
    """Layer-1 LoReFT on ``base`` trained by the plain loop and by the cached trainer (same seed): each
    one's losses, and which loop the cached request really ran."""
    runs = {}
    for method in ("full", "cached"):
        torch.manual_seed(5)
        model = get_reft_model(base, ReftConfig(layers=[1], positions="l1"))
        runs[method] = train_reft(model, examples, epochs=epochs, batch_size=4, lr=1e-2, method=method)
        model.remove_hooks()
    return {m: torch.tensor([h["loss"] for h in r.history]) for m, r in runs.items()}, runs["cached"].args["method"]


@pytest.mark.parametrize("window", [6, 64])
def test_sliding_window_models_train_exactly(window, caplog):
    """Mistral's layers see only the last ``window`` tokens: the cached trainer handles examples shorter
    than that (here with a shared prefix) and hands longer ones to the plain loop, saying so."""
    from transformers import MistralConfig

    base = tiny_causal_lm(MistralConfig, 3, sliding_window=window)
    losses, ran = plain_and_cached_losses(base, random_examples(shared=[5, 6]), epochs=3)
    assert ran == ("full" if window == 6 else "cached")
    assert ("attends over windows of 6" in caplog.text) == (window == 6)
    torch.testing.assert_close(losses["cached"], losses["full"], rtol=0, atol=1e-4)


ARCHITECTURES = {  # tiny random configs; name -> (config class, kwargs, runs cached)
    "gpt2": ("GPT2Config", {"n_embd": HIDDEN, "n_layer": 3, "n_head": 4, "n_positions": 128}, True),
    "gpt_neox": ("GPTNeoXConfig", {"num_attention_heads": 4}, True),
    "opt": ("OPTConfig", {"num_attention_heads": 4, "ffn_dim": 128, "word_embed_proj_dim": HIDDEN}, True),
    "phi": ("PhiConfig", {"num_attention_heads": 4}, True),
    "phi3": ("Phi3Config", {"num_attention_heads": 4, "num_key_value_heads": 2, "pad_token_id": 0}, True),
    "qwen3": ("Qwen3Config", {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}, True),
    "gemma3": ("Gemma3TextConfig", {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}, True),
    "stablelm": ("StableLmConfig", {"num_attention_heads": 4, "num_key_value_heads": 4}, True),
    "olmo2": ("Olmo2Config", {"num_attention_heads": 4}, True),
    # Falcon's attention was its own code until transformers 5.25 moved it to the attention interface
    "falcon": ("FalconConfig", {"num_attention_heads": 4}, Version(transformers_version) >= Version("5.25")),
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_the_cached_trainer_runs_other_architectures_exactly_or_not_at_all(name):
    """Across decoder families the cached trainer either runs and gives the plain loop's losses (with a
    shared prefix, so the precompute's cache handling is exercised too), or hands over to the plain loop."""
    import transformers

    config_class, kwargs, cached = ARCHITECTURES[name]
    sizes = (
        {}
        if name == "gpt2"
        else {"hidden_size": HIDDEN, "num_hidden_layers": 3, "intermediate_size": 128, "max_position_embeddings": 128}
    )
    config = getattr(transformers, config_class)(vocab_size=128, **sizes, **kwargs)
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config).eval()
    losses, ran = plain_and_cached_losses(base, random_examples(shared=[5, 6]), epochs=2)
    assert ran == ("cached" if cached else "full")
    torch.testing.assert_close(losses["cached"], losses["full"], rtol=0, atol=1e-5)


def test_a_model_the_cached_trainer_cannot_run_trains_with_the_plain_loop(caplog):
    """Bloom computes attention in its own code (ALiBi, no transformers attention interface), so the
    cached trainer cannot run it per example: it says so and the plain loop trains instead."""
    from transformers import AutoModelForCausalLM, BloomConfig

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(BloomConfig(hidden_size=HIDDEN, n_layer=3, n_head=4, vocab_size=128))
    losses, ran = plain_and_cached_losses(base.eval(), random_examples(), epochs=2)
    assert ran == "full"
    assert "cached trainer cannot reproduce it here" in caplog.text and "BloomForCausalLM" in caplog.text
    torch.testing.assert_close(losses["cached"], losses["full"], rtol=0, atol=1e-6)


def test_the_cached_trainer_leaves_memory_to_spare(monkeypatch, caplog):
    """Its prefix cache grows with the examples' prompts; where it would take more than half of the free
    memory, training uses the plain loop (whose memory is one batch's) instead."""
    from hub_peft.training import reft_cache as trainer

    model = reft_on_tiny()
    examples = random_examples()
    needed = trainer._prefix_cache_bytes(model.base_model, examples, layers=2)
    kv_per_token = 2 * 2 * 2 * (HIDDEN // 4) * 4  # keys and values, 2 layers, 2 key/value heads of 16 floats
    assert needed == sum(len(ex.prompt_ids) for ex in examples) * kv_per_token
    templated = random_examples(n=20, shared=[5, 6, 7])  # two precompute chunks, each keeps the 3 tokens once
    assert trainer._prefix_cache_bytes(model.base_model, templated, layers=2) == kv_per_token * (
        2 * 3 + sum(len(ex.prompt_ids) - 3 for ex in templated)
    )
    steps = trainer._CachedSteps(model, templated, batch_size=4)
    first, second = steps.cached[0], steps.cached[1]
    assert first.shared == 3 and first.shared_keys is second.shared_keys
    assert first.keys[2].shape[1] == first.start - 3
    assert train_reft(model, examples, epochs=1).args["method"] == "cached"
    monkeypatch.setattr(trainer, "_free_memory", lambda: 2 * needed - 1)
    assert train_reft(model, examples, epochs=1).args["method"] == "full"
    assert "could take 0 MB, more than half of the 0 MB free" in caplog.text


def test_training_stops_at_a_loss_target_or_when_cancelled():
    model = reft_on_tiny()
    result = train_reft(model, random_examples(), epochs=50, batch_size=7, lr=5e-2, target_loss=4.7)
    assert result.stopped == "target_loss" and result.history[-1]["loss"] <= 4.7 and result.steps < 50
    seen = []
    result = train_reft(
        model, random_examples(), epochs=50, batch_size=7, on_step=seen.append, should_stop=lambda: len(seen) >= 3
    )
    assert result.stopped == "cancelled" and result.steps == 3 == len(seen)
    with pytest.raises(InvalidInputError, match="No training examples"):
        train_reft(model, [], epochs=1)


def test_encode_examples_uses_the_template_and_appends_eos():
    from hub_peft.chat import apply_template
    from hub_peft.training import encode_examples

    tok = tiny_tokenizer()
    template = "a b {prompt} c"
    [ex] = encode_examples(tok, [{"prompt": "d e", "response": "f g"}], template)
    assert ex.prompt_ids == tok(apply_template(template, "d e"), add_special_tokens=False)["input_ids"]
    assert ex.response_ids[-1] == tok.eos_token_id and len(ex.response_ids) == 3
    with pytest.raises(InvalidInputError, match="Example 1 has an empty"):
        encode_examples(tok, [{"prompt": " ", "response": "x"}], template)


# --- 4-bit, LoRA + ReFT ------------------------------------------------------------------------


def dequantized_copy(model):
    """The same network with every Linear4bit replaced by an nn.Linear holding its dequantized weight."""
    import copy

    from bitsandbytes.functional import dequantize_4bit

    clone = copy.deepcopy(model)
    for name, module in list(clone.named_modules()):
        if type(module).__name__ == "Linear4bit":
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight.data = dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            if module.bias is not None:
                linear.bias.data = module.bias.data.float()
            parent, _, child = name.rpartition(".")
            setattr(clone.get_submodule(parent), child, linear)
    return clone


def packed_layers(model) -> list[str]:
    """Names of the Linear4bit layers in bitsandbytes' packed CPU inference format."""
    layers = [(name, m) for name, m in model.named_modules() if type(m).__name__ == "Linear4bit"]
    return [name for name, m in layers if getattr(m.weight.quant_state, "packing_format_for_cpu", False)]


def test_training_refuses_a_4bit_model_in_the_packed_inference_format(tiny_base_repo):  # noqa: F811
    """On AVX512-BF16 CPUs bitsandbytes repacks a Linear4bit the first time it runs without grad; on AVX2 CPUs it
    never does. The refusal is checked on every CPU: here the CPU repacks by itself, elsewhere the test packs one
    layer with bitsandbytes' own conversion, the state an AVX512-BF16 machine would leave."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu, has_avx512bf16

    from hub_peft._bnb import keep_4bit_trainable

    ids, mask = pad(PROMPTS, "left")
    raw = load_tiny(load_in_4bit=True)
    raw.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
    packed = packed_layers(raw)
    if has_avx512bf16():
        assert packed, "this CPU has AVX512-BF16, so bitsandbytes should have switched to its packed format"
    else:
        assert not packed, "bitsandbytes packed a layer on a CPU without AVX512-BF16"
        layer = raw.get_submodule("model.layers.1.mlp.down_proj")
        layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(
            layer.weight.data, layer.weight.quant_state
        )
        assert packed_layers(raw) == ["model.layers.1.mlp.down_proj"]
    with pytest.raises(InvalidInputError, match=r"model\.layers\.\d\.\S+ already switched to bitsandbytes' packed CPU"):
        keep_4bit_trainable(raw)
    with pytest.raises(InvalidInputError, match="packed CPU inference format"):
        train_reft(get_reft_model(raw, ReftConfig(layers=[0, 1])), random_examples(), epochs=1)


def test_reft_trains_on_an_nf4_base_with_exact_gradients(tiny_base_repo):  # noqa: F811
    """Training on NF4 must match training on the same dequantized weights, also after the model
    chatted (bitsandbytes would then switch to a CPU kernel that has no backward, unless prevented)."""
    from hub_peft._bnb import keep_4bit_trainable

    ids, mask = pad(PROMPTS, "left")
    base = keep_4bit_trainable(load_tiny(load_in_4bit=True))
    assert any(type(m).__name__ == "Linear4bit" for m in base.modules())
    base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert not any(packed_layers(base)), "keep_4bit_trainable must keep every layer in the trainable format"
    reference = dequantized_copy(base)
    runs = {}
    for name, model in (("nf4", base), ("dequantized", reference)):
        for method in ("cached", "full"):
            torch.manual_seed(0)
            reft = get_reft_model(model, ReftConfig(layers=[0, 1]))
            result = train_reft(reft, random_examples(), epochs=4, batch_size=4, lr=5e-2, method=method)
            assert result.args["method"] == method
            runs[name, method] = [h["loss"] for h in result.history]
            if (name, method) == ("nf4", "full"):
                trained_on_nf4 = reft
            else:
                reft.remove_hooks()
    out = trained_on_nf4.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    plain = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == plain.shape == (4, ids.shape[1] + 4) and not torch.equal(out, plain)
    assert runs["nf4", "cached"][-1] < runs["nf4", "cached"][0] - 0.05
    for key, losses in runs.items():
        torch.testing.assert_close(
            torch.tensor(losses), torch.tensor(runs["dequantized", "full"]), rtol=0, atol=2e-4, msg=f"{key} diverged"
        )


def test_lora_and_reft_combine_in_either_order(tiny_base_repo, tmp_path):  # noqa: F811
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    lora = get_peft_model(load_tiny(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    save_adapter(lora, tmp_path / "lora")
    torch.manual_seed(4)
    save_adapter(get_reft_model(load_tiny(), ReftConfig(layers=[0, 1])), tmp_path / "reft")
    ids = torch.tensor([[5, 9, 17, 33, 4]])

    def logits(model):
        with torch.no_grad():
            return model(input_ids=ids).logits

    lora_then_reft = load_adapter(load_adapter(load_tiny(), tmp_path / "lora"), tmp_path / "reft")
    reft_then_lora = load_adapter(load_adapter(load_tiny(), tmp_path / "reft"), tmp_path / "lora")
    torch.testing.assert_close(logits(lora_then_reft), logits(reft_then_lora))
    assert not torch.allclose(logits(lora_then_reft), logits(load_adapter(load_tiny(), tmp_path / "lora")), atol=1e-4)
    assert not torch.allclose(logits(lora_then_reft), logits(load_adapter(load_tiny(), tmp_path / "reft")), atol=1e-4)
    with pytest.raises(InvalidInputError, match="already has a ReFT adapter"):
        load_adapter(lora_then_reft, tmp_path / "reft")


# --- the repo format ---------------------------------------------------------------------------


@pytest.fixture
def saved_reft(tiny_base_repo, tmp_path):  # noqa: F811
    torch.manual_seed(0)
    model = get_reft_model(load_tiny(), ReftConfig(layers=[0, 1], positions="f1+l1", prompt_template="q {prompt} a"))
    result = train_reft(model, random_examples(), epochs=3, batch_size=4, lr=1e-2)
    rows = [{"prompt": "hi", "response": "🙂"}, {"prompt": "bye", "response": "👋"}]
    folder = save_adapter(
        model,
        tmp_path / "reft",
        training_rows=rows,
        history=result.history,
        training_args=result.args,
        example_prompt="a b c",
    )
    return model, folder


def test_saved_reft_folder_is_the_common_layout_and_says_how_to_load(saved_reft):
    _, folder = saved_reft
    assert {p.name for p in folder.iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
        "hub_peft_card.json",
        "loss_curve.png",
    }
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "REFT" and config["loads_with"] == "hub_peft"
    assert "load it with hub_peft" in config["load_note"]
    assert config["base_model_name_or_path"] == "alice/tiny-llama"
    assert (config["layers"], config["positions"], config["rank"], config["dtype"]) == ([0, 1], "f1+l1", 4, "float32")
    assert config["prompt_template"] == "q {prompt} a"
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "hub_peft" and card.data.base_model == "alice/tiny-llama"
    assert "reft" in card.data.tags
    assert "Loads with [hub_peft]" in card.text and card.text.count("@inproceedings{wu2024reft") == 1
    assert "h ← h + Rᵀ(W h + b − R h)" in card.text and "![Training loss](loss_curve.png)" in card.text
    report = validate_adapter(folder)
    assert report.ok, report.problems
    assert set(report.tensors) == set(ReftConfig.from_dict(config).tensor_shapes())


def test_reft_round_trips_through_the_hub_and_the_card_snippet_runs(saved_reft, alice, repo_name, tmp_path):
    from hub_peft.chat import generate_reply

    model, folder = saved_reft
    repo_id = f"alice/{repo_name}"
    push_adapter(folder, repo_id, token=alice)
    restored = load_adapter(load_tiny(), repo_id)
    ids = torch.tensor([[5, 9, 17, 33, 4]])
    with torch.no_grad():
        torch.testing.assert_close(restored(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)
    expected = generate_reply(restored, tiny_tokenizer(), "a b c", max_new_tokens=5)
    card = ModelCard.load(repo_id)
    snippet = re.search(r"```python\n(.*?)```", card.text, re.S).group(1)
    assert f'load_adapter(base, "{repo_id}")' in snippet and "alice/tiny-llama" in snippet
    snippet = snippet.replace("))\n", ", max_new_tokens=5))\n")
    out = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == expected


def test_validate_info_and_chat_cli_on_a_reft_repo(saved_reft, alice, repo_name):
    _, folder = saved_reft
    repo_id = f"alice/{repo_name}"
    push_adapter(folder, repo_id, token=alice)

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "hub_peft.cli", *args], capture_output=True, text=True, timeout=300
        )

    out = cli("validate", repo_id)
    assert out.returncode == 0 and "valid REFT adapter" in out.stdout
    out = cli("validate", repo_id, "--for", "vllm")
    assert out.returncode == 1 and "vLLM serves only LoRA" in out.stdout
    out = cli("info", str(folder))
    assert out.returncode == 0 and re.search(r"type\s+REFT", out.stdout)
    out = cli("chat", "a b c", "--base", "alice/tiny-llama", "--adapter", repo_id, "--max-new-tokens", "3")
    assert out.returncode == 0, out.stderr[-2000:]


def test_bad_reft_files_get_clear_errors(saved_reft, tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder = saved_reft
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")

    def variant(name, config_change=None, tensors_change=None, replace=False):
        import shutil

        target = tmp_path / name
        shutil.copytree(folder, target)
        (target / "adapter_config.json").write_text(json.dumps({**config, **(config_change or {})}))
        new = tensors_change if replace else {**tensors, **(tensors_change or {})}
        save_file(new, target / "adapter_model.safetensors")
        return target

    bad_shape = variant("shape", tensors_change={"reft.layer0.block_output.f.W": torch.zeros(4, 10)})
    assert "has shape [4, 10]" in str(validate_adapter(bad_shape).problems[0])
    with pytest.raises(InvalidInputError, match="has shape"):
        load_adapter(load_tiny(), bad_shape)
    unknown = variant("unknown", {"intervention": "superreft"})
    with pytest.raises(InvalidInputError, match="not a valid ReFT config"):
        load_adapter(load_tiny(), unknown)
    smol = {"hidden_size": 576, "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    wider = {k: torch.zeros([576 if s == 64 else s for s in v.shape]) for k, v in tensors.items()}
    other_base = variant("other", smol, wider)
    with pytest.raises(IncompatibleAdapterError, match="SmolLM2-135M-Instruct"):
        load_adapter(load_tiny(), other_base)
    deep = variant(
        "deep", {"layers": [0, 9]}, {k.replace("layer1.", "layer9."): v for k, v in tensors.items()}, replace=True
    )
    with pytest.raises(IncompatibleAdapterError, match="layer 9"):
        load_adapter(load_tiny(), deep)
    not_orthonormal = variant("ortho", tensors_change={"reft.layer0.block_output.f.R": torch.ones(4, 64)})
    with pytest.raises(InvalidInputError, match="orthonormal rows"):
        load_adapter(load_tiny(), not_orthonormal)


# --- pyreft import -----------------------------------------------------------------------------


def write_pyreft_dir(path, layers, rank=4, hidden=HIDDEN, seed=0, per_layer=1):
    """What pyreft 0.1's ReftModel.save writes for LoReFT on block_output at the last position."""
    g = torch.Generator().manual_seed(seed)
    path.mkdir()
    keys, weights = [], {}
    for layer in layers:
        for unit in range(per_layer):
            key = f"layer_{layer}_comp_block_output_unit_pos_nunit_1#{unit}"
            rotate, _ = torch.linalg.qr(torch.randn(hidden, rank, generator=g))
            state = {
                "weight": torch.randn(rank, hidden, generator=g) * 0.2,
                "bias": torch.randn(rank, generator=g),
                "rotate_layer": rotate.contiguous(),
            }
            torch.save(state, path / f"intkey_{key}.bin")
            keys.append(key)
            weights[layer] = state
    config = {
        "intervention_constant_sources": [True] * len(keys),
        "intervention_dimensions": [hidden] * len(keys),
        "intervention_types": ["<class 'pyreft.interventions.LoreftIntervention'>"] * len(keys),
        "mode": "parallel",
        "representations": [[int(k.split("_")[1]), "block_output", "pos", 1, rank, *[None] * 9] for k in keys],
        "sorted_keys": keys,
        "transformers_version": "4.45.1",
    }
    (path / "config.json").write_text(json.dumps(config))
    return weights


def test_imported_pyreft_save_computes_what_pyreft_computes(tiny_base_repo, tmp_path):  # noqa: F811
    weights = write_pyreft_dir(tmp_path / "pyreft", layers=[0, 1])
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "hub_peft.cli",
            "import-pyreft",
            str(tmp_path / "pyreft"),
            str(tmp_path / "ours"),
            "--base",
            "alice/tiny-llama",
            "--prompt-template",
            "q {prompt}\\na",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["prompt_template"] == "q {prompt}\na" and config["positions"] == "l1"
    model = load_adapter(load_tiny(), tmp_path / "ours")

    # pyreft's LoreftIntervention.forward, applied by hand at the last prompt token of each layer
    base = load_tiny()
    prompt = [5, 9, 17, 33, 4]

    def pyreft_hook(layer):
        def hook(module, args, output):
            w = weights[layer]
            h = output.clone()
            x = h[:, -1]
            rotated = x @ w["rotate_layer"]
            h[:, -1] = x + (x @ w["weight"].T + w["bias"] - rotated) @ w["rotate_layer"].T
            return h

        return hook

    handles = [base.model.layers[i].register_forward_hook(pyreft_hook(i)) for i in (0, 1)]
    with torch.no_grad():
        expected = base(input_ids=torch.tensor([prompt])).logits
        got = model(input_ids=torch.tensor([prompt])).logits
    for h in handles:
        h.remove()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_pyreft_import_refuses_unsafe_or_mismatched_saves(tmp_path):
    import pickle

    from hub_peft.reft.pyreft_import import import_pyreft

    write_pyreft_dir(tmp_path / "evil", layers=[0])
    key = "layer_0_comp_block_output_unit_pos_nunit_1#0"

    class Payload:  # any non-tensor object is refused before it can run code
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil" / f"intkey_{key}.bin").write_bytes(pickle.dumps({"weight": Payload()}))
    with pytest.raises(UnsafeFileError, match="refusing to unpickle"):
        import_pyreft(tmp_path / "evil", tmp_path / "out", base="alice/tiny-llama")
    assert not (tmp_path / "out").exists()
    write_pyreft_dir(tmp_path / "two_per_layer", layers=[0], per_layer=2)
    with pytest.raises(InvalidInputError, match="--positions"):
        import_pyreft(tmp_path / "two_per_layer", tmp_path / "out", base="alice/tiny-llama", positions="l1")
    with pytest.raises(InvalidInputError, match="pass --base"):
        import_pyreft(tmp_path / "two_per_layer", tmp_path / "out", positions="f1+l1")
    out = import_pyreft(tmp_path / "two_per_layer", tmp_path / "out", base="alice/tiny-llama", positions="f1+l1")
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["positions"], config["share_weights"]) == ("f1+l1", False)
    assert validate_adapter(out).ok


def tiny_other_architecture(kind: str):
    from transformers import AutoModelForCausalLM, GPT2Config, Qwen2Config

    if kind != "gpt2":
        return tiny_causal_lm(Qwen2Config, 3)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=128, n_embd=HIDDEN, n_layer=3, n_head=4, n_positions=128)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("kind", ["gpt2", "qwen2"])
def test_layers_and_components_are_found_on_other_architectures(kind):
    """No per-model table: GPT-2 keeps its blocks in transformer.h with attn/mlp, Qwen2 in model.layers."""
    config = {"layers": [0, 2], "positions": "f1+l2", "components": ALL_COMPONENTS}
    torch.manual_seed(4)
    model = get_reft_model(tiny_other_architecture(kind), ReftConfig(**config))
    assert len(model._layers) == 3
    ids, mask = pad(PROMPTS, "right")  # GPT-2's absolute positions make left padding differ even without ReFT
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask).logits
        plain = model.base_model(input_ids=ids, attention_mask=mask).logits
        for i, prompt in enumerate(PROMPTS):
            alone = model(input_ids=torch.tensor([prompt])).logits[0]
            torch.testing.assert_close(batch[i][mask[i].bool()], alone, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(batch, plain, atol=1e-3)
    model.remove_hooks()
    losses = {}
    for method in ("full", "cached"):
        torch.manual_seed(5)
        reft = get_reft_model(model.base_model, ReftConfig(**config))
        result = train_reft(reft, random_examples(), epochs=3, batch_size=4, lr=1e-2, method=method)
        assert result.args["method"] == method
        losses[method] = [h["loss"] for h in result.history]
        reft.remove_hooks()
    torch.testing.assert_close(torch.tensor(losses["cached"]), torch.tensor(losses["full"]), rtol=0, atol=1e-4)
