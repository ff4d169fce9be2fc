"""Shared fixtures. The local Hub runs as a real server process; tests talk to it only through
the unmodified ``huggingface_hub`` client, which reads ``HF_ENDPOINT`` when it is first imported,
so the endpoint (on a free port) and an empty HF cache are set here, before any test imports it."""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="hub_peft_tests_"))

# HUB_PEFT_EMULATE_AVX2=1 runs the suite as on a CPU without AVX512: torch's, oneDNN's and MKL's kernels are
# capped at AVX2 (set before torch loads, so subprocesses inherit them), and bitsandbytes is told there is no
# AVX512-BF16, so it never repacks a Linear4bit. An emulation, not an AVX2 machine: it checks the code paths and
# the numerics of AVX2 kernels, not their speed.
EMULATE_AVX2 = os.environ.get("HUB_PEFT_EMULATE_AVX2") == "1"
if EMULATE_AVX2:
    for var, value in (
        ("ATEN_CPU_CAPABILITY", "avx2"),
        ("ONEDNN_MAX_CPU_ISA", "AVX2"),
        ("DNNL_MAX_CPU_ISA", "AVX2"),
        ("MKL_ENABLE_INSTRUCTIONS", "AVX2"),
    ):
        os.environ[var] = value


from hub_peft.hub.process import free_port  # noqa: E402 - imports no huggingface_hub

HUB_PORT = free_port()
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{HUB_PORT}"
os.environ["HF_HOME"] = str(_SESSION_DIR / "hf_home")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ.pop("HF_TOKEN", None)
os.environ.pop("HF_HUB_OFFLINE", None)

import pytest  # noqa: E402


def pytest_configure(config):
    if EMULATE_AVX2:
        import bitsandbytes.functional
        import bitsandbytes.nn.modules

        bitsandbytes.functional.has_avx512bf16 = bitsandbytes.nn.modules.has_avx512bf16 = lambda: False


def pytest_report_header(config):
    import torch

    emulated = " (AVX2 emulated: HUB_PEFT_EMULATE_AVX2=1)" if EMULATE_AVX2 else ""
    return f"torch CPU capability: {torch.backends.cpu.get_cpu_capability()}{emulated}"


USERS = {name: f"hf_{name}_{secrets.token_hex(12)}" for name in ("alice", "bob")}


@pytest.fixture(scope="session")
def local_hub():
    from hub_peft.hub import start_local_hub

    hub = start_local_hub(_SESSION_DIR / "hub", tokens=USERS, port=HUB_PORT)
    yield hub
    hub.stop()


@pytest.fixture
def api(local_hub):
    from huggingface_hub import HfApi

    return HfApi(endpoint=local_hub.endpoint)


@pytest.fixture(scope="session")
def alice():
    return USERS["alice"]


@pytest.fixture(scope="session")
def bob():
    return USERS["bob"]


@pytest.fixture
def repo_name(request):
    """A unique repo name per test."""
    import re

    stem = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)[:40].strip("-")
    return f"{stem}-{secrets.token_hex(3)}"
