"""Names of adapters and their places: repo ids, dataset ids, sub-folders, and the adapter spec syntax."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import InvalidInputError

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
