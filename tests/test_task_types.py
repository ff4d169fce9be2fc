"""Adapters of every PEFT task type (seq2seq, sequence/token classification, feature extraction, question
answering): save, push, validate and load exactly as plain PEFT does, with a card whose pipeline tag and snippet
fit the task; and what runs causal LMs only (load_base_model, hub-peft chat, the engine) refuses the rest."""

from __future__ import annotations

import ast
from dataclasses import dataclass, field

import pytest
import torch
import transformers
from huggingface_hub import HfApi, ModelCard
from test_adapter_format import run_card_snippet
from test_peft_methods import load_tiny, tiny_base_repo, tiny_tokenizer  # noqa: F401 - shared session fixture

from hub_peft import load_adapter, push_adapter, save_adapter
from hub_peft.errors import IncompatibleAdapterError, InvalidInputError
from hub_peft.validate import validate_adapter

T5_REPO, BART_REPO, BERT_REPO = "alice/tiny-t5-tasks", "alice/tiny-bart-tasks", "alice/tiny-bert-tasks"
PROMPT = "a b c d"
LABELS = {0: "neg", 1: "neutral", 2: "pos"}


def tiny_configs() -> dict:
    """Seeded tiny seq2seq and encoder bases (vocabulary of ``tiny_tokenizer``: <s>=1, </s>=2)."""
    return {
        T5_REPO: transformers.T5ForConditionalGeneration(
            transformers.T5Config(
                vocab_size=128,
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_decoder_layers=2,
                num_heads=4,
                pad_token_id=2,
                eos_token_id=None,
                decoder_start_token_id=3,
            )
        ),  # no EOS: all 32 tokens
        BART_REPO: transformers.BartForConditionalGeneration(
            transformers.BartConfig(
                vocab_size=128,
                d_model=32,
                encoder_layers=1,
                decoder_layers=1,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=64,
                decoder_ffn_dim=64,
                max_position_embeddings=64,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
                decoder_start_token_id=2,
                forced_eos_token_id=None,
            )
        ),
        BERT_REPO: transformers.BertModel(
            transformers.BertConfig(  # a bare encoder, as bert-base checkpoints are
                vocab_size=128,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                max_position_embeddings=64,
                pad_token_id=0,
            )
        ),
    }


@pytest.fixture(scope="session")
def task_bases(local_hub, tiny_base_repo, tmp_path_factory, alice):  # noqa: F811
    """The tiny T5, BART and BERT bases pushed to the local Hub (the tiny Llama is tiny_base_repo's)."""
    torch.manual_seed(0)
    api = HfApi(endpoint=local_hub.endpoint, token=alice)
    for repo, model in tiny_configs().items():
        folder = tmp_path_factory.mktemp(repo.split("/")[1])
        model.save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=folder)


@dataclass(frozen=True)
class Case:
    task_type: str
    base: str
    auto_class: str
    targets: list[str]
    pipeline_tag: str
    head: dict = field(default_factory=dict)  # from_pretrained arguments that size the head
    snippet: bool = False  # also run the card's snippet


CASES = {
    "t5-seq2seq": Case(
        "SEQ_2_SEQ_LM", T5_REPO, "AutoModelForSeq2SeqLM", ["q", "v"], "text2text-generation", snippet=True
    ),
    "bart-seq2seq": Case(
        "SEQ_2_SEQ_LM", BART_REPO, "AutoModelForSeq2SeqLM", ["q_proj", "v_proj"], "text2text-generation"
    ),
    "bert-seq-cls": Case(
        "SEQ_CLS",
        BERT_REPO,
        "AutoModelForSequenceClassification",
        ["query", "value"],
        "text-classification",
        {"num_labels": 3, "id2label": LABELS},
        snippet=True,
    ),
    "llama-seq-cls": Case(
        "SEQ_CLS",
        "alice/tiny-llama",
        "AutoModelForSequenceClassification",
        ["q_proj", "v_proj"],
        "text-classification",
        {"num_labels": 3},
    ),
    "bert-token-cls": Case(
        "TOKEN_CLS",
        BERT_REPO,
        "AutoModelForTokenClassification",
        ["query", "value"],
        "token-classification",
        {"num_labels": 5},
        snippet=True,
    ),
    "bert-feature-extraction": Case(
        "FEATURE_EXTRACTION", BERT_REPO, "AutoModel", ["query", "value"], "feature-extraction", snippet=True
    ),
    "bert-qa": Case(
        "QUESTION_ANS",
        BERT_REPO,
        "AutoModelForQuestionAnswering",
        ["query", "value"],
        "question-answering",
        snippet=True,
    ),
}


def fresh_base(case: Case, seed: int = 123):
    torch.manual_seed(seed)  # a newly initialised head (when the checkpoint has none) differs from training's
    return getattr(transformers, case.auto_class).from_pretrained(case.base, **case.head).eval()


