"""Fuzzing every parser of user files (issue 7): list files, LabelMe annotations and label.txt, config YAML
and ``-o`` overrides. The contract: no crash, only a ShituError of one line naming the file (and the line
where there is one), or located issues; a few examples of each also go through the command line.

Example counts are in docs/RELIABILITY.md; ``SHITU_FUZZ_SCALE`` multiplies them.
"""

from __future__ import annotations

import json
import os
import shutil
import string
from pathlib import Path

import pytest
import yaml
from conftest import write_image
from hardening_support import assert_cli_failed_cleanly, assert_located, fuzz
from hypothesis import example, given
from hypothesis import strategies as st

from shitu.builtin.labelme import LabelMe
from shitu.config import MAX_YAML_VALUES, load_config
from shitu.data.check import check_dataset
from shitu.data.convert import convert_dataset
from shitu.data.formats import SPLITS, Sample
from shitu.data.lists import format_lines, parse_line, path_problem, read_list
from shitu.errors import ShituError

INT64 = (-(2**63), 2**63 - 1)

# -- strategies -------------------------------------------------------------------------------------------

SEGMENTS = st.one_of(
    st.sampled_from(
        ["images", "c0", "img0.jpg", "..", ".", "", "a b", "ä 名.jpg", "x" * 300, "C:", "\\", "~", " ", "\t", "\x00"]
    ),
    st.text(max_size=8),
)
LIST_PATHS = st.lists(SEGMENTS, max_size=5).map("/".join)
LABELS = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.sampled_from(["", "1.5", "0x10", "+3", "-0", "١", "1e3", " 1", "nan", "1_000", "٣"]),
    st.text(max_size=5),
)
LIST_LINES = st.tuples(LIST_PATHS, st.sampled_from([" ", "  ", "\t", "", " \t"]), LABELS).map("".join)
VALID_LINES = st.sampled_from(["images/c0/img0.jpg 0", "images/c1/img0.jpg 1", "images/with space/ä.jpg 2"])


