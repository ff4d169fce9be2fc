"""Save an adapter with its card, atomically."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .._atomic import atomic_dir
from ..cards import CardInfo, write_card
from ..errors import InvalidInputError, NotFoundError
from ..tasks import labels_of
from ..validate import card_facts, embedding_modules, read_safetensors_header, vocabulary_rows
from .specs import CONFIG_NAME, WEIGHTS_NAME, check_dataset_id


def _is_reft(model: Any) -> bool:
    from ..reft.model import ReftModel

    return isinstance(model, ReftModel)


def _count_params(model: Any) -> tuple[int, int]:
    trainable, total = model.get_nb_trainable_parameters()
    return int(trainable), int(total - trainable)


def data_summary(rows: list[dict[str, str]], name: str | None = None, n_samples: int = 3) -> dict[str, Any]:
    """Count, a few sample rows and a fingerprint (sha256 of the canonical JSON) of a dataset."""
    canonical = json.dumps(rows, sort_keys=True, ensure_ascii=False).encode()
    return {
        "count": len(rows),
        "fingerprint": "sha256:" + hashlib.sha256(canonical).hexdigest()[:16],
        "samples": rows[:n_samples],
        "name": name,
    }


def save_adapter(
    model: Any,
    out_dir: str | Path,
    *,
    adapter_name: str = "default",
    overwrite: bool = False,
    description: str | None = None,
    training_rows: list[dict[str, str]] | None = None,
    dataset_name: str | None = None,
    datasets: list[str] | None = None,
    history: list[dict[str, float]] | None = None,
    training_args: dict[str, Any] | None = None,
    training_seconds: float | None = None,
    evaluation: dict[str, float] | None = None,
    evaluation_details: dict[str, Any] | None = None,
    comparisons: list[dict[str, Any]] | None = None,
    license: str | None = None,
    example_prompt: str | None = None,
    prompt_template: str | None = None,
    tokenizer: Any = None,
) -> Path:
    """Write ``model``'s adapter (a ``peft.PeftModel`` or a :class:`hub_peft.reft.ReftModel`) to ``out_dir``
    with its card, atomically (all or nothing).

    ``dataset_name`` names the training data in the card's text (a file name is fine); ``datasets`` lists
    Hub dataset ids (``"squad"``, ``"org/name"``) for the card's metadata, which the Hub links to.
    ``evaluation`` (metric -> value), ``evaluation_details`` and ``comparisons`` are a
    :class:`hub_peft.evaluation.Evaluation`'s metrics, ``details()`` and ``table()``.

    ``tokenizer`` is saved beside the adapter when the adapter stores rows of the vocabulary (LoRA or
    ``modules_to_save`` on the input embeddings or the output head, as after adding tokens and
    ``resize_token_embeddings``): those rows mean something only with that tokenizer (PEFT's
    ``save_embedding_layers`` case). The card names ``out_dir``, the folder's final path.
    """
    from peft import PeftModel

    from ..modeling import innermost_model

    reft = _is_reft(model)
    if not reft and not isinstance(model, PeftModel):
        raise InvalidInputError(f"save_adapter needs a peft.PeftModel or a ReftModel, got {type(model).__name__}.")
    if reft:
        base_name = model.reft_config.base_model_name_or_path
    elif adapter_name not in model.peft_config:
        raise NotFoundError(f"No adapter named {adapter_name!r}; this model has {sorted(model.peft_config)}.")
    else:
        base_name = model.peft_config[adapter_name].base_model_name_or_path
    source = getattr(innermost_model(model), "hub_peft_source", None)
    trainable, total = _count_params(model)
    info = CardInfo(
        description=description,
        base=_base_info(model, source, base_name),
        params={"trainable": trainable, "total": total},
        data=data_summary(training_rows, dataset_name) if training_rows else None,
        history=list(history or []),
        training_args=dict(training_args or {}),
        training_seconds=training_seconds,
        evaluation=dict(evaluation or {}),
        evaluation_details=dict(evaluation_details or {}),
        comparisons=list(comparisons or []),
        license=license,
        datasets=[check_dataset_id(d) for d in datasets or []],
        labels=labels_of(model, adapter_name),  # a classifier's id2label, for the card's snippet
    )
    if example_prompt:
        info.example_prompt = example_prompt
    info.prompt_template = prompt_template or getattr(model, "hub_peft_prompt_template", None)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        _save_weights(model, tmp, adapter_name, reft, source)
        if tokenizer is not None and _stores_vocabulary_rows(tmp, innermost_model(model).config):
            tokenizer.save_pretrained(tmp)
        info.save(tmp)
        facts = card_facts(tmp, getattr(innermost_model(model), "config", None))
        write_card(tmp, name=str(out_dir), **facts)  # validated here: the card only renders the facts
    return out_dir


def _base_info(model: Any, source: Any, base_name: str) -> dict[str, Any]:
    """The card's facts about the base model: its Hub id, where its weights came from, its quantization."""
    return {
        "hub_id": getattr(source, "hub_id", None) or base_name,
        "origin": f"converted from {source.converted_from}" if getattr(source, "converted_from", None) else None,
        # hub_peft's loader counted the 4-bit layers; for another model, its layers are counted here
        "quantization": source.quantization if source is not None else _quantization_of(model),
        "four_bit_layers": getattr(source, "four_bit_layers", None),
    }


def _save_weights(model: Any, tmp: Path, adapter_name: str, reft: bool, source: Any) -> None:
    """The adapter's config and safetensors weights at the root of ``tmp``, naming the base by its Hub id."""
    if reft:
        model.save_pretrained(tmp)
    else:
        model.save_pretrained(tmp, selected_adapters=[adapter_name], safe_serialization=True)
    if adapter_name != "default" and not reft:  # PEFT nests non-default adapters in a sub-folder
        for p in (tmp / adapter_name).iterdir():
            p.replace(tmp / p.name)
        (tmp / adapter_name).rmdir()
    if source is not None and getattr(source, "hub_id", None):
        config = json.loads((tmp / CONFIG_NAME).read_text())
        config["base_model_name_or_path"] = source.hub_id  # not the local cache path
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))


def _stores_vocabulary_rows(folder: Path, base_config: Any) -> bool:
    """Whether the saved adapter holds tensors with one row per token of the vocabulary."""
    if not (folder / WEIGHTS_NAME).is_file():
        return False
    layout = embedding_modules(base_config)
    if layout is None:
        return False
    tensors = read_safetensors_header(folder / WEIGHTS_NAME)
    return bool(vocabulary_rows(tensors, layout[0]))


def _quantization_of(model: Any) -> str | None:
    """The quantization a model's config names, if any of its layers really is quantized (a config can say
    4-bit over layers bitsandbytes' loader skipped, e.g. Falcon's ``FalconLinear`` ones)."""
    from ..modeling import innermost_model

    core = innermost_model(model)
    q = getattr(getattr(core, "config", None), "quantization_config", None)
    if q is None or not any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in core.modules()):
        return None
    q = q.to_dict() if hasattr(q, "to_dict") else dict(q)
    return q.get("bnb_4bit_quant_type") if q.get("load_in_4bit") else q.get("quant_method")
