"""Untrusted model files (issue 7): pickles that would run code, memory bombs, wrong shapes, damaged
``.pdparams`` / ``.pdiparams`` / ``inference.json`` / ``.pdmodel`` files and damaged Orbax bundles. Each is
refused with one located ShituError, without running anything: every hostile payload would create a
sentinel file, and the tests assert that it never appears.

tests/test_weights.py already covers os.system and eval through ``__reduce__``, a hostile
``.pdiparams.info``, fixed truncation points and garbage; this file covers the rest.
"""

from __future__ import annotations

import copyreg
import json
import os
import pickle
import shutil
import struct
import subprocess
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from hardening_support import assert_cli_failed_cleanly, assert_located, fuzz
from hypothesis import given
from hypothesis import strategies as st

from shitu.errors import ShituError
from shitu.weights import load_inference_model, load_pdparams
from shitu.weights.pdparams import unpickle_restricted

FIXTURES = Path(__file__).parent.parent / "fixtures" / "paddle"
REC = "PP-ShiTuV2_rec"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())


# -- pickles that would run code ---------------------------------------------------------------------------


class Reduce:
    """An object whose unpickling calls ``function(*args)``."""

    def __init__(self, function, *args) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def _touch(sentinel: Path) -> str:
    return f"open({str(sentinel)!r}, 'w').close()"


def _opcodes(sentinel: Path, module: str, name: str, argument: str, protocol: int) -> bytes:
    """A hand-written pickle calling ``module.name(argument)`` through GLOBAL (protocol 0-2) or STACK_GLOBAL."""
    arg = argument.encode()
    if protocol == 0:  # GLOBAL, MARK, STRING, TUPLE, REDUCE
        return b"c" + module.encode() + b"\n" + name.encode() + b"\n(S" + repr(argument).encode() + b"\ntR."
    if protocol == 4:

        def short(text: str) -> bytes:
            return b"\x8c" + bytes([len(text)]) + text.encode()

        return (
            b"\x80\x04" + short(module) + short(name) + b"\x93"  # STACK_GLOBAL
            + b"\x8c" + bytes([len(arg)]) + arg + b"\x85R."  # SHORT_BINUNICODE, TUPLE1, REDUCE
        )  # fmt: skip
    raise ValueError(protocol)


def hostile_pickles(sentinel: Path) -> dict[str, bytes]:
    code = _touch(sentinel)
    command = f"touch {sentinel}"
    arrays = {"backbone.w": np.zeros(2, np.float32)}
    nested = {"a": [1, (2, {"b": Reduce(eval, code)})]}
    return {
        "subprocess.Popen": pickle.dumps({**arrays, "x": Reduce(subprocess.Popen, ["touch", str(sentinel)])}),
        "builtins.exec": pickle.dumps({**arrays, "x": Reduce(exec, code)}),
        "os.system (protocol 0)": pickle.dumps({"x": Reduce(os.system, command)}, protocol=0),
        "nested in containers": pickle.dumps({**arrays, "x": nested}, protocol=2),
        "in an object array": pickle.dumps({"x": np.array([Reduce(eval, code)], dtype=object)}),
        "OrderedDict value": pickle.dumps(OrderedDict(x=Reduce(eval, code))),
        "GLOBAL builtins.eval": _opcodes(sentinel, "builtins", "eval", code, 0),
        "GLOBAL __builtin__.eval": _opcodes(sentinel, "__builtin__", "eval", code, 0),
        "GLOBAL builtins.getattr": b"cbuiltins\ngetattr\n(cos\nsystem\nS'x'\ntR.",
        "GLOBAL posix.system": _opcodes(sentinel, "posix", "system", command, 0),
        "STACK_GLOBAL os.system": _opcodes(sentinel, "os", "system", command, 4),
        "STACK_GLOBAL builtins.__import__": _opcodes(sentinel, "builtins", "__import__", "os", 4),
        "STACK_GLOBAL numpy.load": _opcodes(sentinel, "numpy", "load", str(sentinel), 4),
        "INST os.system": b"(S" + repr(command).encode() + b"\nios\nsystem\n.",
        "OBJ os.system": b"(cos\nsystem\nS" + repr(command).encode() + b"\no.",
        "PERSID": b"Pos.system\n.",
        "codecs other than latin-1": b"c_codecs\nencode\n(S'x'\nS'rot13'\ntR.",
        "ndarray.__new__ through NEWOBJ": b"\x80\x02cnumpy\nndarray\nK\x01\x85\x81.",
        "reconstruct of another type": b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncbuiltins\ndict\n)C\x01b\x87R.",
    }


