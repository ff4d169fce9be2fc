"""The fused products (hub_peft._fused), NF4 and float32, with and without a LoRA inside, against the layers' own
products (bitsandbytes' dequantized weights, ``F.linear``) plus ``w·(x A) B``, alone and in the engine."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import dequantize_4bit
from test_architectures import record_logits
from test_engine import PROMPTS, adapters  # noqa: F401 - adapters: a shared module fixture
from test_peft_methods import load_tiny, tiny_base_repo, tiny_tokenizer  # noqa: F401 - a shared session fixture

from hub_peft import _fused
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
    fused = _fused.fused_linear(layer)
    assert fused is not None
    weight = dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    for rows in (1, 3, _fused.MAX_ROWS):
        x = torch.randn(2, rows, in_features)  # batch dims are flattened and restored
        expected = torch.nn.functional.linear(x, weight, layer.bias)
        got = fused(x)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        with torch.no_grad():  # and bitsandbytes' own forward of the same layer
            torch.testing.assert_close(got, layer(x), rtol=1e-5, atol=1e-5)
        lora = random_lora(in_features, out_features)
        torch.testing.assert_close(fused(x, lora), with_lora(expected, x, lora), rtol=1e-5, atol=1e-5)
    x = torch.randn(_fused.MAX_ROWS + 9, in_features)  # more rows: dequantized once by the kernel, then a GEMM
    assert fused.takes_many(x) and not fused.takes(x)
    assert torch.equal(fused.many(x), torch.nn.functional.linear(x, weight, layer.bias))  # the same weights


@pytest.mark.parametrize(("in_features", "out_features", "bias"), [(64, 48, False), (70, 130, True), (576, 1536, True)])
def test_the_float32_product_equals_linear(in_features, out_features, bias):
    torch.manual_seed(0)
    layer = torch.nn.Linear(in_features, out_features, bias=bias)
    fused = _fused.fused_linear(layer)
    assert isinstance(fused, _fused.FusedF32)
    for rows in (1, 3, _fused.MAX_ROWS_F32):
        x = torch.randn(rows, in_features)
        with torch.no_grad():
            expected = layer(x)
        torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)
        lora = random_lora(in_features, out_features, rank=16)
        torch.testing.assert_close(fused(x, lora), with_lora(expected, x, lora), rtol=1e-5, atol=1e-5)


def random_lora(in_features: int, out_features: int, rank: int = 8) -> _fused.KernelLoras:
    """One LoRA on every row as the kernels take it: A [in, r], B transposed [out, r], a weight."""
    return _fused.KernelLoras.one(torch.randn(in_features, rank) * 0.1, torch.randn(out_features, rank) * 0.1, 0.7)


def with_lora(base: torch.Tensor, x: torch.Tensor, lora: _fused.KernelLoras) -> torch.Tensor:
    return base + float(lora.weights[0]) * (x @ lora.A[0]) @ lora.Bt[0].T


@pytest.mark.parametrize("nf4", [True, False], ids=["nf4", "fp32"])
def test_each_row_gets_its_own_loras_inside_the_product(nf4):
    """Rows on different LoRA slots, a row mixing two, a row on none: each row's output is the layer's plus the
    weighted deltas of its own slots, as ``x A B`` computes them."""
    torch.manual_seed(1)
    layer = nf4_layer(128, 96, bias=True, double_quant=True) if nf4 else torch.nn.Linear(128, 96)
    fused = _fused.fused_linear(layer)
    x = torch.randn(5, 128)
    A, Bt = torch.randn(3, 128, 4) * 0.1, torch.randn(3, 96, 4) * 0.1
    weights = torch.tensor([1.0, 0.6, 0.4])
    owned = [[0], [1, 2], [], [2], [0]]  # row -> its slots (row 1: a 0.6/0.4 mix of slots 1 and 2; row 2: none)
    first = torch.tensor([0, *torch.tensor([len(s) for s in owned]).cumsum(0).tolist()])
    slot = torch.tensor([s for slots in owned for s in slots])
    got = fused(x, _fused.KernelLoras(A, Bt, weights, first, slot))
    with torch.no_grad():
        expected = layer(x).clone()
    for m, slots in enumerate(owned):
        for s in slots:
            expected[m] += weights[s] * (x[m] @ A[s]) @ Bt[s].T
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"], ids=["avx2", "plain"])
def test_every_instruction_set_path_gives_the_same_product(march):
    """The source's AVX2 and plain-C paths (built here beside the native one, which the test above checks)."""
    import platform

    if platform.machine() != "x86_64" or (march == "x86-64-v3" and " avx2" not in _fused._cpu_flags()):
        pytest.skip(f"this CPU cannot run -march={march} code")
    lib = _fused.library(march)
    assert lib is not None and lib is not _fused.library()
    for double_quant in (False, True):
        layer = nf4_layer(192, 130, bias=True, double_quant=double_quant)
        weight = dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        for rows in (1, 11):  # one row; a pass of 8 rows and one of 3
            x = torch.randn(rows, 192)
            expected = torch.nn.functional.linear(x, weight, layer.bias)
            torch.testing.assert_close(_fused.FusedNF4(layer, lib)(x), expected, rtol=1e-5, atol=1e-5)
            lora = random_lora(192, 130)
            torch.testing.assert_close(_fused.FusedNF4(layer, lib)(x, lora), with_lora(expected, x, lora))
            assert torch.equal(_fused.FusedNF4(layer, lib).many(x), torch.nn.functional.linear(x, weight, layer.bias))
    linear = torch.nn.Linear(70, 130)  # a width that is no multiple of the vector length
    x = torch.randn(5, 70)
    with torch.no_grad():
        expected = linear(x)
    torch.testing.assert_close(_fused.FusedF32(linear, lib)(x), expected, rtol=1e-5, atol=1e-5)
    lora = random_lora(70, 130)
    torch.testing.assert_close(_fused.FusedF32(linear, lib)(x, lora), with_lora(expected, x, lora))
    head = _fused.Int8Linear(linear, lib)
    with torch.no_grad():
        torch.testing.assert_close(head(x), x @ head.dequantized().T + linear.bias, rtol=1e-5, atol=1e-5)


