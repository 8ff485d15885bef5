"""Read PaddlePaddle ``.pdparams`` files (``paddle.save(layer.state_dict())``) without Paddle and without
running code from the file.

A ``.pdparams`` file is a pickle of ``{structured_name: numpy.ndarray}``; Paddle loads it with
``pickle.load(f, encoding="latin1")``. Unpickling can call any importable function, so a hostile file
could run code: :class:`_RestrictedUnpickler` resolves only the handful of globals that numpy arrays and
plain containers need and refuses every other one *before* anything is called.

What Paddle writes (checked on files saved by Paddle 3.3, pickle protocol 4, and against
``paddle/framework/io.py``/``io_utils.py``):

- ``numpy._core.multiarray._reconstruct`` (``numpy.core...`` when saved with numpy 1.x), ``numpy.ndarray``
  and ``numpy.dtype`` for each array; a plain ``dict`` (``collections.OrderedDict`` in older files);
- ``"StructuredToParameterName@@"``: ``{structured_name: static parameter name}`` (e.g.
  ``"backbone.stem.0.conv.weight" → "conv2d_0.w_0"``), the names an exported inference model uses;
- protocol 2/3 files split arrays over 1 GiB into ``key@@.0``, ``key@@.1``... listed under
  ``"UnpackBigParamInfor@@"`` (``{key: {"OriginShape": shape, "slices": [part names]}}``); protocol 2 encodes
  bytes as ``_codecs.encode(text, "latin1")``;
- a Tensor pickled outside a state dict becomes ``builtins.tuple(((name, ndarray),))``: the ndarray is used.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from shitu.errors import ShituError

NAME_TABLE_KEY = "StructuredToParameterName@@"
BIG_PARAM_KEY = "UnpackBigParamInfor@@"  # sic: Paddle's spelling

_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's own _reconstruct, whatever module it lives in
_SCALAR = np.float32(0).__reduce__()[0]


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes; only the latin-1 codec is allowed."""
    if encoding.replace("_", "-").lower() not in ("latin1", "latin-1", "iso-8859-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1", errors)


class _NdarrayType:
    """Stands for ``numpy.ndarray`` in a pickle. numpy only ever names the class as the first argument of
    ``_reconstruct``; given to the unpickler as is, ``NEWOBJ`` could call ``ndarray.__new__`` with any shape
    (an object array of 10⁹ elements is 8 GB written before anything can check it)."""

    def __init__(self) -> None:
        raise pickle.UnpicklingError("numpy.ndarray may only be named as _reconstruct's subtype")


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's ``_reconstruct`` as its ``ndarray.__reduce__`` uses it: an empty ndarray that the pickle's
    ``BUILD`` then fills from its own bytes. Any other subtype, or a shape that would allocate, is refused."""
    if subtype is not _NdarrayType or not isinstance(dtype, bytes):
        raise pickle.UnpicklingError("refusing _reconstruct of anything but an empty numpy.ndarray")
    if not isinstance(shape, tuple) or not all(isinstance(d, int) and d >= 0 for d in shape) or 0 not in shape:
        raise pickle.UnpicklingError(f"refusing _reconstruct with shape {shape!r} (numpy always writes an empty one)")
    return _RECONSTRUCT(np.ndarray, shape, dtype)


def _bytearray(source: Any = b"", *args: Any) -> bytearray:
    """``bytearray`` of the bytes or text a pickle holds; never ``bytearray(n)``, which would allocate n bytes."""
    if not isinstance(source, (bytes, bytearray, str)):
        raise pickle.UnpicklingError(f"refusing bytearray({type(source).__name__})")
    return bytearray(source, *args)


# (module, name) → object. Anything not listed is refused: this is the whole trust boundary.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _SCALAR,
    ("numpy._core.multiarray", "scalar"): _SCALAR,
    ("numpy", "ndarray"): _NdarrayType,
    ("numpy", "dtype"): np.dtype,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "tuple"): tuple,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): _bytearray,
    ("__builtin__", "dict"): dict,
    ("__builtin__", "list"): list,
    ("__builtin__", "tuple"): tuple,
    ("_codecs", "encode"): _latin1_encode,
}


class _Refused(Exception):
    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.qualified = f"{module}.{name}"


# pickle's pure-Python unpickler, not the C one: the C unpickler grows its memo to the largest index a
# PUT opcode names, so five bytes (LONG_BINPUT 2**31) make it allocate and zero 16 GB. The Python one keeps
# the memo in a dict, and reads Paddle's files (a few opcodes around large byte strings) as fast.
class _RestrictedUnpickler(pickle._Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(module, name) from None

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("persistent_load", repr(pid)[:60])


def unpickle_restricted(data: bytes, *, path: str | os.PathLike[str] | None = None) -> Any:
    """Unpickle ``data`` (``encoding="latin1"``, as Paddle) allowing only numpy arrays and plain containers.

    Raises :class:`ShituError` naming ``path`` for a refused global (a pickle that would run code) or a
    truncated/corrupt stream."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except _Refused as exc:
        raise ShituError(
            f"refusing to load: the file wants to import {exc.qualified} (a pickle that would run code)", path=path
        ) from None
    except ShituError:
        raise
    except (EOFError, pickle.UnpicklingError, struct.error) as exc:
        raise ShituError(f"not a readable .pdparams pickle (truncated or corrupt: {exc})", path=path) from None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError, MemoryError) as exc:
        raise ShituError(f"not a readable .pdparams pickle ({type(exc).__name__}: {exc})", path=path) from None


