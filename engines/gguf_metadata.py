"""Read the key/value header of a GGUF file (no tensors), without the `gguf` package.

The server needs a few facts before and besides loading a GGUF model: its name, its
architecture, its context length and its quantization type. The header layout is
documented in ggml's GGUF specification: magic, version, tensor count, key/value count,
then typed key/value pairs.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

_SCALAR_FORMATS = {  # GGUF value type -> struct format (little-endian)
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i",
    6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}
_STRING, _ARRAY = 8, 9

# general.file_type values (llama_ftype) for the quantizations we name in metrics.
_FILE_TYPES = {
    0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 7: "q8_0", 8: "q5_0", 9: "q5_1",
    10: "q2_k", 11: "q3_k_s", 12: "q3_k_m", 13: "q3_k_l", 14: "q4_k_s", 15: "q4_k_m",
    16: "q5_k_s", 17: "q5_k_m", 18: "q6_k", 32: "bf16",
}


class GGUFFormatError(ValueError):
    pass


def _read(stream: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = stream.read(size)
    if len(data) != size:
        raise GGUFFormatError("truncated GGUF header")
    return struct.unpack(fmt, data)[0]


def _read_string(stream: BinaryIO) -> str:
    length = _read(stream, "<Q")
    return stream.read(length).decode("utf-8", errors="replace")


def _read_value(stream: BinaryIO, value_type: int, keep_arrays: bool) -> Any:
    if value_type in _SCALAR_FORMATS:
        return _read(stream, _SCALAR_FORMATS[value_type])
    if value_type == _STRING:
        return _read_string(stream)
    if value_type == _ARRAY:
        item_type = _read(stream, "<I")
        count = _read(stream, "<Q")
        if not keep_arrays and item_type in _SCALAR_FORMATS:
            # Skip big arrays (token scores, types) without decoding them.
            stream.seek(count * struct.calcsize(_SCALAR_FORMATS[item_type]), 1)
            return None
        items = [_read_value(stream, item_type, keep_arrays) for _ in range(count)]
        return items if keep_arrays else None
    raise GGUFFormatError(f"unknown GGUF value type {value_type}")


def read_gguf_metadata(path: str | Path, keep_arrays: bool = False) -> dict[str, Any]:
    """Return the header's key/value pairs; arrays are None unless `keep_arrays`."""
    with open(path, "rb") as stream:
        if stream.read(4) != b"GGUF":
            raise GGUFFormatError(f"{path} is not a GGUF file")
        version = _read(stream, "<I")
        if version < 2:
            raise GGUFFormatError(f"GGUF version {version} is not supported")
        _read(stream, "<Q")  # tensor count
        kv_count = _read(stream, "<Q")
        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = _read_string(stream)
            value_type = _read(stream, "<I")
            metadata[key] = _read_value(stream, value_type, keep_arrays)
        return metadata


def context_length(metadata: dict[str, Any]) -> int | None:
    arch = metadata.get("general.architecture")
    value = metadata.get(f"{arch}.context_length")
    return int(value) if value else None


def quantization_name(metadata: dict[str, Any]) -> str:
    file_type = metadata.get("general.file_type")
    return "gguf-" + _FILE_TYPES.get(file_type, f"type{file_type}")
