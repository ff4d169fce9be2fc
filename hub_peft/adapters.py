"""Save, push, fetch and load adapters in hub_peft's one repo format.

A folder is exactly what PEFT writes (``adapter_config.json`` + ``adapter_model.safetensors``) plus
a generated ``README.md`` card, ``hub_peft_card.json`` (the card's inputs) and an optional
``loss_curve.png``, so plain ``PeftModel.from_pretrained(base, repo_id)`` loads it unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._atomic import atomic_dir
from .cards import CARD_INFO_NAME, CardInfo, write_card
from .errors import (
    HubAuthError,
    IncompatibleAdapterError,
    InvalidInputError,
    NotFoundError,
    UnsafeFileError,
)
from .tasks import labels_of
from .validate import MAX_SANE_BYTES, PICKLE_SUFFIXES, validate_adapter

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_DATASET_ID = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


def check_repo_id(repo_id: str) -> str:
    if not isinstance(repo_id, str) or not _REPO_ID.fullmatch(repo_id) or ".." in repo_id or "--" in repo_id:
        raise InvalidInputError(
            f"Invalid repo id {repo_id!r}: use 'namespace/name' with letters, digits, '-', '_' or '.', "
            "at most 96 characters each, no '--' or '..'."
        )
    return repo_id


def check_dataset_id(dataset_id: str) -> str:
    """A Hub dataset id for card metadata: ``name`` or ``namespace/name`` (not a file or a path)."""
    if not isinstance(dataset_id, str) or not _DATASET_ID.fullmatch(dataset_id) or ".." in dataset_id:
        raise InvalidInputError(
            f"Invalid Hub dataset id {dataset_id!r}: card metadata links to Hub datasets, so use 'name' or "
            "'namespace/name'. Describe local data with dataset_name= instead."
        )
    return dataset_id


def check_subfolder(subfolder: str) -> str:
    """A sub-folder of a repo or folder, as a relative POSIX path (``"checkpoint-final"``, ``"runs/best"``);
    no ``..``, no absolute path, no backslash. Returns it without a trailing ``/``."""
    text = subfolder.strip().rstrip("/") if isinstance(subfolder, str) else ""
    parts = text.split("/")
    if not text or text.startswith("/") or "\\" in text or any(p in ("", ".", "..") for p in parts):
        raise InvalidInputError(
            f"Invalid sub-folder {subfolder!r}: give a relative path inside the repo or folder, such as "
            "'checkpoint-final' or 'runs/best' (no '..', no absolute path, no backslash)."
        )
    return text


def parse_adapter_spec(text: str) -> tuple[str, str | None, str | None]:
    """``(source, revision, subfolder)`` from the one adapter syntax every CLI argument and server field takes.

    * ``namespace/name[@revision][:subfolder]``: a Hub repo, at a branch, tag or commit, with the adapter in a
      sub-folder of the repo: ``me/runs``, ``me/runs@v2``, ``me/runs:checkpoint-final``,
      ``me/runs@v2:checkpoint-final``. Revision first, then the sub-folder (a git ref has no ``:``).
    * An existing local path is taken as it is (a sub-folder of a local folder is just a longer path:
      ``./out/checkpoint-final``); ``FOLDER:subfolder`` also works when ``FOLDER`` exists. A path that starts
      with ``.`` or ``/`` is never read as a repo.
    """
    if not isinstance(text, str) or not text.strip():
        raise InvalidInputError("An adapter needs a source: a folder or 'namespace/name[@revision][:subfolder]'.")
    if Path(text).exists():
        return text, None, None
    folder, colon, subfolder = text.rpartition(":")
    if colon and Path(folder).is_dir():  # FOLDER:SUBFOLDER
        return folder, None, check_subfolder(subfolder)
    if text.startswith((".", "/")):
        return text, None, None
    head, colon, subfolder = text.partition(":")
    source, at, revision = head.partition("@")
    if not source or (at and not revision) or (colon and not subfolder.strip("/")):
        raise InvalidInputError(
            f"Cannot read the adapter {text!r}: write 'namespace/name', optionally followed by '@REVISION' and then "
            "':SUBFOLDER' (e.g. 'me/runs@v2:checkpoint-final'), or give an existing folder."
        )
    if colon and "@" in subfolder:
        raise InvalidInputError(
            f"Cannot read the adapter {text!r}: the revision comes before the sub-folder ('me/runs@v2:checkpoint')."
        )
    if at and Path(source).is_dir():
        raise InvalidInputError(f"{source} is a local folder: '@{revision}' names a revision of a Hub repo only.")
    return source, revision or None, check_subfolder(subfolder) if colon else None


_GIT_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,254}")


def parse_hub_spec(text: str) -> tuple[str, str | None, str | None]:
    """``(repo_id, revision, subfolder)`` of ``namespace/name[@revision][:subfolder]``, read as a Hub repo
    only, never as a local path: what a name coming from a stranger (a request's ``model``) may be.

    The repo id follows the Hub's rules (huggingface_hub's ``validate_repo_id``), the revision a git ref's
    characters, the sub-folder :func:`check_subfolder`'s; anything else raises :class:`InvalidInputError`."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(text, str) or len(text) > 512:
        raise InvalidInputError("A Hub adapter is 'namespace/name[@revision][:subfolder]' (at most 512 characters).")
    head, colon, subfolder = text.partition(":")
    repo_id, at, revision = head.partition("@")
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        repo_id = ""
    if repo_id.count("/") != 1 or (at and not _GIT_REF.fullmatch(revision)) or (colon and not subfolder):
        raise InvalidInputError(
            f"{text!r} is not a Hub adapter: write 'namespace/name', optionally followed by '@REVISION' (a branch, "
            "tag or commit) and then ':SUBFOLDER', e.g. 'me/runs@v2:checkpoint-final'."
        )
    return repo_id, revision or None, check_subfolder(subfolder) if colon else None


