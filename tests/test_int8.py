"""int8 post-training quantization of the exported graph, calibrated on the user's images (tiny PP-ShiTuV2_rec
at 32 px): its features stay within cosine 0.99 of shitu's fp32 ones on the calibration images, the quantized
graph is cached per calibration set, and int8 without calibration images is a one-line error."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("jax2onnx")
pytest.importorskip("onnxruntime")

SIZE = 32
MIN_COSINE = 0.99


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    patch = pytest.MonkeyPatch()
    patch.setenv("SHITU_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    yield
    patch.undo()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from shitu.models.bundle import save_bundle
    from shitu.plugins import get_host

    spec = get_host().model("PP-ShiTuV2_rec")
    model = spec.build(5, seed=1, scale=0.5)
    folder = tmp_path_factory.mktemp("bundle") / "pp"
    return save_bundle(folder, spec=spec, model=model, num_classes=5, arch={"scale": 0.5}, extra={"input_size": SIZE})


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> Path:
    """Eight small photos-like images: smooth colour gradients with noise."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("gallery")
    rng = np.random.default_rng(5)
    ramp = np.linspace(0, 1, 48)[:, None, None]
    for i in range(8):
        colour = rng.uniform(0, 255, 3)
        image = colour * ramp + rng.normal(0, 20, (48, 40, 3))
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f"g{i}.png")
    return folder


def _cosines(recognizer, gallery: Path, expected: np.ndarray) -> np.ndarray:
    images = np.stack([recognizer.preprocess(p) for p in sorted(gallery.glob("*.png"))])
    return np.sum(recognizer.embed_arrays(images) * expected, axis=1)


@pytest.fixture(scope="module")
def fp32_features(bundle, gallery) -> np.ndarray:
    from shitu.embed.resolve import resolve_model

    recognizer = resolve_model(bundle)
    images = np.stack([recognizer.preprocess(p) for p in sorted(gallery.glob("*.png"))])
    return recognizer.embed_arrays(images)


def test_calibration_set_samples_with_a_seed_and_hashes_the_content(gallery, tmp_path):
    from shitu.export.quantize import calibration_set

    every = calibration_set(gallery)
    assert len(every.paths) == every.found == 8 and len(every.sha256) == 64
    sample = calibration_set([gallery], limit=3)
    assert len(sample.paths) == 3 and sample.found == 8 and sample == calibration_set(gallery, limit=3)
    assert set(sample.paths) <= set(every.paths) and sample.sha256 != every.sha256
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in every.paths:
        (copy / Path(path).name).write_bytes(Path(path).read_bytes())
    assert calibration_set(copy).sha256 == every.sha256  # the content, not the place
    (copy / "g0.png").write_bytes((gallery / "g1.png").read_bytes())
    assert calibration_set(copy).sha256 != every.sha256


def test_int8_backends_stay_close_to_fp32_and_reuse_the_cached_graph(bundle, gallery, fp32_features, monkeypatch):
    from shitu.embed.resolve import resolve_model
    from shitu.export import backends, convert

    recognizer = resolve_model(bundle, backend="onnxruntime", precision="int8", calibration=[gallery])
    assert recognizer.backend.precision == "int8" and "calibrated on 8 images" in recognizer.backend.note
    cosines = _cosines(recognizer, gallery, fp32_features)
    assert cosines.min() >= MIN_COSINE
    exported = Path(os.environ["SHITU_CACHE_DIR"]) / "exported"
    int8_folders = [folder for folder in exported.iterdir() if "int8" in folder.name]
    assert len(int8_folders) == 1
    info = json.loads((int8_folders[0] / "model.json").read_text())
    assert info["precision"] == "int8" and info["export"]["quantization"]["format"] == "QDQ"

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(convert, "export_recognizer", no_export)
    again = resolve_model(bundle, backend="onnxruntime", precision="int8", calibration=gallery)
    assert np.allclose(_cosines(again, gallery, fp32_features), cosines, atol=1e-6)
    if backends.installed("openvino"):
        with backends.inference_backend("openvino", "int8", calibration=gallery):
            on_openvino = resolve_model(bundle)
        assert on_openvino.backend.backend == "openvino"
        assert _cosines(on_openvino, gallery, fp32_features).min() >= MIN_COSINE