@st.composite
def list_files(draw: st.DrawFn) -> bytes:
    """The bytes of a list file: grammar-built lines (valid ones among them), any line ending, or raw bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=300))
    lines = draw(st.lists(st.one_of(LIST_LINES, VALID_LINES), max_size=12))
    endings = draw(st.lists(st.sampled_from(["\n", "\r\n", "\r", ""]), min_size=len(lines), max_size=len(lines)))
    text = "".join(line + end for line, end in zip(lines, endings, strict=True))
    data = text.encode("utf-8", "surrogatepass")  # lone surrogates: bytes that are not valid UTF-8
    return (b"\xef\xbb\xbf" if draw(st.booleans()) else b"") + data


JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=10)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=8,
)
IMAGE_PATHS = st.one_of(
    st.sampled_from(
        [
            "../images/a.jpg",
            "a.jpg",
            "..\\images\\b.jpg",
            "/abs/a.jpg",
            "../../outside/secret.jpg",
            "../images/link.jpg",
            "../images/loop.jpg",
            "../images/fifo.jpg",
            "x" * 300 + ".jpg",
            "../" * 40 + "etc/passwd",
            "",
            " ",
            "a.jpg\x00",
            "../images/",
            ".",
            "..",
        ]
    ),
    st.text(max_size=20),
    JSON_VALUES,
)
FLAG_NAMES = st.one_of(st.sampled_from(["cat", "dog", "bird", "fish", "", "Cat", "cat "]), st.text(max_size=5))
FLAGS = st.one_of(st.dictionaries(FLAG_NAMES, st.one_of(st.booleans(), JSON_SCALARS), max_size=4), JSON_VALUES)
DOCUMENTS = st.one_of(
    st.fixed_dictionaries(
        {"imagePath": IMAGE_PATHS, "flags": FLAGS}, optional={"shapes": JSON_VALUES, "version": JSON_SCALARS}
    ),
    JSON_VALUES,
)
ANNOTATION_BYTES = st.one_of(
    DOCUMENTS.map(lambda doc: json.dumps(doc).encode()),
    DOCUMENTS.map(lambda doc: json.dumps(doc).encode()[:-3]),  # truncated
    st.binary(max_size=120),
    st.sampled_from(
        [
            b"[" * 100_000,  # nested deeper than the JSON parser recurses
            b"1" * 5000,  # an integer over Python's 4300-digit limit
            b'{"imagePath": "a.jpg", "flags": {"cat": true}, "flags": {"dog": true}}',
            b'\xef\xbb\xbf{"imagePath": "b.jpg", "flags": {"dog": true}}',
            b'{"imagePath": "a.jpg", "flags": {"cat": true}}',
        ]
    ),
)
LABEL_FILES = st.one_of(
    st.lists(
        st.one_of(st.sampled_from(["cat", "dog", "bird", "", " ", "cat", "fish\r"]), st.text(max_size=6)), max_size=5
    )
    .map("\n".join)
    .map(lambda text: text.encode("utf-8", "surrogatepass")),
    st.binary(max_size=60),
)

YAML_TOKENS = st.sampled_from(
    [
        "Global:",
        "Train:",
        "CheckDataset:",
        "\n",
        "  ",
        "- ",
        ": ",
        "key",
        "batch_size",
        "&a ",
        "*a",
        "<<: *a",
        "!!python/object/apply:os.system ['touch {sentinel}']",
        "!!python/name:os.system",
        "!!binary aGk=",
        "!!timestamp 2001-12-14",
        "!!set {a, b}",
        "? ",
        "[",
        "]",
        "{",
        "}",
        ",",
        "'",
        '"',
        "#",
        "---\n",
        "...\n",
        "%YAML 1.1\n",
        "1e400",
        "0x1F",
        ".inf",
        ".nan",
        "~",
        "9" * 5000,
        "\t",
        "\x00",
        "\ufeff",
        "\x85",
        "2001-12-14",
        "a.b",
        "a=b",
    ]
)
SECTION_NAMES = st.one_of(st.sampled_from(["Global", "Train", "Eval", "a.b", "a=b", " x", ""]), st.text(max_size=6))
PLAIN_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(SECTION_NAMES, inner, max_size=3)),
    max_leaves=10,
)
CONFIG_DATA = st.one_of(st.dictionaries(SECTION_NAMES, PLAIN_VALUES, max_size=4), PLAIN_VALUES)


def line_count(data: bytes) -> int:
    return data.count(b"\n") + 1


# -- list files (train/gallery/query.txt) ----------------------------------------------------------------


@fuzz(200)
@given(data=list_files())
@example(data=b"images/c0/img0.jpg 0\r\n\n \nimages/c0/img0.jpg 0\nno-label\n/etc/passwd 1\n../x.jpg 2\n")
@example(data=b"a 99999999999999999999\n\xff\xfe 1\nimages/\x00.jpg 1\n")
def test_list_parser_accounts_for_every_line(tmp_path, data):
    """read_list never raises; every non-blank line becomes an entry or a located issue; every entry is safe."""
    (tmp_path / "train.txt").write_bytes(data)
    parsed = read_list(tmp_path, "train")
    shown = str(tmp_path / "train.txt")
    total = line_count(data)
    for issue in parsed.issues:
        assert issue.file == shown
        assert issue.line is None or 1 <= issue.line <= total
        assert "\n" not in str(issue)
    raw = data.removeprefix(b"\xef\xbb\xbf").split(b"\n")
    entry_lines = [e.line for e in parsed.entries]
    assert entry_lines == sorted(set(entry_lines))
    for entry in parsed.entries:
        text = raw[entry.line - 1].removesuffix(b"\r").decode("utf-8")
        assert parse_line(text) == (entry.sample.path, entry.sample.label)
        assert path_problem(entry.sample.path) is None
        assert INT64[0] <= entry.sample.label <= INT64[1]
    located = set(entry_lines) | {i.line for i in parsed.issues if i.line is not None}
    for number, line in enumerate(raw, start=1):
        if line.strip(b" \t\r\n\x0b\x0c") and number <= total:
            try:
                blank = not line.decode("utf-8").strip()
            except UnicodeDecodeError:
                blank = False
            assert blank or number in located, f"line {number} ({line!r}) silently dropped"


@fuzz(100)
@given(paths=st.lists(LIST_PATHS, max_size=6), labels=st.lists(st.integers(*INT64), min_size=6, max_size=6))
def test_written_lists_read_back_identically_or_are_refused(tmp_path, paths, labels):
    """What format_lines writes, read_list reads back sample for sample; what it cannot write it refuses."""
    samples = [Sample(p, label) for p, label in zip(paths, labels, strict=False)]
    try:
        data = format_lines(samples)
    except ShituError as exc:
        assert_located(exc)
        assert any(path_problem(s.path) or "\n" in s.path or "\r" in s.path for s in samples)
        return
    (tmp_path / "gallery.txt").write_bytes(data)
    parsed = read_list(tmp_path, "gallery")
    unique = list(dict.fromkeys(samples))
    if unique:
        assert [e.sample for e in parsed.entries] == unique, parsed.issues
        assert [i.code for i in parsed.issues if i.severity == "error"] == []


@pytest.fixture
def small_dataset(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    for c in range(2):
        write_image(root / f"images/c{c}/img0.jpg", size=(16, 16), color=(90 * c, 40, 40))
    write_image(root / "images/with space/ä.jpg", size=(16, 16))
    (root / "gallery.txt").write_text("images/c0/img0.jpg 0\nimages/c1/img0.jpg 1\n")
    (root / "query.txt").write_text("images/c0/img0.jpg 0\n")
    return root


@fuzz(60)
@given(data=list_files())
def test_check_on_fuzzed_lists_reports_located_issues(small_dataset, data):
    (small_dataset / "train.txt").write_bytes(data)
    result = check_dataset(small_dataset, output=None, num_workers=1)
    files = {str(small_dataset / f"{split}.txt") for split in SPLITS}
    total = line_count(data)
    for issue in result.issues:
        assert issue.file in files, issue
        assert issue.line is None or 1 <= issue.line <= total, issue
        assert "\n" not in str(issue)
    assert set(result.images) <= {"images/c0/img0.jpg", "images/c1/img0.jpg", "images/with space/ä.jpg"}


@fuzz(3)
@given(data=list_files())
def test_cli_check_on_fuzzed_lists(cli, small_dataset, tmp_path, data):
    (small_dataset / "train.txt").write_bytes(data)
    result = cli("check", small_dataset, "--json", "--output", tmp_path / "out")
    assert result.code in (0, 1), result.stderr
    doc = json.loads(result.stdout)
    assert doc["check_pass"] is (result.code == 0)
    for line in result.stderr.splitlines():
        assert line.startswith(("error: ", "warning: ")), line
    assert "Traceback" not in result.stderr


# -- LabelMe annotations and label.txt --------------------------------------------------------------------


def labelme_root(base: Path, label_txt: bytes, annotations: list[bytes]) -> Path:
    root = base / "labelme"
    shutil.rmtree(root, ignore_errors=True)
    write_image(root / "images" / "a.jpg", size=(8, 8))
    write_image(root / "images" / "b.jpg", size=(8, 8), color=(1, 2, 3))
    secret = base / "outside" / "secret.jpg"
    if not secret.exists():
        write_image(secret, size=(8, 8))
    os.symlink(secret, root / "images" / "link.jpg")
    os.symlink("loop.jpg", root / "images" / "loop.jpg")
    os.mkfifo(root / "images" / "fifo.jpg")
    (root / "label.txt").write_bytes(label_txt)
    (root / "annotations").mkdir()
    for number, data in enumerate(annotations):
        (root / "annotations" / f"{number:02d}.json").write_bytes(data)
    return root


def assert_converted_safely(root: Path, label_txt: bytes) -> None:
    """The lists written name only regular files inside the root, with labels of label.txt."""
    classes = len([line for line in label_txt.decode("utf-8-sig").split("\n") if line.strip()])
    real_root = root.resolve()
    for split in SPLITS:
        parsed = read_list(root, split)
        assert parsed.entries and not [i for i in parsed.issues if i.severity == "error"]
        for entry in parsed.entries:
            target = (root / entry.sample.path).resolve()
            assert target.is_relative_to(real_root) and target.is_file(), entry
            assert 0 <= entry.sample.label < classes


@fuzz(100)
@given(label_txt=LABEL_FILES, annotations=st.lists(ANNOTATION_BYTES, min_size=1, max_size=5))
@example(label_txt=b"cat\ndog\nbird\n", annotations=[b"[" * 100_000, b"1" * 5000])
@example(
    label_txt=b"cat\ndog\n",
    annotations=[
        json.dumps({"imagePath": p, "flags": {"cat": True}}).encode() for p in ("../images/loop.jpg", "x" * 300)
    ],
)
def test_labelme_validate_and_convert_only_raise_located_errors(tmp_path, label_txt, annotations):
    root = labelme_root(tmp_path, label_txt, annotations)
    issues = LabelMe().validate(root)
    for issue in issues:
        assert Path(issue.file).is_relative_to(root), issue
        assert issue.line is None or issue.line >= 1
        assert "\n" not in str(issue)
    try:
        convert_dataset(root, source_format="LabelMe")
    except ShituError as exc:
        assert_located(exc)
        assert exc.path is not None and Path(exc.path).is_relative_to(root), str(exc)
        assert not any((root / f"{split}.txt").exists() for split in SPLITS)  # refused: nothing written
    else:
        assert not [i for i in issues if i.severity == "error"]
        assert_converted_safely(root, label_txt)
    assert (root / "label.txt").read_bytes() == label_txt  # never rewritten


@fuzz(8)
@given(label_txt=LABEL_FILES, annotations=st.lists(ANNOTATION_BYTES, min_size=3, max_size=5))
def test_cli_convert_on_fuzzed_labelme(cli, tmp_path, label_txt, annotations):
    root = labelme_root(tmp_path, label_txt, annotations)
    result = cli("convert", root, "--json")
    if result.code == 0:
        assert json.loads(result.stdout)["source_format"] == "LabelMe"
        assert_converted_safely(root, label_txt)
    else:
        assert_cli_failed_cleanly(result, code=1)


# -- configs: YAML files given to load_config, and -o overrides ------------------------------------------


@fuzz(150)
@given(tokens=st.lists(YAML_TOKENS, max_size=25), noise=st.text(max_size=20))
@example(tokens=["Global:", "\n", "  ", "key", ": ", "!!python/object/apply:os.system ['touch {sentinel}']"], noise="")
@example(tokens=["Global:", "\n", "  ", "key", ": ", "&a ", "[", "*a", "]"], noise="")
def test_config_yaml_loads_or_fails_located_and_runs_nothing(tmp_path, tokens, noise):
    sentinel = tmp_path / "pwned"
    text = "".join(tokens).replace("{sentinel}", str(sentinel)) + noise
    file = tmp_path / "fuzz.yaml"
    file.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        config = load_config(file)
    except ShituError as exc:
        assert_located(exc, file, lines=line_count(file.read_bytes()))
    else:
        assert all(isinstance(section, str) for section in config)
        yaml.safe_load(config.to_yaml())  # what it read is plain data, written back as YAML
    assert not sentinel.exists()


@fuzz(100)
@given(data=CONFIG_DATA)
def test_config_structure_round_trips_or_fails_located(tmp_path, data):
    file = tmp_path / "structured.yaml"
    file.write_text(yaml.safe_dump(data, allow_unicode=True))
    try:
        config = load_config(file)
    except ShituError as exc:
        assert_located(exc, file, lines=line_count(file.read_bytes()))
        return
    assert config.to_dict() == data


def alias_bomb(levels: int, width: int = 10) -> str:
    lines = ["a0: &a0 [" + ", ".join(["x"] * width) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "Global:\n" + "".join(f"  {line}\n" for line in lines)


@pytest.mark.parametrize("levels", [6, 9, 30])
def test_yaml_alias_bomb_is_refused_quickly(tmp_path, levels):
    """A 'billion laughs' config: a few lines whose aliases expand to 10^levels values."""
    import time

    file = tmp_path / "bomb.yaml"
    file.write_text(alias_bomb(levels))
    started = time.monotonic()
    with pytest.raises(ShituError, match="expands to more than") as info:
        load_config(file)
    assert time.monotonic() - started < 2
    assert_located(info.value, file)


def test_yaml_aliases_within_the_limit_still_load(tmp_path):
    file = tmp_path / "aliases.yaml"
    file.write_text(alias_bomb(4))  # 11,110 values
    assert len(load_config(file).get("Global.a3")) == 10


def test_yaml_alias_limit_is_above_real_configs():
    from shitu.config import available_configs

    for name in available_configs():
        assert len(load_config(name).to_yaml()) < MAX_YAML_VALUES


OVERRIDE_KEYS = st.one_of(
    st.sampled_from(
        [
            "Global.output",
            "Global.device",
            "Train.batch_size",
            "Train.learning_rate",
            "CheckDataset.split.enable",
            "CheckDataset.split.train_percent",
            "Global",
            "Global.output.x",
            "..",
            "Global..output",
            "Train.batch_size ",
        ]
    ),
    st.text(alphabet=string.ascii_letters + "._=", max_size=20),
)
OVERRIDE_VALUES = st.one_of(
    st.lists(YAML_TOKENS, max_size=8).map("".join),
    st.text(max_size=20),
    st.sampled_from(
        [
            "[&a [1,1,1,1,1,1,1,1,1,1], [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]]",
            "&a [*a]",
            "!!python/object/apply:os.system ['touch {sentinel}']",
            "[!!python/object/apply:os.system ['touch {sentinel}']]",
            "1" * 5000,
            "1e999",
            "[1, [2, [3]]]",
        ]
    ),
)


@fuzz(100)
@given(pairs=st.lists(st.tuples(OVERRIDE_KEYS, OVERRIDE_VALUES), max_size=3))
def test_overrides_are_one_line_errors_and_run_nothing(tmp_path, pairs):
    sentinel = tmp_path / "pwned"
    overrides = [f"{key}={value}".replace("{sentinel}", str(sentinel)) for key, value in pairs]
    try:
        load_config("PP-ShiTuV2_rec", overrides)
    except ShituError as exc:
        assert_located(exc)
    assert not sentinel.exists()


@fuzz(10)
@given(pairs=st.lists(st.tuples(OVERRIDE_KEYS, OVERRIDE_VALUES), min_size=1, max_size=2))
def test_cli_overrides_fail_with_one_line(cli, tmp_path, pairs):
    """``shitu check MISSING -o ...``: a bad override, else the missing folder, is the one error line."""
    sentinel = tmp_path / "pwned"
    args = [arg for key, value in pairs for arg in ("-o", f"{key}={value}".replace("{sentinel}", str(sentinel)))]
    result = cli("check", tmp_path / "missing", *args)
    assert_cli_failed_cleanly(result)
    assert not sentinel.exists()


@fuzz(6)
@given(tokens=st.lists(YAML_TOKENS, min_size=1, max_size=15))
def test_cli_model_yaml_fails_with_one_line(cli, tmp_path, tokens):
    sentinel = tmp_path / "pwned"
    file = tmp_path / "model.yaml"
    file.write_bytes("".join(tokens).replace("{sentinel}", str(sentinel)).encode("utf-8", "surrogatepass"))
    result = cli("check", tmp_path / "missing", "--model", file)
    line = assert_cli_failed_cleanly(result)
    assert str(file) in line or str(tmp_path / "missing") in line
    assert not sentinel.exists()
