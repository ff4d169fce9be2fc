"""Find adapter folders locally or on the Hub and load them onto a base model (safetensors only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import InvalidInputError, NotFoundError, UnsafeFileError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def fetch_adapter(repo_id_or_dir: str, *, revision: str | None = None, token: str | None = None) -> Path:
    """Return a local folder holding the adapter: the folder itself, or a Hub snapshot of the repo."""
    path = Path(repo_id_or_dir)
    if path.is_dir():
        folder = path
    else:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

        try:
            folder = Path(
                snapshot_download(
                    repo_id_or_dir,
                    revision=revision,
                    token=token,
                    allow_patterns=["*.json", "*.safetensors", "*.bin", "*.md"],
                )
            )
        except HFValidationError as e:
            raise InvalidInputError(f"{repo_id_or_dir!r} is neither a folder nor a valid repo id: {e}") from e
        except RevisionNotFoundError as e:
            raise NotFoundError(f"Revision {revision!r} of {repo_id_or_dir!r} not found; check `hub-peft info`.") from e
        except RepositoryNotFoundError as e:
            raise NotFoundError(f"Adapter repo {repo_id_or_dir!r} not found (or private: pass a token).") from e
    check_adapter_folder(folder)
    return folder


def check_adapter_folder(folder: Path) -> dict:
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise NotFoundError(f"{folder} has no {CONFIG_NAME}: it is not an adapter folder.")
    if not (folder / WEIGHTS_NAME).is_file():
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
            raise UnsafeFileError(
                f"{folder} only has pickled weights (.bin/.pt), which hub_peft never loads. If these are your own "
                "trusted files, convert them locally with `hub-peft convert-bin DIR`."
            )
        raise NotFoundError(f"{folder} has no {WEIGHTS_NAME}.")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise InvalidInputError(f"{config_path} is not valid JSON: {e}") from e


def load_adapters(model: Any, sources: list[str]) -> Any:
    """Load PEFT adapters (repo ids or folders) onto ``model``; the last one is active."""
    from peft import PeftModel

    for i, source in enumerate(sources):
        folder = fetch_adapter(source)
        name = f"adapter_{i}"
        if i == 0:
            model = PeftModel.from_pretrained(model, str(folder), adapter_name=name, use_safetensors=True)
        else:
            model.load_adapter(str(folder), adapter_name=name, use_safetensors=True)
    if sources:
        model.set_adapter(f"adapter_{len(sources) - 1}")
    return model
