"""Read Paddle inference models (what ``paddle.jit.save`` / PaddleClas export / PaddleX ship) without Paddle.

Two program formats, one parameter format:

- ``inference.json``: PaddlePaddle 3's PIR program (the default since 3.0). JSON, keys compressed as in
  ``paddle/fluid/pir/serialize_deserialize/include/schema.h``: ``"#"`` id/op name, ``"%"`` value id,
  ``"I"``/``"O"`` operands/results, ``"A"`` attributes, ``"OA"`` result attributes, ``"TT"`` a value's type,
  ``"D"`` data, ``"N"`` attribute name, ``"AT"`` attribute value. Op names carry a dialect id instead of the
  dialect (``"1.conv2d"`` = ``pd_op.conv2d``; 0 builtin, 1 pd_op, 2 cf, 3 custom_op, 4 dist). Parameters are
  ``"p"`` ops (``builtin.parameter``) whose ``"A"`` is ``[is_distributed, is_parameter, need_clip, name]``
  and whose ``"OA"`` is ``[persistable, stop_gradient, trainable]``; a tensor type is
  ``{"#": "0.t_dtensor", "D": [dtype, dims, layout, lod, offset]}``. Operand 0 is a null value.
- ``inference.pdmodel``: the legacy ``ProgramDesc`` protobuf (``paddle/fluid/framework/framework.proto``).
  Only the few messages needed are decoded, by a small wire-format reader written here: the main package
  must not depend on Paddle, and pulling in ``protobuf`` plus a generated ``framework_pb2`` for ~10 fields
  would add a dependency and a code generator for what is ~100 lines of varint/length-delimited parsing.
- ``inference.pdiparams``: Paddle's ``save_combine`` stream: for each tensor ``uint32 version (0)``,
  ``uint64 lod_level`` + per level ``uint64 nbytes`` + offsets, ``uint32 tensor version (0)``,
  ``int32 desc_size`` + a ``VarType.TensorDesc`` protobuf (``data_type``, ``dims``), then the raw
  little-endian data. There are no names in the file: the tensors are the program's persistable parameters
  **sorted by name** (``sorted()`` in ``paddle/static/pir_io.py`` and ``paddle/static/io.py``), checked on
  the files Paddle 3.3 (PIR) and 3.0 (legacy) wrote. Every tensor's dims are checked against the program.
  Paddle 3.0 (PIR version 1) also saves parameters the program declares but never reads (PP-LCNetV2's
  pre-re-parameterization ``dw_conv_list`` branches); they are in ``params`` but get no structured name.
- ``inference.pdiparams.info`` (legacy exports only): a pickle ``{static_name: {"structured_name": ...}}``,
  read with the same restricted unpickler as ``.pdparams``.

:func:`load_inference_model` returns an :class:`InferenceModel`: ``params`` by static name (``conv2d_0.w_0``),
``ops`` in program order with named inputs/outputs, and :meth:`InferenceModel.structured_state`, which maps the
parameters back to PaddleClas' structured names by reading the program (see :mod:`shitu.weights.structure`).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from shitu.errors import ShituError

# ------------------------------------------------------------------------------------------------ data model


@dataclass(frozen=True)
class Op:
    """One operation. ``type`` as the file names it (PIR: ``pd_op.conv2d``; legacy: ``conv2d``);
    ``inputs``/``outputs`` map a slot name to value names (PIR: the op definition's argument names, e.g.
    ``input``/``filter``; legacy: the file's, e.g. ``Input``/``Filter``). Parameters appear under their static
    names, the feed as its name (``x``), other PIR values as ``%<id>``."""

    type: str
    inputs: dict[str, list[str]]
    outputs: dict[str, list[str]]
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class VarInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str
    persistable: bool = True
    trainable: bool | None = None


@dataclass
class InferenceModel:
    format: str  # "pir" or "legacy"
    program_file: Path
    params_file: Path
    params: dict[str, np.ndarray]  # static name → array, in the order of the .pdiparams file
    ops: list[Op]  # program order (PIR builtin.parameter ops are not listed; see ``vars``)
    vars: dict[str, VarInfo]  # the persistable parameters (shape/dtype as the program declares them)
    feed_names: list[str]
    fetch_names: list[str]
    structured_names: dict[str, str] = field(default_factory=dict)  # from .pdiparams.info when present
    version: int | None = None  # PIR: base_code.version; legacy: ProgramDesc.version

    def structured_state(self, spec: Any = None) -> dict[str, np.ndarray]:
        """``{PaddleClas structured name: array}`` (``backbone.…``/``neck.…``, as in a ``.pdparams``), named
        by ``spec``'s ``paddle_structure`` (None: by the registered model that reads the program)."""
        from shitu.weights.structure import structured_state

        return structured_state(self, spec)


# ----------------------------------------------------------------------------------------------- file finding


def _resolve(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    p = Path(path)
    if not p.exists():
        raise ShituError("inference model not found", path=p)
    if p.is_dir():
        for program in (p / "inference.json", p / "inference.pdmodel"):
            if program.is_file():
                break
        else:
            candidates = sorted([*p.glob("*.json"), *p.glob("*.pdmodel")])
            candidates = [c for c in candidates if c.with_suffix(".pdiparams").is_file()]
            if not candidates:
                raise ShituError(
                    "no inference model here (expected inference.json or inference.pdmodel with inference.pdiparams)",
                    path=p,
                )
            program = candidates[0]
    elif p.suffix == ".pdiparams":
        for program in (p.with_suffix(".json"), p.with_suffix(".pdmodel")):
            if program.is_file():
                break
        else:
            raise ShituError(f"no {p.stem}.json or {p.stem}.pdmodel next to the parameters file", path=p)
    elif p.suffix in (".json", ".pdmodel"):
        program = p
    else:
        raise ShituError("not a Paddle inference model file (.json, .pdmodel or .pdiparams)", path=p)
    params = program.with_suffix(".pdiparams")
    if not params.is_file():
        raise ShituError(f"the parameters file {params.name} is missing", path=program)
    return program, params


def load_inference_model(path: str | os.PathLike[str]) -> InferenceModel:
    """Load an inference model from its folder, its program file or its ``.pdiparams`` file."""
    program_file, params_file = _resolve(path)
    if program_file.suffix == ".json":
        prog = _read_pir(program_file)
        fmt = "pir"
    else:
        prog = _read_legacy(program_file)
        fmt = "legacy"
    names = sorted(prog.params)
    params = read_pdiparams(params_file, names, expected={n: prog.params[n] for n in names})
    info_file = params_file.with_name(params_file.name + ".info")
    structured = _read_info(info_file) if info_file.is_file() else {}
    return InferenceModel(
        format=fmt,
        program_file=program_file,
        params_file=params_file,
        params=params,
        ops=prog.ops,
        vars=prog.params,
        feed_names=prog.feeds,
        fetch_names=prog.fetches,
        structured_names=structured,
        version=prog.version,
    )


@dataclass
class _Program:
    ops: list[Op]
    params: dict[str, VarInfo]
    feeds: list[str]
    fetches: list[str]
    version: int | None


# --------------------------------------------------------------------------------------------- .pdiparams

# framework.proto VarType.Type → numpy dtype (BF16 is read as uint16 bits and widened to float32).
_DTYPES: dict[int, str] = {
    0: "bool",
    1: "int16",
    2: "int32",
    3: "int64",
    4: "float16",
    5: "float32",
    6: "float64",
    20: "uint8",
    21: "int8",
    22: "bfloat16",
    23: "complex64",
    24: "complex128",
    36: "uint16",
    37: "uint32",
    38: "uint64",
}


def _remaining(f: BinaryIO) -> int:
    """Bytes left in ``f`` after its position: sizes read from a corrupt header are checked against it
    before anything that large is allocated."""
    return os.fstat(f.fileno()).st_size - f.tell()


def _read_exact(f: BinaryIO, n: int, file: Path, what: str) -> bytes:
    if n > _remaining(f):
        raise ShituError(f"truncated parameters file (ends inside {what})", path=file)
    data = f.read(n)
    if len(data) != n:
        raise ShituError(f"truncated parameters file (ends inside {what})", path=file)
    return data


def _read_tensor(f: BinaryIO, file: Path, index: int) -> np.ndarray:
    what = f"tensor #{index}"
    (version,) = struct.unpack("<I", _read_exact(f, 4, file, what))
    if version != 0:
        raise ShituError(f"{what}: unsupported tensor stream version {version} (corrupt file?)", path=file)
    (lod_levels,) = struct.unpack("<Q", _read_exact(f, 8, file, what))
    if lod_levels > 64:
        raise ShituError(f"{what}: implausible LoD level count {lod_levels} (corrupt file?)", path=file)
    for _ in range(lod_levels):
        (nbytes,) = struct.unpack("<Q", _read_exact(f, 8, file, what))
        _read_exact(f, nbytes, file, what)
    (tensor_version,) = struct.unpack("<I", _read_exact(f, 4, file, what))
    if tensor_version != 0:
        raise ShituError(f"{what}: unsupported tensor version {tensor_version} (corrupt file?)", path=file)
    (desc_size,) = struct.unpack("<i", _read_exact(f, 4, file, what))
    if not 0 < desc_size < 1 << 16:
        raise ShituError(f"{what}: implausible tensor description size {desc_size} (corrupt file?)", path=file)
    data_type, dims = _tensor_desc(_read_exact(f, desc_size, file, what), file)
    dtype_name = _DTYPES.get(data_type)
    if dtype_name is None:
        raise ShituError(f"{what}: unsupported data type {data_type}", path=file)
    if any(d < 0 for d in dims):
        raise ShituError(f"{what}: negative dimension in {dims} (corrupt file?)", path=file)
    count = math.prod(dims)  # exact: numpy's int64 product would wrap around for corrupt dims
    itemsize = 2 if dtype_name == "bfloat16" else np.dtype(dtype_name).itemsize
    if count * itemsize > _remaining(f):
        raise ShituError(
            f"truncated parameters file ({what} of shape {dims} needs {count * itemsize} bytes, "
            f"{_remaining(f)} are left)",
            path=file,
        )
    if dtype_name == "bfloat16":
        bits = np.empty(count, "<u2")
        _fill(f, bits, file, what)
        return (bits.astype(np.uint32) << 16).view(np.float32).reshape(dims)
    array = np.empty(count, np.dtype(dtype_name).newbyteorder("<"))
    _fill(f, array, file, what)
    return array.reshape(dims).astype(array.dtype.newbyteorder("="), copy=False)


def _fill(f: BinaryIO, array: np.ndarray, file: Path, what: str) -> None:
    view = memoryview(array).cast("B")
    got = f.readinto(view)
    if got != view.nbytes:
        raise ShituError(f"truncated parameters file (ends inside the data of {what})", path=file)


def read_pdiparams(
    path: str | os.PathLike[str], names: list[str], *, expected: dict[str, VarInfo] | None = None
) -> dict[str, np.ndarray]:
    """Read a ``save_combine`` stream holding ``len(names)`` tensors, named in order by ``names``.

    ``expected`` (name → declared shape) is checked tensor by tensor (a -1 dim matches anything); the file
    must end exactly after the last tensor."""
    file = Path(path)
    out: dict[str, np.ndarray] = {}
    try:
        with file.open("rb") as f:
            for i, name in enumerate(names):
                array = _read_tensor(f, file, i)
                info = (expected or {}).get(name)
                if info is not None and (
                    len(info.shape) != array.ndim
                    or any(d not in (-1, a) for d, a in zip(info.shape, array.shape, strict=True))
                ):
                    raise ShituError(
                        f"tensor #{i} ({name}) has shape {list(array.shape)} but the program declares "
                        f"{list(info.shape)} (parameters file does not belong to this program, or is corrupt)",
                        path=file,
                    )
                out[name] = array
            if f.read(1):
                raise ShituError(
                    f"the parameters file holds more than the {len(names)} tensors the program declares", path=file
                )
    except OSError as exc:
        raise ShituError(f"cannot read the parameters file ({exc.strerror or exc})", path=file) from None
    return out


def _read_info(file: Path) -> dict[str, str]:
    from shitu.weights.pdparams import unpickle_restricted

    obj = unpickle_restricted(file.read_bytes(), path=file)
    if not isinstance(obj, dict):
        raise ShituError("malformed .pdiparams.info (not a dict)", path=file)
    names: dict[str, str] = {}
    for key, value in obj.items():
        if isinstance(key, str) and isinstance(value, dict) and isinstance(value.get("structured_name"), str):
            names[key] = value["structured_name"]
    return names


# ------------------------------------------------------------------------------------- protobuf wire format


class _WireError(Exception):
    pass


#: What a corrupt protobuf can make the decoding below raise besides _WireError (a field of the wrong wire
#: type used as a message or a number, an unhashable enum, a short fixed-size field...).
_CORRUPT = (_WireError, TypeError, ValueError, struct.error, OverflowError)


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise _WireError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 70:
            raise _WireError("varint too long")


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _fields(buf: bytes | memoryview) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) for each field of a message: int for varints, bytes-like for
    length-delimited fields, raw 4/8 bytes for fixed32/fixed64."""
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise _WireError("a number where a message was expected")
    view = memoryview(buf)
    pos = 0
    while pos < len(view):
        key, pos = _varint(view, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _WireError("field number 0")
        if wire == 0:
            value, pos = _varint(view, pos)
        elif wire == 1:
            value, pos = bytes(view[pos : pos + 8]), pos + 8
        elif wire == 2:
            size, pos = _varint(view, pos)
            value, pos = view[pos : pos + size], pos + size
        elif wire == 5:
            value, pos = bytes(view[pos : pos + 4]), pos + 4
        else:
            raise _WireError(f"unsupported wire type {wire}")
        if pos > len(view):
            raise _WireError("truncated message")
        yield number, wire, value


def _packed_varints(wire: int, value: Any) -> list[int]:
    if wire == 0:
        return [value]
    out, pos, view = [], 0, memoryview(value)
    while pos < len(view):
        v, pos = _varint(view, pos)
        out.append(v)
    return out


def _packed_fixed(wire: int, value: Any, fmt: str, size: int) -> list[float]:
    if wire == 0:  # bytes(int) would allocate that many bytes
        raise _WireError("a varint where a fixed-size number was expected")
    raw = bytes(value)
    if wire in (1, 5):
        return [struct.unpack("<" + fmt, raw)[0]]
    if len(raw) % size:
        raise _WireError("bad packed length")
    return list(struct.unpack(f"<{len(raw) // size}{fmt}", raw))


def _text(value: Any) -> str:
    return bytes(value).decode("utf-8", errors="replace")


def _tensor_desc(buf: bytes | memoryview, file: Path) -> tuple[int, list[int]]:
    """``VarType.TensorDesc``: 1 data_type (enum), 2 dims (repeated int64, packed or not)."""
    data_type, dims = None, []
    try:
        for number, wire, value in _fields(buf):
            if number == 1:
                data_type = value
            elif number == 2:
                dims += [_signed(v) for v in _packed_varints(wire, value)]
    except _CORRUPT as exc:
        raise ShituError(f"corrupt tensor description ({exc})", path=file) from None
    if not isinstance(data_type, int):
        raise ShituError("corrupt tensor description (no data type)", path=file)
    return data_type, dims


# ------------------------------------------------------------------------------------- legacy ProgramDesc

# OpDesc.Attr: AttrType → the field holding the value.
_ATTR_FIELD = {
    0: 3,  # INT → i
    1: 4,  # FLOAT → f
    2: 5,  # STRING → s
    3: 6,  # INTS → ints
    4: 7,  # FLOATS → floats
    5: 8,  # STRINGS → strings
    6: 10,  # BOOLEAN → b
    7: 11,  # BOOLEANS → bools
    8: 12,  # BLOCK → block_idx
    9: 13,  # LONG → l
    10: 14,  # BLOCKS → blocks_idx
    11: 15,  # LONGS → longs
    12: 16,  # FLOAT64S → float64s
    13: 17,  # VAR → var_name
    14: 18,  # VARS → vars_name
    15: 19,  # FLOAT64 → float64
    16: 20,  # SCALAR → scalar
    17: 21,  # SCALARS → scalars
}
_REPEATED_ATTRS = {3, 4, 5, 7, 10, 11, 12, 14, 17}


def _scalar(buf: Any) -> Any:
    kind, values = None, {}
    for number, wire, value in _fields(buf):
        if number == 1:
            kind = value
        elif number == 2:
            values[2] = bool(value)
        elif number == 3:
            values[3] = _signed(value)
        elif number == 4:
            values[4] = _packed_fixed(wire, value, "d", 8)[0]
        elif number == 5:
            parts = {n: _packed_fixed(w, v, "d", 8)[0] for n, w, v in _fields(value)}
            values[5] = complex(parts.get(1, 0.0), parts.get(2, 0.0))
    return values.get({1: 2, 2: 3, 3: 4, 4: 5}.get(kind or 0, 0))


def _attr(buf: Any) -> tuple[str, Any]:
    name, kind, raw = "", None, []
    for number, wire, value in _fields(buf):
        if number == 1:
            name = _text(value)
        elif number == 2:
            kind = value
        else:
            raw.append((number, wire, value))
    wanted = _ATTR_FIELD.get(kind if kind is not None else -1)
    items: list[Any] = []
    for number, wire, value in raw:
        if number != wanted:
            continue
        if number in (3, 6, 12, 13, 14, 15):  # int32/int64 (negative int32 are sign-extended to 64 bits)
            items += [_signed(v) for v in _packed_varints(wire, value)]
        elif number in (10, 11):  # bool
            items += [bool(v) for v in _packed_varints(wire, value)]
        elif number in (4, 7):  # float
            items += _packed_fixed(wire, value, "f", 4)
        elif number in (16, 19):  # double
            items += _packed_fixed(wire, value, "d", 8)
        elif number in (5, 8, 17, 18):  # string
            items.append(_text(value))
        elif number in (20, 21):
            items.append(_scalar(value))
    if kind in _REPEATED_ATTRS:
        return name, items
    return name, items[-1] if items else None


def _op_vars(buf: Any) -> tuple[str, list[str]]:
    slot, args = "", []
    for number, _, value in _fields(buf):
        if number == 1:
            slot = _text(value)
        elif number == 2:
            args.append(_text(value))
    return slot, args


def _legacy_op(buf: Any) -> Op:
    kind, inputs, outputs, attrs = "", {}, {}, {}
    for number, _, value in _fields(buf):
        if number == 3:
            kind = _text(value)
        elif number == 1:
            slot, args = _op_vars(value)
            inputs[slot] = args
        elif number == 2:
            slot, args = _op_vars(value)
            outputs[slot] = args
        elif number == 4:
            name, attr = _attr(value)
            attrs[name] = attr
    return Op(kind, inputs, outputs, attrs)


def _legacy_var(buf: Any, file: Path) -> tuple[str, int, int | None, list[int], bool]:
    """VarDesc → (name, VarType.type, data_type, dims, persistable)."""
    name, var_type, data_type, dims, persistable = "", -1, None, [], False
    for number, _, value in _fields(buf):
        if number == 1:
            name = _text(value)
        elif number == 3:
            persistable = bool(value)
        elif number == 2:  # VarType
            for n2, _, v2 in _fields(value):
                if n2 == 1:
                    var_type = v2
                elif n2 == 3:  # dense_tensor (lod_tensor in older protos): DenseTensorDesc
                    for n3, _, v3 in _fields(v2):
                        if n3 == 1:
                            data_type, dims = _tensor_desc(v3, file)
    return name, var_type, data_type, dims, persistable


_DENSE_TENSOR = 7


def _read_legacy(file: Path) -> _Program:
    data = file.read_bytes()
    if not data:
        raise ShituError("empty program file", path=file)
    ops: list[Op] = []
    params: dict[str, VarInfo] = {}
    version = None
    blocks = 0
    try:
        for number, _, value in _fields(data):
            if number == 1:
                blocks += 1
                for n2, _, v2 in _fields(value):
                    if n2 == 3:
                        name, var_type, data_type, dims, persistable = _legacy_var(v2, file)
                        if persistable and var_type == _DENSE_TENSOR and data_type is not None:
                            params[name] = VarInfo(name, tuple(dims), _DTYPES.get(data_type, str(data_type)))
                    elif n2 == 4 and blocks == 1:
                        ops.append(_legacy_op(v2))
            elif number == 4:
                for n2, _, v2 in _fields(value):
                    if n2 == 1:
                        version = _signed(v2)
    except _CORRUPT as exc:
        raise ShituError(f"not a readable Paddle program (truncated or corrupt protobuf: {exc})", path=file) from None
    if blocks == 0 or not ops:
        raise ShituError("not a Paddle program (no blocks or no operations)", path=file)
    # Feed/fetch variables are persistable too, but of type FEED_MINIBATCH/FETCH_LIST: already excluded.
    feeds = [name for op in ops if op.type == "feed" for name in op.outputs.get("Out", [])]
    fetches = [name for op in ops if op.type == "fetch" for name in op.inputs.get("X", [])]
    return _Program(ops, params, feeds, fetches, version)


# -------------------------------------------------------------------------------------------- PIR JSON

_DIALECTS = {"0": "builtin", "1": "pd_op", "2": "cf", "3": "custom_op", "4": "pd_dist"}

# Argument names of the pd_op definitions (paddle/phi/ops/yaml/*.yaml) for the ops these models use;
# other ops get positional names (in0, in1, ...).
_PIR_INPUTS: dict[str, tuple[str, ...]] = {
    "conv2d": ("input", "filter"),
    "depthwise_conv2d": ("input", "filter"),
    "batch_norm": ("x", "mean", "variance", "scale", "bias"),
    "batch_norm_": ("x", "mean", "variance", "scale", "bias"),
    "layer_norm": ("x", "scale", "bias"),
    "matmul": ("x", "y"),
    "add": ("x", "y"),
    "add_": ("x", "y"),
    "subtract": ("x", "y"),
    "multiply": ("x", "y"),
    "divide": ("x", "y"),
    "reshape": ("x", "shape"),
    "reshape_": ("x", "shape"),
    "expand": ("x", "shape"),
    "dropout": ("x", "seed_tensor", "p"),
    "pool2d": ("x", "kernel_size"),
    "scale": ("x", "scale"),
    "scale_": ("x", "scale"),
    "concat": ("x", "axis"),
    "slice": ("input", "starts", "ends"),
    "mean": ("x", "axis"),
    "stack": ("x",),
    "transpose": ("x",),
    "flatten": ("x",),
    "relu": ("x",),
    "relu_": ("x",),
    "sigmoid": ("x",),
    "hardswish": ("x",),
    "gelu": ("x",),
    "softmax": ("x",),
    "shape": ("input",),
    "shape64": ("input",),
    "fetch": ("x",),
}
_PIR_OUTPUTS: dict[str, tuple[str, ...]] = {
    "batch_norm": ("out", "mean_out", "variance_out", "saved_mean", "saved_variance", "reserve_space"),
    "batch_norm_": ("out", "mean_out", "variance_out", "saved_mean", "saved_variance", "reserve_space"),
    "layer_norm": ("out", "mean", "variance"),
    "dropout": ("out", "mask"),
}
_PIR_DTYPES = {
    "t_f16": "float16",
    "t_bf16": "bfloat16",
    "t_f32": "float32",
    "t_f64": "float64",
    "t_i8": "int8",
    "t_ui8": "uint8",
    "t_i16": "int16",
    "t_i32": "int32",
    "t_i64": "int64",
    "t_bool": "bool",
    "t_c64": "complex64",
    "t_c128": "complex128",
}


def _pir_name(compressed: str) -> str:
    dialect, _, name = compressed.partition(".")
    return f"{_DIALECTS.get(dialect, dialect)}.{name}" if name else compressed


def _pir_attr(value: Any) -> Any:
    """Decode an attribute value: ``{"#": kind, "D": data}`` → data (arrays recursively); a bare type
    ``{"#": "0.t_f32"}`` → ``"float32"``."""
    if isinstance(value, dict):
        if "D" in value:
            return _pir_attr(value["D"])
        kind = str(value.get("#", ""))
        return _PIR_DTYPES.get(kind.partition(".")[2], kind)
    if isinstance(value, list):
        return [_pir_attr(v) for v in value]
    return value


def _pir_tensor_type(tt: Any) -> tuple[tuple[int, ...], str] | None:
    if not isinstance(tt, dict) or not str(tt.get("#", "")).endswith("t_dtensor"):
        return None
    data = tt["D"]
    dtype = _pir_attr(data[0])
    return tuple(int(d) for d in data[1]), str(dtype)


def _read_pir(file: Path) -> _Program:
    try:
        doc = json.loads(file.read_bytes())
    except (UnicodeDecodeError, ValueError) as exc:
        raise ShituError(f"not a readable PIR program (truncated or corrupt JSON: {exc})", path=file) from None
    except RecursionError:
        raise ShituError("not a readable PIR program (JSON nested too deeply)", path=file) from None
    try:
        if doc["base_code"]["magic"] != "pir":
            raise ShituError("not a PIR program (base_code.magic is not 'pir')", path=file)
        version = doc["base_code"].get("version")
        regions = doc["program"]["regions"]
        ops: list[Op] = []
        params: dict[str, VarInfo] = {}
        names: dict[int, str] = {}
        combined: dict[str, list[str]] = {}
        feeds: list[str] = []
        fetches: list[str] = []
        for raw in _pir_ops(regions):
            kind = raw["#"]
            if kind == "p":  # builtin.parameter, compressed
                attrs, result = raw["A"], raw["O"]
                name = str(attrs[3])
                names[int(result["%"])] = name
                shape_dtype = _pir_tensor_type(result["TT"])
                if shape_dtype is None:
                    raise ShituError(f"parameter {name!r} is not a dense tensor", path=file)
                flags = raw.get("OA") or [1, 1, 1]
                params[name] = VarInfo(name, shape_dtype[0], shape_dtype[1], bool(flags[0]), bool(flags[2]))
                continue
            op_type = _pir_name(kind)
            short = op_type.partition(".")[2]
            attrs = {a["N"]: _pir_attr(a["AT"]) for a in raw.get("A", [])}
            results = raw.get("O", [])
            if short == "data":
                for r in results:
                    names[int(r["%"])] = str(attrs.get("name", f"%{r['%']}"))
                feeds.append(str(attrs.get("name")))
            for r in results:
                names.setdefault(int(r["%"]), f"%{r['%']}")
            in_slots = _PIR_INPUTS.get(short)
            inputs: dict[str, list[str]] = {}
            for i, operand in enumerate(raw.get("I", [])):
                slot = in_slots[i] if in_slots and i < len(in_slots) else f"in{i}"
                vid = int(operand["%"])
                if vid == 0:  # null value (an optional input left out)
                    inputs[slot] = []
                    continue
                value = names.get(vid, f"%{vid}")
                inputs[slot] = combined.get(value, [value])
            out_slots = _PIR_OUTPUTS.get(short, ("out",))
            outputs = {
                (out_slots[i] if i < len(out_slots) else f"out{i}"): [names[int(r["%"])]] for i, r in enumerate(results)
            }
            op = Op(op_type, inputs, outputs, attrs)
            if op_type == "builtin.combine" and results:
                # A vector built for concat/stack: let the consumer list the vector's parts instead.
                combined[names[int(results[0]["%"])]] = [v for vs in inputs.values() for v in vs]
            if short == "fetch":
                fetches += inputs.get("x", [])
            ops.append(op)
    except ShituError:
        raise
    except RecursionError:
        raise ShituError("not a PIR program this reader understands (regions nested too deeply)", path=file) from None
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise ShituError(
            f"not a PIR program this reader understands ({type(exc).__name__}: {exc})", path=file
        ) from None
    if not ops:
        raise ShituError("the PIR program has no operations", path=file)
    return _Program(ops, params, feeds, fetches, version)


def _pir_ops(regions: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for region in regions:
        for block in region["blocks"]:
            for op in block["ops"]:
                yield op
                if op.get("regions"):
                    yield from _pir_ops(op["regions"])
