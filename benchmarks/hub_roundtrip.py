"""Upload + download of a safetensors file through the local Hub with the unmodified huggingface_hub client,
relative to a plain copy (+fsync) of the same file, for 20 MiB and 200 MiB; and the server's memory.

Target (issue 16): round trip <= 5x a plain copy, server memory flat in the file size. It also prints what
the client alone spends building the commit body (the file base64-encoded inline in NDJSON, as
huggingface_hub sends every "regular" file), which bounds any server.

Run: .venv/bin/python benchmarks/hub_roundtrip.py [--sizes 20,200]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _machine import cpu_description


def peak_rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="20,200", help="File sizes in MiB.")
    args = parser.parse_args()
    print(f"cpu: {cpu_description()}")
    work = Path(tempfile.mkdtemp(prefix="hub_roundtrip_"))
    token = secrets.token_hex(16)
    from hub_peft.hub import start_local_hub

    hub = start_local_hub(work / "hub", tokens={"bench": token})
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    import torch
    from huggingface_hub import HfApi, hf_hub_download
    from safetensors.torch import save_file

    try:
        api = HfApi(endpoint=hub.endpoint, token=token)
        api.create_repo("bench/roundtrip")
        for size_mb in (int(s) for s in args.sizes.split(",")):
            repeats = 5 if size_mb <= 50 else 2
            src = work / "adapter_model.safetensors"
            save_file({"w": torch.randn(size_mb * 1024 * 1024 // 4 // 1024, 1024)}, src)
            ups, downs, copies, bodies = [], [], [], []
            before = peak_rss(hub.process.pid)
            for i in range(repeats):
                data = src.read_bytes()
                src.write_bytes(data[:-4] + os.urandom(4))  # new content each time: no dedup shortcut
                t0 = time.perf_counter()
                api.upload_file(
                    path_or_fileobj=src, path_in_repo="adapter_model.safetensors", repo_id="bench/roundtrip"
                )
                t1 = time.perf_counter()
                path = hf_hub_download(
                    "bench/roundtrip",
                    "adapter_model.safetensors",
                    endpoint=hub.endpoint,
                    cache_dir=work / f"c{size_mb}-{i}",
                )
                t2 = time.perf_counter()
                ups.append(t1 - t0)
                downs.append(t2 - t1)
                assert Path(path).read_bytes() == src.read_bytes()
                shutil.rmtree(work / f"c{size_mb}-{i}")
                t0 = time.perf_counter()  # what the client does before sending a byte (the same code path)
                line = {
                    "key": "file",
                    "value": {
                        "content": base64.b64encode(src.read_bytes()).decode(),
                        "path": "x",
                        "encoding": "base64",
                    },
                }
                b"".join([json.dumps(line).encode() + b"\n"])
                bodies.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                shutil.copyfile(src, work / "copy")
                with open(work / "copy", "rb+") as f:
                    os.fsync(f.fileno())
                copies.append(time.perf_counter() - t0)
            growth = (peak_rss(hub.process.pid) - before) / 2**20
            size = src.stat().st_size / 2**20
            up, down, copy, body = (statistics.median(x) for x in (ups, downs, copies, bodies))
            print(f"\nfile: {size:.1f} MiB, {repeats} runs, medians")
            print(f"  local hub upload:     {up * 1000:8.1f} ms ({size / up:6.1f} MiB/s)")
            print(f"  local hub download:   {down * 1000:8.1f} ms ({size / down:6.1f} MiB/s)")
            print(f"  plain copy (+fsync):  {copy * 1000:8.1f} ms ({size / copy:6.1f} MiB/s)")
            print(f"  client body building: {body * 1000:8.1f} ms (base64 + JSON, before any byte is sent)")
            ratio = (up + down) / copy
            print(
                f"  ratio round trip/copy: {ratio:.1f}x (target <= 5x: {'met' if ratio <= 5 else 'NOT met'}); "
                f"the client's body alone is {body / copy:.1f}x a copy"
            )
            print(f"  server peak memory growth: {growth:.0f} MiB")
    finally:
        hub.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