def _is_reft(model: Any) -> bool:
    from .reft.model import ReftModel

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

    from .modeling import innermost_model

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
        base={
            "hub_id": getattr(source, "hub_id", None) or base_name,
            "origin": f"converted from {source.converted_from}" if getattr(source, "converted_from", None) else None,
            # hub_peft's loader counted the 4-bit layers; for another model, its layers are counted here
            "quantization": source.quantization if source is not None else _quantization_of(model),
            "four_bit_layers": getattr(source, "four_bit_layers", None),
        },
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
        if tokenizer is not None and _stores_vocabulary_rows(tmp, innermost_model(model).config):
            tokenizer.save_pretrained(tmp)
        info.save(tmp)
        write_card(tmp, name=str(out_dir))
    return out_dir


def _stores_vocabulary_rows(folder: Path, base_config: Any) -> bool:
    """Whether the saved adapter holds tensors with one row per token of the vocabulary."""
    from .validate import embedding_modules, read_safetensors_header, vocabulary_rows

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
    from .modeling import innermost_model

    core = innermost_model(model)
    q = getattr(getattr(core, "config", None), "quantization_config", None)
    if q is None or not any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in core.modules()):
        return None
    q = q.to_dict() if hasattr(q, "to_dict") else dict(q)
    return q.get("bnb_4bit_quant_type") if q.get("load_in_4bit") else q.get("quant_method")