@pytest.mark.parametrize("name", sorted(hostile_pickles(Path("/x"))))
def test_hostile_pickle_runs_nothing(tmp_path, name):
    sentinel = tmp_path / "pwned"
    file = tmp_path / "evil.pdparams"
    file.write_bytes(hostile_pickles(sentinel)[name])
    with pytest.raises(ShituError) as info:
        load_pdparams(file)
    assert_located(info.value, file)
    assert not sentinel.exists()


def test_extension_registry_goes_through_the_allow_list(tmp_path):
    """EXT1 names a global by a number from copyreg's registry: still refused by name."""
    sentinel = tmp_path / "pwned"
    copyreg.add_extension("os", "system", 0xF1)
    try:
        data = b"\x80\x02\x82\xf1S" + repr(f"touch {sentinel}").encode() + b"\n\x85R."
        with pytest.raises(ShituError, match=r"os\.system"):
            unpickle_restricted(data, path=tmp_path / "x.pdparams")
    finally:
        copyreg.remove_extension("os", "system", 0xF1)
    assert not sentinel.exists()


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("memo index 2**31 (LONG_BINPUT)", b"\x80\x02K\x01r\x00\x00\x00\x80."),
        ("bytearray(2 * 10**9)", b"\x80\x02c__builtin__\nbytearray\nJ\x00\x945w\x85R."),
        ("ndarray of 10**9 through NEWOBJ", b"\x80\x02cnumpy\nndarray\nJ\x00\xca\x9a;\x85\x81."),
        (
            "reconstruct of a huge ndarray",
            b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nJ\x00\xca\x9a;\x85C\x01b\x87R.",
        ),
        ("BINBYTES8 claiming 2**62 bytes", b"\x80\x04\x8e" + struct.pack("<Q", 2**62) + b"abc."),
        ("FRAME claiming 2**62 bytes", b"\x80\x04\x95" + struct.pack("<Q", 2**62) + b"K\x01."),
    ],
)
def test_memory_bombs_are_refused_quickly(tmp_path, name, data):
    file = tmp_path / "bomb.pdparams"
    file.write_bytes(data)
    started = time.monotonic()
    with pytest.raises(ShituError) as info:
        load_pdparams(file)
    assert time.monotonic() - started < 2, name
    assert_located(info.value, file)


def test_real_paddle_pickles_still_load():
    state = load_pdparams(FIXTURES / REC / f"{REC}.pdparams")
    reference = np.load(FIXTURES / REC / f"{REC}.npz")
    assert sorted(state) == sorted(reference.files)


def test_cli_import_weights_refuses_a_stack_global_pickle(cli, tmp_path):
    sentinel = tmp_path / "pwned"
    file = tmp_path / "evil.pdparams"
    file.write_bytes(hostile_pickles(sentinel)["STACK_GLOBAL os.system"])
    result = cli("import-weights", file, "-m", REC, "--output", tmp_path / "bundle")
    line = assert_cli_failed_cleanly(result, code=1)
    assert str(file) in line and "os.system" in line
    assert not sentinel.exists() and not (tmp_path / "bundle").exists()


# -- wrong shapes ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_rec():
    """The tiny PP-ShiTuV2_rec of the fixtures (every import below replaces all its weights)."""
    from flax import nnx

    from shitu.models import pplcnetv2

    arch = MANIFEST["models"][REC]["arch"]
    return pplcnetv2.build_pp_shituv2_rec(
        10, rngs=nnx.Rngs(0), scale=arch["scale"], embedding_size=arch["class_expand"]
    )