def _read(path: str | os.PathLike[str]) -> tuple[Path, Any]:
    file = Path(path)
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise ShituError("weights file does not exist", path=file) from None
    except IsADirectoryError:
        raise ShituError("expected a .pdparams file, got a folder", path=file) from None
    except OSError as exc:
        raise ShituError(f"cannot read the file ({exc.strerror})", path=file) from None
    if not data:
        raise ShituError("empty file (not a .pdparams pickle)", path=file)
    obj = unpickle_restricted(data, path=file)
    if not isinstance(obj, Mapping):
        raise ShituError(f"not a Paddle state dict (the pickle holds a {type(obj).__name__})", path=file)
    return file, obj


def _as_array(value: Any) -> np.ndarray | None:
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], np.ndarray):
        return value[1]  # a Tensor pickled by paddle.save's reduce_varbase: (name, ndarray)
    return None


def _pack_big_params(obj: dict[str, Any], file: Path) -> None:
    """Undo ``_unpack_saved_dict`` (protocol 2/3 files split arrays over 1 GiB into slices)."""
    info = obj.pop(BIG_PARAM_KEY, None)
    if info is None:
        return
    if not isinstance(info, Mapping):
        raise ShituError(f"malformed {BIG_PARAM_KEY!r} entry", path=file)
    for key, entry in info.items():
        try:
            parts = [obj.pop(name) for name in entry["slices"]]
            obj[key] = np.concatenate([np.asarray(_as_array(p)).ravel() for p in parts]).reshape(
                tuple(entry["OriginShape"])
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ShituError(f"cannot reassemble the split parameter {key!r} ({exc})", path=file) from None


def load_pdparams(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """``{structured_name: array}`` from a ``.pdparams`` file, in the file's order.

    ``"StructuredToParameterName@@"`` is skipped (see :func:`load_pdparams_name_table`); any value that
    is not an array is an error (a ``.pdopt`` optimizer file or another pickle is not a state dict)."""
    file, obj = _read(path)
    obj = dict(obj)
    obj.pop(NAME_TABLE_KEY, None)
    _pack_big_params(obj, file)
    state: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise ShituError(f"not a Paddle state dict (key {key!r} is not a string)", path=file)
        array = _as_array(value)
        if array is None:
            raise ShituError(
                f"not a Paddle state dict: {key!r} holds a {type(value).__name__}, not an array", path=file
            )
        if array.dtype.hasobject:
            raise ShituError(f"not a Paddle state dict: {key!r} is an array of Python objects", path=file)
        if array.dtype.kind not in "biufc":  # text, bytes, records, dates: never a Paddle tensor
            raise ShituError(f"not a Paddle state dict: {key!r} is an array of {array.dtype} (not numbers)", path=file)
        state[key] = array
    if not state:
        raise ShituError("the state dict holds no arrays", path=file)
    return state


def load_pdparams_name_table(path: str | os.PathLike[str]) -> dict[str, str]:
    """``{structured_name: static parameter name}`` (``"StructuredToParameterName@@"``); empty if absent."""
    file, obj = _read(path)
    table = obj.get(NAME_TABLE_KEY, {})
    if not isinstance(table, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in table.items()):
        raise ShituError(f"malformed {NAME_TABLE_KEY!r} entry", path=file)
    return dict(table)
