"""llama.cpp as a peer (opt-in): the embedded base and PEFT LoRA folders converted by llama.cpp's own converters,
served by its ``llama-server`` (built by ``../shared/tools/build_llama_server.sh``, which prints the source folder).

The converters need a Python with torch, transformers and sentencepiece (``--convert-python``; see README). The base
becomes an F32 GGUF, or Q4_1 (llama.cpp's nearest to NF4: 4-bit blocks with a scale and a minimum) through its
``llama-quantize``, built in the same tree on first use; each LoRA an F32 GGUF adapter.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


class LlamaCpp:
    def __init__(self, source: str | Path, convert_python: str) -> None:
        self.source, self.python = Path(source), convert_python
        self.server = self.source / "build" / "bin" / "llama-server"
        if not self.server.is_file():
            raise SystemExit(f"no {self.server}: run ../shared/tools/build_llama_server.sh first")

    def _convert(self, script: str, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(self.source / "gguf-py")}
        subprocess.run([self.python, str(self.source / script), *args], check=True, env=env, capture_output=True)

    def base(self, base_dir: Path, out: Path, quantization: str | None = None) -> Path:
        """``base_dir`` as a GGUF in ``out``: F32, or ``quantization`` (``"Q4_1"``) by ``llama-quantize``."""
        f32 = out / "base-f32.gguf"
        if not f32.is_file():
            self._convert("convert_hf_to_gguf.py", str(base_dir), "--outtype", "f32", "--outfile", str(f32))
        if quantization is None:
            return f32
        quantize = self.source / "build" / "bin" / "llama-quantize"
        if not quantize.is_file():
            build = ["cmake", "--build", str(self.source / "build"), "--target", "llama-quantize"]
            subprocess.run(build, check=True, capture_output=True)
        quantized = out / f"base-{quantization.lower()}.gguf"
        subprocess.run([str(quantize), str(f32), str(quantized), quantization], check=True, capture_output=True)
        return quantized

    def lora(self, base_dir: Path, folder: Path, out: Path) -> Path:
        """A PEFT LoRA folder as an F32 GGUF adapter."""
        adapter = out / f"{folder.name}.gguf"
        self._convert(
            "convert_lora_to_gguf.py",
            "--base",
            str(base_dir),
            "--outtype",
            "f32",
            "--outfile",
            str(adapter),
            str(folder),
        )
        return adapter

    def command(self, model: Path, loras: list[Path], parallel: int, context: int = 1024) -> list[str]:
        """``llama-server`` on ``model`` with every adapter loaded unapplied (a request picks its own with
        ``"lora": [{"id": i, "scale": 1}]``), ``parallel`` slots of ``context`` tokens, every core."""
        # NOTE(peer): "--no-repack": on the 2-core Xeon VM with AMX, llama-server never came up on a Q4_1 model with
        # repacking on (no progress after "threadpool init" in 120 s); F32 weights are never repacked
        command = [str(self.server), "-m", str(model), "--host", "127.0.0.1", "--no-webui", "--no-repack"]
        command += ["-np", str(parallel), "-c", str(parallel * context), "-t", str(os.cpu_count() or 1)]
        if loras:
            command.append("--lora-init-without-apply")
        for adapter in loras:
            command += ["--lora", str(adapter)]
        return command
