"""Retrieval indexes under hostile side files, ``kill -9`` and a second writer (see docs/RELIABILITY.md).

- the side files of an index folder (``index.json``, ``items.jsonl``) fuzzed: :func:`open_index` reads the
  index or refuses it with one located ShituError, never another exception (the checksums are recomputed
  so the parsers themselves are reached, as a hand edit with a matching checksum would);
- ``shitu index build`` killed with SIGKILL before each of its file-system steps, over an existing index
  and as a first build: the folder is always the old index or the new one, never missing or mixed;
- two ``shitu index build`` on one output folder: the second is refused at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import write_image
from hardening_support import SteppedCommand, assert_cli_failed_cleanly, assert_located, fuzz
from hypothesis import example, given
from hypothesis import strategies as st

from shitu.errors import ShituError
from shitu.index.core import INDEX_FILE, INFO_FILE, ITEMS_FILE, build_index, open_index

DIM = 8
COUNT = 12
RECOGNIZER = {"model": "PP-ShiTuV2_rec", "embedding_size": DIM, "input_size": 32, "bundle": None}


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A small index (12 random 8-d vectors, 3 labels) written by build_index."""
    features = np.random.default_rng(0).standard_normal((COUNT, DIM)).astype(np.float32)
    folder = tmp_path_factory.mktemp("index") / "idx"
    paths = [f"/data/img{i}.jpg" for i in range(COUNT)]
    build_index(features, [i % 3 for i in range(COUNT)], paths, output=folder, recognizer_info=RECOGNIZER)
    return folder


def _fresh(template: Path, target: Path) -> Path:
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(template, target)
    return target


