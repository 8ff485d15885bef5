"""The service's cheap paths in-process: JSON answers written by orjson (and the fallback without it), Base64
read in one pass, uvicorn's C loop and parser chosen where they exist, and ``--backend``/``--precision``
reaching the model."""

from __future__ import annotations

import asyncio
import base64
import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")

from serve_support import make_bundle, png_bytes

from shitu.serve import app as serve_app


def _strict_json(data: bytes) -> object:
    """``data`` parsed as strict JSON (NaN and Infinity are not JSON)."""

    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(data.decode("utf-8"), parse_constant=refuse)


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle") / "rec")


def _features(rows: int = 3) -> np.ndarray:
    features = np.random.default_rng(0).standard_normal((rows, 512)).astype(np.float32)
    features[0, :4] = [0.1, -1e-30, 3.4028235e38, 0.0]  # short, tiny, the largest float32, zero
    return features / np.float32(1.0)


def test_answers_are_valid_json_holding_the_very_float32_features():
    features = _features()
    encoded = serve_app.encode_json({"dim": 512, "features": features, "sha256": ["ab"], "note": "é"})
    document = _strict_json(encoded)
    assert document["dim"] == 512 and document["sha256"] == ["ab"] and document["note"] == "é"
    back = np.asarray(document["features"], np.float64).astype(np.float32)
    np.testing.assert_array_equal(back, features)  # every number reads back as the same float32
    assert len(encoded) < len(json.dumps(features.tolist()))  # shortest float32 text, not float64's
    # a strided view (a column slice) is written as its values too
    view = serve_app.encode_json({"features": features[:, ::2]})
    np.testing.assert_array_equal(np.asarray(_strict_json(view)["features"], np.float32), features[:, ::2])


def test_without_orjson_answers_fall_back_to_the_same_numbers(monkeypatch):
    features = _features(2)
    fast = _strict_json(serve_app.encode_json({"features": features, "score": np.float32(0.5)}))
    monkeypatch.setattr(serve_app, "orjson", None)
    slow = _strict_json(serve_app.encode_json({"features": features, "score": np.float32(0.5)}))
    assert slow["score"] == fast["score"] == 0.5
    np.testing.assert_array_equal(np.asarray(slow["features"], np.float32), np.asarray(fast["features"], np.float32))
    with pytest.raises(ValueError):
        serve_app.encode_json({"x": math.nan})  # never invalid JSON on the wire
    response = serve_app.FastJSONResponse({"a": [1, 2]})
    assert response.body == b'{"a":[1,2]}' and response.media_type == "application/json"


def _image_bytes(text: str) -> bytes:
    service = serve_app.Service(serve_app.ServeSettings(model="unused", decode_workers=1))
    try:
        return asyncio.run(service.image_bytes(text, "images.0"))
    finally:
        service.decode_pool.shutdown()
        service.io_pool.shutdown()


def test_base64_in_one_pass_wrapped_or_as_a_data_url_and_bad_text_names_the_field():
    data = png_bytes(7)
    text = base64.b64encode(data).decode("ascii")
    assert _image_bytes(text) == data
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76))  # MIME line breaks
    assert _image_bytes(wrapped) == data
    assert _image_bytes("data:image/png;base64," + text) == data
    for bad in ("é" * 8, text[:-3], "/etc/passwd", text + "!", "=" + text):
        with pytest.raises(serve_app.ApiError) as refused:
            _image_bytes(bad)
        assert refused.value.status == 422 and refused.value.field == "images.0"


def test_uvicorn_gets_uvloop_and_httptools_where_they_import(monkeypatch):
    import importlib.util

    assert serve_app.server_implementations() == ("uvloop", "httptools")  # the serve extra installs both
    real = importlib.util.find_spec
    missing = ("uvloop", "httptools")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name in missing else real(name))
    assert serve_app.server_implementations() == ("asyncio", "h11")


def test_the_backend_and_precision_options_reach_the_service(cli, monkeypatch, tiny_bundle):
    seen = []
    monkeypatch.setattr(serve_app, "run", seen.append)
    monkeypatch.setattr("shitu.runtime.configure_jax", lambda: None)
    result = cli("serve", "--model-dir", tiny_bundle, "--backend", "openvino", "--precision", "bf16")
    assert result.code == 0, result.stderr
    assert (seen[0].backend, seen[0].precision, seen[0].calibration) == ("openvino", "bf16", None)
    assert cli("serve", "--model-dir", tiny_bundle).code == 0
    assert (seen[1].backend, seen[1].precision) == ("jax", "fp32")

    wrong = cli("serve", "--model-dir", tiny_bundle, "--backend", "tensorrt")
    assert wrong.code != 0 and "tensorrt" in wrong.stderr
    missing = cli("serve", "--model-dir", tiny_bundle, "--backend", "onnxruntime", "--precision", "int8")
    assert missing.code == 1 and len(missing.stderr.strip().splitlines()) == 1 and "calibration" in missing.stderr
    stray = cli("serve", "--model-dir", tiny_bundle, "--calibration", str(tiny_bundle))
    assert stray.code == 1 and "int8 only" in stray.stderr
    assert len(seen) == 2  # the refusals never started a server


def test_the_service_embeds_on_the_backend_it_was_given(tiny_bundle, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("SHITU_CACHE_DIR", str(tmp_path / "cache"))
    features = {}
    for backend in ("jax", "onnxruntime"):
        settings = serve_app.ServeSettings(
            model=tiny_bundle, state_dir=tmp_path / backend, backend=backend, max_batch=2, decode_workers=1
        )
        service = serve_app.Service(settings)
        service.load()
        assert service.backend_choice().backend == backend
        assert service.backend_choice().precision == "fp32"
        _, array = service.recognizer.load(png_bytes(3))
        features[backend] = service.recognizer.embed_arrays(array[None])
        service.store.close()
        service.decode_pool.shutdown()
        service.io_pool.shutdown()
    assert service.recognizer.backend is not None and service.recognizer.backend.backend == "onnxruntime"
    np.testing.assert_allclose(features["onnxruntime"], features["jax"], atol=2e-4)


def _batch_sizes(count: int, **options: object) -> tuple[list[int], list[np.ndarray]]:
    """The model calls a DynamicBatcher makes for ``count`` one-image requests arriving together, and the
    answers each request got (the fake model returns each image's first two values)."""
    from shitu.serve.batching import DynamicBatcher

    calls: list[int] = []

    def model(images: np.ndarray) -> np.ndarray:
        calls.append(len(images))
        return images.reshape(len(images), -1)[:, :2].copy()

    async def main() -> list[np.ndarray]:
        batcher = DynamicBatcher(model, max_wait=0.05, **options)
        batcher.start()
        try:
            images = [np.full((1, 2, 2, 3), n, np.float32) for n in range(count)]
            return list(await asyncio.gather(*(batcher.embed(image) for image in images)))
        finally:
            await batcher.stop()

    return calls, asyncio.run(main())


def test_batches_run_at_the_sizes_the_model_does_not_pad_and_the_rest_follow():
    calls, answers = _batch_sizes(11, max_batch=16, sizes=(1, 2, 4, 8, 16, 32))
    assert calls == [8, 2, 1]  # not one call of 11 padded to 16
    assert [float(answer[0, 0]) for answer in answers] == list(range(11))  # each request got its own row
    assert _batch_sizes(11, max_batch=16)[0] == [11]  # a backend without padding takes any size
    assert _batch_sizes(12, max_batch=12, sizes=(1, 2, 4, 8, 16))[0] == [12]  # a full batch always runs whole
