"""oneDNN's reordered weights (hub_peft._onednn): the products equal nn.Linear's up to float32 rounding, a
changed weight is re-read, a product that needs a gradient gets one, and the engine's packed LM head gives the
plain head's logits and tokens."""

from __future__ import annotations

import pytest
import torch
from test_engine import PROMPTS, adapters  # noqa: F401 - module fixture
from test_peft_methods import load_tiny, tiny_base_repo, tiny_tokenizer  # noqa: F401
from torch import nn

from hub_peft._onednn import PackedLinear, onednn_available, packed_is_faster
from hub_peft.serving import MultiAdapterModel, SamplingParams

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")


def test_a_packed_linear_computes_what_nn_linear_computes():
    torch.manual_seed(0)
    layer = nn.Linear(96, 300)
    packed = PackedLinear(layer)
    with torch.inference_mode():
        for shape in [(1, 96), (7, 96), (64, 96), (1, 5, 96), (3, 4, 96)]:
            x = torch.randn(shape)
            torch.testing.assert_close(packed(x), layer(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # an in-place change (an optimizer step, load_state_dict) is picked up
        layer.weight.mul_(-2)
    x = torch.randn(4, 96)
    torch.testing.assert_close(packed(x), layer(x), rtol=1e-5, atol=1e-5)
    x.requires_grad_(True)  # a product that needs a gradient runs through the layer itself
    packed(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(4, -1))
    assert layer.weight.grad is not None
    with pytest.raises(ValueError, match=r"float32 nn\.Linear"):
        PackedLinear(nn.Linear(8, 8).to(torch.bfloat16))
    assert isinstance(packed_is_faster(layer, (1, 8)), bool)  # timed here; which one wins depends on the CPU


def test_the_engines_packed_lm_head_gives_the_plain_heads_logits_and_tokens(adapters):  # noqa: F811
    plain = MultiAdapterModel((load_tiny(), tiny_tokenizer()), packed_head=False)
    packed = MultiAdapterModel((load_tiny(), tiny_tokenizer()), packed_head=True)
    assert plain._head is None and isinstance(packed._head, PackedLinear)
    for engine in (plain, packed):  # the slot cache's one-time check runs at the first admission
        engine.generate(["a"], max_new_tokens=1)
    calls = []
    packed._head.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    specs = ["lora", "reft", "ia3", {"lora": 0.5, "ia3": 0.5}, None, "rslora"]
    for engine in (plain, packed):
        for name in ("lora", "reft", "ia3", "rslora"):
            engine.add(name, adapters[name])

    def first_logits(engine):
        gens = [engine.generation(p, a, SamplingParams(max_tokens=1)) for p, a in zip(PROMPTS, specs, strict=True)]
        for gen in gens:
            assert engine.admit(gen)
        try:
            return engine.forward_ragged([(gen, len(gen.prompt_ids)) for gen in gens])
        finally:
            for gen in gens:
                engine.release(gen)

    torch.testing.assert_close(first_logits(packed), first_logits(plain), rtol=1e-5, atol=1e-5)
    assert calls == [torch.Size([1, len(PROMPTS), 64])]  # the packed head ran, on each row's last token only
    assert type(packed.core.lm_head) is nn.Linear  # and the base got its own head back after the step
    answers = [
        [c.tokens for c in e.generate_tokens(PROMPTS, specs, max_new_tokens=8, ignore_eos=True)]
        for e in (plain, packed)
    ]
    assert answers[0] == answers[1]