def _rechecksum(folder: Path, info: dict) -> dict:
    """``info`` with the checksums (and sizes) of the folder's files as they are now."""
    files = info.get("files")
    if isinstance(files, dict):
        for name in (INDEX_FILE, ITEMS_FILE):
            if isinstance(files.get(name), dict):
                data = (folder / name).read_bytes()
                files[name] = {**files[name], "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    return info


def _open_located_or_sound(folder: Path) -> None:
    """open_index reads a consistent index, or raises one located ShituError naming a file of the folder."""
    try:
        index = open_index(folder, recognizer_info=RECOGNIZER)
    except ShituError as exc:
        assert_located(exc)
        assert exc.path is not None and Path(exc.path).absolute().is_relative_to(folder.absolute()), str(exc)
        return
    assert len(index) == len(index.items) and index.dim >= 1
    if len(index):  # what was read is searchable
        hits = index.search(np.ones(index.dim, np.float32), k=3)[0]
        assert hits and all(-1.01 <= hit.score <= 1.01 for hit in hits)


# -- index.json fuzzed --------------------------------------------------------------------------------------

JSON_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
JSON_VALUE = st.recursive(
    JSON_LEAF,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8,
)
INFO_KEYS = [
    "format",
    "format_version",
    "dim",
    "dtype",
    "metric",
    "graph_metric",
    "graph_scale",
    "count",
    "next_key",
    "files",
    "recognizer",
    "connectivity",
    "expansion_add",
    "expansion_search",
]
# Values close to the valid ones hit more checks than random ones.
NEAR_VALUES = st.sampled_from(
    [0, 1, -1, 7, DIM, DIM + 1, COUNT, COUNT - 1, COUNT + 1, 2**31, 2**63, 2**64, 2**70, True, 1.0, "f16", "i8", "l2"]
)


def _deep(depth: int) -> str:
    return '{"format": ' + "[" * depth + "]" * depth + "}"


@fuzz(200)
@given(
    changes=st.dictionaries(st.sampled_from(INFO_KEYS), st.one_of(NEAR_VALUES, JSON_VALUE), max_size=3),
    drop=st.one_of(st.none(), st.sampled_from(INFO_KEYS)),
    files_entry=st.one_of(st.none(), st.tuples(st.sampled_from([INDEX_FILE, ITEMS_FILE, "x"]), JSON_VALUE)),
    raw=st.one_of(
        st.none(),
        st.binary(max_size=80),
        st.text(max_size=80).map(str.encode),
        st.integers(0, 400).map(lambda cut: ("cut", cut)),
        st.sampled_from([_deep(100_000).encode(), b"1" * 5000, b"\xef\xbb\xbf{}", b"[]", b"null", b'"x"', b"NaN"]),
    ),
)
@example(changes={}, drop=None, files_entry=None, raw=_deep(100_000).encode())
@example(changes={}, drop=None, files_entry=None, raw=b"{" + b'"dim": ' + b"1" * 5000 + b"}")
@example(changes={"expansion_search": 2**70}, drop=None, files_entry=None, raw=None)
@example(changes={"next_key": 2**64}, drop=None, files_entry=None, raw=None)
@example(changes={"dim": 2**70}, drop=None, files_entry=None, raw=None)
def test_fuzzed_index_description_fails_located(template, tmp_path, changes, drop, files_entry, raw):
    folder = _fresh(template, tmp_path / "idx")
    info = json.loads((template / INFO_FILE).read_text())
    info.update(changes)
    if drop is not None:
        info.pop(drop, None)
    if files_entry is not None and isinstance(info.get("files"), dict):
        info["files"][files_entry[0]] = files_entry[1]
    text = json.dumps(info, allow_nan=True).encode()
    if isinstance(raw, tuple):
        text = text[: raw[1]]
    elif raw is not None:
        text = raw
    (folder / INFO_FILE).write_bytes(text)
    _open_located_or_sound(folder)


# -- items.jsonl fuzzed -------------------------------------------------------------------------------------

ITEM_FIELD = st.one_of(
    st.integers(0, COUNT - 1),
    st.integers(-(2**70), 2**70),
    st.sampled_from([2**63, 2**64, 2**64 - 1, -1, True, None, 1.5, "3", "", "\ud800", "x\u2028y", "../x"]),
    JSON_VALUE,
)


@st.composite
def item_lines(draw) -> bytes:
    """Mostly lines of the right shape with hostile values; some broken JSON, raw bytes, deep nesting."""
    lines: list[bytes] = []
    for key in range(draw(st.integers(0, COUNT + 2))):
        kind = draw(st.sampled_from(["good"] * 4 + ["field", "drop", "extra", "json", "bytes", "deep", "blank"]))
        doc: object = {"key": key, "label": key % 3, "path": f"/data/img{key}.jpg"}
        if kind == "field":
            doc[draw(st.sampled_from(["key", "label", "path"]))] = draw(ITEM_FIELD)  # type: ignore[index]
        elif kind == "drop":
            del doc[draw(st.sampled_from(["key", "label", "path"]))]  # type: ignore[attr-defined]
        elif kind == "extra":
            doc[draw(st.text(max_size=5))] = draw(JSON_VALUE)  # type: ignore[index]
        elif kind == "json":
            doc = draw(JSON_VALUE)
        if kind == "bytes":
            line = draw(st.binary(max_size=30))
        elif kind == "deep":
            line = b"[" * 100_000 + b"]" * 100_000
        elif kind == "blank":
            line = draw(st.sampled_from([b"", b" ", b"\t", b"\r"]))
        else:
            line = json.dumps(doc, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
        lines.append(line)
    ending = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
    return draw(st.sampled_from([b"", b"\xef\xbb\xbf"])) + ending.join(lines) + draw(st.sampled_from([b"", ending]))


@fuzz(200)
@given(content=item_lines(), fix_count=st.booleans(), cut=st.one_of(st.none(), st.floats(0, 1)))
@example(content=b'{"key": 18446744073709551616, "label": 0, "path": "x"}\n', fix_count=True, cut=None)
@example(content=b"[" * 100_000 + b"]" * 100_000 + b"\n", fix_count=True, cut=None)
@example(content=b'{"key": 0, "label": 0, "path": "' + b"1" * 5000 + b'"}', fix_count=True, cut=None)
@example(content=b'{"key": 0, "label": ' + b"1" * 5000 + b', "path": "x"}', fix_count=True, cut=None)
def test_fuzzed_items_file_fails_located(template, tmp_path, content, fix_count, cut):
    """items.jsonl rewritten (its checksum updated, and with ``fix_count`` the count too, so the parser and
    the cross-checks are reached): a located error, or an index whose items all exist in the graph."""
    folder = _fresh(template, tmp_path / "idx")
    if cut is not None:
        content = content[: int(cut * len(content))]
    (folder / ITEMS_FILE).write_bytes(content)
    info = _rechecksum(folder, json.loads((template / INFO_FILE).read_text()))
    if fix_count:
        info["count"] = len([line for line in content.splitlines() if line.strip()])
    (folder / INFO_FILE).write_text(json.dumps(info))
    _open_located_or_sound(folder)


@pytest.mark.parametrize("name", [INFO_FILE, ITEMS_FILE, INDEX_FILE])
@pytest.mark.parametrize("how", ["delete", "empty", "folder", "fifo", "link loop"])
def test_side_file_missing_or_not_a_file_is_located(template, tmp_path, name, how):
    folder = _fresh(template, tmp_path / "idx")
    target = folder / name
    target.unlink()
    if how == "empty":
        target.write_bytes(b"")
    elif how == "folder":
        target.mkdir()
    elif how == "fifo":
        os.mkfifo(target)
    elif how == "link loop":
        os.symlink(target.name, target)
    with pytest.raises(ShituError) as info:
        open_index(folder)  # a FIFO is never opened (it would block)
    assert_located(info.value)
    assert Path(info.value.path).absolute().is_relative_to(folder.absolute())


def test_edited_items_without_a_new_checksum_are_refused(template, tmp_path):
    folder = _fresh(template, tmp_path / "idx")
    lines = (folder / ITEMS_FILE).read_text().splitlines(keepends=True)
    (folder / ITEMS_FILE).write_text("".join(lines[:-1]))
    with pytest.raises(ShituError, match="checksum mismatch") as info:
        open_index(folder)
    assert_located(info.value, folder / ITEMS_FILE)


def test_paths_with_line_separators_and_undecodable_bytes_round_trip(tmp_path):
    """The writer keeps non-ASCII as it is: U+2028, U+0085 and U+001C must not split a line when read back;
    a file name that is not UTF-8 (lone surrogates from os.fsdecode) can be saved and reads back the same."""
    paths = ["/a/line\u2028sep.jpg", "/a/next\x85line.jpg", "/a/group\x1csep.jpg", os.fsdecode(b"/a/\xff\xfe.jpg")]
    features = np.eye(len(paths), DIM, dtype=np.float32)
    build_index(features, [0, 1, 2, 3], paths, output=tmp_path / "idx", recognizer_info=RECOGNIZER)
    assert [item.path for item in open_index(tmp_path / "idx").items] == paths


# -- kill -9 during `shitu index build` ---------------------------------------------------------------------

EXCHANGE = "shitu.fileio:_exchange_directories"


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny bundle (PP-ShiTuV2_rec at width 0.25, 32 px) and two gallery lists: old (5 images) and
    new (8 images), in one dataset folder."""
    from shitu.models.bundle import save_bundle
    from shitu.plugins import get_host

    base = tmp_path_factory.mktemp("gallery")
    spec = get_host().model("PP-ShiTuV2_rec")
    arch = {"scale": 0.25}  # (an embedding_size in arch is not what the recognizer reports: see the report)
    bundle = save_bundle(
        base / "bundle", spec=spec, model=spec.build(3, seed=0, **arch), num_classes=3, arch=arch,
        extra={"input_size": 32},
    )  # fmt: skip
    dataset = base / "data"
    lines = []
    for i in range(8):
        write_image(dataset / "images" / f"g{i}.jpg", size=(20, 20), color=(30 * i, 200 - 20 * i, 90))
        lines.append(f"images/g{i}.jpg {i % 3}\n")
    (dataset / "old.txt").write_text("".join(lines[:5]))
    (dataset / "new.txt").write_text("".join(lines))
    return bundle, dataset / "old.txt", dataset / "new.txt"


def _build_args(bundle: Path, listing: Path, output: Path) -> list[str]:
    return ["index", "build", "--model-dir", bundle, "--gallery", listing, "--output", output, "--overwrite", "--json"]


def _listed(listing: Path) -> list[str]:
    return [str((listing.parent / line.split(" ")[0]).absolute()) for line in listing.read_text().splitlines()]


def _state(output: Path) -> list[str] | None:
    """The image paths of the index at ``output`` (None: no index there); open_index must work."""
    if not output.exists():
        return None
    return [item.path for item in open_index(output).items]


def _old_index(bundle: Path, listing: Path, output: Path) -> None:
    """An index of ``listing``'s images as if built with ``bundle`` (random features: written in-process)."""
    paths = _listed(listing)
    features = np.random.default_rng(1).standard_normal((len(paths), 512)).astype(np.float32)
    info = {"model": "PP-ShiTuV2_rec", "embedding_size": 512, "input_size": 32, "bundle": str(bundle)}
    build_index(features, [0] * len(paths), paths, output=output, recognizer_info=info)


def _saving_steps(steps: list[str], folder: Path) -> list[int]:
    """The steps from the save on: after the last one on a file outside ``folder`` (the JAX cache's)."""
    outside = [i for i, step in enumerate(steps) if step.split("\t", 1)[1] not in ("-",) and str(folder) not in step]
    return list(range(outside[-1] + 1 if outside else 0, len(steps)))


@dataclass
class KillScenario:
    """A command on an index (``{out}`` in ``args``), the image paths of the index before and after it, and
    how to finish the job after a kill (the command again, or nothing when the state is already new)."""

    args: list[str]
    old: list[str] | None
    new: list[str]
    prepare: Callable[[Path], None]


def _scenario(kind: str, gallery: tuple[Path, Path, Path]) -> KillScenario:
    bundle, old_list, new_list = gallery
    if kind == "remove":  # `shitu index remove` of two items (by key and by path): the new index lacks them
        every = _listed(new_list)
        args = ["index", "remove", "--index", "{out}", "0", every[3]]
        return KillScenario(args, every, every[1:3] + every[4:], lambda out: _old_index(bundle, new_list, out))
    args = ["index", "build", "--model-dir", bundle, "--gallery", new_list, "--output", "{out}", "--overwrite"]
    if kind == "first-build":
        return KillScenario(args, None, _listed(new_list), lambda out: None)
    return KillScenario(args, _listed(old_list), _listed(new_list), lambda out: _old_index(bundle, old_list, out))


def _command(base: Path, scenario: KillScenario, output: Path) -> SteppedCommand:
    args = [str(output) if arg == "{out}" else arg for arg in scenario.args]
    return SteppedCommand.create(base, args, extra=(EXCHANGE,))


def _fresh_output(base: Path, name: str, scenario: KillScenario) -> Path:
    output = base / name / "idx"
    shutil.rmtree(output.parent, ignore_errors=True)
    output.parent.mkdir(parents=True)
    scenario.prepare(output)
    return output


def _kill_loop(gallery, base: Path, kind: str) -> Counter[str]:
    """The scenario's command killed before each step of its save; after each kill the folder holds the old
    index (or none, before a first build) or the new one, and a rerun finishes the job leaving nothing
    beside the index."""
    scenario = _scenario(kind, gallery)
    probe = _fresh_output(base, "probe", scenario)
    steps, code, stderr = _command(base, scenario, probe).steps()
    assert code == 0, stderr
    assert _state(probe) == scenario.new
    saving = _saving_steps(steps, probe.parent)
    assert len(saving) >= 8, steps
    outcomes: Counter[str] = Counter()
    for step in saving:
        output = _fresh_output(base, f"kill{step}", scenario)
        command = _command(base, scenario, output)
        waiting = command.kill_before(step)
        state = _state(output)  # open_index works (or there is no index yet, before a first build)
        assert state in (scenario.old, scenario.new), (step, waiting, state)
        outcomes["old" if state == scenario.old else "new"] += 1
        if state != scenario.new:  # the command again finishes the job
            rerun = subprocess.run([sys.executable, "-m", "shitu", *command.args], capture_output=True, text=True)
            assert rerun.returncode == 0, rerun.stderr
        else:  # any later save tidies up what the kill left beside the index
            open_index(output).save()
        assert _state(output) == scenario.new
        assert sorted(p.name for p in output.parent.iterdir()) == ["idx"], "leftovers beside the index"
        shutil.rmtree(output.parent)
    outcomes["kills"] = len(saving)
    return outcomes


def test_index_build_held_before_its_swap_refuses_a_second_build_and_survives_a_kill(gallery, tmp_path, cli):
    """The default run's case, for both rows: a real ``shitu index build --overwrite`` stopped when the new
    index is complete beside the old one, about to be swapped in. A second build of the same folder is
    refused at once (the first holds the index's lock); then the first is killed there (SIGKILL): the old
    index is intact, and the next save removes what the kill left beside it."""
    bundle, old_list, _ = gallery
    scenario = _scenario("over-an-index", gallery)
    output = _fresh_output(tmp_path, "run", scenario)
    process = (command := _command(tmp_path, scenario, output)).start()
    try:
        while not (line := process.stdout.readline()).startswith("_exchange_directories"):
            assert line, command.stderr()
            command.go(process)
        started = time.monotonic()
        second = cli(*_build_args(bundle, old_list, output))
        assert time.monotonic() - started < 10  # refused before loading the model
        message = assert_cli_failed_cleanly(second, code=1)
        assert "another shitu command is writing this index" in message and str(output) in message
    finally:
        command.close(process)  # SIGKILL
    assert _state(output) == scenario.old
    leftovers = sorted(p.name for p in output.parent.iterdir() if p.name not in ("idx", ".idx.shitu-lock"))
    assert len(leftovers) == 1 and (output.parent / ".idx.shitu-lock").is_file(), leftovers  # staged index, lock
    assert _state(output.parent / leftovers[0]) == scenario.new  # complete, never used
    open_index(output).save()  # the lock of a killed process is free again
    assert sorted(p.name for p in output.parent.iterdir()) == ["idx"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["over-an-index", "first-build", "remove"])
def test_index_killed_before_every_step_keeps_an_index(gallery, tmp_path, kind):
    outcomes = _kill_loop(gallery, tmp_path, kind)
    print(f"index {kind}: {dict(outcomes)}")
    assert outcomes["old"] >= 1 and outcomes["new"] >= 1, outcomes
