"""The plugin host: built-ins listed, inline plugins (llm style), and broken third-party plugins through real
entry points. A failing plugin is always listed with its error and never stops the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import write_image

import shitu
from shitu import hookimpl
from shitu.data.formats import ConversionPlan, DatasetFormat, Sample, SplitOptions
from shitu.plugins import PluginHost, builtin_plugin_modules, get_host

REPO = Path(__file__).resolve().parents[1]


# -- small inline plugins --------------------------------------------------------------------------------
class Flat(DatasetFormat):
    """A test format: images side by side in the root, the class before the first '_' of the file name."""

    name = "Flat"
    description = "root/<class>_<n>.jpg"
    converts = True

    def convert(self, root: Path, options: SplitOptions | None) -> ConversionPlan:
        images = sorted(p.name for p in root.glob("*.jpg"))
        classes = sorted({name.split("_")[0] for name in images})
        samples = [Sample(name, classes.index(name.split("_")[0])) for name in images]
        split = options or SplitOptions(train=50, gallery=25, query=25)
        return ConversionPlan(shitu.split_samples(samples, split), classes, ["flat: read the file names"])


class Named(DatasetFormat):
    converts = True

    def __init__(self, name: str) -> None:
        self.name = name


class FlatPlugin:
    __name__ = "flat"

    @hookimpl
    def register_dataset_formats(self, register):
        register(Flat())

    @hookimpl
    def detect_dataset_format(self, path):
        return Flat.name if any(path.glob("*_*.jpg")) else None


class Formats:
    """Registers the formats it is given."""

    def __init__(self, *names: str) -> None:
        self.names = names

    @hookimpl
    def register_dataset_formats(self, register):
        for name in self.names:
            register(Named(name))


class RaisesInRegister:
    @hookimpl
    def register_dataset_formats(self, register):
        register(Named("HalfDone"))
        raise RuntimeError("cannot register [/bold] today")


class Detects:
    """A detector that answers ``answer`` (or raises it, when it is an exception) and counts its calls."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.calls = 0

    @hookimpl
    def detect_dataset_format(self, path):
        self.calls += 1
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


def fresh_host(*plugins: tuple[str, object]) -> PluginHost:
    host = PluginHost(load_entry_points=False)
    for name, plugin in plugins:
        host.register(plugin, name=name)
    return host


def flat_dataset(root: Path) -> Path:
    for cls in ("apple", "pear", "plum", "fig"):
        for i in range(4):
            write_image(root / f"{cls}_{i}.jpg", color=(30 * i, 60, 90))
    return root


# -- the built-ins -----------------------------------------------------------------------------------------
def test_plugins_json_lists_the_builtins(cli):
    result = cli("plugins", "--json")
    assert result.code == 0, result.stderr
    assert result.stdout.count("\n") == 1 and result.stdout.endswith("}\n")  # one JSON document
    plugins = {p["name"]: p for p in result.json()["plugins"]}
    for name, fmt in (("shiturec", "ShiTuRecDataset"), ("labelme", "LabelMe")):
        info = plugins[name]
        assert info["dataset_formats"] == [fmt]
        assert info["version"] == shitu.__version__
        assert info["distribution"] == "shitu"
        assert info["builtin"] is True
        assert info["hooks"] == ["detect_dataset_format", "register_dataset_formats"]
        assert info["ok"] is True and info["errors"] == []
        assert info["module"] == f"shitu.builtin.{name}"
    assert "warning" not in result.stderr


def test_plugins_human_listing_goes_to_stderr(cli):
    result = cli("plugins")
    assert result.code == 0
    assert result.stdout == ""
    assert "ShiTuRecDataset" in result.stderr and "(built-in)" in result.stderr


def test_builtins_declared_in_pyproject_are_the_modules_of_shitu_builtin():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["shitu"]
    modules = builtin_plugin_modules()
    assert sorted(v.partition(":")[0] for v in declared.values()) == sorted(modules.values()), (
        "every module of shitu/builtin/ is a built-in plugin and needs its entry point in pyproject.toml"
    )


def test_builtins_load_without_installed_metadata(monkeypatch):
    """Run from a source tree that was never installed: no entry points, the built-ins still load."""
    monkeypatch.setattr("shitu.plugins._find_entry_points", lambda group: ([], []))
    host = PluginHost()
    assert {"shiturec", "labelme"} <= set(host.plugins)
    assert host.plugins["labelme"].builtin and host.plugins["labelme"].version == shitu.__version__
    assert host.dataset_format("labelme").name == "LabelMe"
    assert host.broken == []


