"""Push an adapter to the Hub as one atomic commit, its card regenerated for the repo."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..cards import write_card
from ..errors import HubAuthError, InvalidInputError, NotFoundError
from ..validate import PICKLE_SUFFIXES, card_facts, validate_adapter
from .save import save_adapter
from .specs import check_repo_id


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
        write_card(stage, repo_id=repo_id, **card_facts(stage))  # validated here: the card only renders the facts
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