def _bad_shapes(state: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    conv = next(k for k, v in state.items() if k.startswith("backbone.") and v.ndim == 4)
    bias = next(k for k, v in state.items() if k.endswith(".bias") and v.ndim == 1)
    return {
        "transposed": {conv: state[conv].T},
        "scalar": {conv: np.float32(1.0) * np.ones((), np.float32)},
        "extra axis": {bias: state[bias][None]},
        "empty": {bias: np.zeros((0,), np.float32)},
        "integers": {conv: state[conv].astype(np.int64)},
        "complex": {conv: state[conv].astype(np.complex64)},
    }


@pytest.mark.parametrize("case", ["transposed", "scalar", "extra axis", "empty", "integers", "complex"])
def test_wrong_shapes_and_types_are_skipped_or_refused(tiny_rec, case):
    """Like Paddle's set_dict, a key of another shape is skipped and reported; a wrong type (integers,
    complex numbers: they would be cast into the float parameters without a word) is refused, naming it."""
    from shitu.plugins import get_host
    from shitu.weights.importer import import_paddle_state

    state = load_pdparams(FIXTURES / REC / f"{REC}.pdparams")
    changed = _bad_shapes(state)[case]
    try:
        report = import_paddle_state(get_host().model(REC), tiny_rec, {**state, **changed}, source="x.pdparams")
    except ShituError as exc:
        assert_located(exc, Path("x.pdparams"))
        assert next(iter(changed)) in str(exc)
        assert case in ("integers", "complex"), str(exc)
        return
    assert case not in ("integers", "complex"), "a non-float array was cast silently"
    skipped = {key for key, _, _ in report.skipped}
    assert set(changed) <= skipped, (case, report.skipped)


def test_integer_entries_the_importer_does_not_read_are_ignored(tiny_rec):
    """Only what is loaded is checked: an unused integer entry (a counter, say) does not stop the import."""
    from shitu.plugins import get_host
    from shitu.weights.importer import import_paddle_state

    state = load_pdparams(FIXTURES / REC / f"{REC}.pdparams")
    report = import_paddle_state(get_host().model(REC), tiny_rec, {**state, "step_counter": np.int64(7) * np.ones(1)})
    assert "step_counter" in report.unused and report.loaded


@pytest.mark.parametrize(
    "value", [np.array(["x", "y"]), np.array([b"x"]), np.zeros(2, "datetime64[s]"), np.zeros(2, "i4,f4")]
)
def test_arrays_that_are_not_numbers_are_refused_at_load(tmp_path, value):
    file = tmp_path / "odd.pdparams"
    file.write_bytes(pickle.dumps({"backbone.w": np.zeros(2, np.float32), "neck.b": value}, protocol=2))
    with pytest.raises(ShituError, match=r"'neck\.b' is an array of") as info:
        load_pdparams(file)
    assert_located(info.value, file)


# -- damaged Paddle files: random truncation and byte changes ----------------------------------------------

FILES = {
    "pdparams": [FIXTURES / REC / f"{REC}.pdparams"],
    "pir": sorted((FIXTURES / REC / "inference").iterdir()),
    "legacy": sorted((FIXTURES / REC / "inference_legacy").iterdir()),
}


def _load(kind: str, folder: Path) -> None:
    if kind == "pdparams":
        load_pdparams(folder / f"{REC}.pdparams")
    else:
        load_inference_model(folder).structured_state()


@fuzz(60)
@given(
    kind=st.sampled_from(sorted(FILES)),
    which=st.integers(0, 2),
    cut=st.one_of(st.none(), st.floats(0, 1)),
    changes=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=6),
)
def test_damaged_paddle_files_fail_located_or_load(tmp_path, kind, which, cut, changes):
    folder = tmp_path / "model"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for source in FILES[kind]:
        shutil.copy(source, folder / source.name)
    target = folder / FILES[kind][which % len(FILES[kind])].name
    data = bytearray(target.read_bytes())
    for where, value in changes:
        data[min(int(where * len(data)), len(data) - 1)] = value
    if cut is not None:
        del data[int(cut * len(data)) :]
    target.write_bytes(bytes(data))
    started = time.monotonic()
    try:
        _load(kind, folder)
    except ShituError as exc:
        assert_located(exc)
        assert exc.path is not None and Path(exc.path).parent == folder, str(exc)
    assert time.monotonic() - started < 10  # no size read from the damage is allocated or looped over


