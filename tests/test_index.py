"""The retrieval index: search results against numpy, persistence, atomic saves, damaged files, the CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import tree_digest, write_image

from shitu.data.inputs import resolve
from shitu.errors import ShituError
from shitu.index import Hit, RetrievalIndex, build_index, open_index, vote
from shitu.index.core import SERIAL_ADD_BELOW

RECOGNIZER = {"model": "toy", "embedding_size": 32, "input_size": 64, "bundle": None}


def clustered(n: int, dim: int = 32, clusters: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around ``clusters`` random centres, and the cluster of each (as its label)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    labels = rng.integers(0, clusters, n)
    x = (centres[labels] + 0.35 * rng.standard_normal((n, dim))).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), labels


def numpy_topk(gallery: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ gallery.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


def make(tmp_path: Path, n: int = 300, **kwargs) -> tuple[RetrievalIndex, np.ndarray, np.ndarray, Path]:
    x, labels = clustered(n)
    out = tmp_path / "idx"
    index = build_index(
        x, labels.tolist(), [f"img/{i}.jpg" for i in range(n)], output=out, recognizer_info=RECOGNIZER, **kwargs
    )
    return index, x, labels, out


def keys_of(hits: list[list[Hit]]) -> list[list[int]]:
    return [[h.key for h in row] for row in hits]


def test_a_small_gallery_builds_the_same_graph_every_time(tmp_path):
    """Below SERIAL_ADD_BELOW rows the graph is built on one thread: the same rows give the same index.usearch
    (concurrent inserts into a small graph differ from build to build and now and then leave neighbours out)."""
    assert SERIAL_ADD_BELOW > 300
    digests = set()
    for attempt in range(3):
        (tmp_path / str(attempt)).mkdir()
        _, _, _, out = make(tmp_path / str(attempt))
        digests.add(hashlib.sha256((out / "index.usearch").read_bytes()).hexdigest())
    assert len(digests) == 1


def test_search_matches_numpy_cosine(tmp_path):
    index, x, labels, _ = make(tmp_path)
    queries, _ = clustered(40, seed=1)
    want_keys, want_scores = numpy_topk(x, queries, 5)
    hits = index.search(queries, k=5, exact=True)
    assert keys_of(hits) == want_keys.tolist()
    np.testing.assert_allclose([[h.score for h in row] for row in hits], want_scores, atol=1e-5)
    assert all(h.label == labels[h.key] and h.path == f"img/{h.key}.jpg" for row in hits for h in row)
    # the HNSW graph may miss a neighbour now and then; its scores are still exact
    approximate = index.search(queries, k=5)
    assert np.mean([a == b for a, b in zip(keys_of(approximate), want_keys.tolist(), strict=True)]) >= 0.9
    for query, row in zip(queries, approximate, strict=True):
        np.testing.assert_allclose([h.score for h in row], x[[h.key for h in row]] @ query, atol=1e-5)
        assert [h.score for h in row] == sorted((h.score for h in row), reverse=True)
    # a stored vector finds itself with score 1
    self_hits = index.search(x[:10], k=1)
    assert [row[0].key for row in self_hits] == list(range(10))
    np.testing.assert_allclose([row[0].score for row in self_hits], 1.0, atol=1e-5)


def test_result_shape_is_the_same_for_one_or_many_queries(tmp_path):
    index, x, _, _ = make(tmp_path, n=20)
    one = index.search(x[3], k=4)
    assert len(one) == 1 and len(one[0]) == 4
    assert keys_of(index.search(x[3:4], k=4)) == keys_of(one)
    assert keys_of(index.search(x[3:6], k=4))[0] == keys_of(one)[0]
    assert [len(row) for row in index.search(x[:3], k=50)] == [20, 20, 20]  # k above the size: all items
    assert index.search(np.zeros((0, 32), np.float32), k=3) == []
    with pytest.raises(ShituError, match=r"16 dimensions.*32-dimensional"):
        index.search(np.ones((2, 16), np.float32))
    with pytest.raises(ShituError, match="k must be"):
        index.search(x[:1], k=0)
    empty = build_index(np.zeros((0, 32), np.float32), [], [], output=None, recognizer_info=RECOGNIZER)
    assert empty.search(x[:2], k=3) == [[], []]


def test_scores_are_unaffected_by_vector_length(tmp_path):
    index, x, _, _ = make(tmp_path, n=50)
    hits = index.search(5.0 * x[:4], k=3, exact=True)
    assert [row[0].key for row in hits] == [0, 1, 2, 3]
    np.testing.assert_allclose([row[0].score for row in hits], 1.0, atol=1e-5)


def test_reopen_gives_the_same_results(tmp_path):
    index, _, _, out = make(tmp_path)
    queries, _ = clustered(20, seed=2)
    again = open_index(out)
    assert len(again) == len(index) == 300
    assert again.search(queries, k=5) == index.search(queries, k=5)
    assert again.search(queries, k=5, exact=True) == index.search(queries, k=5, exact=True)
    assert again.info["recognizer"] == RECOGNIZER and again.info["count"] == 300 and again.info["num_labels"] == 10
    doc = json.loads((out / "index.json").read_text())
    assert doc["format"] == "shitu-retrieval-index" and doc["dim"] == 32 and doc["dtype"] == "f32"
    assert set(doc["files"]) == {"index.usearch", "items.jsonl"}


def test_add_and_remove_round_trip(tmp_path):
    index, x, _, out = make(tmp_path, n=30)
    extra, _ = clustered(5, seed=3)
    keys = index.add(extra, [7] * 5, [f"new/{i}.jpg" for i in range(5)])
    assert keys == [30, 31, 32, 33, 34]
    index.save()
    index = open_index(out)
    assert keys_of(index.search(extra, k=1)) == [[k] for k in keys]
    removed = index.remove([30, "new/1.jpg", "2"])
    assert [it.key for it in removed] == [2, 30, 31]
    index.save()
    index = open_index(out)
    assert len(index) == 32
    assert not {2, 30, 31} & {h.key for row in index.search(np.vstack([x[2], extra[:2]]), k=32) for h in row}
    with pytest.raises(ShituError, match=r"not in the index.*'nowhere\.jpg'"):
        index.remove([0, "nowhere.jpg"])
    assert len(index) == 32  # all or nothing
    assert index.add(extra[:1], [1], ["again.jpg"]) == [35]  # removed keys are never reused


def test_vote_sums_scores_and_breaks_ties_by_rank():
    hits = [Hit(0, 1, "a", 0.9), Hit(1, 2, "b", 0.8), Hit(2, 2, "c", 0.7), Hit(3, 1, "d", 0.1)]
    assert vote(hits) == (2, pytest.approx(0.8))  # 1.5 for label 2 against 1.0 for label 1
    tie = [Hit(0, 5, "a", 0.5), Hit(1, 3, "b", 0.5)]
    assert vote(tie) == (5, 0.5) and vote(tie[::-1]) == (3, 0.5)
    assert vote([]) == (None, 0.0)
    assert RetrievalIndex.vote(hits) == vote(hits)


def test_compact_dtypes_find_nearly_the_same_neighbours(tmp_path):
    x, labels = clustered(2000, dim=64, clusters=40)
    queries, _ = clustered(200, dim=64, clusters=40, seed=5)
    want, want_scores = numpy_topk(x, queries, 1)
    top1 = {}
    for dtype in ("f32", "f16", "i8"):
        build_index(x, labels.tolist(), ["p"] * len(x), output=tmp_path / dtype, recognizer_info=None, dtype=dtype)
        index = open_index(tmp_path / dtype)
        assert index.dtype == dtype and index.info["dtype"] == dtype
        hits = index.search(queries, k=10, exact=True)
        top1[dtype] = np.array([row[0].key for row in hits])
        # the true nearest item is among the first ten, and the item returned first is nearly as close
        assert np.mean([want[i, 0] in {h.key for h in row} for i, row in enumerate(hits)]) >= 0.98
        true_scores = np.einsum("ij,ij->i", x[top1[dtype]], queries)
        assert np.max(want_scores[:, 0] - true_scores) < 0.03
    assert (top1["f32"] == want[:, 0]).all()
    assert (top1["f16"] == want[:, 0]).mean() >= 0.98
    assert (top1["i8"] == want[:, 0]).mean() >= 0.8  # 8 bits per component: near-ties in a cluster swap


def test_existing_index_needs_overwrite_and_foreign_folders_are_kept(tmp_path):
    _, x, _, out = make(tmp_path, n=10)
    with pytest.raises(ShituError, match="already exists"):
        build_index(x, [0] * 10, ["p"] * 10, output=out, recognizer_info=RECOGNIZER)
    build_index(x[:4], [0] * 4, ["p"] * 4, output=out, recognizer_info=RECOGNIZER, overwrite=True)
    assert len(open_index(out)) == 4
    foreign = tmp_path / "photos"
    write_image(foreign / "a.jpg")
    with pytest.raises(ShituError, match="not a shitu index"):
        build_index(x, [0] * 10, ["p"] * 10, output=foreign, recognizer_info=RECOGNIZER, overwrite=True)
    assert (foreign / "a.jpg").is_file()


def test_failed_save_leaves_the_old_index_intact(tmp_path, monkeypatch):
    index, x, _, out = make(tmp_path, n=40)
    before = tree_digest(out)
    index.add(x[:3], [1, 1, 1], ["x", "y", "z"])
    import shitu.fileio

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(shitu.fileio, "atomic_write_json", crash)  # index.usearch and items.jsonl are staged by now
    with pytest.raises(OSError, match="disk full"):
        index.save()
    assert tree_digest(out) == before
    assert len(open_index(out)) == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no staging folder left behind
    monkeypatch.undo()
    index.save()
    assert len(open_index(out)) == 43


def test_concurrent_change_is_not_overwritten(tmp_path):
    _, _, _, out = make(tmp_path, n=10)
    first, second = open_index(out), open_index(out)
    first.remove([0])
    first.save()
    second.remove([1])
    with pytest.raises(ShituError, match="changed on disk"):
        second.save()
    assert len(open_index(out)) == 9


def _rewrite_info(out: Path, **changes) -> None:
    doc = json.loads((out / "index.json").read_text())
    doc.update(changes)
    (out / "index.json").write_text(json.dumps(doc))


def _refresh_checksums(out: Path) -> None:
    import hashlib

    doc = json.loads((out / "index.json").read_text())
    for name in doc["files"]:
        doc["files"][name]["sha256"] = hashlib.sha256((out / name).read_bytes()).hexdigest()
    (out / "index.json").write_text(json.dumps(doc))


def test_damaged_files_are_refused_naming_the_file(tmp_path):
    _, _, _, out = make(tmp_path, n=50)
    pristine = {p.name: p.read_bytes() for p in out.iterdir()}

    def restore():
        for name, data in pristine.items():
            (out / name).write_bytes(data)

    usearch_file = out / "index.usearch"
    usearch_file.write_bytes(pristine["index.usearch"][: len(pristine["index.usearch"]) // 2])
    with pytest.raises(ShituError, match=r"index\.usearch: checksum mismatch"):
        open_index(out)
    _refresh_checksums(out)  # the checksum made to fit: usearch itself must refuse the truncated file
    with pytest.raises(ShituError, match=r"index\.usearch: cannot read the usearch index"):
        open_index(out)
    restore()

    (out / "items.jsonl").write_text((out / "items.jsonl").read_text().replace('"label": 1', '"label": 2'))
    with pytest.raises(ShituError, match=r"items\.jsonl: checksum mismatch"):
        open_index(out)
    (out / "items.jsonl").write_text("".join((out / "items.jsonl").read_text().splitlines(True)[:-1]))
    _refresh_checksums(out)
    with pytest.raises(ShituError, match=r"items\.jsonl: counts disagree"):
        open_index(out)
    restore()

    _rewrite_info(out, dim=64)
    with pytest.raises(ShituError, match=r"index\.json: says dim 64.*holds dim 32"):
        open_index(out)
    restore()
    (out / "index.json").write_text('{"format": "shitu-retrieval-index", ')
    with pytest.raises(ShituError, match=r"index\.json: unreadable index description"):
        open_index(out)
    _rewrite_info_text = json.dumps({"format": "shitu-retrieval-index", "format_version": 99})
    (out / "index.json").write_text(_rewrite_info_text)
    with pytest.raises(ShituError, match=r"index\.json: index format version 99"):
        open_index(out)
    restore()

    (out / "index.usearch").unlink()
    with pytest.raises(ShituError, match=r"index\.usearch: missing"):
        open_index(out)
    with pytest.raises(ShituError, match="index folder does not exist"):
        open_index(tmp_path / "elsewhere")
    with pytest.raises(ShituError, match="not a shitu index"):
        open_index(tmp_path)


def test_another_recognizer_is_refused(tmp_path):
    _, _, _, out = make(tmp_path, n=10)
    open_index(out, recognizer_info={**RECOGNIZER, "bundle": "/moved/elsewhere"})  # same model elsewhere: fine
    with pytest.raises(ShituError, match=r"index\.json: the index was built with input_size 64.*128"):
        open_index(out, recognizer_info={**RECOGNIZER, "input_size": 128})
    with pytest.raises(ShituError, match="model 'toy'"):
        open_index(out).check_recognizer({"model": "PP-ShiTuV2_rec", "embedding_size": 32, "input_size": 64})
    with pytest.raises(ShituError, match="embedding size is 512"):
        build_index(
            np.ones((2, 32), np.float32), [0, 1], ["a", "b"], output=None, recognizer_info={"embedding_size": 512}
        )


def test_resolve_inputs(tmp_path):
    a = write_image(tmp_path / "photos" / "b" / "2.png", fmt="PNG")
    b = write_image(tmp_path / "photos" / "a" / "1.jpg")
    (tmp_path / "photos" / "notes.md").write_text("not an image")
    listing = tmp_path / "list.txt"
    listing.write_text("# queries\nphotos/a/1.jpg\n\nphotos/b/2.png 3\nphotos/missing.jpg\n")
    resolved = resolve([tmp_path / "photos", listing, tmp_path / "gone.jpg", b])
    assert resolved.paths == [str(b), str(a), str(b), str(a), str(b)]
    assert resolved.problems == [
        f"{listing}:5: not found: photos/missing.jpg",
        f"{tmp_path / 'gone.jpg'}: not found",
    ]
    assert resolved.skipped == [f"{tmp_path / 'photos' / 'notes.md'}: skipped: not an image Pillow can open"]


# -- the command line, on the bundled demo dataset with a random-weight model at 64 px ---------------------------


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    from shitu.models.bundle import save_bundle
    from shitu.plugins import get_host

    spec = get_host().model("PP-ShiTuV2_rec")
    path = tmp_path_factory.mktemp("bundle") / "rec64"
    save_bundle(path, spec=spec, model=spec.build(20, seed=0), num_classes=20, extra={"input_size": 64})
    return path


@pytest.fixture
def loaded_once(monkeypatch):
    """Each command loads the bundle (seconds): load it once per test and hand out the same recognizer."""
    import shitu.embed.recognizer

    loaded: dict[tuple[str, int | None], object] = {}
    original = shitu.embed.recognizer.load_recognizer

    def load(model, **kwargs):
        key = (str(model), kwargs.get("input_size"))
        if key not in loaded:
            loaded[key] = original(model, **kwargs)
        return loaded[key]

    monkeypatch.setattr(shitu.embed.recognizer, "load_recognizer", load)
    return loaded


def test_cli_build_search_add_remove_eval(cli, demo_copy, tiny_bundle, tmp_path, loaded_once):
    from shitu.embed.recognizer import load_recognizer

    assert load_recognizer(tiny_bundle).input_size == 64  # extra["input_size"] is honoured
    gallery_lines = (demo_copy / "gallery.txt").read_text().splitlines()[:8]
    (demo_copy / "small_gallery.txt").write_text("\n".join(gallery_lines) + "\n")
    (demo_copy / "small_query.txt").write_text("\n".join(gallery_lines[:2]) + "\n")  # list paths are relative
    out = tmp_path / "index"

    built = cli("index", "build", "--model-dir", tiny_bundle, "--gallery", demo_copy / "small_gallery.txt",
                "--output", out, "--batch-size", "4", "--json")  # fmt: skip
    assert built.code == 0, built.stderr
    doc = built.json()
    assert doc["count"] == 8 and doc["dim"] == 512 and doc["recognizer"]["input_size"] == 64
    assert doc["recognizer"]["bundle"] == str(tiny_bundle.absolute())

    again = cli("index", "build", "--model-dir", tiny_bundle, "--gallery", demo_copy / "small_gallery.txt",
                "--output", out)  # fmt: skip
    assert again.code == 1 and "already exists" in again.stderr and len(again.stderr.strip().splitlines()) == 1

    first = demo_copy / gallery_lines[0].rsplit(" ", 1)[0]
    found = cli("search", "--index", out, demo_copy / "small_query.txt", demo_copy / "nowhere.jpg", "-k", "3",
                "--batch-size", "4", "--json")  # fmt: skip
    assert found.code == 1 and "nowhere.jpg: not found" in found.stderr
    lines = found.json_lines()
    assert [line["input"] for line in lines] == [str(first), str(demo_copy / gallery_lines[1].rsplit(" ", 1)[0])]
    for line in lines:
        scores = [hit["score"] for hit in line["hits"]]
        assert len(line["hits"]) == 3 and scores == sorted(scores, reverse=True)
        assert line["hits"][0]["path"] == line["input"] and scores[0] == pytest.approx(1.0, abs=1e-5)
        assert line["label"] == vote([Hit(**hit) for hit in line["hits"]])[0]
    exact = cli("search", "--index", out, first, "-k", "3", "--exact", "--batch-size", "4", "--json").json_lines()
    assert [h["key"] for h in exact[0]["hits"]] == [h["key"] for h in lines[0]["hits"]]

    removed = cli("index", "remove", "--index", out, "0", str(demo_copy / gallery_lines[1].rsplit(" ", 1)[0]), "--json")
    assert removed.code == 0 and [it["key"] for it in removed.json()["removed"]] == [0, 1]
    added = cli("index", "add", "--index", out, first, "--label", "99", "--batch-size", "4", "--json")
    assert added.code == 0 and added.json()["added"] == [{"key": 8, "label": 99, "path": str(first)}]
    info = cli("index", "info", "--index", out, "--json").json()
    assert info["count"] == 7 and info["next_key"] == 9

    evaluated = cli("index", "eval", "--index", out, "--dataset", demo_copy, "-k", "1,3", "--batch-size", "4", "--json")
    assert evaluated.code == 0, evaluated.stderr
    result = evaluated.json()
    assert result["num_queries"] == 60 and result["ann_recall"]["recall@1"] == 1.0
    assert 0.0 <= result["accuracy_top1"] <= 1.0
    assert len(loaded_once) == 1  # every command used the bundle recorded in the index


def test_cli_refuses_a_damaged_index(cli, tmp_path):
    _, _, _, out = make(tmp_path, n=10)
    (out / "items.jsonl").write_text("")
    result = cli("index", "info", "--index", out)
    assert result.code == 1
    message = "checksum mismatch: the file is damaged or was changed outside shitu (rebuild the index)"
    assert result.stderr.strip() == f"error: {out / 'items.jsonl'}: {message}"
    assert cli("search", "--index", tmp_path / "none", "x.jpg").code == 1


def test_search_inputs_with_a_name_too_long_are_a_problem_not_a_crash(tmp_path):
    listed = tmp_path / "list.txt"
    listed.write_text("y" * 300 + ".jpg\n")
    resolved = resolve([str(tmp_path / ("x" * 300 + ".jpg")), str(listed)])
    assert resolved.paths == []
    assert len(resolved.problems) == 2
    assert "too long" in resolved.problems[0] and resolved.problems[1].startswith(f"{listed}:1: yyy")
    assert "too long" in resolved.problems[1]
