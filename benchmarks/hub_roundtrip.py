"""Upload + download of a 20 MB safetensors file through the local Hub, relative to a plain copy.

Run: .venv/bin/python benchmarks/hub_roundtrip.py
"""

from __future__ import annotations

import os
import secrets
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def main(size_mb: int = 20, repeats: int = 5) -> None:
    work = Path(tempfile.mkdtemp(prefix="hub_roundtrip_"))
    token = secrets.token_hex(16)
    from hub_peft.hub import start_local_hub

    hub = start_local_hub(work / "hub", tokens={"bench": token})
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    import torch
    from huggingface_hub import HfApi, hf_hub_download
    from safetensors.torch import save_file

    try:
        src = work / "adapter_model.safetensors"
        n = size_mb * 1024 * 1024 // 4
        save_file({"w": torch.randn(n // 1024, 1024)}, src)
        api = HfApi(endpoint=hub.endpoint, token=token)
        api.create_repo("bench/roundtrip")
        hub_times, copy_times = [], []
        for i in range(repeats):
            data = src.read_bytes()
            src.write_bytes(data[:-4] + os.urandom(4))  # new content each time: no dedup shortcut
            t0 = time.perf_counter()
            api.upload_file(path_or_fileobj=src, path_in_repo="adapter_model.safetensors", repo_id="bench/roundtrip")
            path = hf_hub_download(
                "bench/roundtrip", "adapter_model.safetensors", endpoint=hub.endpoint, cache_dir=work / f"c{i}"
            )
            hub_times.append(time.perf_counter() - t0)
            assert Path(path).read_bytes() == src.read_bytes()
            t0 = time.perf_counter()
            shutil.copyfile(src, work / f"copy{i}")
            with open(work / f"copy{i}", "rb+") as f:
                os.fsync(f.fileno())
            copy_times.append(time.perf_counter() - t0)
        size = src.stat().st_size / 2**20
        h, c = statistics.median(hub_times), statistics.median(copy_times)
        print(f"file: {size:.1f} MiB, {repeats} runs, medians")
        print(f"local hub upload+download: {h * 1000:8.1f} ms  ({size / h:6.1f} MiB/s)")
        print(f"plain copy (+fsync):       {c * 1000:8.1f} ms  ({size / c:6.1f} MiB/s)")
        print(f"ratio hub/copy: {h / c:.1f}x")
    finally:
        hub.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