@pytest.mark.parametrize(
    "text",
    ["[" * 100_000, '{"base_code": {"magic": "pir"}, "program": {"regions": ' + "[" * 50_000 + "]" * 50_000 + "}}"],
)
def test_deeply_nested_inference_json_is_refused(tmp_path, text):
    folder = tmp_path / "model"
    shutil.copytree(FIXTURES / REC / "inference", folder)
    (folder / "inference.json").write_text(text)
    with pytest.raises(ShituError) as info:
        load_inference_model(folder)
    assert_located(info.value, folder / "inference.json")


def test_pdiparams_sizes_are_checked_before_allocating(tmp_path):
    """A tensor header claiming 2**40 elements: refused from the file's size, not by trying to read it."""
    folder = tmp_path / "model"
    shutil.copytree(FIXTURES / REC / "inference", folder)
    params = folder / "inference.pdiparams"
    data = bytearray(params.read_bytes())
    # first tensor: version u32, lod u64, tensor version u32, desc size i32, then TensorDesc {1: type, 2: dims}
    desc_size = struct.unpack("<i", data[16:20])[0]
    huge = bytes([0x08, 0x05, 0x10]) + _varint(2**20) + bytes([0x10]) + _varint(2**20)  # float32 [2**20, 2**20]
    data[16 : 20 + desc_size] = struct.pack("<i", len(huge)) + huge
    params.write_bytes(bytes(data))
    started = time.monotonic()
    with pytest.raises(ShituError, match="truncated parameters file") as info:
        load_inference_model(folder)
    assert time.monotonic() - started < 2
    assert_located(info.value, params)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


