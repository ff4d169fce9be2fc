"""Every PEFT method: a few optimizer steps on random tokens move its weights away from their initial values
(CPT's, whose gradient is zero on random tokens, are perturbed instead); then save, push to the local Hub, pull
into a fresh base (full precision and NF4 4-bit), and get the same logits. What this proves is an exact round
trip of non-initial weights for every method, not that each method learns a task."""

from __future__ import annotations

import pytest
import torch
from peft_catalog import NO_4BIT, UNSUPPORTED, catalog

ALL_CASES = catalog()
CASES = [c for c in ALL_CASES if c.key not in UNSUPPORTED]
CASES_4BIT = [c for c in CASES if c.key not in NO_4BIT]
BASE_REPO = "alice/tiny-llama"


@pytest.fixture(scope="session")
def tiny_base_repo(local_hub, tmp_path_factory, alice):
    """A seeded 2-layer Llama pushed to the local Hub, so adapters name a base anyone can fetch."""
    from huggingface_hub import HfApi
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_llama_config()
    folder = tmp_path_factory.mktemp("tiny_base")
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    api = HfApi(endpoint=local_hub.endpoint, token=alice)
    api.create_repo(BASE_REPO, exist_ok=True)
    api.upload_folder(repo_id=BASE_REPO, folder_path=folder)
    return BASE_REPO


def tiny_tokenizer():
    """A 128-token word-level tokenizer matching the tiny model's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({chr(ord("a") + i): 3 + i for i in range(26)})
    vocab.update({f"w{i}": 29 + i for i in range(128 - len(vocab))})
    assert len(vocab) == 128 and sorted(vocab.values()) == list(range(128)), "every word needs its own id"
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def tiny_llama_config(**sizes):
    """A seeded-test-sized Llama config (2 layers, 4 heads, 2 KV heads); ``sizes`` override any field."""
    from transformers import LlamaConfig

    return tiny_decoder_config(LlamaConfig, **sizes)


def tiny_decoder_config(config_class, **sizes):
    """A test-sized config of a Llama-like decoder class (Qwen2, Mistral, Gemma2...): 2 layers, 4 heads, 2 KV
    heads, a vocabulary of 128; ``sizes`` override any field."""
    hidden = sizes.get("hidden_size", 64)
    defaults = {
        "vocab_size": 128,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    }
    return config_class(**{**defaults, **sizes})


def load_tiny(load_in_4bit: bool = False):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {}
    if load_in_4bit:
        kwargs = {
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
            ),
            "device_map": "cpu",
        }
    return AutoModelForCausalLM.from_pretrained(BASE_REPO, **kwargs)


def forward(model, ids, case):
    kwargs = {}
    if case.needs_task_ids:
        kwargs["task_ids"] = torch.zeros(ids.shape[0], dtype=torch.long)
    if case.needs_no_cache:
        kwargs["use_cache"] = False
    return model(input_ids=ids, **kwargs)


def train_a_few_steps(model, case, steps: int = 3):
    torch.manual_seed(1)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(0, 128, (2, 12))
    model.train()
    history = []
    for step in range(steps):
        kwargs = {"task_ids": torch.zeros(2, dtype=torch.long)} if case.needs_task_ids else {}
        if case.needs_no_cache:
            kwargs["use_cache"] = False
        loss = model(input_ids=ids, labels=ids, **kwargs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append({"step": step + 1, "loss": loss.item()})
    model.eval()
    if case.zero_grad_on_random_data:
        with torch.no_grad():
            for p in params:
                p.add_(0.1 * torch.randn_like(p))
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, params, strict=True)), "weights never moved"
    return history


def round_trip(case, load_in_4bit, tmp_path, repo_name, token):
    from peft import get_peft_model

    from hub_peft import load_adapter, push_adapter, save_adapter

    base = load_tiny(load_in_4bit)
    base.config.use_cache = not case.needs_no_cache
    model = get_peft_model(base, case.make(load_tiny().config))
    history = train_a_few_steps(model, case)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = forward(model, ids, case).logits
    rows = [{"prompt": "hi", "response": "hello"}, {"prompt": "2+2?", "response": "4"}]
    save_adapter(model, tmp_path / "adapter", training_rows=rows, history=history)
    repo_id = f"alice/{repo_name}"
    push_adapter(tmp_path / "adapter", repo_id, token=token)

    fresh = load_tiny(load_in_4bit)
    fresh.config.use_cache = not case.needs_no_cache
    restored = load_adapter(fresh, repo_id)
    restored.eval()
    with torch.no_grad():
        got = forward(restored, ids, case).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=[c.key for c in CASES])
def test_every_method_round_trips_through_the_hub(case, tiny_base_repo, tmp_path, repo_name, alice):
    round_trip(case, False, tmp_path, repo_name, alice)


def check_known_failure(key: str, table: dict, load_in_4bit: bool, tmp_path, repo_name: str, token: str) -> None:
    """The method fails exactly as its table row says: same exception type, matching message. If upstream fixes it,
    or it fails some other way (a harness error, a new bug), this fails: update the row."""
    import re

    failure = table[key]
    case = next(c for c in ALL_CASES if c.key == key)
    with pytest.raises(BaseException) as caught:
        round_trip(case, load_in_4bit, tmp_path, repo_name, token)
    assert type(caught.value).__name__ == failure.error, repr(caught.value)
    assert re.search(failure.match, str(caught.value)), repr(caught.value)


@pytest.mark.parametrize("key", sorted(UNSUPPORTED))
def test_the_unsupported_table_matches_reality(key, tiny_base_repo, tmp_path, repo_name, alice):
    check_known_failure(key, UNSUPPORTED, False, tmp_path, repo_name, alice)


@pytest.mark.parametrize("case", CASES_4BIT, ids=[c.key for c in CASES_4BIT])
def test_every_4bit_capable_method_round_trips_on_nf4(case, tiny_base_repo, tmp_path, repo_name, alice):
    round_trip(case, True, tmp_path, repo_name, alice)


@pytest.mark.parametrize("key", sorted(NO_4BIT))
def test_the_no_4bit_table_matches_reality(key, tiny_base_repo, tmp_path, repo_name, alice):
    check_known_failure(key, NO_4BIT, True, tmp_path, repo_name, alice)


def test_readme_tables_list_exactly_the_failing_methods_with_their_reasons():
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for marker, expected in (("no-4bit-table", NO_4BIT), ("unsupported-table", UNSUPPORTED)):
        table = readme.split(f"<!-- {marker} -->")[1]
        rows = [row.split("|") for row in table.strip().splitlines()[2:] if row.startswith("|")]
        assert {row[1].strip().strip("`"): row[2].strip() for row in rows} == {k: f.reason for k, f in expected.items()}


def test_the_catalog_has_a_hand_written_entry_for_every_peft_type():
    """No generic fallback: a method added to peft fails here until it gets a real, working configuration."""
    import peft

    keys = [c.key for c in ALL_CASES]
    assert len(keys) == len(set(keys))
    assert {c.peft_type for c in ALL_CASES} == {t.value for t in peft.PeftType}
    assert set(NO_4BIT) <= set(keys) and set(UNSUPPORTED) <= set(keys)