def outputs(model, case: Case) -> torch.Tensor:
    ids = torch.arange(3, 11)[None]
    with torch.no_grad():
        if case.task_type == "SEQ_2_SEQ_LM":
            return model(input_ids=ids, decoder_input_ids=torch.tensor([[1, 5, 6, 7]])).logits
        out = model(input_ids=ids)
    if case.task_type == "QUESTION_ANS":
        return torch.stack([out.start_logits, out.end_logits])
    return out.last_hidden_state if case.task_type == "FEATURE_EXTRACTION" else out.logits


def make_adapter(case: Case):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        fresh_base(case, seed=7),
        LoraConfig(task_type=case.task_type, r=4, lora_alpha=8, target_modules=case.targets, init_lora_weights=False),
    )
    with torch.no_grad():  # a trained head, one no fresh initialisation can give, and a LoRA that shows
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p))
            elif "lora_B" in name:
                p.mul_(20)
    return model.eval()


def snippet_expectation(model, case: Case) -> str:
    """What the card's snippet prints, computed here with hub_peft's loaded model."""
    tok = tiny_tokenizer()
    inputs = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        if case.task_type == "SEQ_2_SEQ_LM":
            return tok.decode(model.generate(**inputs, max_new_tokens=32, do_sample=False)[0], skip_special_tokens=True)
        if case.task_type == "QUESTION_ANS":
            inputs = tok(PROMPT, "Replace this with the passage that holds the answer.", return_tensors="pt")
            out = model(**inputs)
            start, end = out.start_logits.argmax(-1).item(), out.end_logits.argmax(-1).item()
            return tok.decode(inputs["input_ids"][0, start : end + 1])
        out = model(**inputs)
    if case.task_type == "SEQ_CLS":
        return model.config.id2label[out.logits.argmax(-1).item()]
    if case.task_type == "TOKEN_CLS":
        tokens = tok.convert_ids_to_tokens(inputs["input_ids"][0])
        return str(
            [(t, model.config.id2label[i]) for t, i in zip(tokens, out.logits.argmax(-1)[0].tolist(), strict=True)]
        )
    return str(out.last_hidden_state.mean(1)[0].tolist())


@pytest.mark.parametrize("name", list(CASES))
def test_task_type_adapter_round_trips_like_plain_peft(name, task_bases, alice, repo_name, tmp_path, capsys):
    """save -> validate -> push -> load_adapter on a fresh base gives plain PEFT's outputs (and training's:
    the head PEFT keeps in modules_to_save comes back); the card carries the task's pipeline tag and its
    snippet, run without hub_peft, prints what hub_peft's loaded model gives."""
    from peft import PeftModel

    from hub_peft.cli import main

    case = CASES[name]
    trained = make_adapter(case)
    if case.task_type in ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"):  # PEFT keeps the new head trainable and saved
        assert trained.peft_config["default"].modules_to_save
    expected = outputs(trained, case)
    folder = save_adapter(trained, tmp_path / "adapter", example_prompt=PROMPT)
    base_config = transformers.AutoConfig.from_pretrained(case.base)
    report = validate_adapter(folder, base_config=base_config, base_name=case.base)  # the task's Auto class
    assert report.ok, report.problems
    repo_id = f"alice/{repo_name}"
    push_adapter(folder, repo_id, token=alice)
    assert main(["validate", repo_id]) == 0
    assert "valid LORA adapter" in capsys.readouterr().out
    card = ModelCard.load(repo_id)
    assert card.data.pipeline_tag == case.pipeline_tag and card.data.base_model == case.base

    ours = load_adapter(fresh_base(case), repo_id)
    plain = PeftModel.from_pretrained(fresh_base(case), repo_id).eval()
    assert type(ours) is type(plain) and ours.peft_config["default"].task_type == case.task_type
    got = outputs(ours.eval(), case)
    torch.testing.assert_close(got, outputs(plain, case), rtol=0, atol=0)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(outputs(fresh_base(case), case), expected)  # the adapter changes the outputs

    snippet = card.text.split("```python\n", 1)[1].split("```", 1)[0]
    assert f"{case.auto_class}.from_pretrained" in snippet and "chat_template" not in snippet
    if not case.snippet:
        return
    printed = run_card_snippet(repo_id, tmp_path)
    assert printed  # an answer span, labels, an embedding or generated text
    wanted = snippet_expectation(ours, case)
    if case.task_type == "FEATURE_EXTRACTION":  # floats: as close as two processes' CPU sums get
        torch.testing.assert_close(torch.tensor(ast.literal_eval(printed)), torch.tensor(ast.literal_eval(wanted)))
    else:
        assert printed == wanted
    if case.task_type == "SEQ_CLS":
        assert printed in LABELS.values() and "id2label={0: 'neg', 1: 'neutral', 2: 'pos'}" in snippet
    if case.task_type == "SEQ_2_SEQ_LM":
        assert "model.generate(**inputs" in snippet and printed != snippet_expectation(fresh_base(case), case)


