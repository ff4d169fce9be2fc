"""``hub-peft space push``: the Space repo it makes builds and serves from a fresh virtualenv, installed from
its own requirements.txt as a Space installs it (``pip install -r requirements.txt``), against the local Hub."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from hub_peft.hub.process import free_port

pytestmark = pytest.mark.slow


def test_the_pushed_space_installs_and_serves_from_a_fresh_virtualenv(local_hub, alice, repo_name, tmp_path):
    from huggingface_hub import HfApi, snapshot_download

    space_id = f"alice/{repo_name}"
    env = {**os.environ, "HF_TOKEN": alice}
    out = subprocess.run(
        [sys.executable, "-m", "hub_peft.cli", "space", "push", space_id, "--hardware", "cpu-basic"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert alice not in out.stdout + out.stderr
    assert HfApi(endpoint=local_hub.endpoint).repo_info(space_id, repo_type="space").id == space_id

    folder = tmp_path / "space"  # an empty folder, as a Space's build starts
    snapshot_download(space_id, repo_type="space", local_dir=folder, token=alice)
    header = yaml.safe_load((folder / "README.md").read_text().split("---")[1])
    assert header["sdk"] == "gradio" and header["app_file"] == "app.py" and header["hf_oauth"] is True
    assert header["suggested_hardware"] == "cpu-basic"
    requirements = (folder / "requirements.txt").read_text().splitlines()
    assert not any(line.lower().startswith("hub-peft") for line in requirements)
    assert all("==" in line for line in requirements if not line.startswith("-"))  # pinned as tested
    assert (folder / "hub_peft" / "_cards" / "peft.md.j2").is_file()  # the wheel's layout, package data included

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    # download.pytorch.org (the --extra-index-url a Space uses for CPU torch) is unreachable here: fail fast on it
    pip_env = {**os.environ, "PIP_RETRIES": "0", "PIP_DEFAULT_TIMEOUT": "10"}
    install = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "-r", "requirements.txt"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=1500,
        env=pip_env,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    where = subprocess.run(
        [python, "-c", "import hub_peft; print(hub_peft.__file__)"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert Path(where.stdout.strip()).is_relative_to(folder), where  # the pushed code, not some other install

    port = free_port()
    app_env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "VIRTUAL_ENV", "PYTHONPATH")}
    app_env.update(
        GRADIO_SERVER_PORT=str(port),
        HF_ENDPOINT=local_hub.endpoint,
        HUB_PEFT_STUDIO_DIR=str(tmp_path / "sessions"),
        GRADIO_ANALYTICS_ENABLED="False",
    )
    log = (tmp_path / "app.log").open("w")
    app = subprocess.Popen([python, "app.py"], cwd=folder, env=app_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while True:
            assert app.poll() is None, (tmp_path / "app.log").read_text()[-3000:]
            assert time.time() < deadline, "the Space app did not serve a page in 180 s"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as page:
                    html = page.read().decode()
                break
            except OSError:
                time.sleep(1)
        assert "Adapter Studio" in html and "Push to the Hub" in html
    finally:
        app.terminate()
        app.wait(30)
        log.close()
