"""Find an adapter's files: a local folder as it is, or a Hub repo resolved to one commit and downloaded (never its
pickle files), and which of its folders holds the adapter."""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..cards import CARD_INFO_NAME
from ..errors import InvalidInputError, NotFoundError, UnsafeFileError
from ..validate import PICKLE_SUFFIXES
from .specs import CONFIG_NAME, WEIGHTS_NAME, check_subfolder


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
    try:
        if constants.HF_HUB_OFFLINE:  # the local download cache only
            return _resolve_cached(repo_id, revision, token, subfolder, adapter_name)
        info = HfApi(token=token).model_info(repo_id, revision=revision, files_metadata=max_bytes is not None)
        all_files = [s.rfilename for s in info.siblings or []]
        sub = _choose_subfolder(repo_id, subfolder, adapter_name, _adapter_folders(all_files))
        _check_repo_files(info, repo_id, sub, max_bytes)
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


def _resolve_cached(
    repo_id: str, revision: str | None, token: str | None, subfolder: str | None, adapter_name: str | None
) -> ResolvedAdapter:
    """:func:`resolve_adapter` offline (``HF_HUB_OFFLINE``): the repo's snapshot in the local download cache."""
    from huggingface_hub import snapshot_download

    only = [f"{subfolder}/*"] if subfolder else None  # only the sub-folder's files are downloaded
    root = Path(
        snapshot_download(repo_id, revision=revision, token=token, allow_patterns=only, ignore_patterns=PICKLE_GLOBS)
    )
    commit = root.name if re.fullmatch(r"[0-9a-f]{40}", root.name) else None
    sub = _choose_subfolder(repo_id, subfolder, adapter_name, _local_adapter_folders(root))
    return ResolvedAdapter(root / sub if sub else root, repo_id, commit, sub or None)


def _check_repo_files(info: Any, repo_id: str, sub: str, max_bytes: int | None) -> None:
    """Refuse, from the repo's file list and before anything is downloaded, an adapter folder (``sub``) whose files
    add up to more than ``max_bytes`` or whose weights are pickles only; warn when pickles sit beside the
    safetensors weights (they are never downloaded)."""
    prefix = f"{sub}/" if sub else ""
    files = [s.rfilename.removeprefix(prefix) for s in info.siblings or [] if s.rfilename.startswith(prefix)]
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
            stacklevel=4,  # the code calling load_adapter/fetch_adapter (resolve_adapter's caller)
        )
