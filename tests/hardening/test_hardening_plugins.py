"""Plugins that misbehave (issue 7), beyond tests/test_plugins.py (which covers a plugin that raises at
import, in a registration hook or in its detector, exits, misspells a hook, or takes a taken name): a format
plugin whose ``validate``/``convert`` raises or returns garbage, plans that name files outside the dataset,
and exceptions or objects that cannot even be printed. Each is reported against the plugin, the others go
on, and nothing is written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tree_digest, write_image
from hardening_support import assert_located

from shitu import hookimpl
from shitu.data.convert import convert_dataset
from shitu.data.formats import ConversionPlan, DatasetFormat, Issue, Sample
from shitu.errors import ShituError
from shitu.plugins import PluginHost, PluginInfo, iter_plugin_errors


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no message for you")


class Scripted(DatasetFormat):
    """A format whose validate() and convert() do what the test says."""

    converts = True

    def __init__(self, name: str, *, validate=None, convert=None) -> None:
        self.name = name
        self._validate, self._convert = validate, convert

    def validate(self, root: Path) -> list[Issue]:
        return self._validate(root) if self._validate else []

    def convert(self, root: Path, options) -> ConversionPlan:
        return self._convert(root)


def raising(exc: BaseException):
    def act(root: Path):
        raise exc

    return act


def plan(*paths: str, labels: tuple[object, ...] = (0, 1, 2)) -> ConversionPlan:
    samples = [Sample(p, label) for p, label in zip(paths, labels, strict=True)]  # type: ignore[arg-type]
    return ConversionPlan({"train": samples[:1], "gallery": samples[1:2], "query": samples[2:]})


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for name in ("a", "b", "c"):
        write_image(root / "images" / f"{name}.jpg", size=(8, 8))
    write_image(tmp_path / "outside.jpg", size=(8, 8))
    os.symlink(tmp_path / "outside.jpg", root / "images" / "link.jpg")
    return root


def host_with(fmt: DatasetFormat) -> PluginHost:
    class Plugin:
        @hookimpl
        def register_dataset_formats(self, register):
            register(fmt)

    host = PluginHost(load_entry_points=False)
    host.register(Plugin(), name="scripted")
    assert host.dataset_format(fmt.name) is fmt
    return host


GOOD = ("images/a.jpg", "images/b.jpg", "images/c.jpg")
CASES = {
    "validate raises": (Scripted("V", validate=raising(RuntimeError("boom"))), "plugin failed in validate(): Runtime"),
    "validate exits": (Scripted("V", validate=raising(SystemExit(3))), "failed in validate(): SystemExit: 3"),
    "validate returns text": (Scripted("V", validate=lambda root: "all fine"), "did not return a list of Issue"),
    "convert raises": (Scripted("C", convert=raising(KeyError("k"))), "failed in convert(): KeyError: 'k'"),
    "convert raises unprintable": (Scripted("C", convert=raising(Unprintable())), "failed in convert(): Unprintable"),
    "convert returns a dict": (Scripted("C", convert=lambda root: {"train": []}), "did not return a ConversionPlan"),
    "path with ..": (Scripted("C", convert=lambda root: plan("../data/images/a.jpg", *GOOD[1:])), "through '..'"),
    "absolute path": (Scripted("C", convert=lambda root: plan(str(root / GOOD[0]), *GOOD[1:])), "absolute image path"),
    "link out": (Scripted("C", convert=lambda root: plan("images/link.jpg", *GOOD[1:])), "resolves outside"),
    "missing image": (Scripted("C", convert=lambda root: plan("images/zzz.jpg", *GOOD[1:])), "image not found"),
    "folder as image": (Scripted("C", convert=lambda root: plan("images", *GOOD[1:])), "is a folder"),
    "newline in path": (Scripted("C", convert=lambda root: plan("images/a.jpg\n1", *GOOD[1:])), "line break"),
    "label is text": (Scripted("C", convert=lambda root: plan(*GOOD, labels=(0, "1", 2))), "is not a Sample"),
    "label is bool": (Scripted("C", convert=lambda root: plan(*GOOD, labels=(0, True, 2))), "is not a Sample"),
    "label over int64": (Scripted("C", convert=lambda root: plan(*GOOD, labels=(0, 2**63, 2))), "64-bit integer"),
    "a list that is text": (
        Scripted("C", convert=lambda root: ConversionPlan({"train": "images/a.jpg 0", "gallery": [], "query": []})),
        "lists are not lists of Sample",
    ),
    "notes not a list": (
        Scripted("C", convert=lambda root: ConversionPlan(plan(*GOOD).lists, None, 3)),  # type: ignore[arg-type]
        "notes are not a list of strings",
    ),
    "class names not text": (
        Scripted("C", convert=lambda root: ConversionPlan(plan(*GOOD).lists, [1, 2])),
        "class names are not a list of strings",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_misbehaving_format_plugin_is_one_located_error_and_writes_nothing(folder, case):
    fmt, fragment = CASES[case]
    before = tree_digest(folder)
    with pytest.raises(ShituError) as info:
        convert_dataset(folder, source_format=fmt.name, host=host_with(fmt))
    assert fragment in str(info.value)
    assert_located(info.value, folder)
    assert tree_digest(folder) == before


def test_a_well_behaved_scripted_format_converts(folder):
    fmt = Scripted("Fine", convert=lambda root: plan(*GOOD))
    name, written, _ = convert_dataset(folder, source_format="Fine", host=host_with(fmt))
    assert name == "Fine" and written.counts == {"train": 1, "gallery": 1, "query": 1}


class UnprintableInHook:
    @hookimpl
    def register_dataset_formats(self, register):
        raise Unprintable()


class NameRaises(DatasetFormat):
    converts = True

    @property
    def name(self) -> str:  # type: ignore[override]
        raise RuntimeError("no name")


class BadRepr:
    name = None

    def __repr__(self) -> str:
        raise RuntimeError("no repr")


class WeirdRegistrations:
    @hookimpl
    def register_dataset_formats(self, register):
        register(NameRaises())
        register(BadRepr())
        register(Scripted("StillFine", convert=lambda root: plan(*GOOD)))


class AnswersUnprintable:
    @hookimpl
    def detect_dataset_format(self, path):
        return BadRepr()


def test_exceptions_and_objects_that_cannot_be_printed_are_still_reported(tmp_path):
    host = PluginHost(load_entry_points=False)
    host.register(UnprintableInHook(), name="unprintable")
    host.register(WeirdRegistrations(), name="weird")
    host.register(AnswersUnprintable(), name="answers")
    assert host.detect_format(tmp_path) is None
    errors = {info.name: info.errors for info in host.plugins.values()}
    assert errors["unprintable"] == ["register_dataset_formats raised Unprintable: (its message cannot be shown)"]
    assert errors["weird"] == [
        "register_dataset_formats registered an item whose name raised RuntimeError: no name",
        "register_dataset_formats registered a BadRepr, which has no name",
    ]
    assert errors["answers"] == ["detect_dataset_format returned a BadRepr, not a format name"]
    assert host.dataset_format("StillFine").name == "StillFine"  # the good registration of a faulty plugin stays

    def load_module() -> object:
        raise Unprintable()

    host._load(PluginInfo("import-time", "unprintable_module"), load_module)  # as an entry point's import
    assert host.plugins["import-time"].errors == [
        "failed to import unprintable_module: Unprintable: (its message cannot be shown)"
    ]
    assert len(list(iter_plugin_errors(host))) == 5


def test_a_third_party_format_that_raises_in_convert_is_one_line_on_the_cli(tmp_path, folder):
    site = tmp_path / "site"
    site.mkdir()
    (site / "crashing_format.py").write_text(
        "import shitu\nfrom shitu.data.formats import DatasetFormat\n\n"
        "class Crashing(DatasetFormat):\n"
        "    name = 'Crashing'\n    converts = True\n\n"
        "    def convert(self, root, options):\n        raise ZeroDivisionError('division by zero')\n\n"
        "@shitu.hookimpl\ndef register_dataset_formats(register):\n    register(Crashing())\n"
    )
    info = site / "crashing_format-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: crashing-format\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[shitu]\ncrashing = crashing_format\n")
    before = tree_digest(folder)
    env = {k: v for k, v in os.environ.items() if k not in ("SHITU_DEBUG", "SHITU_TRACE_PLUGINS")}
    result = subprocess.run(
        [sys.executable, "-m", "shitu", "convert", str(folder), "--from", "crashing"],
        env={**env, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: {folder}: the Crashing format plugin failed in convert(): ZeroDivisionError: division by zero"
    ]
    assert tree_digest(folder) == before
