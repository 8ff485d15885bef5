"""Model bundles and `shitu import-weights`: Paddle state → bundle → the same features."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from shitu.errors import ShituError
from shitu.models.bundle import load_bundle, read_bundle_info


@pytest.fixture(scope="module")
def paddle_state():
    """A PP-ShiTuV2_rec state in PaddleClas' names and layouts (7 classes), from a random model."""
    from shitu.models.pplcnetv2 import export_paddle_state
    from shitu.plugins import get_host

    model = get_host().model("PP-ShiTuV2_rec").build(7, seed=3)
    return {k: np.asarray(v) for k, v in export_paddle_state(model).items()}


def _features(model, size=64, seed=0):
    images = np.random.default_rng(seed).normal(size=(2, size, size, 3)).astype(np.float32)
    model.eval()
    return np.asarray(model(images))


def _write_pdparams(path, state):
    with open(path, "wb") as handle:
        pickle.dump(state, handle, protocol=2)  # paddle.save writes a pickle of name -> ndarray
    return path


def test_import_weights_round_trip(cli, tmp_path, paddle_state):
    from shitu.models.pplcnetv2 import import_paddle_state
    from shitu.plugins import get_host

    file = _write_pdparams(tmp_path / "rec.pdparams", paddle_state)
    result = cli("import-weights", file, "--model", "PP-ShiTuV2_rec", "--output", tmp_path / "bundle", "--json")
    assert result.code == 0, result.stderr
    doc = result.json()
    assert doc["num_classes"] == 7 and doc["skipped"] == [] and doc["source"] == "pdparams"
    info = read_bundle_info(tmp_path / "bundle")
    assert (info.model, info.num_classes) == ("PP-ShiTuV2_rec", 7)

    reference = get_host().model("PP-ShiTuV2_rec").build(7, seed=99)
    import_paddle_state(reference, paddle_state)
    loaded = load_bundle(tmp_path / "bundle")
    np.testing.assert_array_equal(_features(loaded.model), _features(reference))


def test_head_of_another_size_is_skipped_and_reported(cli, tmp_path, paddle_state):
    file = _write_pdparams(tmp_path / "rec.pdparams", paddle_state)
    result = cli(
        "import-weights", file, "-m", "PP-ShiTuV2_rec", "--output", tmp_path / "b", "--num-classes", "3", "--json"
    )
    assert result.code == 0, result.stderr
    skipped = result.json()["skipped"]
    assert skipped == [{"key": "head.fc.weight", "file_shape": [512, 7], "model_shape": [512, 3]}]
    assert "skipped head.fc.weight" in result.stderr


def test_missing_key_is_an_error_and_writes_nothing(cli, tmp_path, paddle_state):
    state = dict(paddle_state)
    del state["backbone.last_conv.bias"]
    file = _write_pdparams(tmp_path / "rec.pdparams", state)
    result = cli("import-weights", file, "-m", "PP-ShiTuV2_rec", "--output", tmp_path / "b")
    assert result.code == 1
    assert "backbone.last_conv.bias" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()


def test_hostile_pickle_is_refused_and_runs_nothing(cli, tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    file = tmp_path / "evil.pdparams"
    file.write_bytes(pickle.dumps({"backbone.x": Exploit()}))
    result = cli("import-weights", file, "-m", "PP-ShiTuV2_rec", "--output", tmp_path / "b")
    assert result.code == 1
    assert "refusing" in result.stderr and "system" in result.stderr
    assert not marker.exists()
    assert not (tmp_path / "b").exists()


def test_not_a_bundle_and_corrupt_bundle(tmp_path, paddle_state, cli):
    with pytest.raises(ShituError, match="not a shitu model bundle"):
        read_bundle_info(tmp_path)
    file = _write_pdparams(tmp_path / "rec.pdparams", paddle_state)
    assert cli("import-weights", file, "-m", "PP-ShiTuV2_rec", "--output", tmp_path / "b").code == 0
    info_file = tmp_path / "b" / "shitu_model.json"
    doc = json.loads(info_file.read_text())
    doc["model"] = "PP-ShiTuV2_rec_CLIP_vit_base"  # another model's shapes: the checkpoint does not fit
    info_file.write_text(json.dumps(doc))
    with pytest.raises(ShituError, match="cannot restore the checkpoint"):
        load_bundle(tmp_path / "b")


def test_output_not_empty_is_refused(cli, tmp_path, paddle_state):
    file = _write_pdparams(tmp_path / "rec.pdparams", paddle_state)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("mine")
    result = cli("import-weights", file, "-m", "PP-ShiTuV2_rec", "--output", tmp_path / "b")
    assert result.code == 1 and "--overwrite" in result.stderr
    assert (tmp_path / "b" / "keep.txt").read_text() == "mine"
