"""Tests for shitu.config: shipped YAMLs, override type rules, messages, and loading files."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from shitu.config import Config, available_configs, load_config
from shitu.errors import ShituError

REC = "PP-ShiTuV2_rec"
CLIP_BASE = "PP-ShiTuV2_rec_CLIP_vit_base"
CLIP_LARGE = "PP-ShiTuV2_rec_CLIP_vit_large"

# Expected type of every key of the shipped configs (NoneType: default null, accepts any scalar).
NONE = type(None)
SCHEMA: dict[str, type] = {
    "Global.model": str,
    "Global.dataset_dir": NONE,
    "Global.device": str,
    "Global.output": str,
    "Global.seed": int,
    "CheckDataset.sample_num": int,
    "CheckDataset.num_workers": int,
    "CheckDataset.max_image_pixels": int,
    "CheckDataset.convert.enable": bool,
    "CheckDataset.convert.src_dataset_type": NONE,
    "CheckDataset.split.enable": bool,
    "CheckDataset.split.train_percent": NONE,
    "CheckDataset.split.gallery_percent": NONE,
    "CheckDataset.split.query_percent": NONE,
    "CheckDataset.split.seed": int,
    "CheckDataset.split.by": str,
    "Train.num_classes": NONE,
    "Train.epochs_iters": int,
    "Train.batch_size": int,
    "Train.learning_rate": float,
    "Train.warmup_steps": int,
    "Train.weight_decay": NONE,
    "Train.input_size": int,
    "Train.sample_per_id": int,
    "Train.pretrain_weight_path": str,
    "Train.log_interval": int,
    "Train.eval_interval": int,
    "Train.save_interval": int,
    "Train.sampler": str,
    "Train.model_scale": float,
    "Train.num_workers": int,
    "Train.precision": str,
    "Train.checkpoints_to_keep": int,
    "Evaluate.weight_path": NONE,
    "Evaluate.batch_size": int,
    "Evaluate.sim_block_size": int,
    "Predict.model_dir": NONE,
    "Predict.input": NONE,
    "Predict.batch_size": int,
}

LIST_YAML = """\
Lists:
  ints: [1, 2]
  floats: [0.5, 1.5]
  mixed_numbers: [1, 0.5]
  strs: [a, b]
  bools: [true]
  empty: []
