"""The task types adapters are made for, and which of them each part of hub_peft runs.

One table maps PEFT's ``task_type`` to the transformers Auto class that builds the model the adapter
wraps, the Hub ``pipeline_tag`` its card carries and the call its card's snippet makes. An adapter
without a ``task_type`` (ReFT, or PEFT saved without one) is a causal LM adapter.

``load_adapter``, ``validate`` and the cards handle every task type; ``hub-peft chat``, the
multi-adapter engine (``hub-peft serve``) and ``load_base_model`` are causal LM only and refuse the
rest with an error that says what loads them instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import IncompatibleAdapterError, InvalidInputError


@dataclass(frozen=True)
class Task:
    task_type: str  # PEFT's TaskType value
    auto_class: str  # the transformers Auto class that builds the model the adapter wraps
    pipeline_tag: str  # the Hub's pipeline tag for the card's metadata
    call: str  # what the card's snippet does: chat | generate | classify | tag | embed | span
    what: str  # in words, for messages


TASKS: dict[str, Task] = {
    "CAUSAL_LM": Task("CAUSAL_LM", "AutoModelForCausalLM", "text-generation", "chat", "causal language model"),
    "SEQ_2_SEQ_LM": Task(
        "SEQ_2_SEQ_LM", "AutoModelForSeq2SeqLM", "text2text-generation", "generate", "sequence-to-sequence model"
    ),
    "SEQ_CLS": Task(
        "SEQ_CLS", "AutoModelForSequenceClassification", "text-classification", "classify", "sequence classifier"
    ),
    "TOKEN_CLS": Task(
        "TOKEN_CLS", "AutoModelForTokenClassification", "token-classification", "tag", "token classifier"
    ),
    "FEATURE_EXTRACTION": Task(
        "FEATURE_EXTRACTION", "AutoModel", "feature-extraction", "embed", "feature extractor (encoder)"
    ),
    "QUESTION_ANS": Task(
        "QUESTION_ANS",
        "AutoModelForQuestionAnswering",
        "question-answering",
        "span",
        "extractive question-answering model",
    ),
}
CAUSAL_LM = TASKS["CAUSAL_LM"]

# transformers' model mappings of heads that are not causal LMs, and the Auto class that loads each
# (first match wins; a class that is also in the causal LM mapping is a causal LM)
_OTHER_HEADS = (
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "AutoModelForSeq2SeqLM", "a sequence-to-sequence model"),
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForSequenceClassification", "a sequence classifier"),
    ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "AutoModelForTokenClassification", "a token classifier"),
    ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "AutoModelForQuestionAnswering", "a question-answering model"),
    ("MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES", "AutoModelForMultipleChoice", "a multiple-choice model"),
    ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "AutoModelForMaskedLM", "a masked language model"),
    ("MODEL_MAPPING_NAMES", "AutoModel", "a bare encoder/decoder without a head"),
)
# only for checkpoints (load_base_model): AutoModelForCausalLM would not load these either
_OTHER_CHECKPOINTS = (
    ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "AutoModelForImageTextToText", "an image-text-to-text model"),
    ("MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES", "AutoModelForSpeechSeq2Seq", "a speech-to-text model"),
    ("MODEL_FOR_PRETRAINING_MAPPING_NAMES", "AutoModelForPreTraining", "a pretraining model"),
)


def task_of(config: dict) -> Task:
    """The :class:`Task` of an adapter config (a dict); causal LM when it names none."""
    task_type = config.get("task_type") or "CAUSAL_LM"
    return TASKS.get(str(task_type).upper(), Task(str(task_type), "AutoModel", "other", "embed", str(task_type)))


def _class_names(mapping_name: str) -> set[str]:
    from transformers.models.auto import modeling_auto

    names: set[str] = set()
    for value in getattr(modeling_auto, mapping_name, {}).values():
        names.update([value] if isinstance(value, str) else value)
    return names


def head_of(class_name: str, *, checkpoint: bool = False) -> tuple[str, str] | None:
    """``(Auto class, what it is)`` for a transformers model class that is not a causal LM; None for a
    causal LM or a class transformers does not map (remote code, say)."""
    if class_name in _class_names("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"):
        return None
    for mapping, auto_class, what in _OTHER_HEADS + (_OTHER_CHECKPOINTS if checkpoint else ()):
        if class_name in _class_names(mapping):
            return auto_class, what
    return None


def check_causal_checkpoint(config: Any, name: str) -> None:
    """Refuse a checkpoint whose ``architectures`` names a non-causal-LM class, which
    ``AutoModelForCausalLM`` would load without its head (or as another model entirely)."""
    architectures = getattr(config, "architectures", None) or []
    for arch in architectures[:1]:
        head = head_of(arch, checkpoint=True)
        if head is None:
            continue
        auto_class, what = head
        raise InvalidInputError(
            f"{name} is a {arch} checkpoint ({what}); load_base_model loads causal LMs (AutoModelForCausalLM) and "
            f"would drop or replace its head. Load it with transformers.{auto_class}.from_pretrained({name!r}) and "
            "put adapters on it with hub_peft.load_adapter; hub-peft chat, train and serve run causal LMs only."
        )


def require_causal_lm(model: Any, where: str = "the multi-adapter engine") -> None:
    """Refuse a model (under any PEFT/ReFT wrappers) that is not a causal LM: ``where`` serves causal LMs."""
    from .modeling import innermost_model

    core = innermost_model(model)
    name = type(core).__name__
    head = head_of(name)
    if head is None and getattr(getattr(core, "config", None), "is_encoder_decoder", False):
        head = ("AutoModelForSeq2SeqLM", "a sequence-to-sequence model")
    if head is not None:
        auto_class, what = head
        raise IncompatibleAdapterError(
            f"{where} serves causal LMs (AutoModelForCausalLM), but this base is a {name} ({what}). Use "
            f"hub_peft.load_adapter on the {auto_class} model and call it directly, or give {where} a causal LM."
        )


def require_causal_adapter(folder: str | Path, source: Any, where: str) -> None:
    """Refuse an adapter whose ``task_type`` is not causal LM (``where`` serves causal LM adapters only).
    A folder without a readable ``adapter_config.json`` passes: the adapter checks report that."""
    try:
        config = json.loads((Path(folder) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return
    if not isinstance(config, dict):
        return
    task = task_of(config)
    if task.task_type == "CAUSAL_LM":
        return
    base = config.get("base_model_name_or_path") or "its base model"
    raise IncompatibleAdapterError(
        f"{source} is a {task.task_type} adapter (a {task.what}); {where} serves causal LM adapters only. Load it "
        f"with hub_peft.load_adapter(transformers.{task.auto_class}.from_pretrained({base!r}), {str(source)!r}) "
        "(or plain PEFT's PeftModel.from_pretrained) and call the model directly."
    )


def labels_of(model: Any, adapter_name: str = "default") -> dict[str, str] | None:
    """A classifier adapter's labels (its base's ``id2label``) for the card; None for other task types."""
    from .modeling import innermost_model

    configs = getattr(model, "peft_config", None)
    config = configs.get(adapter_name) if isinstance(configs, dict) else None
    if str(getattr(config, "task_type", None) or "") not in ("SEQ_CLS", "TOKEN_CLS"):
        return None
    id2label = getattr(getattr(innermost_model(model), "config", None), "id2label", None) or {}
    return {str(k): str(v) for k, v in sorted(id2label.items(), key=lambda kv: int(kv[0]))} or None
