"""The fused NF4 product (hub_peft._nf4) against bitsandbytes' own dequantized weights, alone and in the engine."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import dequantize_4bit
from test_engine import PROMPTS, adapters  # noqa: F401 - adapters: a shared module fixture
from test_peft_methods import load_tiny, tiny_base_repo, tiny_tokenizer  # noqa: F401 - a shared session fixture

from hub_peft import _nf4
from hub_peft.serving import MultiAdapterModel


def nf4_layer(in_features: int, out_features: int, *, bias: bool, double_quant: bool, seed: int = 0):
    torch.manual_seed(seed)
    layer = bnb.nn.Linear4bit(
        in_features, out_features, bias=bias, compute_dtype=torch.float32, compress_statistics=double_quant
    )
    weight = torch.randn(out_features, in_features) * 0.05
    layer.weight = bnb.nn.Params4bit(
        weight, requires_grad=False, quant_type="nf4", compress_statistics=double_quant
    )._quantize("cpu")
    if bias:
        layer.bias = torch.nn.Parameter(torch.randn(out_features), requires_grad=False)
    return layer


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "double-quant"])
@pytest.mark.parametrize(
    ("in_features", "out_features", "bias"), [(64, 48, False), (192, 130, True), (576, 1536, True)]
)
def test_the_fused_product_equals_the_dequantized_weights(in_features, out_features, bias, double_quant):
    layer = nf4_layer(in_features, out_features, bias=bias, double_quant=double_quant)
    fused = _nf4.fused_nf4(layer)
    assert fused is not None
    weight = dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    for rows in (1, 3, _nf4.MAX_ROWS):
        x = torch.randn(2, rows, in_features)  # batch dims are flattened and restored
        expected = torch.nn.functional.linear(x, weight, layer.bias)
        got = fused(x)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        with torch.no_grad():  # and bitsandbytes' own forward of the same layer
            torch.testing.assert_close(got, layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"], ids=["avx2", "plain"])
def test_every_instruction_set_path_gives_the_same_product(march):
    """The source's AVX2 and plain-C paths (built here beside the native one, which the test above checks)."""
    import platform

    if platform.machine() != "x86_64" or (march == "x86-64-v3" and " avx2" not in _nf4._cpu_flags()):
        pytest.skip(f"this CPU cannot run -march={march} code")
    lib = _nf4.library(march)
    assert lib is not None and lib is not _nf4.library()
    for double_quant in (False, True):
        layer = nf4_layer(192, 130, bias=True, double_quant=double_quant)
        weight = dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        for rows in (1, 11):  # one row; a pass of 8 rows and one of 3
            x = torch.randn(rows, 192)
            expected = torch.nn.functional.linear(x, weight, layer.bias)
            torch.testing.assert_close(_nf4.FusedNF4(layer, lib)(x), expected, rtol=1e-5, atol=1e-5)


def test_calls_the_kernel_does_not_take_keep_their_path():
    layer = nf4_layer(64, 32, bias=False, double_quant=False)
    fused = _nf4.fused_nf4(layer)
    assert fused.takes(torch.randn(_nf4.MAX_ROWS, 64))
    assert not fused.takes(torch.randn(_nf4.MAX_ROWS + 1, 64))  # a prefill: dequantize once, then a GEMM
    assert not fused.takes(torch.randn(1, 64, dtype=torch.bfloat16))
    assert not fused.takes(torch.randn(1, 64, requires_grad=True))  # training needs bitsandbytes' backward
    with torch.no_grad():
        assert fused.takes(torch.randn(1, 64, requires_grad=True))
    assert _nf4.fused_nf4(nf4_layer(96, 32, bias=False, double_quant=False)) is None  # blocks span two rows
    assert _nf4.fused_nf4(torch.nn.Linear(64, 32)) is None


def test_without_a_compiler_layers_keep_bitsandbytes_path(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("HUB_PEFT_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    _nf4.library.cache_clear()
    try:
        assert _nf4.fused_nf4(nf4_layer(64, 32, bias=False, double_quant=False)) is None
        assert "did not build" in caplog.text
        assert not list((tmp_path / "kernels").iterdir())  # nothing half-written left behind
    finally:
        _nf4.library.cache_clear()


def test_an_nf4_engine_decodes_with_the_kernel_as_bitsandbytes_does(adapters, monkeypatch):  # noqa: F811
    """A mixed LoRA/IA3/ReFT/mix batch on an NF4 base: the fused decode steps give bitsandbytes' path's tokens
    and next-token logits up to float32 rounding."""
    calls = []
    original = _nf4.FusedNF4.__call__
    monkeypatch.setattr(_nf4.FusedNF4, "__call__", lambda self, x: calls.append(1) or original(self, x))
    rows = ["reft", "lora", None, "ia3", {"lora": 0.6, "rslora": 0.4}]
    prompts = PROMPTS[: len(rows)]
    results = {}
    for fused in (True, False):
        engine = MultiAdapterModel((load_tiny(True), tiny_tokenizer()), fused_4bit=fused)
        for name, folder in adapters.items():
            engine.add(name, folder)
        calls.clear()
        tokens = [c.tokens for c in engine.generate_tokens(prompts, rows, max_new_tokens=6)]
        results[fused] = tokens, engine.next_token_logits(prompts, rows), len(calls)
    (tokens, logits, used), (reference_tokens, reference_logits, unused) = results[True], results[False]
    assert used > 0 and unused == 0
    assert tokens == reference_tokens
    torch.testing.assert_close(logits, reference_logits, rtol=1e-5, atol=1e-5)