def push_adapter(
    model_or_dir: Any,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Push an adapter (a PeftModel or a saved folder) as one atomic commit; returns the commit URL.

    The card is regenerated with the repo id so its usage snippet names the right repo.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    check_repo_id(repo_id)
    with tempfile.TemporaryDirectory(prefix="hub_peft_push_") as staging:
        stage = Path(staging) / "adapter"
        if isinstance(model_or_dir, (str, Path)):
            src = Path(model_or_dir)
            if not src.is_dir():
                raise NotFoundError(f"{src} is not a folder; save the adapter first or pass a model.")
            # pickles stay behind; so do hidden files (write_card below rewrites .eval_results/ for this repo)
            shutil.copytree(src, stage, ignore=shutil.ignore_patterns(*[f"*{s}" for s in PICKLE_SUFFIXES], ".*"))
        else:
            save_adapter(model_or_dir, stage)
        report = validate_adapter(stage)
        if not report.ok:
            raise InvalidInputError(f"Refusing to push an invalid adapter: {report.problems[0]}")
        write_card(stage, repo_id=repo_id)
        _check_card_with_the_hub(stage / "README.md")
        api = HfApi(token=token)
        created = False
        try:
            existed = api.repo_exists(repo_id)
            api.create_repo(repo_id, private=private, exist_ok=True)
            created = not existed
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=stage,
                revision=revision,
                commit_message=commit_message or "Upload adapter with hub_peft",
            )
        except BaseException as e:
            if created:  # leave no empty repo behind when the upload fails
                with contextlib.suppress(Exception):
                    api.delete_repo(repo_id)
            if not isinstance(e, HfHubHTTPError):
                raise
            status = e.response.status_code if e.response is not None else None
            if status in (401, 403):
                raise HubAuthError(
                    f"Cannot push to {repo_id}: the Hub refused the token (HTTP {status}). Pass a write token "
                    "(token=... or HF_TOKEN) of a user who owns that namespace."
                ) from None
            raise
    return info.commit_url


def _check_card_with_the_hub(card: Path) -> None:
    """The card's YAML metadata checked by the Hub's own ``validate-yaml`` route (``ModelCard.validate``;
    the local Hub implements it) before anything is created or uploaded."""
    from huggingface_hub import ModelCard

    try:
        ModelCard(card.read_text()).validate(repo_type="model")
    except ValueError as e:
        detail = str(e)
        with contextlib.suppress(ValueError, TypeError, KeyError):
            detail = "; ".join(m["message"] for m in json.loads(detail)["errors"])
        raise InvalidInputError(
            f"The Hub refused the model card's metadata ({detail}); nothing was pushed. Fix "
            "the metadata (for example the license or tags given to save_adapter)."
        ) from None


@dataclass(frozen=True)
class ResolvedAdapter:
    """Where an adapter's files are, and what they are: a Hub repo at a resolved commit, or a local folder."""

    folder: Path  # the folder holding adapter_config.json (the sub-folder's, when there is one)
    repo_id: str | None = None  # None for a local folder
    commit: str | None = None  # the resolved 40-hex commit of a Hub repo
    subfolder: str | None = None  # where the adapter is inside the repo (or the given folder)

    @property
    def cache_key(self) -> str:
        """``hub:{repo}@{commit}[:{subfolder}]`` for a repo, ``sha256:{digest}`` of the adapter's files for a
        folder."""
        if self.repo_id is not None and self.commit is not None:
            return f"hub:{self.repo_id}@{self.commit}" + (f":{self.subfolder}" if self.subfolder else "")
        return "sha256:" + content_digest(self.folder)


