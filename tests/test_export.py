"""Export to ONNX / StableHLO and the inference backends, on tiny models (32 px, PP-ShiTuV2_rec at half width,
a two-block CLIP ViT): every runtime's features equal shitu's JAX features to 1e-5 in fp32."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("jax2onnx")
pytest.importorskip("onnxruntime")

SIZE = 32
TOL = 1e-5
TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "img_size": 32, "output_dim": 24}


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    """Exported graphs, OpenVINO blobs and auto choices go to a cache of this module's own."""
    patch = pytest.MonkeyPatch()
    patch.setenv("SHITU_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    yield
    patch.undo()


def _bundle(folder: Path, name: str, arch: dict, num_classes: int = 5) -> Path:
    from shitu.models.bundle import save_bundle
    from shitu.plugins import get_host

    spec = get_host().model(name)
    model = spec.build(num_classes, seed=1, **arch)
    return save_bundle(folder, spec=spec, model=model, num_classes=num_classes, arch=arch, extra={"input_size": SIZE})


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    return {
        "pp": _bundle(root / "pp", "PP-ShiTuV2_rec", {"scale": 0.5}),
        "vit": _bundle(root / "vit", "PP-ShiTuV2_rec_CLIP_vit_base", {**TINY_VIT, "embedding_size": 16}),
    }


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(7).normal(0.0, 1.0, (3, SIZE, SIZE, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def recognizers(bundles):
    from shitu.embed.resolve import resolve_model

    return {key: resolve_model(path) for key, path in bundles.items()}


@pytest.fixture(scope="module")
def onnx_exports(bundles, tmp_path_factory):
    from shitu.export import export_model

    root = tmp_path_factory.mktemp("onnx")
    return {key: export_model(path, root / key, format="onnx") for key, path in bundles.items()}


def test_export_form_of_pp_shituv2_equals_the_model_in_jax(recognizers, images):
    from shitu.export.convert import features_function

    recognizer = recognizers["pp"]
    expected = recognizer.embed_arrays(images)
    np.testing.assert_allclose(np.asarray(features_function(recognizer.model, export=True)(images)), expected, atol=TOL)
    assert recognizer.model.neck is not None  # the recognizer's own model is left as it was


def _need_openvino() -> None:
    """Skip without OpenVINO; import it as shitu does (without its usage telemetry, which would reach out)."""
    from shitu.export.backends import installed

    if not installed("openvino"):
        pytest.skip("openvino is not installed")


def test_openvino_loads_without_its_usage_telemetry():
    """Importing openvino itself sends a usage event from a forked process (unsafe in a JAX process, and a
    network call nobody asked for); shitu's import of it neither forks nor loads openvino_telemetry. In a fresh
    process with CI unset, where the telemetry would otherwise run."""
    _need_openvino()
    code = (
        "import os, sys, time\n"
        "forks = []\n"
        "os.register_at_fork(before=lambda: forks.append(1))\n"
        "from shitu.export.backends import import_openvino, installed\n"
        "assert installed('openvino')\n"
        "import_openvino().Core()\n"
        "time.sleep(1.0)  # the telemetry sends from a thread of its own\n"
        "print(len(forks), 'openvino_telemetry' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TF_BUILD", "JENKINS_URL")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["0", "False"]
    assert "os.fork()" not in done.stderr


@pytest.mark.parametrize("key", ["pp", "vit"])
def test_onnx_export_runs_in_onnxruntime_and_openvino_like_jax(key, recognizers, onnx_exports, images):
    from shitu.export.backends import OnnxRuntimeForward, OpenVinoForward

    expected = recognizers[key].embed_arrays(images)
    result = onnx_exports[key]
    got = OnnxRuntimeForward(result.model_file)(images)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= TOL
    _need_openvino()
    assert np.abs(OpenVinoForward(result.model_file)(images) - expected).max() <= TOL
    # the batch is symbolic: one image and three go through the same graph
    assert np.abs(OnnxRuntimeForward(result.model_file)(images[:1]) - expected[:1]).max() <= TOL


def test_export_folder_describes_the_model_and_its_preprocessing(bundles, onnx_exports):
    import onnx

    from shitu.models.bundle import read_bundle_info

    folder = onnx_exports["pp"].path
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.onnx", "preprocess.json"]
    info = json.loads((folder / "model.json").read_text())
    assert info["model"] == "PP-ShiTuV2_rec" and info["embedding_size"] == 512 and info["input_size"] == SIZE
    assert info["source"] == {
        "bundle": str(bundles["pp"]),
        "params_crc32": read_bundle_info(bundles["pp"]).params_crc32,
    }
    assert info["export"]["format"] == "onnx" and info["export"]["batch"] == "dynamic"
    assert info["verified"]["max_abs_diff"] <= TOL
    pre = json.loads((folder / "preprocess.json").read_text())
    assert pre["input_size"] == [SIZE, SIZE] and pre["layout"] == "NHWC" and pre["channel_order"] == "RGB"
    assert pre["mean"] == pytest.approx([0.485, 0.456, 0.406]) and pre["resize"]["interpolation"] == "bilinear"
    graph = onnx.load(folder / "model.onnx").graph
    ops = {node.op_type for node in graph.node}
    grouped = [n for n in graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)]
    assert grouped, "depthwise convolutions are exported as grouped Conv"
    assert "MatMul" not in ops and "Slice" not in ops  # no shifted-slice depthwise, no matmul 1x1 convs
    assert sum(n.op_type == "Transpose" for n in graph.node) <= 2  # only around the graph's ends
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch


def test_fixed_batch_and_stablehlo_round_trip_without_shitu(bundles, recognizers, images, tmp_path):
    from shitu.export import export_model

    fixed = export_model(bundles["pp"], tmp_path / "fixed", format="onnx", batch=3)
    dims = __import__("onnx").load(fixed.model_file).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [3, SIZE, SIZE, 3]

    hlo = export_model(bundles["vit"], tmp_path / "hlo", format="stablehlo")
    assert hlo.model_file.name == "model.stablehlo" and hlo.info["verified"]["max_abs_diff"] <= TOL
    np.save(tmp_path / "x.npy", images)
    script = (
        "import sys, numpy as np, jax\n"
        "assert not any(m.startswith('shitu') for m in sys.modules)\n"
        "exp = jax.export.deserialize(bytearray(open(sys.argv[1], 'rb').read()))\n"
        "np.save(sys.argv[3], np.asarray(exp.call(np.load(sys.argv[2]))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, hlo.model_file, tmp_path / "x.npy", tmp_path / "y.npy"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), recognizers["vit"].embed_arrays(images), atol=TOL)


def test_export_refuses_a_foreign_folder_and_leaves_it(bundles, tmp_path):
    from shitu.errors import ShituError
    from shitu.export import export_model

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine\n")
    with pytest.raises(ShituError, match="not an exported model"):
        export_model(bundles["pp"], foreign, format="onnx")
    assert (foreign / "keep.txt").read_text() == "mine\n"
    with pytest.raises(ShituError, match="unknown export format"):
        export_model(bundles["pp"], tmp_path / "x", format="tflite")


def test_backends_equal_jax_and_reuse_the_cached_export(bundles, images, monkeypatch):
    from shitu.embed.resolve import resolve_model
    from shitu.export import backends, convert

    recognizer = resolve_model(bundles["pp"])
    expected = recognizer.embed_arrays(images)
    assert recognizer.use_backend("onnxruntime").backend == "onnxruntime"
    assert np.abs(recognizer.embed_arrays(images) - expected).max() <= TOL
    cached = backends.exported_onnx(recognizer)
    assert cached.is_file() and str(cached).startswith(str(backends.Path(__import__("os").environ["SHITU_CACHE_DIR"])))

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(convert, "export_recognizer", no_export)
    again = resolve_model(bundles["pp"], backend="onnxruntime")  # a second load: the cached graph
    assert np.abs(again.embed_arrays(images) - expected).max() <= TOL
    if backends.installed("openvino"):
        assert recognizer.use_backend("openvino").backend == "openvino"
        assert np.abs(recognizer.embed_arrays(images) - expected).max() <= TOL


def test_an_upgrade_of_shitu_or_the_converter_exports_again(bundles, monkeypatch):
    import shitu
    from shitu.embed.resolve import resolve_model
    from shitu.export import backends, convert

    recognizer = resolve_model(bundles["pp"])
    key = backends._cache_key(recognizer)
    assert key == backends._cache_key(recognizer)  # stable for the same weights and tools
    monkeypatch.setattr(shitu, "__version__", shitu.__version__ + ".post1")
    newer_shitu = backends._cache_key(recognizer)
    monkeypatch.setattr(convert, "converter_version", lambda package: f"{package} 999")
    newer_converter = backends._cache_key(recognizer)
    assert len({key, newer_shitu, newer_converter}) == 3
    assert all(k.startswith(key.rsplit("-t", 1)[0]) for k in (newer_shitu, newer_converter))


def test_openvino_recompiles_a_graph_rewritten_at_the_same_path(tmp_path):
    _need_openvino()
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from shitu.export.backends import OpenVinoForward

    def write_scaling_graph(path: Path, factor: float) -> None:
        shape = [1, 4]
        weight = numpy_helper.from_array(np.full(shape, factor, np.float32), "factor")
        graph = helper.make_graph(
            [helper.make_node("Mul", ["images", "factor"], ["features"])],
            "scale",
            [helper.make_tensor_value_info("images", TensorProto.FLOAT, shape)],
            [helper.make_tensor_value_info("features", TensorProto.FLOAT, shape)],
            [weight],
        )
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)

    model_file = tmp_path / "model.onnx"
    ones = np.ones((1, 4), np.float32)
    write_scaling_graph(model_file, 2.0)
    assert np.array_equal(OpenVinoForward(model_file)(ones), 2 * ones)
    stamp = model_file.stat().st_mtime_ns
    write_scaling_graph(model_file, 3.0)  # same path, size and config, other content: not the cached blob
    os.utime(model_file, ns=(stamp, stamp))  # as a copy keeping times, or a rewrite within one clock tick
    assert np.array_equal(OpenVinoForward(model_file)(ones), 3 * ones)
    assert np.array_equal(OpenVinoForward(model_file)(ones), 3 * ones)  # and its own blob is reused


def test_bf16_runs_where_the_cpu_can_and_is_refused_where_it_cannot(recognizers, images):
    from shitu.errors import ShituError
    from shitu.export.backends import jax_bf16_available

    recognizer = recognizers["pp"]
    expected = recognizer.embedder(images)
    with pytest.raises(ShituError, match="fp32 only"):
        recognizer.use_backend("onnxruntime", "bf16")
    ok, _ = jax_bf16_available()
    try:
        if not ok:
            with pytest.raises(ShituError, match="AVX-512 BF16"):
                recognizer.use_backend("jax", "bf16")
            return
        recognizer.use_backend("jax", "bf16")
        got = recognizer.embed_arrays(images)
        assert got.dtype == np.float32
        assert np.min(np.sum(got * expected, axis=1)) > 0.995  # cosine to the fp32 features
        assert np.abs(got - expected).max() > 0  # it really ran in bf16
    finally:
        recognizer.use_backend("jax", "fp32")


def test_auto_measures_once_and_says_which(bundles, images):
    import os

    from shitu.embed.resolve import resolve_model
    from shitu.export.backends import CHOICES_FILE, inference_backend

    reports = []
    with inference_backend("auto", "fp32", report=reports.append):
        recognizer = resolve_model(bundles["vit"])
    choice = recognizer.backend
    assert reports == [choice] and choice.backend in ("jax", "onnxruntime", "openvino")
    assert "measured" in choice.note and "jax" in choice.note
    remembered = json.loads((Path(os.environ["SHITU_CACHE_DIR"]) / CHOICES_FILE).read_text())
    assert [v["backend"] for v in remembered.values()] == [choice.backend]
    second = resolve_model(bundles["vit"], backend="auto")
    assert second.backend.backend == choice.backend and "measured earlier" in second.backend.note
    expected = resolve_model(bundles["vit"]).embed_arrays(images)
    assert np.abs(second.embed_arrays(images) - expected).max() <= TOL


def test_cli_predict_backend_flag_gives_jax_features(cli, bundles, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(3)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40 + 3 * i, 36, 3), dtype=np.uint8)).save(tmp_path / f"p{i}.png")
    runs = {
        backend: cli("predict", "--model-dir", bundles["pp"], "--json", "--backend", backend, tmp_path)
        for backend in ("jax", "onnxruntime")
    }
    assert all(run.code == 0 for run in runs.values()), runs
    jax_rows = {row["input_path"]: np.asarray(row["feature"]) for row in runs["jax"].json_lines()}
    ort_rows = {row["input_path"]: np.asarray(row["feature"]) for row in runs["onnxruntime"].json_lines()}
    assert jax_rows.keys() == ort_rows.keys() and len(jax_rows) == 3
    for path, feature in jax_rows.items():
        assert np.abs(ort_rows[path] - feature).max() <= TOL
    assert "backend: onnxruntime fp32" in runs["onnxruntime"].stderr
    assert "backend:" not in runs["jax"].stderr