def seq2seq_adapter(tmp_path, task_bases):
    case = CASES["t5-seq2seq"]
    return save_adapter(make_adapter(case), tmp_path / "t5", example_prompt=PROMPT)


def test_seq2seq_adapter_on_the_wrong_base_is_refused_clearly(task_bases, tmp_path):
    """The shape check builds the seq2seq model, so a T5 of another width is a shape mismatch, and a causal LM
    base (which AutoModelForSeq2SeqLM cannot build) says what the adapter needs, not transformers' ValueError."""
    folder = seq2seq_adapter(tmp_path, task_bases)
    wider = transformers.T5ForConditionalGeneration(
        transformers.T5Config(
            vocab_size=128, d_model=48, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4
        )
    )
    with pytest.raises(IncompatibleAdapterError, match=r"coder\.block\.0.*has shape \[4, 32\].*needs 48"):
        load_adapter(wider, folder)
    with pytest.raises(
        IncompatibleAdapterError,
        match=r"SEQ_2_SEQ_LM adapter .*llama model, which "
        r"AutoModelForSeq2SeqLM cannot build: it was made for alice/tiny-t5-tasks",
    ):
        load_adapter(load_tiny(), folder)


def classifier_folder(tmp_path, architecture: str):
    torch.manual_seed(0)
    model = tiny_configs()[BERT_REPO] if architecture == "bert" else tiny_configs()[T5_REPO]
    if architecture == "bert":
        model = transformers.BertForSequenceClassification(model.config)
    folder = tmp_path / architecture
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_load_base_model_refuses_a_checkpoint_whose_head_it_would_drop(tiny_base_repo, tmp_path):  # noqa: F811
    from hub_peft.base_model import load_base_model

    bert = classifier_folder(tmp_path, "bert")
    # what load_base_model's AutoModelForCausalLM does with it unchecked: a BERT LM, the classifier gone
    dropped = transformers.AutoModelForCausalLM.from_pretrained(bert)
    assert not any("classifier" in n for n, _ in dropped.named_parameters())
    with pytest.raises(
        InvalidInputError,
        match=r"BertForSequenceClassification checkpoint \(a sequence classifier\)"
        r".*transformers\.AutoModelForSequenceClassification\.from_pretrained",
    ):
        load_base_model(str(bert))
    with pytest.raises(InvalidInputError, match=r"T5ForConditionalGeneration.*AutoModelForSeq2SeqLM"):
        load_base_model(str(classifier_folder(tmp_path, "t5")))
    model, _ = load_base_model(tiny_base_repo)  # a causal LM still loads, its weights as they are
    ids = torch.arange(1, 9)[None]
    torch.testing.assert_close(model(input_ids=ids).logits, load_tiny()(input_ids=ids).logits, rtol=0, atol=0)


def test_chat_and_the_engine_refuse_non_causal_adapters_and_bases(task_bases, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    from hub_peft.cli import main
    from hub_peft.serving import MultiAdapterModel

    seq_cls = save_adapter(make_adapter(CASES["llama-seq-cls"]), tmp_path / "seq-cls")  # fits the tiny Llama
    t5 = seq2seq_adapter(tmp_path, task_bases)
    assert main(["chat", PROMPT, "--base", "alice/tiny-llama", "--adapter", str(seq_cls)]) == 2
    err = capsys.readouterr().err
    assert "is a SEQ_CLS adapter" in err and "hub-peft chat serves causal LM adapters only" in err
    assert "load_adapter(transformers.AutoModelForSequenceClassification.from_pretrained('alice/tiny-llama')" in err
    assert main(["chat", PROMPT, "--base", str(classifier_folder(tmp_path, "bert"))]) == 2
    assert "BertForSequenceClassification" in capsys.readouterr().err

    classifier = transformers.BertForSequenceClassification(tiny_configs()[BERT_REPO].config)
    with pytest.raises(IncompatibleAdapterError, match=r"engine serves causal LMs.*BertForSequenceClassification"):
        MultiAdapterModel((classifier, tiny_tokenizer()))
    engine = MultiAdapterModel((load_tiny(), tiny_tokenizer()))
    for folder, task in ((seq_cls, "SEQ_CLS"), (t5, "SEQ_2_SEQ_LM")):
        with pytest.raises(IncompatibleAdapterError, match=rf"is a {task} adapter .*engine \(hub-peft serve\) serves"):
            engine.add("nope", folder)
    assert engine.cache.loaded() == []
    for task_type in ("CAUSAL_LM", None):  # causal LM adapters, with or without a task type, still serve
        lora = get_peft_model(load_tiny(), LoraConfig(task_type=task_type, r=2, target_modules=["q_proj"]))
        engine.add(f"ok-{task_type}", save_adapter(lora, tmp_path / f"ok-{task_type}"))
    assert len(engine.cache.loaded()) == 2
