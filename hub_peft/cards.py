"""Generate model cards (``README.md``) for adapter folders from the Jinja templates in ``cards/``.

Everything a card says comes from the folder itself (config, weights) and ``hub_peft_card.json``
(what was known at save time: base model source, training data summary, loss history, evaluation).
A token is never an input here, so it can never reach a card.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypedDict, Unpack

import yaml

from ._atomic import write_text
from ._version import __version__
from .tasks import task_of

CARD_INFO_NAME = "hub_peft_card.json"
LOSS_CURVE_NAME = "loss_curve.png"
EVAL_RESULTS_PATH = ".eval_results/hub_peft.yaml"
METRIC_NAMES = {
    "validation_loss": "Validation loss (mean cross-entropy per response token)",
    "exact_match": "Exact match, with the adapter",
    "base_exact_match": "Exact match, base model alone",
}
EMBEDDED_LICENSES = {"HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0"}

_SUMMARIES = {
    "LORA": "Low-rank update ΔW = (α/r)·B·A added to the targeted linear layers.",
    "ADALORA": "LoRA with an SVD-style parametrisation whose rank budget is re-allocated during training.",
    "IA3": "Learned vectors that rescale keys, values and feed-forward activations.",
    "PREFIX_TUNING": "Trainable key/value prefixes prepended at every attention layer.",
    "PROMPT_TUNING": "Trainable virtual tokens prepended to the input embeddings.",
    "P_TUNING": "Virtual tokens produced by a small prompt encoder.",
    "ADAPTION_PROMPT": "LLaMA-Adapter: zero-initialised gated prompts in the top attention layers.",
}
_REFT_FORMULAS = {
    "loreft": "h ← h + Rᵀ(W h + b − R h), R with orthonormal rows (LoReFT)",
    "noreft": "h ← h + Rᵀ(W h + b − R h), R unconstrained (NoReFT)",
    "direft": "h ← h + Rᵀ(W h + b), R with orthonormal rows (DiReFT)",
    "nodireft": "h ← h + Rᵀ(W h + b), R unconstrained (NoDiReFT)",
    "consreft": "h ← h + Rᵀ(b − R h), R with orthonormal rows (ConsReFT)",
    "lobireft": "h ← h + Rᵀ b, R with orthonormal rows (LoBiReFT)",
}
_CONFIG_PLUMBING = {
    *("peft_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version"),
    *("task_type", "load_note", "loads_with", "hub_peft_version", "prompt_template"),
}


@dataclass
class CardInfo:
    """What a card needs beyond the adapter files. Stored as ``hub_peft_card.json``."""

    description: str | None = None
    base: dict[str, Any] = field(default_factory=dict)  # hub_id, revision, origin, quantization
    params: dict[str, Any] = field(default_factory=dict)  # trainable, total
    data: dict[str, Any] | None = None  # count, fingerprint, samples, name
    history: list[dict[str, float]] = field(default_factory=list)  # [{"step": 1, "loss": 2.3}, ...]
    training_args: dict[str, Any] = field(default_factory=dict)
    training_seconds: float | None = None
    evaluation: dict[str, float] = field(default_factory=dict)  # metric -> value
    evaluation_details: dict[str, Any] = field(default_factory=dict)  # source, rows, evaluated, date
    comparisons: list[dict[str, Any]] = field(default_factory=list)  # [{"prompt", "base", "adapter", "reference"}]
    license: str | None = None
    datasets: list[str] = field(default_factory=list)  # Hub dataset ids only (card metadata links to them)
    example_prompt: str = "Hello! What can you do?"
    limitations: str | None = None
    prompt_template: str | None = None  # the text around "{prompt}" in training, so chat uses the same format
    labels: dict[str, str] | None = None  # a classifier's id2label (SEQ_CLS/TOKEN_CLS), for the card's snippet
    lineage: dict[str, Any] | None = None  # a merge's parents and settings, or a conversion's source and error

    @classmethod
    def load(cls, folder: Path) -> CardInfo:
        path = Path(folder) / CARD_INFO_NAME
        if not path.is_file():
            return cls()
        data = json.loads(path.read_text())
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def save(self, folder: Path) -> None:
        write_text(Path(folder) / CARD_INFO_NAME, json.dumps(self.__dict__, indent=2, default=str))


def _citations() -> dict[str, str]:
    return yaml.safe_load(resources.files("hub_peft._cards").joinpath("citations.yaml").read_text())


def _env():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(lambda name: resources.files("hub_peft._cards").joinpath(name).read_text()),
        keep_trailing_newline=True,
        trim_blocks=False,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["cell"] = lambda v: str(v).replace("|", "\\|").replace("\n", " ")[:120]
    return env


def method_variants(config: dict) -> list[str]:
    """``["LORA", "RSLORA", "DORA", "QLORA"]``-style names: the type plus the variants it uses."""
    peft_type = str(config.get("peft_type", "UNKNOWN")).upper()
    names = [peft_type]
    if peft_type == "LORA":
        if config.get("use_rslora"):
            names.append("RSLORA")
        if config.get("use_dora"):
            names.append("DORA")
    return names


def _hyperparameters(config: dict) -> list[tuple[str, str]]:
    rows = []
    for key, value in sorted(config.items()):
        if key in _CONFIG_PLUMBING or value in (None, {}, [], "") or key.startswith("_"):
            continue
        rows.append((key, json.dumps(value, sort_keys=True)[:200] if not isinstance(value, str) else value))
    return rows


def _size(folder: Path) -> str:
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return f"{size / 2**20:.2f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"


class CardFacts(TypedDict, total=False):
    """What a card states beyond its folder: ``name`` (the path a staged folder will have), ``verdicts`` and
    ``tensors`` (from :func:`hub_peft.validate.card_facts`); see :func:`render_card`."""

    name: str | None
    verdicts: dict[str, list[str] | None] | None
    tensors: dict[str, tuple[str, list[int]]] | None


def render_card(folder: str | Path, *, repo_id: str | None = None, **facts: Unpack[CardFacts]) -> str:
    """The full ``README.md`` text for the adapter in ``folder``. Its usage snippets load ``repo_id``, else
    ``name`` (the path a folder not pushed yet will have, when ``folder`` is a staging copy), else ``folder``.

    The card states what it is given and checks nothing: ``verdicts`` (engine -> the problems its validator found,
    ``[]`` when it serves the adapter; an engine absent or None: not known, the card says how to check) and
    ``tensors`` (the weights' safetensors header, for a classifier head's size when no labels were recorded).
    :func:`hub_peft.validate.card_facts` gives both."""
    from huggingface_hub import constants

    name, tensors, verdicts = facts.get("name"), facts.get("tensors"), facts.get("verdicts") or {}

    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    info = CardInfo.load(folder)
    task = task_of(config)  # ReFT and task-less configs: causal LM
    variants = method_variants(config)
    reft = config if variants[0] == "REFT" else {}
    base_id = info.base.get("hub_id") or config.get("base_model_name_or_path") or "unknown"
    quantization = info.base.get("quantization")
    if quantization and variants[0] == "LORA":
        variants.append("QLORA")
    family = "reft" if variants[0] == "REFT" else "peft"
    trainable, total = info.params.get("trainable"), info.params.get("total")
    context = {
        "metadata_yaml": yaml.safe_dump(
            _metadata(info, task, variants, family, base_id, repo_id), sort_keys=False, allow_unicode=True
        ).strip(),
        "title": repo_id or f"{variants[0]} adapter for {base_id}",
        "description": info.description
        or f"A {' + '.join(variants)} adapter for [`{base_id}`]({constants.ENDPOINT}/{base_id}), made with hub_peft.",
        "repo_id": repo_id or name or str(folder),
        "hub_url": constants.ENDPOINT,
        "base": {
            "hub_id": base_id,
            "revision": info.base.get("revision") or config.get("revision"),
            "origin": info.base.get("origin") or "the base model's own weights",
            "quantization": _quantization_label(quantization, info.base.get("four_bit_layers")),
        },
        "method": {
            "name": " + ".join(variants),
            "summary": _reft_summary(reft)
            if reft
            else _SUMMARIES.get(variants[0], f"PEFT method `{variants[0]}`; see the citation below."),
            "hyperparameters": _hyperparameters(config),
        },
        "params": {
            "trainable": trainable,
            "total": total,
            "percent": 100.0 * trainable / total if trainable and total else None,
        },
        "size_on_disk": _size(folder),
        "data": info.data,
        "training": {
            "history": info.history,
            "loss_curve": LOSS_CURVE_NAME if (folder / LOSS_CURVE_NAME).is_file() else None,
            "seconds": info.training_seconds,
            "args": info.training_args,
        },
        "evaluation": _evaluation(info),
        "serving": _serving(task, verdicts, repo_id or name or str(folder), base_id),
        "lineage": info.lineage,
        "limitations": info.limitations or _LIMITATIONS,
        "citation": _citation(variants, family),
        "example_prompt": info.example_prompt,
        "reft": {"prompt_template": reft.get("prompt_template")},
        "prompt_template": info.prompt_template,
        "task": task,
        "head_kwargs": _head_kwargs(task, info, tensors or {}),
        "version": __version__,
    }
    return _env().get_template(f"{family}.md.j2").render(**context)


def _citation(variants: list[str], family: str) -> str:
    """The BibTeX entries of the method and its variants, then of PEFT (or ReFT)."""
    citations = _citations()
    keys = list(dict.fromkeys([*(v for v in variants if v in citations), "PEFT" if family == "peft" else "REFT"]))
    return "\n".join(citations[k].strip() for k in keys)


def _evaluation(info: CardInfo) -> dict[str, Any]:
    return {
        "metrics": info.evaluation,
        "names": METRIC_NAMES,
        "details": info.evaluation_details,
        "comparisons": info.comparisons,
        "has_references": any(c.get("reference") is not None for c in info.comparisons),
    }


_LIMITATIONS = (
    "This adapter inherits the limitations and biases of its base model and was trained on the small dataset "
    "summarised above; check its answers before relying on them. It is meant for research and demos of "
    "parameter-efficient fine-tuning, not for high-stakes decisions."
)


def _metadata(
    info: CardInfo, task: Any, variants: list[str], family: str, base_id: str, repo_id: str | None
) -> dict[str, Any]:
    """The card's YAML metadata: what the Hub indexes (base model, library, tags, license, datasets) and, for an
    evaluated run pushed to ``repo_id``, its ``model-index`` results."""
    from huggingface_hub import ModelCardData

    tags = [v.lower() for v in variants] + ["hub_peft", family]
    if info.lineage and info.lineage.get("operation") == "merge":
        tags.append("merge")
    if family == "peft":
        tags.append("base_model:adapter:" + base_id)
    metadata = ModelCardData(
        base_model=base_id,
        library_name="peft" if family == "peft" else "hub_peft",
        pipeline_tag=task.pipeline_tag,
        tags=tags,
        license=info.license or info.base.get("license") or EMBEDDED_LICENSES.get(base_id),
        datasets=info.datasets or None,
        model_name=repo_id,
        eval_results=None,
    )
    meta = metadata.to_dict()
    meta["base_model_relation"] = "adapter"
    if info.evaluation and repo_id:
        dataset = {
            "name": _data_name(info) + ", validation split",
            "type": (info.datasets or ["custom"])[0],
            "split": "validation",
        }
        metrics = [{"type": k, "value": v, "name": METRIC_NAMES.get(k, k)} for k, v in sorted(info.evaluation.items())]
        result = {"task": {"type": task.pipeline_tag}, "dataset": dataset, "metrics": metrics}
        meta["model-index"] = [{"name": repo_id, "results": [result]}]
    meta.pop("model_name", None)
    return meta


def _serving(task: Any, verdicts: dict[str, list[str] | None], repo: str, base: str) -> str:
    """Where the adapter can be served, as the card says it: one row per engine, from the validators' verdicts
    (engine -> its problems, ``[]`` when it serves the adapter; absent or None: not checked)."""
    if task.task_type != "CAUSAL_LM":  # chat and the engine generate with causal LMs
        return (
            f"Loads with PEFT and `hub_peft.load_adapter` on `{task.auto_class}`. `hub-peft chat` and "
            f"`hub-peft serve` run causal LM adapters only, so they refuse this {task.task_type} adapter."
        )
    rows = [
        "| Engine | Serves it | How, or why not |",
        "|---|---|---|",
        "| PEFT, `hub-peft serve` | yes | `PeftModel.from_pretrained` (above); "
        f"`hub-peft serve --base {base} --adapter NAME={repo}` batches it with other adapters on one (4-bit) base |",
    ]
    engines = (
        (
            "vllm",
            "vLLM",
            f"vLLM-compatible LoRA: `vllm serve {base} --enable-lora --lora-modules NAME={repo}`",
            "`hub-peft validate --for vllm`",
        ),
        (
            "llama.cpp",
            "llama.cpp, Ollama",
            f"`hub-peft export {repo} --to gguf --ollama BASE.gguf` writes its GGUF LoRA "
            "and a Modelfile (`llama-server --lora`, Ollama's `ADAPTER`)",
            "`hub-peft validate --for llama.cpp`",
        ),
    )
    for key, label, how, check in engines:
        problems = verdicts.get(key)
        if problems is None:
            rows.append(f"| {label} | not checked | {check} says |")
        elif not problems:
            rows.append(f"| {label} | yes | {how} (checked with {check}) |")
        else:
            why = "; ".join(problems[:2]).replace("|", "\\|").replace("\n", " ")[:300]
            prefix = "Not vLLM-compatible: " if key == "vllm" else ""
            rows.append(f"| {label} | no | {prefix}{why} ({check} lists the fixes) |")
    return "\n".join(rows)


def _head_kwargs(task: Any, info: CardInfo, tensors: dict[str, tuple[str, list[int]]]) -> str:
    """``from_pretrained`` arguments that give a classifier's base the adapter's head size and labels."""
    if task.call not in ("classify", "tag"):
        return ""
    labels = info.labels
    if not labels:  # saved without hub_peft's card inputs: the head's size from its saved weight
        rows = [
            shape[0]
            for name, (_, shape) in tensors.items()
            if re.search(r"\.(classifier|score)(\.out_proj)?\.weight$", name) and len(shape) == 2
        ]
        return f", num_labels={rows[0]}" if rows else ""
    id2label = {int(k): v for k, v in labels.items()}
    if all(v == f"LABEL_{k}" for k, v in id2label.items()):
        return f", num_labels={len(id2label)}"
    return f", num_labels={len(id2label)}, id2label={dict(sorted(id2label.items()))!r}"


def _quantization_label(quantization: str | None, four_bit_layers: str | None) -> str | None:
    label = "NF4 4-bit (bitsandbytes)" if quantization == "nf4" else quantization
    if label and four_bit_layers:
        done, total = four_bit_layers.split("/")
        label += f", {done} of {total} decoder linear layers"
    return label


def _reft_summary(config: dict) -> str:
    intervention = config.get("intervention")
    formula = _REFT_FORMULAS.get(intervention, intervention) if isinstance(intervention, str) else intervention
    return (
        f"ReFT edits hidden representations instead of weights: {formula}, rank {config.get('rank')}, applied to "
        f"`{', '.join(config.get('components') or [])}` of layers {config.get('layers')} at prompt positions "
        f"`{config.get('positions')}` (pyreft notation: f = first, l = last prompt tokens). Generated tokens are not "
        "edited, so generation runs on the KV cache."
    )


def write_card(folder: str | Path, *, repo_id: str | None = None, **facts: Unpack[CardFacts]) -> Path:
    """Write (or refresh) ``folder/README.md`` and, when the run was evaluated, ``.eval_results/``;
    also draws the loss curve when a history is known. ``facts``: see :func:`render_card` (the caller
    validates; ``write_card(folder, **card_facts(folder))``)."""
    folder = Path(folder)
    info = CardInfo.load(folder)
    if info.history and not (folder / LOSS_CURVE_NAME).is_file():
        plot_loss_curve(info.history, folder / LOSS_CURVE_NAME)
    entries = eval_result_entries(info, repo_id=repo_id)
    if entries:
        from huggingface_hub import eval_result_entries_to_yaml

        (folder / EVAL_RESULTS_PATH).parent.mkdir(exist_ok=True)
        write_text(folder / EVAL_RESULTS_PATH, yaml.safe_dump(eval_result_entries_to_yaml(entries), sort_keys=False))
    path = folder / "README.md"
    write_text(path, render_card(folder, repo_id=repo_id, **facts))
    return path


def _data_name(info: CardInfo) -> str:
    return (info.data or {}).get("name") or "the training examples"


def eval_result_entries(info: CardInfo, *, repo_id: str | None = None) -> list:
    """The run's metrics as ``.eval_results/`` entries (huggingface_hub's ``EvalResultEntry``), one per
    metric (its ``task_id``). The dataset is the Hub dataset the examples came from when known; a
    held-out split of a local file has no Hub id, so the entry names the adapter's own repo and says so
    in ``notes``. Without a repo id (a folder not pushed yet) only a Hub dataset can be named."""
    from huggingface_hub import EvalResultEntry, constants

    dataset = info.datasets[0] if info.datasets else repo_id
    if not info.evaluation or dataset is None:
        return []
    details = info.evaluation_details
    split = f"{details.get('rows', '?')}-row validation split of {_data_name(info)}, never trained on"
    source = {"source_url": f"{constants.ENDPOINT}/{repo_id}", "source_name": "hub_peft training run"}
    entries = []
    for name, value in sorted(info.evaluation.items()):
        answered = f"; {details.get('evaluated')} rows answered, greedy" if "exact_match" in name else ""
        entries.append(
            EvalResultEntry(
                dataset_id=dataset,
                task_id=name,
                value=value,
                date=details.get("date"),
                notes=f"{METRIC_NAMES.get(name, name)}; {split}{answered}",
                **(source if repo_id else {}),
            )
        )
    return entries


def plot_loss_curve(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], marker="o", markersize=3, label="train")
    validated = [h for h in history if "val_loss" in h]
    if validated:  # one point per epoch, at the epoch's last step
        ax.plot(
            [h["step"] for h in validated],
            [h["val_loss"] for h in validated],
            marker="s",
            markersize=4,
            label="validation",
        )
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
