"""Checks of an adapter against a base model's config: layer shapes, vocabulary size, target modules, ReFT sizes.
The base is built from its config on the meta device, so no weight is read."""

from __future__ import annotations

import re
from typing import Any

from ..errors import InvalidInputError
from ..targets import adapted_modules, base_module_names
from ..tasks import task_of
from .report import Report


def _module_shapes(base_config: Any, auto_class: str = "AutoModelForCausalLM") -> dict[str, tuple[int, int]]:
    """(in, out) features of every Linear in a model built by ``auto_class`` from ``base_config`` on the
    meta device; raises ValueError when that Auto class cannot build this config."""
    import torch
    import transformers

    with torch.device("meta"):
        model = getattr(transformers, auto_class).from_config(base_config)
    return {
        name: (m.in_features, m.out_features) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }


def embedding_modules(base_config: Any) -> tuple[tuple[str, ...], int] | None:
    """The names of the input and output embedding modules of a causal LM built from ``base_config`` (on the
    meta device) and its vocabulary size (rows of the input embeddings); None for a model it cannot build."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(base_config)
    except Exception:  # not a causal LM transformers can build: nothing to compare
        return None
    names = {id(m): name for name, m in model.named_modules()}
    found = [
        names[id(m)]
        for m in (model.get_input_embeddings(), model.get_output_embeddings())
        if m is not None and id(m) in names
    ]
    embeddings = model.get_input_embeddings()
    if not found or not hasattr(embeddings, "num_embeddings"):
        return None
    return tuple(found), int(embeddings.num_embeddings)


def vocabulary_rows(tensors: dict[str, tuple[str, list[int]]], modules: tuple[str, ...]) -> dict[str, int]:
    """Tensor name -> vocabulary size it was made for, for the adapter tensors of the embedding ``modules``
    that hold one row (or column) per token: whole layers (``modules_to_save``, PEFT's saved base layers),
    LoRA's ``lora_embedding_A`` on the input embeddings and ``lora_B`` on the output head."""
    out = {}
    for name, (_, shape) in tensors.items():
        stem = name.removeprefix("base_model.model.")
        module = next((m for m in modules if stem.startswith(f"{m}.")), None)
        if module is None or len(shape) != 2:
            continue
        rest = stem[len(module) + 1 :].split(".")
        if rest[0] == "lora_embedding_A":
            out[name] = shape[1]  # [r, vocab]
        elif rest[-1] == "weight" and rest[0] in (
            "weight",
            "lora_B",
            "modules_to_save",
            "base_layer",
            "original_module",
        ):
            out[name] = shape[0]  # [vocab, hidden] and lora_B [vocab, r]
    return out


def check_vocabulary(report: Report, base_config: Any, base_name: str) -> bool:
    """An adapter trained after tokens were added (and the embeddings resized) needs a base of that size;
    True when it does not fit (a problem was added)."""
    layout = embedding_modules(base_config)
    if layout is None:
        return False
    modules, vocab = layout
    wrong = {name: rows for name, rows in vocabulary_rows(report.tensors, modules).items() if rows != vocab}
    if not wrong:
        return False
    tensor, rows = next(iter(sorted(wrong.items())))
    saved = (report.folder / "tokenizer_config.json").is_file()
    tokenizer = (
        "the tokenizer saved with the adapter (AutoTokenizer.from_pretrained on the adapter)"
        if saved
        else "the tokenizer it was trained with, which holds the added tokens"
    )
    made_for = report.config.get("base_model_name_or_path") or "its base model"
    report.add(
        f"{tensor} has {rows} token rows, but {base_name} has a vocabulary of {vocab}: this adapter was trained on "
        f"{made_for} with its embeddings resized to {rows} tokens (tokens were added to the tokenizer)",
        f"resize the base's embeddings to {rows} before loading it (base.resize_token_embeddings({rows})), and use "
        f"{tokenizer}",
        incompatible_base=True,
    )
    return True


def check_shapes(report: Report, base_config: Any, base_name: str) -> None:
    expected_base = report.config.get("base_model_name_or_path") or "unknown"
    task = task_of(report.config)
    try:  # the model the adapter wraps: the Auto class of its task type
        shapes = _module_shapes(base_config, task.auto_class)
    except ValueError:  # transformers: "Unrecognized configuration class ... for this kind of AutoModel"
        model_type = getattr(base_config, "model_type", None) or type(base_config).__name__
        report.add(
            f"this is a {task.task_type} adapter (a {task.what}, built with {task.auto_class}), but {base_name} is a "
            f"{model_type} model, which {task.auto_class} cannot build: it was made for {expected_base}",
            f"load it on {expected_base} with transformers.{task.auto_class}",
            incompatible_base=True,
        )
        return
    pattern = re.compile(r"^base_model\.model\.(.+)\.(lora_A|lora_B)\.weight$")
    for tensor, (_, shape) in report.tensors.items():
        m = pattern.match(tensor)
        if not m or m.group(1) not in shapes or len(shape) < 2:
            continue
        fan_in, fan_out = shapes[m.group(1)]
        got, want = (shape[1], fan_in) if m.group(2) == "lora_A" else (shape[0], fan_out)
        if got != want:
            report.add(
                f"{tensor} has shape {shape}, but {base_name} needs {want} there: this adapter was made for "
                f"{expected_base}, not {base_name}",
                f"load it on {expected_base}, or retrain it for {base_name}",
                incompatible_base=True,
            )
            return


def check_targets_in_base(report: Report, base_config: Any, base_name: str) -> None:
    """Add a problem when adapter weights belong to modules the base does not have (``hub-peft validate --base``):
    each weight's module is the longest path before it that ``target_modules`` names (PEFT's rule). Names in
    ``target_modules`` that match nothing but hold no weights are left alone, as PEFT loads those adapters.
    The base is built from its config on the meta device, by the Auto class of the adapter's task type."""
    targets = report.config.get("target_modules")
    if (
        str(report.config.get("peft_type")) == "REFT"
        or not targets
        or not isinstance(targets, (str, list))
        or (isinstance(targets, list) and not all(isinstance(t, str) for t in targets))
    ):
        return
    built = base_module_names(base_config, task_of(report.config).auto_class)
    if built is None:
        return  # check_shapes says the base cannot be built for this task type
    names, linear = built
    try:  # a regex target_modules is matched with a bound
        adapted = adapted_modules(report.tensors, targets)
    except InvalidInputError as e:
        if not any(p.point == str(e).partition(" Fix: ")[0] for p in report.problems):  # said once
            report.add(str(e).partition(" Fix: ")[0], "list the module names in target_modules")
        return
    absent = {path: target for path, target in adapted.items() if path not in names}
    if absent:
        made_for = report.config.get("base_model_name_or_path") or "unknown"
        report.add(
            f"target module(s) {', '.join(dict.fromkeys(absent.values()))} are not in {base_name} (its linear "
            f"layers: {linear}): {len(absent)} adapted module(s) such as {next(iter(absent))} have nothing to "
            f"load into; this adapter was made for {made_for}",
            f"load it on {made_for}, or retrain it for {base_name} (hub-peft train --target-modules all-linear)",
            incompatible_base=True,
        )


def check_reft(report: Report, config: Any, base_config: Any, base_name: str) -> None:
    expected = config.tensor_shapes()
    found = {name: shape for name, (_, shape) in report.tensors.items()}
    if set(found) != set(expected):
        missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        report.add(
            f"the ReFT weights do not match the config (missing {missing[:3]}, unexpected {extra[:3]})",
            "re-save the adapter with hub_peft; config and weights must come from the same model",
        )
        return
    wrong = [n for n in expected if expected[n] != found[n]]
    if wrong:
        report.add(
            f"{wrong[0]} has shape {found[wrong[0]]}, the config says {expected[wrong[0]]}",
            "re-save the adapter with hub_peft",
        )
    if base_config is None:
        return
    text = base_config.get_text_config() if hasattr(base_config, "get_text_config") else base_config
    hidden, n_layers = getattr(text, "hidden_size", None), getattr(text, "num_hidden_layers", None)
    made_for = config.base_model_name_or_path or "unknown"
    if hidden is not None and hidden != config.hidden_size:
        report.add(
            f"this ReFT adapter edits {config.hidden_size}-dim hidden states, but {base_name} has "
            f"hidden size {hidden}: it was made for {made_for}",
            f"load it on {made_for}",
            incompatible_base=True,
        )
    elif n_layers is not None and config.layers[-1] >= n_layers:
        report.add(
            f"this ReFT adapter intervenes on layer {config.layers[-1]}, but {base_name} has {n_layers} "
            f"layers: it was made for {made_for}",
            f"load it on {made_for}",
            incompatible_base=True,
        )