def content_digest(folder: Path) -> str:
    """sha256 over the files that define an adapter (config, weights, recorded prompt format), streamed."""
    digest = hashlib.sha256()
    for name in (CONFIG_NAME, WEIGHTS_NAME, CARD_INFO_NAME):
        path = folder / name
        digest.update(name.encode() + b"\0")
        if path.is_file():
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(2**20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


PICKLE_GLOBS = [f"*{suffix}" for suffix in PICKLE_SUFFIXES]


def _adapter_folders(paths: list[str]) -> list[str]:
    """The folders (``""``: the root) holding an ``adapter_config.json``, from a repo's file paths."""
    return sorted({p.rpartition("/")[0] for p in paths if p.rpartition("/")[2] == CONFIG_NAME})


def _local_adapter_folders(folder: Path) -> list[str]:
    """The adapter folders of a local folder: itself and sub-folders two levels deep (PEFT's and Trainer's)."""
    found = [
        p.relative_to(folder).as_posix()
        for pattern in ("*/" + CONFIG_NAME, "*/*/" + CONFIG_NAME)
        for p in folder.glob(pattern)
    ]
    return _adapter_folders(([CONFIG_NAME] if (folder / CONFIG_NAME).is_file() else []) + found)


def _choose_subfolder(source: str, subfolder: str | None, adapter_name: str | None, adapters: list[str]) -> str:
    """Where in ``source`` the adapter to load is (``""``: the root), among its ``adapters`` folders.

    A given ``subfolder`` must hold one. Otherwise a multi-adapter save (PEFT writes the default adapter at the
    root and each other one in a sub-folder named after it) gives the sub-folder named ``adapter_name``; an
    ``adapter_name`` it does not hold is refused rather than loading the root's adapter under that name."""
    listed = ", ".join("default (the root)" if a == "" else repr(a) for a in adapters) or "none"
    if subfolder == "":  # the root's adapter, whatever adapter_name it is loaded under
        if adapters and "" not in adapters:
            raise NotFoundError(f"{source} has no adapter at its root. Adapters there: {listed}.")
        return ""
    if subfolder is not None:
        subfolder = check_subfolder(subfolder)
        if subfolder not in adapters:
            raise NotFoundError(
                f"{source} has no adapter in its sub-folder {subfolder!r} ({subfolder}/{CONFIG_NAME} "
                f"is missing). Adapters there: {listed}."
            )
        return subfolder
    if adapter_name and adapter_name != "default" and adapter_name in adapters:
        return adapter_name
    named = [a for a in adapters if a and "/" not in a]
    if adapter_name and adapter_name != "default" and named:
        raise NotFoundError(
            f"{source} holds several adapters ({listed}) and none named {adapter_name!r}. Pick one with "
            "adapter_name= (a sub-folder's name, or 'default' for the root) or subfolder= (CLI: 'REPO:SUBFOLDER'; "
            "subfolder='' loads the root's adapter under any name)."
        )
    if adapters and "" not in adapters:
        raise NotFoundError(
            f"{source} has no adapter at its root, only in sub-folders: {listed}. Name one with subfolder= "
            f"(CLI and server: '{source}:{adapters[0]}')."
        )
    return ""


def resolve_adapter(
    repo_id_or_dir: str | Path,
    *,
    revision: str | None = None,
    token: str | None = None,
    subfolder: str | None = None,
    adapter_name: str | None = None,
    local: bool = True,
    max_bytes: int | None = None,
) -> ResolvedAdapter:
    """Find an adapter: an existing folder as is, or a Hub repo resolved to one commit and downloaded.
    ``local=False``: a Hub repo only, even where a folder of that name exists (names from strangers);
    ``max_bytes``: refuse a repo whose files to download (sizes from the Hub, before any is fetched) add up to more.

    ``subfolder`` is where the adapter is inside the repo or folder (``"checkpoint-final"``; ``""``: the root);
    only that sub-folder's files are downloaded. Without one, ``adapter_name`` picks the sub-folder of that name in a
    multi-adapter save (see :func:`_choose_subfolder`). Pickle files (``adapter_model.bin``, ``*.pt``...) are
    never downloaded: a repo that also ships ``adapter_model.safetensors`` loads from it (with a warning
    naming the skipped files); a repo with pickles only is refused before anything is fetched.
    """
    if subfolder:  # "" is the root
        subfolder = check_subfolder(subfolder)
    path = Path(repo_id_or_dir)
    if local and path.is_dir():
        sub = _choose_subfolder(str(repo_id_or_dir), subfolder, adapter_name, _local_adapter_folders(path))
        return ResolvedAdapter(path / sub if sub else path, subfolder=sub or None)
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    repo_id = str(repo_id_or_dir)
    if repo_id.startswith((".", "/")) or repo_id.count("/") != 1:
        raise NotFoundError(
            f"{repo_id!r} is neither an existing folder nor a 'namespace/name' repo id (a sub-folder of a local "
            "folder is just a longer path)."
        )
    only = [f"{subfolder}/*"] if subfolder else None  # only the sub-folder's files are downloaded
    try:
        if constants.HF_HUB_OFFLINE:  # the local download cache only
            root = Path(
                snapshot_download(
                    repo_id, revision=revision, token=token, allow_patterns=only, ignore_patterns=PICKLE_GLOBS
                )
            )
            commit = root.name if re.fullmatch(r"[0-9a-f]{40}", root.name) else None
            sub = _choose_subfolder(repo_id, subfolder, adapter_name, _local_adapter_folders(root))
            return ResolvedAdapter(root / sub if sub else root, repo_id, commit, sub or None)
        info = HfApi(token=token).model_info(repo_id, revision=revision, files_metadata=max_bytes is not None)
        all_files = [s.rfilename for s in info.siblings or []]
        sub = _choose_subfolder(repo_id, subfolder, adapter_name, _adapter_folders(all_files))
        prefix = f"{sub}/" if sub else ""
        files = [f.removeprefix(prefix) for f in all_files if f.startswith(prefix)]
        where = f"{repo_id}:{sub}" if sub else repo_id
        if max_bytes is not None:
            total = sum(
                s.size or 0
                for s in info.siblings or []
                if s.rfilename.startswith(prefix) and Path(s.rfilename).suffix not in PICKLE_SUFFIXES
            )
            if total > max_bytes:
                raise InvalidInputError(
                    f"{where} holds {total / 2**20:.1f} MiB of files, over this server's limit of "
                    f"{max_bytes / 2**20:.1f} MiB for one adapter: keep only the adapter's files in its folder, "
                    "or ask the operator to raise the limit."
                )
        pickles = sorted(prefix + f for f in files if Path(f).suffix in PICKLE_SUFFIXES)
        if pickles and WEIGHTS_NAME not in files:
            raise UnsafeFileError(
                f"{where} only has pickled weights ({', '.join(pickles)}), which hub_peft never downloads or "
                "unpickles. If they are your own trusted files, convert them locally with `hub-peft convert-bin "
                "DIR` and push the safetensors file."
            )
        if pickles:
            warnings.warn(
                f"{where} also holds pickle files ({', '.join(pickles)}); hub_peft loads {WEIGHTS_NAME} and "
                "never downloads or opens them.",
                UserWarning,
                stacklevel=3,
            )
        only = [f"{sub}/*"] if sub else None
        root = Path(
            snapshot_download(
                repo_id, revision=info.sha, token=token, allow_patterns=only, ignore_patterns=PICKLE_GLOBS
            )
        )
    except HFValidationError as e:
        raise InvalidInputError(f"{repo_id!r} is not a valid repo id: {e}") from None
    except RevisionNotFoundError:
        raise NotFoundError(f"Revision {revision!r} of {repo_id} does not exist.") from None
    except RepositoryNotFoundError:
        raise NotFoundError(
            f"Repo {repo_id} not found (or private: pass a token). Hub: the one HF_ENDPOINT names."
        ) from None
    return ResolvedAdapter(root / sub if sub else root, repo_id, info.sha, sub or None)


def fetch_adapter(
    repo_id_or_dir: str | Path,
    *,
    revision: str | None = None,
    token: str | None = None,
    check: bool = True,
    subfolder: str | None = None,
) -> Path:
    """A local folder holding the adapter: the folder itself (or its ``subfolder``), or a Hub snapshot of the
    repo (of its ``subfolder`` only).

    With ``check`` (the default) the folder must hold a loadable adapter (see :func:`check_adapter_folder`).
    """
    folder = resolve_adapter(repo_id_or_dir, revision=revision, token=token, subfolder=subfolder).folder
    if check:
        check_adapter_folder(folder)
    return folder


def check_adapter_folder(
    folder: Path, *, base_config: Any = None, base_name: str = "the given base model", max_bytes: int = MAX_SANE_BYTES
) -> dict:
    """Raise a clear error unless ``folder`` holds a loadable, safetensors-only adapter (fitting ``base_config``, its
    weights file at most ``max_bytes``): every problem :func:`validate_adapter` finds in the untrusted files is an
    InvalidInputError, IncompatibleAdapterError, NotFoundError or UnsafeFileError (HTTP 422 or 404 when served)."""
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles and not (folder / WEIGHTS_NAME).is_file():
        raise UnsafeFileError(
            f"{folder} only has pickled weights ({', '.join(pickles)}), which hub_peft never unpickles. If they "
            "are your own trusted files, convert them locally with `hub-peft convert-bin DIR`."
        )
    report = validate_adapter(folder, base_config=base_config, base_name=base_name, max_bytes=max_bytes)
    if not report.ok:
        first = report.problems[0]
        if first.incompatible_base:
            raise IncompatibleAdapterError(str(first))
        if "missing" in first.point and "adapter_config" in first.point:
            raise NotFoundError(f"{folder} is not an adapter folder: {first}")
        if str(report.config.get("peft_type")) not in _known_types() and "peft_type" in report.config:
            raise IncompatibleAdapterError(
                f"Unknown adapter type {report.config.get('peft_type')!r} in {folder}: hub_peft loads every "
                f"peft.PeftType ({len(_known_types())} types). Upgrade peft/hub_peft if it is newer."
            )
        raise InvalidInputError(f"Invalid adapter in {folder}: {first}")
    return report.config


def _known_types() -> set[str]:
    import peft

    return {t.value for t in peft.PeftType} | {"REFT"}


def load_adapter(
    base_model: Any,
    repo_id_or_dir: str | Path,
    *,
    adapter_name: str = "default",
    revision: str | None = None,
    token: str | None = None,
    is_trainable: bool = False,
    subfolder: str | None = None,
    max_bytes: int = MAX_SANE_BYTES,
) -> Any:
    """Load an adapter onto ``base_model`` and make it active; call again to add more adapters.

    PEFT types give a ``PeftModel``; ReFT gives a :class:`hub_peft.reft.ReftModel` (over the base or
    over a ``PeftModel``, so LoRA and ReFT combine; one ReFT adapter per model here, many in the engine).
    ``subfolder`` is where the adapter is inside the repo or folder (PEFT's ``subfolder=``; only its files
    are downloaded; ``""``: the root). Without one, a folder saved by PEFT with several adapters (the default
    one at the root, each other one in a sub-folder named after it) gives the one named ``adapter_name``; a
    name it does not hold fails with :class:`NotFoundError` listing the adapters there.

    The adapter is untrusted data: it is validated first (:func:`check_adapter_folder`), refused when its weights
    need more than ``max_bytes`` of memory (from the safetensors header, before any tensor is read: the weights as
    float32, plus the LoRA matrices PEFT builds for targeted modules without saved weights), and a regex
    ``target_modules`` is resolved into module names with a bound (:func:`hub_peft.targets.expand_target_modules`)
    before PEFT sees the config.
    """
    folder = resolve_adapter(
        repo_id_or_dir, revision=revision, token=token, subfolder=subfolder, adapter_name=adapter_name
    ).folder
    return _load_folder(
        base_model,
        folder,
        adapter_name=adapter_name,
        is_trainable=is_trainable,
        label=str(repo_id_or_dir),
        max_bytes=max_bytes,
    )


def _load_folder(
    base_model: Any, folder: Path, *, adapter_name: str, is_trainable: bool, label: str, max_bytes: int = MAX_SANE_BYTES
) -> Any:
    """:func:`load_adapter` once the adapter's folder is known: ``folder`` holds the adapter itself."""
    from peft import PeftModel

    from .modeling import innermost_model
    from .reft.model import ReftModel
    from .targets import expand_target_modules
    from .validate import read_safetensors_header

    inner = innermost_model(base_model)
    config = check_adapter_folder(folder, base_config=inner.config, base_name=_name_of(inner), max_bytes=max_bytes)
    tensors = read_safetensors_header(folder / WEIGHTS_NAME)
    if config.get("peft_type") == "REFT":
        _check_memory(label, _memory_bytes(tensors), max_bytes)
        if isinstance(base_model, ReftModel):
            raise InvalidInputError(
                "This model already has a ReFT adapter; load one ReFT adapter per model (the multi-adapter engine "
                "serves several side by side)."
            )
        return ReftModel.from_pretrained(base_model, folder, is_trainable=is_trainable)
    if isinstance(base_model, ReftModel):  # LoRA goes under the interventions, which keep their hooks
        base_model.base_model = _load_folder(
            base_model.base_model,
            folder,
            adapter_name=adapter_name,
            is_trainable=is_trainable,
            label=label,
            max_bytes=max_bytes,
        )
        return base_model
    if isinstance(base_model, PeftModel) and adapter_name in base_model.peft_config:
        raise InvalidInputError(f"An adapter named {adapter_name!r} is already loaded; pick another name.")
    target = base_model.get_base_model() if isinstance(base_model, PeftModel) else base_model
    modules = _peft_modules(target)
    # NOTE(security): PEFT full-matches a string target_modules against every module name with Python's re, which
    # can backtrack for ever holding the GIL ("(.|.)*!"); it gets the config with the explicit names instead
    config = expand_target_modules(config, modules)
    _check_memory(label, _memory_bytes(tensors) + _unsaved_lora_bytes(target, modules, config, tensors), max_bytes)
    peft_config = peft_config_of(config)
    try:
        if isinstance(base_model, PeftModel):
            # what PeftModel.load_adapter does with the config it reads from the folder, with ours: it then loads
            # only the weights, as the adapter exists
            base_model._check_new_adapter_config(peft_config, is_trainable=is_trainable)
            peft_config.inference_mode = not is_trainable
            base_model.add_adapter(adapter_name, peft_config)
            if is_trainable:
                base_model.set_requires_grad(adapter_name)
            base_model.load_adapter(str(folder), adapter_name=adapter_name, is_trainable=is_trainable)
            base_model.set_adapter(adapter_name)
            return base_model
        model = PeftModel.from_pretrained(
            base_model, str(folder), adapter_name=adapter_name, is_trainable=is_trainable, config=peft_config
        )
        model.hub_peft_prompt_template = CardInfo.load(folder).prompt_template
        return model
    except RuntimeError as e:
        if "size mismatch" not in str(e):
            raise
        made_for, name = config.get("base_model_name_or_path"), _name_of(inner)
        detail = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        hint = (
            f"It was made for {made_for}: load it on that base."
            if made_for and made_for != name
            else "Load it on the base it was trained on, with the same vocabulary and layer sizes."
        )
        raise IncompatibleAdapterError(f"{label} does not fit {name}'s shapes ({detail}). {hint}") from None


def _peft_modules(model: Any) -> dict[str, Any]:
    """Name -> module of what PEFT matches ``target_modules`` against when it adds an adapter to ``model`` (a plain
    model, or a PeftModel's base model): every module but the root and the insides of layers an adapter wraps."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out, wrapped = {}, ()
    for name, module in model.named_modules():
        if not name or name.startswith(wrapped):
            continue
        out[name] = module
        if isinstance(module, BaseTunerLayer):
            wrapped = (*wrapped, name + ".")
    return out


def peft_config_of(config: dict) -> Any:
    """The PeftConfig PEFT's ``from_pretrained`` would build from ``config`` (an adapter_config.json dict, its
    ``target_modules`` already resolved by :func:`hub_peft.targets.expand_target_modules`)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    config_class = PEFT_TYPE_TO_CONFIG_MAPPING[config["peft_type"]]
    kwargs = config_class.check_kwargs(**{k: v for k, v in config.items() if k != "runtime_config"})
    return config_class.from_peft_type(**kwargs)