# -- inline plugins ------------------------------------------------------------------------------------------
def test_inline_plugin_adds_a_format_that_converts_and_is_listed(cli, tmp_path):
    host = get_host()
    info = host.register(FlatPlugin())
    try:
        assert info.ok and info.name == "flat" and info.dataset_formats == ["Flat"]
        assert info.hooks == ["detect_dataset_format", "register_dataset_formats"]
        listed = {p["name"]: p for p in cli("plugins", "--json").json()["plugins"]}
        assert listed["flat"]["dataset_formats"] == ["Flat"] and listed["flat"]["builtin"] is False
        assert host.dataset_format("FLAT") is host.dataset_format("flat")  # names are case-insensitive

        root = flat_dataset(tmp_path / "flat")
        result = cli("convert", root, "--json")  # detected: the newest plugin is asked first
        assert result.code == 0, result.stderr
        assert result.json()["source_format"] == "Flat"
        assert (root / "label.txt").read_text() == "apple\nfig\npear\nplum\n"
        listed_images = sorted(
            line.split()[0] for split in ("train", "gallery", "query") for line in (root / f"{split}.txt").open()
        )
        assert listed_images == sorted(p.name for p in root.glob("*.jpg"))
        assert "flat: read the file names" in result.stderr
    finally:
        host.unregister("flat")
    assert "flat" not in host.plugins and "flat" not in host.dataset_formats
    assert host.pm.get_plugin("flat") is None


def test_hook_that_raises_loses_its_registrations_and_is_listed(cli):
    host = get_host()
    bad = host.register(RaisesInRegister(), name="raiser")
    good = host.register(Formats("StillHere"), name="good")
    try:
        assert not bad.ok
        assert bad.errors == ["register_dataset_formats raised RuntimeError: cannot register [/bold] today"]
        assert bad.dataset_formats == [] and "halfdone" not in host.dataset_formats
        assert host.pm.get_plugin("raiser") is None
        assert good.ok and host.dataset_format("stillhere").name == "StillHere"
        assert host.dataset_format("labelme").name == "LabelMe"

        result = cli("plugins", "--json")
        assert result.code == 0
        listed = {p["name"]: p for p in result.json()["plugins"]}
        assert listed["raiser"]["ok"] is False and listed["raiser"]["errors"] == bad.errors
        assert listed["good"]["ok"] is True
        warnings = [line for line in result.stderr.splitlines() if "raiser" in line]
        assert warnings == [
            "warning: plugin 'raiser' (RaisesInRegister): register_dataset_formats raised RuntimeError: "
            "cannot register [/bold] today"
        ]

        human = cli("plugins")  # rich markup in an error message is shown, not interpreted
        assert human.code == 0, human.stderr
        assert "[/bold] today" in human.stderr
    finally:
        host.unregister("raiser")
        host.unregister("good")


def test_system_exit_in_a_hook_does_not_exit():
    class Exits:
        @hookimpl
        def register_dataset_formats(self, register):
            sys.exit(3)

    host = fresh_host(("exits", Exits()), ("good", Formats("A")))
    assert host.plugins["exits"].errors == ["register_dataset_formats raised SystemExit: 3"]
    assert list(host.dataset_formats) == ["a"]


def test_a_taken_name_is_refused_naming_the_first_plugin_case_insensitively():
    host = fresh_host(("first", Formats("Thing")), ("second", Formats("THING", "Other")))
    first, second = host.plugins["first"], host.plugins["second"]
    assert first.ok and first.dataset_formats == ["Thing"]
    assert second.errors == ["dataset format 'THING' is already registered by plugin 'first'"]
    assert second.dataset_formats == ["Other"]  # only the taken name is dropped
    assert host.dataset_format("thing").name == "Thing"
    assert host.dataset_format("other").name == "Other"
    assert [info.name for info in host.broken] == ["second"]


def test_a_builtin_name_cannot_be_taken(cli):
    host = get_host()
    info = host.register(Formats("labelMe"), name="impostor")
    try:
        assert info.errors == ["dataset format 'labelMe' is already registered by plugin 'labelme'"]
        assert type(host.dataset_format("labelme")).__module__ == "shitu.builtin.labelme"
        listed = {p["name"]: p for p in cli("plugins", "--json").json()["plugins"]}
        assert listed["impostor"]["ok"] is False
    finally:
        host.unregister("impostor")


def test_a_second_plugin_of_the_same_name_is_refused():
    host = fresh_host(("dup", Formats("One")))
    again = host.register(Formats("Two"), name="dup")
    assert again.errors == ["a plugin named 'dup' is already registered (from Formats); this one is ignored"]
    assert host.plugins["dup"].ok and host.plugins["dup (2)"] is again
    assert "two" not in host.dataset_formats and host.dataset_format("one").name == "One"


