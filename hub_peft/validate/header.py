"""An untrusted safetensors file's header, read and checked without reading any tensor data."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, TypeGuard

from ..errors import InvalidInputError
from ..limits import MAX_HEADER_BYTES, MAX_TENSORS

FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}

# bits per element of every dtype safetensors 0.8 reads (F4 and F6 pack several elements per byte)
DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}


def is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def shown(value: Any, limit: int = 40) -> str:
    """``value`` for a message, cut short (it comes from an untrusted file)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the JSON names {key!r} twice")
        out[key] = value
    return out


def _not_json(constant: str) -> Any:
    raise ValueError(f"the JSON holds {constant}, which JSON does not allow")


def parse_json(data: bytes, what: str) -> Any:
    """Strict JSON of an untrusted file: UTF-8, no duplicate keys, no NaN/Infinity; InvalidInputError (a
    ValueError) naming ``what``."""
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_not_json)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise InvalidInputError(f"{what} is not valid JSON ({str(e)[:200]})") from None


def _check_tensor_entry(name: str, meta: Any, data_len: int) -> tuple[str, list[int], int, int]:
    """``(dtype, shape, start, end)`` of one header entry; InvalidInputError naming what is wrong with it."""
    label = shown(name, 200)
    if not isinstance(meta, dict) or not {"dtype", "shape", "data_offsets"} <= meta.keys():
        raise InvalidInputError(f"tensor {label} is not an object with dtype, shape and data_offsets")
    dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise InvalidInputError(f"tensor {label} has the unknown dtype {shown(dtype)} (known: {', '.join(DTYPE_BITS)})")
    # NOTE(security): at most 16 dimensions below 2**64 (safetensors' own bound), so their product stays cheap
    if not isinstance(shape, list) or len(shape) > 16 or not all(is_int(d) and 0 <= d < 2**64 for d in shape):
        raise InvalidInputError(
            f"tensor {label} has the shape {shown(shape, 80)}, not a list of at most 16 non-negative integers"
        )
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_int(o) for o in offsets):
        raise InvalidInputError(f"tensor {label} has data_offsets {shown(offsets, 80)}, not two integers")
    start, end = offsets
    if not 0 <= start <= end <= data_len:
        raise InvalidInputError(f"tensor {label} points past the end of the file or before its data (truncated?)")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != end - start:
        raise InvalidInputError(
            f"tensor {label} of shape {shape} and dtype {dtype} needs {bits // 8} bytes, but its "
            f"data_offsets hold {end - start}"
        )
    return dtype, shape, start, end


def read_safetensors_header(path: Path, *, max_tensors: int = MAX_TENSORS) -> dict[str, tuple[str, list[int]]]:
    """Name -> (dtype, shape) from the JSON header only (no tensor data is read), checked as safetensors checks
    it and more: InvalidInputError (a ValueError) naming the problem unless the header is at most
    ``MAX_HEADER_BYTES`` of strict JSON; holds at most ``max_tensors`` entries, each a known dtype, a shape of
    non-negative integers and two data offsets whose span is exactly the bytes that shape and dtype need; the
    spans tile the data with no gap, overlap or byte left over; and ``__metadata__`` maps strings to strings."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise InvalidInputError("file is shorter than a safetensors header")
        n = int.from_bytes(raw, "little")
        size = os.fstat(f.fileno()).st_size
        if n <= 0 or n > size - 8:
            raise InvalidInputError(f"header length {n} does not fit a {size}-byte file")
        if n > MAX_HEADER_BYTES:
            raise InvalidInputError(f"its header takes {n} bytes, over hub_peft's limit of {MAX_HEADER_BYTES}")
        header = parse_json(f.read(n), "its header")
    if not isinstance(header, dict):
        raise InvalidInputError("its header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise InvalidInputError("its __metadata__ is not a map of strings to strings")
    if len(header) > max_tensors:
        raise InvalidInputError(f"it holds {len(header)} tensors, over hub_peft's limit of {max_tensors}")
    data_len = size - 8 - n
    out, spans = {}, []
    for name, meta in header.items():
        dtype, shape, start, end = _check_tensor_entry(name, meta, data_len)
        out[name] = (dtype, list(shape))
        spans.append((start, end, name))
    at = 0
    for start, end, name in sorted(spans):
        if start != at:
            raise InvalidInputError(
                f"tensor {shown(name, 200)} "
                + (
                    "overlaps the tensor before it"
                    if start < at
                    else f"starts {start - at} bytes after the end of the one before it"
                )
            )
        at = end
    if at != data_len:
        raise InvalidInputError(f"{data_len - at} bytes after the last tensor belong to no tensor")
    return out
