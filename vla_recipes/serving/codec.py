"""openpi's wire format: msgpack with numpy arrays as ``{b"__ndarray__": True, b"data", b"dtype", b"shape"}`` maps.

Byte for byte what ``openpi_client.msgpack_numpy`` packs and unpacks, so an unmodified openpi client talks to our
server. That package cannot be a dependency (it pins ``numpy<2``), hence these few lines. Unpacking checks what a
hostile or broken client could send (object dtypes, a buffer that does not fit its shape) and raises
:class:`ValueError` with the reason instead of crashing or building an object array.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

_UNSUPPORTED_KINDS = ("V", "O", "c")  # void, object, complex: openpi refuses them too


def _pack(obj: Any) -> Any:
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in _UNSUPPORTED_KINDS:
        raise ValueError(f"unsupported dtype: {obj.dtype}")
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    return obj


def _unpack(obj: dict) -> Any:
    if b"__ndarray__" in obj or b"__npgeneric__" in obj:
        dtype = np.dtype(obj[b"dtype"])
        if dtype.kind in _UNSUPPORTED_KINDS:
            raise ValueError(f"unsupported dtype: {dtype}")
        if b"__ndarray__" in obj:
            return np.ndarray(buffer=obj[b"data"], dtype=dtype, shape=obj[b"shape"])
        return dtype.type(obj[b"data"])
    return obj


def packb(obj: Any) -> bytes:
    """``obj`` (dicts, lists, scalars, numpy arrays) as one msgpack message."""
    return msgpack.packb(obj, default=_pack)


def unpackb(data: bytes) -> Any:
    """One msgpack message back to Python objects with numpy arrays; ``ValueError`` naming the problem otherwise."""
    try:
        return msgpack.unpackb(data, object_hook=_unpack)
    except Exception as e:  # msgpack raises several exception types; numpy TypeErrors for bad buffers / dtypes
        raise ValueError(f"not a msgpack-numpy message ({type(e).__name__}: {e})") from None