def test_registered_items_are_validated():
    class Registers:
        @hookimpl
        def register_dataset_formats(self, register):
            register(Flat)  # the class, not an instance
            register(object())
            register(Named("Fine"))

    info = fresh_host(("sloppy", Registers())).plugins["sloppy"]
    assert info.errors[0] == "register_dataset_formats registered 'Flat', which is a class, not an instance " + (
        "(register(MyFormat()))"
    )
    assert info.errors[1].startswith("register_dataset_formats registered <object object at")
    assert info.errors[1].endswith("which has no name")
    assert info.dataset_formats == ["Fine"]


def test_misspelled_hook_is_reported_not_ignored():
    class Typo:
        @hookimpl
        def register_dataset_format(self, register):  # the hook is register_dataset_formats
            register(Named("Lost"))

    host = fresh_host(("typo", Typo()))
    info = host.plugins["typo"]
    assert info.errors == ["unknown hook 'register_dataset_format' (did you mean 'register_dataset_formats'?)"]
    assert host.pm.get_plugin("typo") is None
    later = host.register(Formats("Later"), name="later")  # the typo does not follow the next plugin around
    assert later.ok
    host.pm.check_pending()


def test_optional_hooks_and_unknown_names_without_a_close_match():
    class Extra:
        @hookimpl(optionalhook=True)
        def some_future_hook(self):
            pass

        @hookimpl
        def register_dataset_formats(self, register):
            register(Named("E"))

    class Unrelated:
        @hookimpl
        def frobnicate(self):
            pass

    host = fresh_host(("extra", Extra()), ("unrelated", Unrelated()))
    assert host.plugins["extra"].ok and host.dataset_format("e").name == "E"
    (error,) = host.plugins["unrelated"].errors
    assert error.startswith("unknown hook 'frobnicate' (known hooks: detect_dataset_format, register_")


def test_hook_wrappers_are_refused():
    class Wraps:
        @hookimpl(wrapper=True)
        def detect_dataset_format(self, path):
            return (yield)

    host = fresh_host(("wraps", Wraps()), ("answers", Detects("X")))
    assert host.plugins["wraps"].errors == [
        "hook wrappers are not supported (detect_dataset_format): each plugin is called alone"
    ]
    assert host.detect_format(Path(".")) == "X"


def test_a_detector_that_raises_is_skipped_and_recorded(tmp_path):
    answers, raises = Detects("Answer"), Detects(ValueError("cannot look at [this]"))
    host = fresh_host(("answers", answers), ("raises", raises))  # 'raises' is newer: asked first
    for _ in range(2):
        assert host.detect_format(tmp_path) == "Answer"
    assert raises.calls == 2 and answers.calls == 2
    assert host.plugins["raises"].errors == ["detect_dataset_format raised ValueError: cannot look at [this]"]
    assert host.plugins["answers"].ok


def test_first_result_wins_and_later_plugins_are_asked_first(tmp_path):
    older, newer, silent = Detects("Older"), Detects("Newer"), Detects(None)
    host = fresh_host(("older", older), ("newer", newer), ("silent", silent))
    assert host.detect_format(tmp_path) == "Newer"
    assert (silent.calls, newer.calls, older.calls) == (1, 1, 0)
    host.unregister("newer")
    assert host.detect_format(tmp_path) == "Older"


def test_tryfirst_and_trylast_are_honoured(tmp_path):
    class Last:
        @hookimpl(trylast=True)
        def detect_dataset_format(self, path):
            return "Last"

    class First:
        @hookimpl(tryfirst=True)
        def detect_dataset_format(self, path):
            return "First"

    assert fresh_host(("first", First()), ("plain", Detects("Plain"))).detect_format(tmp_path) == "First"
    assert fresh_host(("plain", Detects("Plain")), ("last", Last())).detect_format(tmp_path) == "Plain"


def test_detection_names_registered_formats_and_skips_bad_answers(tmp_path):
    host = fresh_host(
        ("formats", Formats("Flat")),
        ("lower", Detects("flat")),
        ("unknown", Detects("Nope")),
        ("object", Detects(Flat)),  # not a name
    )
    assert host.detect_format(tmp_path) == "Nope"  # the newest answers a name nobody registered
    assert host.detect_format(tmp_path, convertible_only=True) == "Flat"  # canonical spelling
    assert host.plugins["object"].errors[0].startswith("detect_dataset_format returned <class ")