"""


def leaves(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested sections into {dotted key: value}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.fixture(scope="module")
def rec() -> Config:
    return load_config(REC)


def error_of(cfg: Config, *overrides: str) -> str:
    with pytest.raises(ShituError) as info:
        cfg.with_overrides(list(overrides))
    return str(info.value)


# ------------------------------------------------------------------------------------------------
# Shipped configs
# ------------------------------------------------------------------------------------------------


def test_available_configs() -> None:
    assert available_configs() == [REC, CLIP_BASE, CLIP_LARGE]


@pytest.mark.parametrize("name", [REC, CLIP_BASE, CLIP_LARGE])
def test_shipped_config_loads_with_typed_keys(name: str) -> None:
    cfg = load_config(name)
    assert cfg.source == name
    assert cfg.overrides == []
    assert list(cfg) == ["Global", "CheckDataset", "Train", "Evaluate", "Predict"]
    flat = leaves(cfg.to_dict())
    expected = dict(SCHEMA)
    if name != REC:
        del expected["Train.sample_per_id"]  # rec only
        del expected["Train.model_scale"]
    assert set(flat) == set(expected)
    for key, kind in expected.items():
        assert type(flat[key]) is kind, key
        if kind is NONE:
            assert flat[key] is None
    assert cfg.get("Global.model") == name
    assert cfg.get("Global.device") == "cpu"
    assert cfg.get("Global.output") == "output"
    assert cfg.get("CheckDataset.max_image_pixels") == 89478485
    assert cfg.get("CheckDataset.split.by") == "image"
    assert cfg.get("Train.epochs_iters") == 20
    assert cfg.get("Train.warmup_steps") == 5
    assert cfg.get("Evaluate.sim_block_size") == 64
    assert cfg.get("Predict.batch_size") == 1


def test_model_specific_defaults() -> None:
    rec, base, large = (load_config(n) for n in (REC, CLIP_BASE, CLIP_LARGE))
    assert rec["Train"]["batch_size"] == 128
    assert rec["Train"]["learning_rate"] == 0.01
    assert rec["Train"]["sample_per_id"] == 4
    for clip in (base, large):
        assert clip["Train"]["batch_size"] == 32
        assert clip["Train"]["learning_rate"] == 0.001
        assert "sample_per_id" not in clip["Train"]


@pytest.mark.parametrize("name", [REC, CLIP_BASE, CLIP_LARGE])
def test_every_key_accepts_its_own_value_as_text(name: str) -> None:
    cfg = load_config(name)
    flat = leaves(cfg.to_dict())
    texts = []
    for key, value in flat.items():
        text = value if isinstance(value, str) else yaml.safe_dump(value).split("\n")[0]
        texts.append(f"{key}={text}")
    again = cfg.with_overrides(texts)
    assert again.to_dict() == cfg.to_dict()
    assert again.overrides == list(flat)


# ------------------------------------------------------------------------------------------------
# Override type rules
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("false", False), ("True", True), ("False", False), (" true ", True)],
)
def test_bool_accepts_true_false(rec: Config, text: str, expected: bool) -> None:
    cfg = rec.with_overrides([f"CheckDataset.split.enable={text}"])
    assert cfg.get("CheckDataset.split.enable") is expected


@pytest.mark.parametrize("text", ["yes", "no", "on", "1", "0", "", "null", "maybe"])
def test_bool_refuses_other_text(rec: Config, text: str) -> None:
    message = error_of(rec, f"CheckDataset.split.enable={text}")
    assert f"'CheckDataset.split.enable={text}'" in message
    assert "expects bool (true or false)" in message
    if text not in ("", "null"):
        assert f"got {text!r}" in message


@pytest.mark.parametrize(("text", "expected"), [("32", 32), ("-1", -1), ("+7", 7), (" 64", 64)])
def test_int_accepts_integers(rec: Config, text: str, expected: int) -> None:
    value = rec.with_overrides([f"Train.batch_size={text}"]).get("Train.batch_size")
    assert value == expected
    assert type(value) is int


@pytest.mark.parametrize("text", ["1.5", "1e3", "true", "abc", "0x10", "1_000", "[1]"])
def test_int_refuses_non_integers(rec: Config, text: str) -> None:
    message = error_of(rec, f"Train.batch_size={text}")
    assert message == (f"invalid override 'Train.batch_size={text}': 'Train.batch_size' expects int, got {text!r}")


def test_int_refuses_null(rec: Config) -> None:
    message = error_of(rec, "Train.batch_size=null")
    assert "'Train.batch_size' can't be null" in message
    assert "expects int" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0.5", 0.5), ("1", 1.0), ("1e-3", 0.001), ("1E-3", 0.001), (".5", 0.5), ("-2.5e+2", -250.0)],
)
def test_float_accepts_numbers(rec: Config, text: str, expected: float) -> None:
    value = rec.with_overrides([f"Train.learning_rate={text}"]).get("Train.learning_rate")
    assert value == expected
    assert type(value) is float


@pytest.mark.parametrize("text", ["abc", "true", "nan", "inf", "1e999", "[0.1]", "1,5"])
def test_float_refuses_other_text(rec: Config, text: str) -> None:
    message = error_of(rec, f"Train.learning_rate={text}")
    assert message.endswith(f"'Train.learning_rate' expects float, got {text!r}")
    assert f"'Train.learning_rate={text}'" in message


def test_float_refuses_null(rec: Config) -> None:
    assert "can't be null" in error_of(rec, "Train.learning_rate=~")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("123", "123"), ("gpu:0", "gpu:0"), ("true", "true"), ("", ""), ("a=b", "a=b")],
)
def test_str_takes_raw_text(rec: Config, text: str, expected: str) -> None:
    assert rec.with_overrides([f"Global.output={text}"]).get("Global.output") == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("70", 70),
        ("70.5", 70.5),
        ("true", True),
        ("null", None),
        ("", None),
        ("/data/my set", "/data/my set"),
        ("photo #1.jpg", "photo #1.jpg"),
        ("[draft] photos", "[draft] photos"),
        ("1e-3", 0.001),
    ],
)
def test_null_default_accepts_any_scalar(rec: Config, text: str, expected: Any) -> None:
    value = rec.with_overrides([f"Predict.input={text}"]).get("Predict.input")
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize("text", ["[1, 2]", "{a: 1}"])
def test_null_default_refuses_collections(rec: Config, text: str) -> None:
    message = error_of(rec, f"Train.num_classes={text}")
    assert "'Train.num_classes' expects a scalar (str, int, float or bool) or null" in message
    assert text in message


def test_nested_key(rec: Config) -> None:
    cfg = rec.with_overrides(["CheckDataset.split.enable=true", "CheckDataset.split.train_percent=70"])
    assert cfg["CheckDataset"]["split"]["train_percent"] == 70
    assert cfg.get("CheckDataset.split.enable") is True
    assert cfg.overrides == ["CheckDataset.split.enable", "CheckDataset.split.train_percent"]


def test_assigning_a_section_is_an_error(rec: Config) -> None:
    message = error_of(rec, "CheckDataset.split=70")
    assert "'CheckDataset.split=70'" in message
    assert "'CheckDataset.split' is a section" in message
    assert "Train" in error_of(rec, "Train=1") and "is a section" in error_of(rec, "Train=1")


def test_key_inside_a_scalar_is_an_error(rec: Config) -> None:
    message = error_of(rec, "Train.batch_size.x=1")
    assert message == (
        "invalid override 'Train.batch_size.x=1': 'Train.batch_size' is not a section "
        "(its value is 128), so it has no key 'x'"
    )


def list_config() -> Config:
    return Config(yaml.safe_load(LIST_YAML), source="lists")


@pytest.mark.parametrize(
    ("key", "text", "expected"),
    [
        ("ints", "[3, 4, 5]", [3, 4, 5]),
        ("ints", "[]", []),
        ("floats", "[1, 1e-3, 0.5]", [1.0, 0.001, 0.5]),
        ("mixed_numbers", "[2, 2.5]", [2.0, 2.5]),
        ("strs", "[x, 'y z']", ["x", "y z"]),
        ("bools", "[false, true]", [False, True]),
        ("empty", "[1, a, null]", [1, "a", None]),
    ],
)
def test_list_accepts_matching_elements(key: str, text: str, expected: list[Any]) -> None:
    cfg = list_config().with_overrides([f"Lists.{key}={text}"])
    assert cfg.to_dict()["Lists"][key] == expected
    assert cfg.get(f"Lists.{key}") == tuple(expected)  # read-only view


@pytest.mark.parametrize(
    ("key", "text", "expected_type"),
    [
        ("ints", "[1, 2.5]", "list of int"),
        ("ints", "3", "list of int"),
        ("ints", "[1, 2", "list of int"),
        ("strs", "[1]", "list of str"),
        ("bools", "[1]", "list of bool (true or false)"),
        ("floats", "[a]", "list of float"),
        ("ints", "[null]", "list of int"),
    ],
)
def test_list_refuses_bad_elements(key: str, text: str, expected_type: str) -> None:
    message = error_of(list_config(), f"Lists.{key}={text}")
    assert f"'Lists.{key}={text}'" in message
    assert expected_type in message


def test_list_from_python() -> None:
    cfg = list_config().with_overrides({"Lists.floats": (1, 2.5), "Lists.strs": []})
    assert cfg.to_dict()["Lists"]["floats"] == [1.0, 2.5]
    assert cfg.to_dict()["Lists"]["strs"] == []
    with pytest.raises(ShituError, match="list of int"):
        list_config().with_overrides({"Lists.ints": ["1"]})


# ------------------------------------------------------------------------------------------------
# Unknown keys and malformed overrides
# ------------------------------------------------------------------------------------------------


def test_did_you_mean(rec: Config) -> None:
    assert error_of(rec, "Train.epoch_iters=5") == (
        "unknown config key 'Train.epoch_iters'; did you mean 'Train.epochs_iters'?"
    )
    assert error_of(rec, "Trian.batch_size=5").startswith(
        "unknown config key 'Trian.batch_size'; did you mean 'Train.batch_size'"
    )
    assert error_of(rec, "CheckDataset.split.train_percnt=1") == (
        "unknown config key 'CheckDataset.split.train_percnt'; "
        "did you mean 'CheckDataset.split.train_percent' or 'CheckDataset.split.query_percent'?"
    )


def test_did_you_mean_same_key_in_other_sections(rec: Config) -> None:
    assert error_of(rec, "batch_size=5") == (
        "unknown config key 'batch_size'; did you mean "
        "'Train.batch_size', 'Evaluate.batch_size' or 'Predict.batch_size'?"
    )


def test_unknown_key_without_close_match_lists_choices(rec: Config) -> None:
    assert error_of(rec, "Foo.bar=1") == (
        "unknown config key 'Foo.bar'; sections are: Global, CheckDataset, Train, Evaluate, Predict"
    )
    message = error_of(rec, "Train.zzz=1")
    assert message.startswith("unknown config key 'Train.zzz'; keys of 'Train' are: ")
    assert "epochs_iters" in message and "batch_size" in message


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("Train.batch_size", "missing '='"),
        ("=5", "empty key"),
        ("  =5", "empty key"),
        ("Train..batch_size=5", "empty part"),
        ("Train.=5", "empty part"),
        (".Train=5", "empty part"),
    ],
)
def test_malformed_override(rec: Config, text: str, reason: str) -> None:
    message = error_of(rec, text)
    assert message.startswith(f"malformed override {text!r}: ")
    assert reason in message


def test_non_string_override_is_an_error(rec: Config) -> None:
    with pytest.raises(ShituError, match="malformed override 5"):
        rec.with_overrides([5])  # type: ignore[list-item]


def test_value_may_contain_equals(rec: Config) -> None:
    assert rec.with_overrides(["Predict.input=a=b"]).get("Predict.input") == "a=b"


# ------------------------------------------------------------------------------------------------
# Python API
# ------------------------------------------------------------------------------------------------


def test_mapping_overrides() -> None:
    cfg = load_config(
        REC,
        {
            "Train.batch_size": 16,
            "Train.learning_rate": 1,
            "CheckDataset.split.train_percent": 70,
            "Global.dataset_dir": "/data",
            "Global.output": "out",
        },
    )
    assert cfg.get("Train.batch_size") == 16
    assert cfg.get("Train.learning_rate") == 1.0
    assert type(cfg.get("Train.learning_rate")) is float
    assert cfg.get("CheckDataset.split.train_percent") == 70
    assert cfg.get("Global.dataset_dir") == "/data"
    assert cfg.overrides == [
        "Train.batch_size",
        "Train.learning_rate",
        "CheckDataset.split.train_percent",
        "Global.dataset_dir",
        "Global.output",
    ]


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("Train.batch_size", "16", "expects int, got '16' (str)"),
        ("Train.batch_size", True, "expects int, got True (bool)"),
        ("Train.batch_size", 1.0, "expects int, got 1.0 (float)"),
        ("Train.learning_rate", math.nan, "expects float"),
        ("Train.learning_rate", "0.1", "expects float, got '0.1' (str)"),
        ("Global.output", 123, "expects str, got 123 (int)"),
        ("Global.output", None, "can't be null"),
        ("CheckDataset.split.enable", 1, "expects bool (true or false), got 1 (int)"),
        ("Train.num_classes", [1], "expects a scalar"),
        ("Train.epoch_iters", 5, "did you mean 'Train.epochs_iters'?"),
    ],
)
def test_mapping_overrides_are_validated(key: str, value: Any, fragment: str) -> None:
    with pytest.raises(ShituError) as info:
        load_config(REC, {key: value})
    assert fragment in str(info.value)


def test_null_default_accepts_python_scalars(rec: Config) -> None:
    for value in (None, 3, 0.5, True, "x"):
        assert rec.with_overrides({"Train.num_classes": value}).get("Train.num_classes") == value


def test_later_override_wins_and_keys_are_listed_once(rec: Config) -> None:
    cfg = rec.with_overrides(["Train.batch_size=8", "Global.seed=3", "Train.batch_size=4"])
    assert cfg.get("Train.batch_size") == 4
    assert cfg.overrides == ["Train.batch_size", "Global.seed"]
    cfg2 = cfg.with_overrides({"Predict.batch_size": 2})
    assert cfg2.overrides == ["Train.batch_size", "Global.seed", "Predict.batch_size"]
    assert cfg2.source == REC


def test_with_overrides_leaves_original_unchanged(rec: Config) -> None:
    changed = rec.with_overrides(["Train.batch_size=8"])
    assert rec.get("Train.batch_size") == 128
    assert changed.get("Train.batch_size") == 8
    assert rec.overrides == []


def test_config_is_read_only(rec: Config) -> None:
    with pytest.raises(TypeError):
        rec["Train"]["batch_size"] = 1  # type: ignore[index]
    with pytest.raises(TypeError):
        rec["CheckDataset"]["split"]["seed"] = 1  # type: ignore[index]
    data = rec.to_dict()
    data["Train"]["batch_size"] = 1
    data["CheckDataset"]["split"]["seed"] = 9
    assert rec.get("Train.batch_size") == 128
    assert rec.get("CheckDataset.split.seed") == 0
    overrides = rec.overrides
    overrides.append("x")
    assert rec.overrides == []


def test_get(rec: Config) -> None:
    assert rec.get("Train.batch_size") == 128
    assert rec.get("CheckDataset.split")["by"] == "image"
    assert rec.get("Train.nope", 5) == 5
    with pytest.raises(ShituError, match=r"did you mean 'Train\.batch_size'"):
        rec.get("Train.batchsize")
    with pytest.raises(ShituError, match="is not a section"):
        rec.get("Train.batch_size.x")
    with pytest.raises(KeyError):
        rec["Nope"]


def test_to_yaml_keeps_order_and_round_trips(rec: Config, tmp_path: Path) -> None:
    text = rec.with_overrides(["Train.batch_size=8"]).to_yaml()
    assert text.index("Global:") < text.index("CheckDataset:") < text.index("Train:")
    assert text.index("num_classes:") < text.index("epochs_iters:")
    path = tmp_path / "dumped.yaml"
    path.write_text(text, encoding="utf-8")
    again = load_config(path)
    assert again.get("Train.batch_size") == 8
    assert again.to_dict() == rec.with_overrides(["Train.batch_size=8"]).to_dict()


# ------------------------------------------------------------------------------------------------
# Loading files and names
# ------------------------------------------------------------------------------------------------


def test_load_yaml_path(tmp_path: Path) -> None:
    path = tmp_path / "my.yaml"
    path.write_text("Global:\n  model: mine\n  seed: 1\nTrain:\n  lr: 0.5\n", encoding="utf-8")
    cfg = load_config(str(path), ["Train.lr=2", "Global.seed=7"])
    assert cfg.source == str(path)
    assert cfg.get("Train.lr") == 2.0
    assert cfg.get("Global.seed") == 7
    assert load_config(path).source == str(path)  # os.PathLike too


def test_yaml_syntax_error_reports_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("Global:\n  model: x\nTrain:\n  batch_size: [1, 2\n  lr: 3\n")
    with pytest.raises(ShituError) as info:
        load_config(path)
    err = info.value
    assert err.path == str(path)
    assert err.line is not None and err.line >= 4
    assert str(err).startswith(f"{path}:{err.line}: invalid YAML: ")


def test_yaml_bad_indentation_reports_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("Global:\n  model: x\n   seed: 1\n")
    with pytest.raises(ShituError) as info:
        load_config(path)
    assert info.value.line == 3


def test_duplicate_key_reports_line(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("Train:\n  batch_size: 1\n  batch_size: 2\n")
    with pytest.raises(ShituError, match="duplicate key 'batch_size'") as info:
        load_config(path)
    assert info.value.line == 3


@pytest.mark.parametrize(
    ("text", "fragment", "line"),
    [
        ("- a\n- b\n", "the top level must be a mapping of sections, got a list", 1),
        ("", "empty config", None),
        ("Global:\n  seed: 0\nTrain: 5\n", "section 'Train' must be a mapping of keys", 3),
        ("Global:\n  seed: 0\n  a.b: 1\n", "keys must not contain '.'", 3),
        ("Global:\n  1: x\n", "keys must be strings", 2),
        ("Global:\n  seed: 0\n  when: 2024-01-01\n", "unsupported value for 'Global.when'", 3),
    ],
)
def test_bad_structure(tmp_path: Path, text: str, fragment: str, line: int | None) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(ShituError, match=fragment) as info:
        load_config(path)
    assert info.value.line == line
    assert info.value.path == str(path)


def test_unknown_model_name_suggests_close_matches() -> None:
    with pytest.raises(ShituError) as info:
        load_config("PP-ShiTuV2_recc")
    message = str(info.value)
    assert message.startswith("unknown model config 'PP-ShiTuV2_recc'")
    assert "did you mean 'PP-ShiTuV2_rec'" in message
    with pytest.raises(ShituError, match="available: PP-ShiTuV2_rec, "):
        load_config("resnet")


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ShituError, match="config file not found") as info:
        load_config(missing)
    assert info.value.path == str(missing)
    with pytest.raises(ShituError, match="the built-in config is named 'PP-ShiTuV2_rec'"):
        load_config("PP-ShiTuV2_rec.yaml")


def test_invalid_utf8_reports_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"Global:\n  model: caf\xe9\n")
    with pytest.raises(ShituError, match="not valid UTF-8") as info:
        load_config(path)
    assert info.value.line == 2


# ------------------------------------------------------------------------------------------------
# Property: arbitrary override text fails only with ShituError
# ------------------------------------------------------------------------------------------------

REC_CONFIG = load_config(REC)
LIST_CONFIG = list_config()
KNOWN_KEYS = sorted(leaves(REC_CONFIG.to_dict())) + [f"Lists.{key}" for key in yaml.safe_load(LIST_YAML)["Lists"]]
YAMLISH = st.sampled_from(
    ["[", "]", "{", "}", ",", ":", " ", "'", '"', "&a", "*a", "!!", "#", "-", ".", "1", "e", "null"]
)


def apply_both(overrides: list[str]) -> None:
    for cfg in (REC_CONFIG, LIST_CONFIG):
        try:
            cfg.with_overrides(overrides)
        except ShituError as exc:
            assert str(exc)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=40), max_size=3))
def test_arbitrary_overrides_raise_only_shitu_error(overrides: list[str]) -> None:
    apply_both(overrides)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(KNOWN_KEYS),
    st.one_of(st.text(max_size=30), st.lists(YAMLISH, max_size=12).map("".join)),
)
def test_arbitrary_values_for_known_keys_raise_only_shitu_error(key: str, value: str) -> None:
    apply_both([f"{key}={value}"])


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from(KNOWN_KEYS),
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(),
        st.text(max_size=10),
        st.lists(st.one_of(st.integers(), st.floats(), st.text(max_size=5)), max_size=3),
        st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
    ),
)
def test_arbitrary_python_values_raise_only_shitu_error(key: str, value: Any) -> None:
    for cfg in (REC_CONFIG, LIST_CONFIG):
        try:
            cfg.with_overrides({key: value})
        except ShituError as exc:
            assert str(exc)


def test_a_config_shipped_in_a_plugin_package(tmp_path: Path, monkeypatch) -> None:
    package = tmp_path / "shipped_pkg"
    (package / "configs").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "model.py").write_text("")
    (package / "configs" / "tiny.yaml").write_text("Global:\n  model: Tiny\nTrain:\n  batch_size: 8\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = load_config("shipped_pkg:configs/tiny.yaml", ["Train.batch_size=4"])
    assert (config.get("Global.model"), config.get("Train.batch_size")) == ("Tiny", 4)
    beside_a_module = load_config("shipped_pkg.model:configs/tiny.yaml")  # resolved in the module's package
    assert beside_a_module.get("Train.batch_size") == 8
    with pytest.raises(ShituError, match="cannot be read"):
        load_config("shipped_pkg:configs/missing.yaml")
    with pytest.raises(ShituError, match="cannot import no_such_pkg"):
        load_config("no_such_pkg:configs/tiny.yaml")
