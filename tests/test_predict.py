"""``shitu predict`` and the PaddleX-like Python API (create_model / predict / results), at 48 px."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shitu.embed.predict import (
    FeatureResult,
    Predictor,
    RandomWeightsWarning,
    UniqueNames,
    create_model,
    resolve_inputs,
)
from shitu.errors import ShituError

SIZE = 48


def _image(path: Path, seed: int, size: tuple[int, int] = (40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """8 images in nested folders (two share the stem 'same'), a text file and a hidden file."""
    root = tmp_path_factory.mktemp("photos")
    names = ["a/one.png", "a/two.jpg", "a/deep/three.png", "b/same.png", "c/same.jpg", "c/four.bmp", "five.webp"]
    for seed, name in enumerate(names):
        _image(root / name, seed, size=(30 + 5 * seed, 50 - 3 * seed))
    _image(root / "six.jpeg", 9)
    (root / "notes.md").write_text("not an image\n")
    (root / "a" / ".hidden.png").write_bytes(b"junk")
    return root


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """PP-ShiTuV2_rec with random weights (seed 0), and that network saved as a bundle to embed at 48 px."""
    from shitu.embed.recognizer import Recognizer
    from shitu.models.bundle import save_bundle
    from shitu.plugins import get_host

    spec = get_host().model("PP-ShiTuV2_rec")
    network = spec.build(1, seed=0)
    folder = tmp_path_factory.mktemp("bundle") / "rec"
    save_bundle(folder, spec=spec, model=network, num_classes=1, extra={"input_size": SIZE})
    return Recognizer(spec, network, num_classes=1, input_size=SIZE), folder


@pytest.fixture(scope="module")
def bundle(seeded) -> Path:
    return seeded[1]


@pytest.fixture(scope="module")
def model(bundle) -> Predictor:
    """The bundle loaded through the public API (the one real load of this module)."""
    return create_model(bundle)


@pytest.fixture
def fast_loads(monkeypatch, model, seeded) -> list:
    """Models this module already has are not loaded again: loading a bundle (or building the seed-0 random
    network) takes 2-6 s here and each new model compiles again. ``load_recognizer`` is replaced by one that
    returns the module's recognizer for the same bundle (same ``shitu_model.json``) or for the seed-0 random
    PP-ShiTuV2_rec at 48 px, and loads anything else. Returns the list of calls."""
    import shitu.embed.recognizer

    real = shitu.embed.recognizer.load_recognizer
    random_recognizer, folder = seeded
    description = (folder / "shitu_model.json").read_bytes()
    calls: list = []

    def load(reference, *, input_size=None, seed=0, **kwargs):
        calls.append(reference)
        info = Path(reference) / "shitu_model.json"
        if info.is_file() and info.read_bytes() == description and input_size in (None, SIZE):
            return model.recognizer
        if str(reference) == "PP-ShiTuV2_rec" and input_size == SIZE and seed == 0:
            return random_recognizer
        return real(reference, input_size=input_size, seed=seed, **kwargs)

    monkeypatch.setattr(shitu.embed.recognizer, "load_recognizer", load)
    return calls


def _features(results) -> np.ndarray:
    return np.stack([np.asarray(r["feature"]) for r in results])


# -- inputs -------------------------------------------------------------------------------------------


def test_inputs_by_folder_glob_list_and_stdin_resolve_to_the_same_images(photos, tmp_path, monkeypatch):
    by_folder = resolve_inputs([photos])
    assert [Path(p).relative_to(photos).as_posix() for p in by_folder] == [
        "a/deep/three.png",
        "a/one.png",
        "a/two.jpg",
        "b/same.png",
        "c/four.bmp",
        "c/same.jpg",
        "five.webp",
        "six.jpeg",
    ]  # sorted, recursive, images only, hidden files skipped
    by_glob = resolve_inputs([f"{photos}/**/*"])  # a quoted pattern, expanded by shitu
    listing = tmp_path / "lists" / "images.txt"
    listing.parent.mkdir()
    relative = [os.path.relpath(p, listing.parent) for p in by_folder]  # relative to the list's folder
    listing.write_text("# my images\n\n" + "".join(f"{p}\n" for p in relative[:4]) + f"{photos}\n")
    by_list = resolve_inputs([listing])
    monkeypatch.chdir(photos)
    by_stdin = resolve_inputs(
        ["-"], stdin=io.StringIO("a\nb/same.png\n\nc/four.bmp 3\nc/same.jpg\nfive.webp\nsix.jpeg\n")
    )
    resolved = [sorted(str(Path(p).resolve()) for p in paths) for paths in (by_glob, by_stdin)]
    expected = sorted(str(Path(p).resolve()) for p in by_folder)
    assert resolved[0] == expected and resolved[1] == expected
    assert [str(Path(p).resolve()) for p in by_list] == [str(Path(p).resolve()) for p in by_folder[:4] + by_folder]


def test_unresolvable_inputs_raise_or_are_collected(photos, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShituError, match="not found"):
        resolve_inputs([tmp_path / "nope.jpg"])
    problems: list[str] = []
    listing = tmp_path / "l.txt"
    listing.write_text(f"{photos / 'five.webp'}\nmissing.png\n")
    found = resolve_inputs(
        [tmp_path / "nope.jpg", tmp_path / "empty", f"{tmp_path}/*.gif", listing, "https://example.invalid/x.jpg"],
        problems=problems,
    )
    assert found == [str(photos / "five.webp"), "https://example.invalid/x.jpg"]
    assert problems == [
        f"{tmp_path / 'nope.jpg'}: not found",
        f"{tmp_path / 'empty'}: no images in this folder",
        f"{tmp_path}/*.gif: no image matches this pattern",
        f"{listing}:2: not found: missing.png",
    ]


# -- Python API ---------------------------------------------------------------------------------------


def test_predict_gives_unit_features_in_order_independent_of_batch_size(model, photos):
    assert model.describe()["input_size"] == SIZE  # the bundle's extra input_size is honoured
    paths = resolve_inputs([photos])
    one = list(model.predict(paths, batch_size=1))
    seven = list(model.predict(photos, batch_size=7))  # a folder string is resolved the same way
    assert [r["input_path"] for r in one] == [r["input_path"] for r in seven] == paths
    assert [r.index for r in seven] == list(range(len(paths)))
    features = _features(one)
    assert features.shape == (len(paths), 512) and features.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(_features(seven), features, rtol=0, atol=1e-6)
    assert len({tuple(np.round(f, 4)) for f in features}) == len(paths)  # different images, different features
    first = one[0]
    assert set(first) == {"input_path", "page_index", "input_img", "feature"} and first["page_index"] is None
    np.testing.assert_array_equal(first["input_img"], np.asarray(Image.open(paths[0]).convert("RGB")))


def test_arrays_pil_images_and_urls_give_the_features_of_the_file(model, photos, tmp_path):
    path = photos / "a" / "one.png"
    pixels = np.asarray(Image.open(path).convert("RGB"))
    results = list(model.predict([str(path), pixels, Image.open(path)], batch_size=1))
    assert [r["input_path"] for r in results] == [str(path), None, None]
    np.testing.assert_allclose(_features(results[1:]), _features(results[:1]).repeat(2, axis=0), atol=1e-6)
    assert results[1].json_path(tmp_path).name == "input_1_res.json"
    single = list(model.predict(pixels))  # one array is one input, not a list of rows
    assert len(single) == 1


def test_url_input(model, photos, tmp_path):
    import functools
    import http.server
    import threading

    shutil.copy(photos / "a" / "one.png", tmp_path / "one.png")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/one.png?v=1"
        remote, local = list(model.predict([url, str(tmp_path / "one.png")]))
    finally:
        server.shutdown()
        server.server_close()
    assert remote["input_path"] == url and remote.json_path(tmp_path).name == "one_res.json"
    assert remote.img_path(tmp_path).name == "one_res.png"
    np.testing.assert_allclose(remote["feature"], local["feature"], atol=1e-6)


def test_predict_is_lazy_and_raises_on_a_broken_input_unless_told(model, photos, tmp_path):
    pulled: list[str] = []
    paths = resolve_inputs([photos])

    def stream():
        for path in paths:
            pulled.append(path)
            yield path

    results = model.predict(stream(), batch_size=1)
    assert pulled == []  # nothing happens before the first result is asked for
    next(results)
    assert len(pulled) <= 2  # this batch and the next one (decoded ahead)
    results.close()

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"garbage")
    got = []
    with pytest.raises(ShituError, match=r"broken\.jpg: not an image"):
        for result in model.predict([paths[0], broken, paths[1]], batch_size=1):
            got.append(result["input_path"])
    assert got == [paths[0]]
    failures = []
    inputs = [paths[0], broken, *paths[1:5], tmp_path / "absent.png"]  # 5 good: one batch of 7
    kept = list(model.predict(inputs, batch_size=7, on_failure=failures.append))
    assert [r["input_path"] for r in kept] == [paths[0], *paths[1:5]]
    assert [r.index for r in kept] == [0, 2, 3, 4, 5]
    assert [(f.index, f.source) for f in failures] == [(1, str(broken)), (-1, str(tmp_path / "absent.png"))]
    got = []
    with pytest.raises(ShituError, match=r"absent\.png: not found"):  # after the results before it
        for result in model.predict([paths[0], tmp_path / "absent.png"], batch_size=1):
            got.append(result["input_path"])
    assert got == [paths[0]]


def test_print_json_and_save_to_json_follow_paddlex(model, photos, tmp_path, capsys):
    result = next(model.predict(photos / "a" / "one.png"))
    result.print()
    printed = capsys.readouterr().out
    assert printed.startswith("{'res': {'input_path': ") and "'feature': array([" in printed
    assert "input_img" not in printed
    result.print(json_format=True, indent=2)
    document = json.loads(capsys.readouterr().out)
    assert list(document["res"]) == ["input_path", "page_index", "feature"]
    assert result.json == document
    np.testing.assert_array_equal(np.float32(document["res"]["feature"]), result["feature"])  # exact round trip

    written = result.save_to_json(tmp_path / "out")  # a folder: <stem>_res.json
    assert written == tmp_path / "out" / "one_res.json"
    assert json.loads(written.read_text()) == document["res"]
    assert result.save_to_json(tmp_path / "res.json") == tmp_path / "res.json"  # a .json path: that file
    assert json.loads((tmp_path / "res.json").read_text())["input_path"] == str(photos / "a" / "one.png")

    picture = result.save_to_img(tmp_path / "pics")
    assert picture == tmp_path / "pics" / "one_res.png"
    assert Image.open(picture).size[0] >= 224


def test_an_attached_index_adds_hits_to_results_and_pictures(model, photos, tmp_path):
    from shitu.index import Hit

    gallery = [str(photos / "a" / "two.jpg"), str(photos / "five.webp")]

    class FakeIndex:  # anything with search(features, k) -> list[list[Hit]]
        def __init__(self):
            self.calls = []

        def search(self, features, k):
            self.calls.append((np.asarray(features).shape, k))
            return [[Hit(7, 3, gallery[0], 0.9), Hit(8, 4, gallery[1], 0.5)][:k] for _ in range(len(features))]

    fake = FakeIndex()
    predictor = Predictor(model.recognizer, index=fake, topk=2)
    results = list(predictor.predict(resolve_inputs([photos])[:5], batch_size=8))
    assert fake.calls == [((5, 512), 2)]  # one search per batch
    assert [h.label for h in results[0]["hits"]] == [3, 4]
    saved = json.loads(results[0].save_to_json(tmp_path / "r.json").read_text())
    assert saved["hits"][0] == {"key": 7, "label": 3, "path": gallery[0], "score": 0.9}
    with_hits = Image.open(results[0].save_to_img(tmp_path / "with.png"))
    plain = next(model.predict(photos / "a" / "one.png")).img["res"]
    assert with_hits.size[0] > plain.size[0] + 2 * 100  # two thumbnails beside the input
    assert plain.size[0] >= 224


def test_create_model_by_name_uses_an_installed_bundle_else_warns_random(
    fast_loads, model, bundle, photos, tmp_path, monkeypatch
):
    from shitu.embed.predict import installed_bundle

    monkeypatch.setenv("SHITU_CACHE_DIR", str(tmp_path / "cache"))
    assert installed_bundle("PP-ShiTuV2_rec") is None
    with pytest.warns(RandomWeightsWarning, match="RANDOM weights"):
        random_model = create_model("PP-ShiTuV2_rec", input_size=SIZE, pretrained=False)
    assert random_model.describe()["bundle"] is None and random_model.describe()["input_size"] == SIZE
    # the bundle holds that very network (seed 0): the round trip through Orbax changed nothing
    image = photos / "a" / "one.png"
    np.testing.assert_allclose(
        next(random_model.predict(image))["feature"], next(model.predict(image))["feature"], atol=1e-6
    )
    installed = tmp_path / "cache" / "models" / "PP-ShiTuV2_rec"
    shutil.copytree(bundle, installed)
    assert installed_bundle("PP-ShiTuV2_rec") == installed
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomWeightsWarning)
        found = create_model("PP-ShiTuV2_rec")
    assert fast_loads[-1] == installed and found.describe()["input_size"] == SIZE
    with pytest.raises(ShituError):
        create_model("no-such-model")
    shutil.rmtree(installed)  # offline, a name with published weights and none installed is a clear error
    with pytest.raises(ShituError, match="SHITU_OFFLINE"):
        create_model("PP-ShiTuV2_rec")


def test_the_api_is_importable_from_the_package_root():
    import shitu

    assert shitu.create_model is create_model and shitu.resolve_inputs is resolve_inputs


def test_unique_names_number_repeated_stems():
    names = UniqueNames()
    assert [names(Path("d") / n).name for n in ("x_res.json", "x_res.json", "X_res.json", "y_res.png")] == [
        "x_res.json",
        "x_2_res.json",
        "X_3_res.json",
        "y_res.png",
    ]


def test_feature_result_without_path_is_named_by_position(tmp_path):
    result = FeatureResult(
        {"input_path": None, "page_index": None, "input_img": np.zeros((4, 4, 3), np.uint8), "feature": np.ones(3)},
        index=5,
    )
    assert result.save_to_json(tmp_path).name == "input_5_res.json"
    assert result.img_path(tmp_path).name == "input_5_res.png"


# -- command line -------------------------------------------------------------------------------------


def test_cli_json_lines_match_the_python_api_and_report_failures(
    cli, fast_loads, model, bundle, photos, tmp_path, monkeypatch
):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG truncated")
    paths = resolve_inputs([photos])
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{paths[0]}\n{broken}\n"))
    run = cli(
        "predict",
        "--model-dir",
        bundle,
        "-",  # paths[0] and the broken image
        photos,  # every image (8)
        tmp_path / "missing.jpg",
        "--json",
        "--batch-size",
        "9",
        "--save-dir",
        tmp_path / "out",
        "--npy",
        tmp_path / "features.npy",
    )
    assert run.code == 1  # some inputs failed
    assert fast_loads == [bundle]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2
    assert any(f"{broken}: not an image" in line for line in errors)
    assert any("missing.jpg: not found" in line for line in errors)
    expected = [paths[0], *paths]
    lines = run.json_lines()
    assert [line["input_path"] for line in lines] == expected
    assert all(list(line) == ["input_path", "page_index", "feature"] and line["page_index"] is None for line in lines)
    features = np.array([line["feature"] for line in lines], np.float32)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)
    api = _features(model.predict(paths, batch_size=1))
    np.testing.assert_allclose(features, np.concatenate([api[:1], api]), rtol=0, atol=1e-6)

    matrix = np.load(tmp_path / "features.npy")
    assert matrix.dtype == np.float32 and matrix.shape == (9, 512)
    np.testing.assert_array_equal(matrix, features)
    assert (tmp_path / "features.npy.paths.txt").read_text().splitlines() == expected

    stems = [Path(p).stem for p in expected]
    saved = sorted(p.name for p in (tmp_path / "out").iterdir())
    # the first image twice and 'same' twice: numbered in input order, and said so on stderr
    assert saved == sorted({f"{s}_res.json" for s in stems} | {f"{stems[0]}_2_res.json", "same_2_res.json"})
    assert json.loads((tmp_path / "out" / "same_2_res.json").read_text()) == lines[-3]  # c/same.jpg
    assert json.loads((tmp_path / "out" / f"{stems[0]}_2_res.json").read_text()) == lines[1]
    assert "saved as same_2_res.json (same_res.json is another input's)" in run.stderr


def test_cli_for_people_and_random_weights_warning(cli, fast_loads, model, photos, tmp_path, monkeypatch):
    monkeypatch.setenv("SHITU_CACHE_DIR", str(tmp_path))
    run = cli(
        "predict", "--model", "PP-ShiTuV2_rec", "--random-weights", "--input-size", str(SIZE), photos / "five.webp"
    )
    assert run.code == 0, run.stderr
    assert run.stdout == ""  # people's output is on stderr
    assert "RANDOM weights" in run.stderr and "five.webp" in run.stderr and "1.00000" in run.stderr
    assert "1 of 1 images embedded" in run.stderr
    assert cli("predict", photos).code != 0  # neither --model nor --model-dir
    empty = tmp_path / "empty"
    empty.mkdir()
    run = cli("predict", "--model", "PP-ShiTuV2_rec", "--random-weights", empty)
    assert run.code == 1 and "no images in this folder" in run.stderr and "no images to predict" in run.stderr


def test_cli_with_a_real_index_adds_hits(cli, fast_loads, model, bundle, photos, tmp_path):
    index_module = pytest.importorskip("shitu.index")
    gallery = resolve_inputs([photos])[:5]
    features = _features(model.predict(gallery, batch_size=8))
    index_module.build_index(
        features, [0, 1, 2, 3, 4], gallery, output=tmp_path / "index", recognizer_info=model.describe()
    )
    run = cli("predict", "--model-dir", bundle, gallery[1], "--index", tmp_path / "index", "-k", "2", "--json")
    assert run.code == 0, run.stderr
    (line,) = run.json_lines()
    assert [hit["path"] for hit in line["hits"]][:1] == [gallery[1]] and len(line["hits"]) == 2
    assert line["hits"][0]["label"] == 1 and line["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert line["hits"][0]["score"] >= line["hits"][1]["score"]