def test_hooks_may_take_fewer_arguments_than_the_spec(tmp_path):
    class NoArgs:
        @hookimpl
        def detect_dataset_format(self):
            return "Whatever"

    assert fresh_host(("noargs", NoArgs())).detect_format(tmp_path) == "Whatever"


def test_plugins_registered_with_a_module_or_a_class_object(tmp_path):
    import shitu.builtin.labelme as labelme

    class AsClass:
        @hookimpl
        def register_dataset_formats(register):  # llm style: the class itself is the plugin
            register(Named("Classy"))

    host = PluginHost(load_entry_points=False)
    assert host.register(labelme).name == "shitu.builtin.labelme"
    assert host.register(AsClass).name == "AsClass"
    assert host.broken == []
    assert sorted(host.dataset_formats) == ["classy", "labelme"]
    again = host.register(labelme, name="other")  # the same module twice
    assert again.errors == ["this object is already registered as plugin 'shitu.builtin.labelme'"]
    assert "other" in host.plugins and host.pm.get_plugin("other") is None


def test_unknown_format_suggests_close_names():
    host = fresh_host(("formats", Formats("ImageFolder", "LabelMe")))
    with pytest.raises(shitu.ShituError, match=r"unknown dataset format 'imagefoldr' \(did you mean 'ImageFolder'\?\)"):
        host.dataset_format("imagefoldr")


def test_trace_variable_writes_hook_calls_to_stderr(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("SHITU_TRACE_PLUGINS", raising=False)
    quiet = fresh_host(("answers", Detects("X")))
    quiet.detect_format(tmp_path)
    assert capsys.readouterr().err == ""

    monkeypatch.setenv("SHITU_TRACE_PLUGINS", "1")
    host = fresh_host(("formats", Formats("Traced")), ("answers", Detects("Traced")))
    host.detect_format(tmp_path)
    host.pm.hook.detect_dataset_format(path=tmp_path)  # a direct pluggy call is traced too
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert all(line.startswith("[plugins] ") for line in lines)
    assert "[plugins]   register_dataset_formats [formats] [hook]" in lines
    assert "[plugins]   detect_dataset_format [answers] [hook]" in lines
    assert f"[plugins]       path: {tmp_path!r}" in lines
    assert "[plugins]   finish detect_dataset_format [answers] --> Traced [hook]" in lines
    assert "[plugins]   finish detect_dataset_format --> Traced [hook]" in lines


# -- third-party plugins through real entry points -----------------------------------------------------------
def make_distribution(site: Path, name: str, source: str, entry_points: str) -> None:
    """An installed distribution as pip leaves it: ``<name>.py`` and ``<name>-0.1.dist-info/``."""
    (site / f"{name}.py").write_text(source)
    info = site / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)