def _memory_bytes(tensors: dict[str, tuple[str, list[int]]]) -> int:
    """Bytes the weights of a safetensors header take in memory: float16/bfloat16 ones as float32 (PEFT upcasts
    them by default), the others as stored."""
    from .validate import DTYPE_BITS, FLOAT_DTYPES

    return sum(
        math.prod(shape) * max(DTYPE_BITS[dtype] // 8, 4 if dtype in FLOAT_DTYPES else 1)
        for dtype, shape in tensors.values()
    )


def _unsaved_lora_bytes(
    model: Any, modules: dict[str, Any], config: dict, tensors: dict[str, tuple[str, list[int]]]
) -> int:
    """Float32 bytes of the LoRA matrices PEFT builds, before loading the weights, for the modules ``config``
    targets that have no saved weights (rank from ``r``/``rank_pattern``): a config can target every module at
    rank 65536 while the file holds one small matrix."""
    from .targets import ALL_LINEAR, linear_layers, list_matches, pattern_lookup
    from .validate import LORA_TENSOR

    targets = config.get("target_modules")
    if config.get("peft_type") != "LORA" or not targets:
        return 0
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:  # PEFT turns it into the linear layers' names
        entries = {name.rsplit(".", 1)[-1] for name in linear_layers(model) if name in modules}
    else:
        entries = set(targets)
    saved = {m.group(1) for name in tensors if (m := LORA_TENSOR.match(name))}
    r, patterns = config.get("r", 8), config.get("rank_pattern") or {}
    lookup = pattern_lookup(list(patterns), "rank_pattern")
    total = 0
    for name, module in modules.items():
        weight = getattr(module, "weight", None)
        if name in saved or getattr(weight, "ndim", 0) < 2 or not list_matches(name, entries):
            continue
        key = lookup(name)
        rank = patterns[key] if key is not None else r
        total += 4 * rank * (weight.shape[0] + math.prod(weight.shape[1:]))
    return total


def _check_memory(label: str, needed: int, max_bytes: int) -> None:
    if needed > max_bytes:
        raise InvalidInputError(
            f"{label} needs about {needed / 2**20:.1f} MiB of memory for its weights (as float32), over the limit of "
            f"{max_bytes / 2**20:.1f} MiB for one adapter. Use a smaller rank or fewer target modules, or pass a "
            "larger max_bytes= for an adapter you trust."
        )


def _name_of(model: Any) -> str:
    source = getattr(model, "hub_peft_source", None)
    return getattr(source, "hub_id", None) or getattr(model.config, "_name_or_path", None) or "the given base model"


def load_adapters(model: Any, sources: list[str]) -> Any:
    """Load several adapters onto ``model``; the last one is active. Each is a folder or
    ``namespace/name[@revision][:subfolder]`` (see :func:`parse_adapter_spec`)."""
    for i, spec in enumerate(sources):
        source, revision, subfolder = parse_adapter_spec(str(spec))
        folder = resolve_adapter(source, revision=revision, subfolder=subfolder).folder  # the root or SUBFOLDER
        model = _load_folder(model, folder, adapter_name=f"adapter_{i}", is_trainable=False, label=str(spec))
    return model


def adapter_info(folder: Path) -> dict[str, Any]:
    """Type, base model, trainable parameters, size and files of an adapter folder."""
    report = validate_adapter(folder)
    info = CardInfo.load(folder)
    n_params = 0
    for _, shape in report.tensors.values():
        count = 1
        for d in shape:
            count *= d
        n_params += count
    return {
        "type": report.config.get("peft_type"),
        "base_model": info.base.get("hub_id") or report.config.get("base_model_name_or_path"),
        "trainable_parameters": info.params.get("trainable") or n_params,
        "stored_parameters": n_params,
        "size_bytes": sum(p.stat().st_size for p in folder.iterdir() if p.is_file()),
        "files": sorted(p.name for p in folder.iterdir() if p.is_file()),
        "valid": report.ok,
        "problems": [str(p) for p in report.problems],
        "warnings": report.warnings,
    }


def convert_bin(folder: str | Path) -> Path:
    """Convert one's own *trusted* ``adapter_model.bin`` to safetensors (weights_only unpickling)."""
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    src = folder / "adapter_model.bin"
    if not src.is_file():
        raise NotFoundError(f"{src} does not exist.")
    try:
        state = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UnsafeFileError(f"{src} holds more than plain tensors; refusing to unpickle it ({e}).") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UnsafeFileError(f"{src} is not a flat dict of tensors.")
    out = folder / WEIGHTS_NAME
    tmp = out.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    tmp.replace(out)
    return out