def test_calls_the_kernel_does_not_take_keep_their_path():
    layer = nf4_layer(64, 32, bias=False, double_quant=False)
    fused = _fused.fused_linear(layer)
    assert fused.takes(torch.randn(_fused.MAX_ROWS, 64))
    assert not fused.takes(torch.randn(_fused.MAX_ROWS + 1, 64))  # a prefill: dequantize once, then a GEMM
    assert not fused.takes(torch.randn(1, 64, dtype=torch.bfloat16))
    assert not fused.takes(torch.randn(1, 64, requires_grad=True))  # training needs bitsandbytes' backward
    with torch.no_grad():
        assert fused.takes(torch.randn(1, 64, requires_grad=True))
    assert _fused.fused_linear(nf4_layer(96, 32, bias=False, double_quant=False)) is None  # blocks span two rows
    assert _fused.fused_linear(torch.nn.Linear(64, 32).bfloat16()) is None
    assert _fused.fused_linear(torch.nn.Embedding(64, 32)) is None


def test_without_a_compiler_layers_keep_bitsandbytes_path(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("HUB_PEFT_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    _fused.library.cache_clear()
    try:
        assert _fused.fused_linear(nf4_layer(64, 32, bias=False, double_quant=False)) is None
        assert "did not build" in caplog.text
        assert not list((tmp_path / "kernels").iterdir())  # nothing half-written left behind
    finally:
        _fused.library.cache_clear()


@pytest.mark.parametrize("nf4", [True, False], ids=["nf4", "fp32"])
def test_the_engine_decodes_with_the_kernels_as_the_layers_do(adapters, monkeypatch, nf4):  # noqa: F811
    """A mixed LoRA/IA3/ReFT/mix batch, a batch of LoRA rows (different adapters, a mix, a base row) and one
    weighted LoRA alone: the whole-step kernel (decode steps without IA3), the per-layer kernels under
    transformers' forward, and the layers' own products give the same tokens and every step's logits up to
    float32 rounding."""
    calls = []
    original = _fused.Fused.__call__
    monkeypatch.setattr(
        _fused.Fused, "__call__", lambda self, x, loras=None: calls.append(loras) or original(self, x, loras)
    )
    batches = [
        ["reft", "lora", None, "ia3", {"lora": 0.6, "rslora": 0.4}],
        ["lora", {"lora": 0.6, "rslora": 0.4}, None, "rslora"],
        [{"rslora": 0.5}],
    ]
    setups = {"step": {}, "layers": {"lean_decode": False}, "reference": {"fused": False, "lean_decode": False}}
    results = {}
    for setup, options in setups.items():
        engine = MultiAdapterModel((load_tiny(nf4), tiny_tokenizer()), packed_head=False, **options)
        for name, folder in adapters.items():
            engine.add(name, folder)
        calls.clear()
        logits = record_logits(engine)
        tokens = [
            [c.tokens for c in engine.generate_tokens(PROMPTS[: len(rows)], rows, max_new_tokens=6)] for rows in batches
        ]
        results[setup] = tokens, logits, list(calls), engine.native_steps
    assert results["step"][3] >= 2 * 5 and results["layers"][3] == results["reference"][3] == 0  # batches 2, 3
    used = [loras for loras in results["layers"][2] if loras is not None]
    assert any(loras.first is not None for loras in used)  # several slots in one product (batch 2)
    assert any(loras.first is None and float(loras.weights[0]) == 0.5 for loras in used)  # the lone weighted LoRA
    assert results["layers"][2] and not results["reference"][2]
    reference_tokens, reference_logits = results["reference"][:2]
    for setup in ("step", "layers"):
        tokens, logits = results[setup][:2]
        assert tokens == reference_tokens, setup
        assert logits.keys() == reference_logits.keys()
        for prompt, rows in logits.items():
            torch.testing.assert_close(torch.stack(rows), torch.stack(reference_logits[prompt]), rtol=1e-5, atol=1e-5)


def test_the_8bit_head_multiplies_by_its_rounded_weight_within_the_rounding_bound():
    torch.manual_seed(0)
    layer = torch.nn.Linear(70, 300, bias=False)
    head = _fused.int8_head(layer)
    x = torch.randn(3, 1, 70)
    weight = head.dequantized()
    with torch.no_grad():
        exact, got = layer(x), head(x)
    torch.testing.assert_close(got, x @ weight.T, rtol=1e-5, atol=1e-5)  # the kernel: its own weight exactly
    bound = x.abs() @ (head.scale[:, None] / 2).expand(-1, 70).T  # |x|·scale/2 per output: the rounding's most
    assert ((got - exact).abs() <= bound + 1e-5).all()
    assert (weight - layer.weight).abs().max() <= head.scale.max() / 2 + 1e-7
    assert _fused.int8_head(torch.nn.Linear(8, 8).bfloat16()) is None


def test_an_engine_with_an_8bit_head_uses_it_and_stays_within_its_rounding(adapters, monkeypatch):  # noqa: F811
    from hub_peft.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="head_bits must be 8"):
        MultiAdapterModel((load_tiny(), tiny_tokenizer()), head_bits=4)
    calls = []
    original = _fused.Int8Linear.forward
    monkeypatch.setattr(_fused.Int8Linear, "forward", lambda self, x: calls.append(1) or original(self, x))
    rows = ["lora", None, {"lora": 0.6, "rslora": 0.4}]
    logits = {}
    for bits in (8, None):
        engine = MultiAdapterModel((load_tiny(), tiny_tokenizer()), head_bits=bits, packed_head=False)
        for name, folder in adapters.items():
            engine.add(name, folder)
        recorded = record_logits(engine)
        engine.generate_tokens(PROMPTS[:3], rows, max_new_tokens=2)
        logits[bits] = torch.stack([r[0] for r in recorded.values()])
        assert engine.batching == "continuous" and engine.lean_steps > 0, (engine.ragged_reason, engine.lean_reason)
    assert len(calls) >= 1
    gap = (logits[8] - logits[None]).abs().max() / logits[None].abs().max()
    assert 0 < gap < 2e-2  # rounded, not changed: a few parts per thousand of the logits' size


@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"], ids=["avx2", "plain"])
def test_the_whole_step_on_every_instruction_set_gives_the_layers_logits(adapters, monkeypatch, march):  # noqa: F811
    """``decode_step`` built for AVX2 and for plain C (the native build runs in every other engine test), NF4 and
    float32, rows on two LoRAs and a mix: the layers' own products' tokens and logits."""
    import platform

    from hub_peft.serving import lean

    if platform.machine() != "x86_64" or (march == "x86-64-v3" and " avx2" not in _fused._cpu_flags()):
        pytest.skip(f"this CPU cannot run -march={march} code")
    lib = _fused.library(march)
    monkeypatch.setattr(lean, "library", lambda: lib)  # the step's kernel (products called alone: native)
    rows = ["lora", {"lora": 0.6, "rslora": 0.4}, None, "rslora"]
    setups = {"step": {}, "reference": {"fused": False, "lean_decode": False}}
    for nf4 in (True, False):
        results = {}
        for setup, options in setups.items():
            engine = MultiAdapterModel((load_tiny(nf4), tiny_tokenizer()), packed_head=False, **options)
            for name, folder in adapters.items():
                engine.add(name, folder)
            logits = record_logits(engine)
            tokens = [c.tokens for c in engine.generate_tokens(PROMPTS[: len(rows)], rows, max_new_tokens=6)]
            results[setup] = tokens, logits, engine.native_steps
        assert results["step"][2] >= 5 and results["reference"][2] == 0
        assert results["step"][0] == results["reference"][0]
        for prompt, got in results["step"][1].items():
            expected = torch.stack(results["reference"][1][prompt])
            torch.testing.assert_close(torch.stack(got), expected, rtol=1e-5, atol=1e-5)


def test_a_kernel_out_of_memory_fails_cleanly_without_writing():
    """Scratch memory a kernel cannot get: status -1 (``MemoryError`` from Python), the output untouched."""
    lib = _fused.library()
    y = torch.full((1, 4), 7.0)
    huge = _fused.LinearSpec(kind=_fused.KIND_NF4, K=2**60, N=4)  # its permuted input would take 2^62 bytes
    assert lib.linear(huge, torch.zeros(1).data_ptr(), 1, y.data_ptr()) == -1
    decoder = _fused.DecoderSpec(layers=0, hidden=4, heads=1, kv_heads=1, head_dim=4, inter=4, max_len=2**60)
    assert lib.decode_step(decoder, 1, y.data_ptr(), None, None, None, None) == -1
    assert (y == 7.0).all()
    with pytest.raises(MemoryError, match="free memory or run fewer rows"):
        _fused.check_status(-1)


def test_the_whole_step_runs_only_on_what_the_kernel_reads(tiny_base_repo):  # noqa: F811
    """native_blocker: the engine's wrapped float32 model passes; a norm the kernel cannot read as a float array,
    or a block linear the kernels do not take, keeps the lean step's Python, with the reason."""
    from hub_peft.serving.lean import native_blocker

    engine = MultiAdapterModel((load_tiny(), tiny_tokenizer()), packed_head=False)
    assert native_blocker(engine.core) is None and engine._lean.native_reason is None
    layer = engine.core.model.layers[1]
    layer.post_attention_layernorm.weight.data = layer.post_attention_layernorm.weight.data.bfloat16()
    assert "norms' weights are not contiguous float32" in native_blocker(engine.core)
    unfused = MultiAdapterModel((load_tiny(), tiny_tokenizer()), packed_head=False, fused=False)
    assert "q_proj is not a linear layer the fused kernels take" in unfused._lean.native_reason