def test_int8_without_calibration_or_on_jax_is_a_clear_error(bundle, gallery):
    from shitu.embed.resolve import resolve_model
    from shitu.errors import ShituError

    recognizer = resolve_model(bundle)
    with pytest.raises(ShituError, match="needs calibration images: pass --calibration"):
        recognizer.use_backend("onnxruntime", "int8")
    with pytest.raises(ShituError, match="exported graph only"):
        recognizer.use_backend("jax", "int8", gallery)
    with pytest.raises(ShituError, match="int8 only"):
        recognizer.use_backend("onnxruntime", "fp32", gallery)
    with pytest.raises(ShituError, match="not found"):
        recognizer.use_backend("onnxruntime", "int8", gallery / "missing")


def test_cli_export_int8_records_precision_and_calibration_hash(cli, bundle, gallery, tmp_path):
    from shitu.export.convert import run_onnx
    from shitu.export.quantize import calibration_set

    run = cli(
        "export", "--model-dir", bundle, "--output", tmp_path / "e", "--precision", "int8",
        "--calibration", gallery, "--json",
    )  # fmt: skip
    assert run.code == 0, run.stderr
    info = json.loads((tmp_path / "e" / "model.json").read_text())
    quantization = info["export"]["quantization"]
    assert info["precision"] == "int8" and run.json()["precision"] == "int8"
    assert quantization["calibration"]["sha256"] == calibration_set(gallery).sha256
    assert quantization["calibration"]["images"] == 8 and quantization["min_cosine_to_fp32"] >= MIN_COSINE
    ops = {node.op_type for node in __import__("onnx").load(str(tmp_path / "e" / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert run_onnx(tmp_path / "e" / "model.onnx", np.zeros((2, SIZE, SIZE, 3), np.float32)).shape[0] == 2

    missing = cli("predict", "--model-dir", bundle, "--backend", "onnxruntime", "--precision", "int8", gallery)
    assert missing.code != 0 and missing.stderr.count("\n") == 1 and "--calibration" in missing.stderr
    stablehlo = cli(
        "export", "--model-dir", bundle, "--output", tmp_path / "s", "--format", "stablehlo", "--precision", "int8",
        "--calibration", gallery,
    )  # fmt: skip
    assert stablehlo.code != 0 and "ONNX only" in stablehlo.stderr and not (tmp_path / "s").exists()


AUTO_INT8_SCRIPT = r"""
import json, sys
from pathlib import Path
import numpy as np
from shitu.embed.resolve import resolve_model

bundle, gallery, fewer, expected = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), np.load(sys.argv[4])
recognizer = resolve_model(bundle, backend="auto", precision="int8", calibration=gallery)
images = np.stack([recognizer.preprocess(p) for p in sorted(gallery.glob("*.png"))])
cosine = float(np.sum(recognizer.embed_arrays(images) * expected, axis=1).min())
again = resolve_model(bundle, backend="auto", precision="int8", calibration=gallery)
other = resolve_model(bundle, backend="auto", precision="int8", calibration=fewer)
print(json.dumps({"backend": recognizer.backend.backend, "precision": recognizer.backend.precision,
                  "note": recognizer.backend.note, "cosine": cosine, "again": again.backend.backend,
                  "again_note": again.backend.note, "other_note": other.backend.note}))
"""


def test_auto_int8_times_the_int8_backends_and_remembers_per_calibration_set(bundle, gallery, fp32_features, tmp_path):
    # In a process of its own: after auto has timed both int8 runtimes in a process, a SIGINT during training
    # later in that same process (tests/test_train.py's Ctrl-C test) ended it with a segmentation fault.
    import subprocess
    import sys

    from shitu.export.backends import CHOICES_FILE, installed

    fewer = tmp_path / "fewer"
    fewer.mkdir()
    for path in sorted(gallery.glob("*.png"))[:4]:
        (fewer / path.name).write_bytes(path.read_bytes())
    np.save(tmp_path / "expected.npy", fp32_features)
    done = subprocess.run(
        [sys.executable, "-c", AUTO_INT8_SCRIPT, str(bundle), str(gallery), str(fewer), str(tmp_path / "expected.npy")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    measured = [b for b in ("onnxruntime", "openvino") if installed(b)]
    assert result["precision"] == "int8" and result["backend"] in measured
    assert "measured 8 images" in result["note"] and all(b in result["note"] for b in measured)
    assert "jax" not in result["note"]  # JAX has no int8 path
    assert result["cosine"] >= MIN_COSINE
    assert result["again"] == result["backend"] and "measured earlier" in result["again_note"]
    assert "measured earlier" not in result["other_note"]  # another calibration set is another graph: timed anew
    choices = json.loads((Path(os.environ["SHITU_CACHE_DIR"]) / CHOICES_FILE).read_text())
    assert len([key for key in choices if "|int8-" in key]) == 2