def run_shitu(site: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k not in ("SHITU_TRACE_PLUGINS", "SHITU_DEBUG")}
    environment.update(PYTHONPATH=str(site), **env)
    return subprocess.run(
        [sys.executable, "-m", "shitu", *args],
        cwd=site,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def broken_site(tmp_path: Path) -> Path:
    """A folder on PYTHONPATH holding third-party plugins that fail in every way they can."""
    site = tmp_path / "site"
    site.mkdir()
    make_distribution(
        site, "broken_plugin", 'raise RuntimeError("broken at import")\n', "[shitu]\nbroken = broken_plugin\n"
    )
    make_distribution(
        site,
        "raising_plugin",
        "import shitu\n\n@shitu.hookimpl\ndef register_dataset_formats(register):\n"
        "    raise ValueError('no formats today')\n",
        "[shitu]\nraising = raising_plugin\n",
    )
    make_distribution(site, "exiting_plugin", "import sys\nsys.exit(2)\n", "[shitu]\nexiting = exiting_plugin\n")
    make_distribution(site, "missing_attr", "", "[shitu]\nmissing = missing_attr:plugin\n")
    make_distribution(
        site, "impostor_plugin", "import shitu.builtin.shiturec as plugin\n", "[shitu]\nlabelme = impostor_plugin\n"
    )
    make_distribution(site, "garbled_plugin", "", "[shitu]\nthis line has no equals sign\n")
    make_distribution(site, "not_ours", "", "[console_scripts]\nno equals sign here either\n")
    return site


def test_broken_third_party_plugins_are_listed_and_never_stop_the_cli(broken_site, tmp_path):
    result = run_shitu(broken_site, "plugins", "--json")
    assert result.returncode == 0, result.stderr
    plugins = json.loads(result.stdout)["plugins"]
    listed: dict[str, dict] = {}
    for plugin in plugins:
        listed.setdefault(plugin["name"], plugin)  # the first of a name is the one in use

    broken = listed["broken"]
    assert broken["ok"] is False and broken["distribution"] == "broken_plugin" and broken["version"] == "0.1"
    assert broken["errors"] == ["failed to import broken_plugin: RuntimeError: broken at import"]
    assert listed["raising"]["errors"] == ["register_dataset_formats raised ValueError: no formats today"]
    assert listed["raising"]["hooks"] == ["register_dataset_formats"]
    assert listed["exiting"]["errors"] == ["failed to import exiting_plugin: SystemExit: 2"]
    assert listed["missing"]["errors"][0].startswith("failed to import missing_attr:plugin: AttributeError")
    (impostor,) = [p for p in plugins if p["distribution"] == "impostor_plugin"]
    assert impostor["name"] == "labelme" and impostor["dataset_formats"] == []
    assert impostor["errors"] == ["a plugin named 'labelme' is already registered (from shitu); this one is ignored"]
    assert listed["garbled_plugin"]["errors"][0].startswith("cannot read the entry points of garbled_plugin: ")
    assert "not_ours" not in listed  # a broken package that is no shitu plugin is none of our business
    for name in ("shiturec", "labelme"):
        assert listed[name]["ok"] is True and listed[name]["builtin"] is True
    assert listed["labelme"]["dataset_formats"] == ["LabelMe"]

    for name in ("broken", "raising", "exiting", "missing", "garbled_plugin"):
        warnings = [line for line in result.stderr.splitlines() if f"plugin '{name}'" in line]
        assert len(warnings) == 1 and warnings[0].startswith("warning: "), result.stderr
    assert "Traceback" not in result.stderr

    check = run_shitu(broken_site, "check", "--demo", "--output", str(tmp_path / "out"))
    assert check.returncode == 0, check.stderr
    assert "warning: plugin 'broken' (broken_plugin): failed to import broken_plugin: RuntimeError" in check.stderr
    assert "Check dataset passed" in check.stderr
    assert (tmp_path / "out" / "check_dataset_result.json").is_file()


def test_debug_variable_shows_the_plugin_traceback(broken_site):
    result = run_shitu(broken_site, "plugins", "--json", SHITU_DEBUG="1")
    assert result.returncode == 0
    assert 'raise RuntimeError("broken at import")' in result.stderr


def test_trace_variable_in_a_real_run(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    result = run_shitu(site, "plugins", "--json", SHITU_TRACE_PLUGINS="1")
    assert result.returncode == 0, result.stderr
    json.loads(result.stdout)  # the trace never touches stdout
    lines = result.stderr.splitlines()
    assert "[plugins] loading plugin shiturec from shitu.builtin.shiturec [load]" in lines
    assert "[plugins]   register_dataset_formats [shiturec] [hook]" in lines
    assert "[plugins]   finish register_dataset_formats [shiturec] --> None [hook]" in lines


def test_a_third_party_detector_is_asked_before_the_builtins(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    make_distribution(
        site,
        "greedy_plugin",
        "import shitu\n\n@shitu.hookimpl\ndef detect_dataset_format(path):\n    return 'LabelMe'\n",
        "[shitu]\ngreedy = greedy_plugin\n",
    )
    dataset = tmp_path / "data"
    write_image(dataset / "images" / "a.jpg")
    (dataset / "notes.csv").write_text("not an ImageFolder either\n")
    result = run_shitu(site, "convert", str(dataset))
    assert result.returncode == 1
    assert "label.txt is missing" in result.stderr  # the greedy plugin's answer won: LabelMe was tried


def test_a_model_spec_with_a_bad_recipe_is_refused():
    from shitu.models.spec import ModelSpec, TrainingRecipe

    class Models:
        @hookimpl
        def register_models(self, register):
            register(ModelSpec(name="NoRecipe", description="", builder="m:f", config="c"))
            register(ModelSpec(name="BadRecipe", description="", builder="m:f", config="c", recipe="m:loss"))
            odd = TrainingRecipe(loss="m:l", train_transform="m:t", sampler="random")
            register(ModelSpec(name="OddSampler", description="", builder="m:f", config="c", recipe=odd))

    info = fresh_host(("models", Models())).plugins["models"]
    assert info.models == ["NoRecipe"]
    assert info.errors == [
        "register_models registered 'BadRecipe', which has a recipe that is not a shitu.models.TrainingRecipe "
        "(or None)",
        "register_models registered 'OddSampler', which has a recipe whose sampler 'random' is neither 'pk' nor "
        "'shuffle'",
    ]
