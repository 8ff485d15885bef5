"""The service's galleries in-process: journal replay, torn records, idempotent replay, dedupe, paging."""

from __future__ import annotations

import numpy as np
import pytest

from shitu.serve.journal import read_records
from shitu.serve.state import JOURNAL_FILE, Conflict, GalleryStore, NotFound

INFO = {"model": "toy", "embedding_size": 8, "input_size": 32, "bundle": None}


def _store(tmp_path, compact_every: int = 1000) -> GalleryStore:
    store = GalleryStore(tmp_path / "state", INFO, compact_every=compact_every)
    store.open_all()
    return store


def _vectors(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)


def test_writes_survive_a_crash_through_the_journal_and_a_torn_tail_is_dropped(tmp_path):
    gallery = _store(tmp_path).get(None)
    x = _vectors(4)
    ids = [a.id for a in gallery.add(x[:3], ["a", "b", "a"], ["h0", "h1", "h2"], ["r0", None, None])]
    gallery.remove(ids=[ids[1]])
    journal = gallery.folder / JOURNAL_FILE
    assert len(read_records(journal)[0]) == 2
    with journal.open("ab") as handle:  # a record cut short by the crash: never acknowledged
        handle.write(b'{"op":"add","first_key":3,"rows":[')
    reopened = _store(tmp_path).get(None)  # no close(): as after kill -9
    assert reopened.replayed == 2 and journal.stat().st_size == 0  # replayed, then compacted
    items, total = reopened.page(offset=0, limit=10)
    assert total == 2 and [(i.id, i.label, i.ref) for i in items] == [(0, "a", "r0"), (2, "a", None)]
    assert reopened.search(x[2:3], k=1)[0][0].id == 2
    # new ids continue after the old ones, never reusing a removed one
    assert reopened.add(x[3:4], ["c"], ["h3"])[0].id == 3


def test_replay_is_idempotent_when_the_crash_came_between_save_and_emptying_the_journal(tmp_path):
    gallery = _store(tmp_path).get(None)
    gallery.add(_vectors(2), ["a", "b"], ["h0", "h1"])
    gallery.remove(labels=["a"])
    saved = (gallery.folder / JOURNAL_FILE).read_bytes()
    gallery.compact()  # index saved, journal emptied...
    (gallery.folder / JOURNAL_FILE).write_bytes(saved)  # ...as if the emptying had not happened
    reopened = _store(tmp_path).get(None)
    assert reopened.replayed == 0 and [i.label for i in reopened.page(offset=0, limit=5)[0]] == ["b"]


def test_same_content_is_not_stored_twice_unless_asked_and_refs_are_unique(tmp_path):
    gallery = _store(tmp_path).get(None)
    x = _vectors(2)
    first = gallery.add(x, ["a", "a"], ["same", "same"])
    assert [(a.id, a.existing) for a in first] == [(0, False), (0, True)]
    assert gallery.add(x[:1], ["a"], ["same"], allow_duplicates=True)[0].id == 1
    with pytest.raises(Conflict):
        gallery.add(x, ["a", "b"], ["u", "v"], ["dup", "dup"])
    gallery.add(x[:1], ["b"], ["w"], ["mine"])
    with pytest.raises(Conflict):
        gallery.add(x[:1], ["b"], ["z"], ["mine"])
    with pytest.raises(NotFound):
        gallery.remove(ids=[0, 99])  # all or nothing
    assert len(gallery) == 3
    assert gallery.page(offset=0, limit=10, label="b")[1] == 1
    assert gallery.search(x[:1], k=5, labels=["b"])[0][0].label == "b"


def test_a_rescored_i8_gallery_replays_its_journal_and_keeps_its_vectors_in_step(tmp_path):
    store = GalleryStore(tmp_path / "state", INFO, dtype="i8", compact_every=1000)
    store.open_all()
    gallery = store.get(None)
    assert (gallery.index.dtype, gallery.index.rescore) == ("i8", 20)
    x = _vectors(6)
    ids = [a.id for a in gallery.add(x[:5], ["a", "b", "c", "d", "e"], [f"h{i}" for i in range(5)])]
    gallery.remove(ids=[ids[2]])
    reopened = GalleryStore(tmp_path / "state", INFO, dtype="i8", compact_every=1000)
    reopened.open_all()  # no close(): the journal is replayed onto the saved (empty) index
    again = reopened.get(None)
    assert again.replayed == 2 and again.index.rescore == 20
    items, stored = again.index.vectors()
    kept = [0, 1, 3, 4]
    assert [item.key for item in items] == kept
    unit = x[kept] / np.linalg.norm(x[kept], axis=1, keepdims=True)
    np.testing.assert_allclose(stored, unit, atol=1e-3)
    best = again.search(x[3:4], k=2)[0][0]
    assert best.id == 3 and best.score == pytest.approx(1.0, abs=1e-3)