# -- damaged Orbax bundles ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    """A small PP-ShiTuV2_rec bundle (scale 0.25, 16-d embedding, 3 classes) and its parameters."""
    import jax
    from flax import nnx

    from shitu.models.bundle import save_bundle
    from shitu.plugins import get_host

    spec = get_host().model(REC)
    arch = {"scale": 0.25, "embedding_size": 16}
    model = spec.build(3, seed=1, **arch)
    path = save_bundle(tmp_path_factory.mktemp("bundle") / "b", spec=spec, model=model, num_classes=3, arch=arch)
    return path, [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def _params(model) -> list[np.ndarray]:
    import jax
    from flax import nnx

    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def _damage(bundle: Path, target: Path, how: str) -> Path:
    copy = target
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(bundle, copy)
    data_files = sorted((copy / "params" / "d").iterdir(), key=lambda p: -p.stat().st_size)
    files = {
        "truncate the largest array file": (data_files[0], "half"),
        "empty the OCDBT manifest": (copy / "params" / "manifest.ocdbt", "empty"),
        "delete the _METADATA": (copy / "params" / "_METADATA", "delete"),
        "flip a byte of array data": (data_files[0], "flip"),
        "garbage in the array file": (data_files[0], "garbage"),
    }
    file, action = files[how]
    data = file.read_bytes()
    if action == "half":
        file.write_bytes(data[: len(data) // 2])
    elif action == "empty":
        file.write_bytes(b"")
    elif action == "delete":
        file.unlink()
    elif action == "flip":
        middle = bytearray(data)
        middle[len(middle) * 2 // 3] ^= 0xFF
        file.write_bytes(bytes(middle))
    else:
        file.write_bytes(bytes(range(256)) * (len(data) // 256 + 1))
    return copy


DAMAGE = [
    "truncate the largest array file",
    "flip a byte of array data",
    pytest.param("empty the OCDBT manifest", marks=pytest.mark.slow),
    pytest.param("delete the _METADATA", marks=pytest.mark.slow),
    pytest.param("garbage in the array file", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_bundle_is_refused(tiny_bundle, tmp_path, how):
    from shitu.models.bundle import load_bundle

    bundle, _ = tiny_bundle
    damaged = _damage(bundle, tmp_path / "damaged", how)
    with pytest.raises(ShituError) as info:
        load_bundle(damaged)
    assert_located(info.value)
    assert Path(info.value.path).is_relative_to(damaged)


@pytest.mark.slow  # tests/test_bundle.py loads checksummed bundles in the default run
def test_undamaged_tiny_bundle_loads_with_its_checksum(tiny_bundle):
    from shitu.models.bundle import load_bundle, read_bundle_info

    bundle, params = tiny_bundle
    assert len(read_bundle_info(bundle).params_crc32) == 8
    for loaded, saved in zip(_params(load_bundle(bundle).model), params, strict=True):
        np.testing.assert_array_equal(loaded, saved)


@pytest.mark.slow
def test_every_file_of_a_bundle_damaged_every_way(tiny_bundle, tmp_path):
    """Each file of the bundle truncated, emptied, deleted, overwritten: refused, or (a file Orbax does not
    need) loaded with exactly the saved parameters. Never a silently different model."""
    from shitu.models.bundle import load_bundle

    bundle, params = tiny_bundle
    outcomes = {"refused": 0, "same": 0}
    for file in sorted(p for p in bundle.rglob("*") if p.is_file()):
        for action in ("half", "empty", "delete", "garbage", "flip"):
            copy = tmp_path / "copy"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(bundle, copy)
            target = copy / file.relative_to(bundle)
            data = bytearray(target.read_bytes())
            if action == "delete":
                target.unlink()
            elif action == "flip" and data:
                data[len(data) // 2] ^= 0x01
                target.write_bytes(bytes(data))
            else:
                size = {"half": len(data) // 2, "empty": 0}.get(action)
                target.write_bytes(bytes(data[:size]) if size is not None else bytes(range(256)) * 8)
            try:
                model = load_bundle(copy).model
            except ShituError as exc:
                assert_located(exc)
                outcomes["refused"] += 1
                continue
            for loaded, saved in zip(_params(model), params, strict=True):
                np.testing.assert_array_equal(loaded, saved, err_msg=f"{file.name} {action}")
            outcomes["same"] += 1
    print(f"bundle damage: {outcomes}")
    assert outcomes["refused"] > 0


INFO_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8), st.lists(st.integers(), max_size=2)
)


@fuzz(100)
@given(
    changes=st.dictionaries(
        st.sampled_from(["model", "num_classes", "arch", "embedding_size", "input_size", "extra", "format_version"]),
        st.one_of(INFO_VALUES, st.dictionaries(st.text(max_size=6), INFO_VALUES, max_size=2)),
        max_size=3,
    ),
    drop=st.sampled_from([None, "model", "num_classes", "format"]),
)
def test_fuzzed_bundle_descriptions_fail_located(tiny_bundle, tmp_path, changes, drop):
    """shitu_model.json edited: read_bundle_info refuses it located, or load_bundle builds the model or refuses
    it located (options the builder does not take, shapes that do not fit the checkpoint)."""
    from shitu.models.bundle import INFO_FILE, load_bundle, read_bundle_info

    bundle, _ = tiny_bundle
    copy = tmp_path / "edited"
    if not copy.exists():
        shutil.copytree(bundle, copy)
    doc = json.loads((bundle / INFO_FILE).read_text())
    doc.update(changes)
    if drop is not None:
        doc.pop(drop, None)
    (copy / INFO_FILE).write_text(json.dumps(doc))
    try:
        info = read_bundle_info(copy)
    except ShituError as exc:
        assert_located(exc, copy / INFO_FILE)
        return
    assert isinstance(info.num_classes, int) and isinstance(info.arch, dict)
    if set(info.arch) - {"scale", "embedding_size", "dropout_prob", "deploy"}:  # refused before any restore
        with pytest.raises(ShituError) as raised:
            load_bundle(copy)
        assert_located(raised.value, copy / INFO_FILE)


@pytest.mark.parametrize(
    "arch", [{"scale": "x"}, {"nope": 1}, pytest.param({"scale": 0.25, "embedding_size": -3}, marks=pytest.mark.slow)]
)
def test_bundle_options_the_builder_refuses_are_located(tiny_bundle, tmp_path, arch):
    from shitu.models.bundle import INFO_FILE, load_bundle

    bundle, _ = tiny_bundle
    copy = tmp_path / "edited"
    shutil.copytree(bundle, copy)
    doc = json.loads((bundle / INFO_FILE).read_text())
    (copy / INFO_FILE).write_text(json.dumps({**doc, "arch": arch}))
    with pytest.raises(ShituError, match="do not build PP-ShiTuV2_rec") as info:
        load_bundle(copy)
    assert_located(info.value, copy / INFO_FILE)