def test_cli_export_writes_the_folder_and_rejects_bad_input(cli, bundles, tmp_path):
    run = cli("export", "--model-dir", bundles["vit"], "--format", "onnx", "--output", tmp_path / "e", "--json")
    assert run.code == 0, run.stderr
    doc = run.json()
    assert doc["model"] == "PP-ShiTuV2_rec_CLIP_vit_base" and Path(doc["model_file"]).is_file()
    bad = cli("export", "--model-dir", bundles["vit"], "--output", tmp_path / "f", "--batch", "0")
    assert bad.code != 0 and bad.stderr.count("\n") == 1 and "--batch" in bad.stderr
    assert not (tmp_path / "f").exists()
    from PIL import Image

    Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(tmp_path / "one.png")
    wrong = cli(
        "predict",
        "--model-dir",
        bundles["vit"],
        "--backend",
        "onnxruntime",
        "--precision",
        "bf16",
        tmp_path / "one.png",
    )
    assert wrong.code != 0 and "fp32 only" in wrong.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", ["PP-ShiTuV2_rec", "PP-ShiTuV2_rec_CLIP_vit_base"])
def test_full_size_exports_equal_jax_at_224(name, tmp_path):
    """The real architectures at 224 px (random weights): ONNX Runtime and OpenVINO f32 within 1e-5 of JAX."""
    from shitu.embed.resolve import resolve_model
    from shitu.export.backends import OnnxRuntimeForward, OpenVinoForward
    from shitu.export.convert import export_recognizer

    with pytest.warns(UserWarning):  # random weights
        recognizer = resolve_model(name)
    images = np.random.default_rng(5).normal(0.0, 1.0, (4, 224, 224, 3)).astype(np.float32)
    expected = recognizer.embed_arrays(images)
    result = export_recognizer(recognizer, tmp_path / "export", format="onnx")
    assert np.abs(OnnxRuntimeForward(result.model_file)(images) - expected).max() <= TOL
    _need_openvino()
    assert np.abs(OpenVinoForward(result.model_file)(images) - expected).max() <= TOL
