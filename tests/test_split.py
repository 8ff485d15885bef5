"""shitu split: PaddleX's rules (sum to 100, each > 0, round()), seeded and repeatable, nothing ever lost."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import pytest
from conftest import tree_digest

from shitu.data.formats import SPLITS, Sample, SplitOptions
from shitu.data.split import split_dataset, split_samples
from shitu.errors import ShituError
from shitu.fileio import JOURNAL_NAME

ARGS = ("--train", "70", "--gallery", "20", "--query", "10")


def make_lists(root: Path, lists: dict[str, list[str]]) -> Path:
    """A dataset of list files only (split never opens the images)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    for split, lines in lists.items():
        (root / f"{split}.txt").write_text("".join(f"{line}\n" for line in lines))
    return root


def lines_of(root: Path, split: str, suffix: str = "") -> list[str]:
    return (root / f"{split}.txt{suffix}").read_text().splitlines()


def numbered(n: int, classes: int = 5) -> list[str]:
    return [f"images/c{i % classes}/img{i:03d}.jpg {i % classes}" for i in range(n)]


def three_way(lines: list[str]) -> dict[str, list[str]]:
    """Spread lines over the three lists (every 2nd to train, every 4th to gallery, the rest to query)."""
    return {"train": lines[0::2], "gallery": lines[1::4], "query": lines[3::4]}


@pytest.mark.parametrize("n", [15, 25, 40])
def test_round_trip_keeps_every_line_once_and_backs_up_exactly(cli, tmp_path, n):
    lines = numbered(n)
    lists = three_way(lines)
    lists["query"].append(lists["train"][0])  # the same line in two lists: kept once
    root = make_lists(tmp_path / "ds", lists)
    old = {split: (root / f"{split}.txt").read_bytes() for split in SPLITS}

    result = cli("split", root, *ARGS, "--seed", "3")
    assert result.code == 0, result.stderr
    new = {split: lines_of(root, split) for split in SPLITS}
    union = [line for split in SPLITS for line in new[split]]
    assert len(union) == len(set(union)) == n  # disjoint, and no line lost or added
    assert set(union) == set(lines)
    n_train = round(n * 70 / 100)
    n_gallery = round(n * 20 / 100)
    assert [len(new[s]) for s in SPLITS] == [n_train, n_gallery, n - n_train - n_gallery]
    for split in SPLITS:
        assert (root / f"{split}.txt.bak").read_bytes() == old[split]
        assert new[split] == sorted(new[split])  # each list is written sorted by path
    assert not (root / "train.txt.bak.1").exists()
    assert sorted(p.name for p in root.iterdir()) == sorted(
        ["images", *(f"{s}.txt" for s in SPLITS), *(f"{s}.txt.bak" for s in SPLITS)]
    )  # no temporary file or journal left behind
    assert f"Split {root} by image (seed 3): train {n_train}, gallery {n_gallery}, query " in result.stderr


def test_paddlex_round_is_bankers_rounding(tmp_path):
    # 15 * 70 / 100 = 10.5 → 10 and 25 * 70 / 100 = 17.5 → 18: Python's round(), as PaddleX uses.
    samples = [Sample(f"images/{i}.jpg", i % 3) for i in range(15)]
    parts = split_samples(samples, SplitOptions(70, 20, 10, seed=0))
    assert [len(parts[s]) for s in SPLITS] == [10, 3, 2]
    samples = [Sample(f"images/{i}.jpg", i % 3) for i in range(25)]
    parts = split_samples(samples, SplitOptions(70, 20, 10, seed=0))
    assert [len(parts[s]) for s in SPLITS] == [18, 5, 2]


def test_same_seed_is_byte_identical_on_another_copy(cli, tmp_path):
    lines = numbered(30)
    first = make_lists(tmp_path / "a", three_way(lines))
    # The same lines, listed differently (other files, other order, CRLF): the split depends on the set only.
    second = tmp_path / "b"
    make_lists(second, {"train": lines[::-1][:10], "gallery": lines[::-1][10:], "query": []})
    (second / "gallery.txt").write_bytes((second / "gallery.txt").read_bytes().replace(b"\n", b"\r\n"))
    assert cli("split", first, *ARGS, "--seed", "3").code == 0
    assert cli("split", second, *ARGS, "--seed", "3").code == 0
    for split in SPLITS:
        assert (first / f"{split}.txt").read_bytes() == (second / f"{split}.txt").read_bytes()

    third = make_lists(tmp_path / "c", three_way(lines))
    assert cli("split", third, *ARGS, "--seed", "4").code == 0
    assert (third / "train.txt").read_bytes() != (first / "train.txt").read_bytes()
    assert set(lines_of(third, "train") + lines_of(third, "gallery") + lines_of(third, "query")) == set(lines)


def test_library_split_ignores_input_order_and_duplicates():
    samples = [Sample(f"images/{i}.jpg", i % 4) for i in range(20)]
    options = SplitOptions(60, 20, 20, seed=11)
    once = split_samples(samples, options)
    assert split_samples([*reversed(samples), samples[0], samples[5]], options) == once
    assert split_samples(samples, SplitOptions(60, 20, 20, seed=12)) != once


def test_second_split_keeps_first_backups_and_rerun_changes_nothing(cli, tmp_path):
    lines = numbered(30)
    root = make_lists(tmp_path / "ds", three_way(lines))
    original = {split: (root / f"{split}.txt").read_bytes() for split in SPLITS}

    assert cli("split", root, *ARGS, "--seed", "3").code == 0
    first = {split: (root / f"{split}.txt").read_bytes() for split in SPLITS}
    result = cli("split", root, "--train", "50", "--gallery", "30", "--query", "20", "--seed", "3")
    assert result.code == 0, result.stderr
    for split in SPLITS:
        assert (root / f"{split}.txt.bak").read_bytes() == original[split]  # the first backups survive
        assert (root / f"{split}.txt.bak.1").read_bytes() == first[split]  # and the first split is kept too
        assert f"kept the previous {split}.txt as {root / f'{split}.txt.bak.1'}" in result.stderr
    new = [line for split in SPLITS for line in lines_of(root, split)]
    assert sorted(new) == sorted(lines)
    assert [len(lines_of(root, s)) for s in SPLITS] == [15, 9, 6]

    before = tree_digest(root)
    again = cli("split", root, "--train", "50", "--gallery", "30", "--query", "20", "--seed", "3", "--json")
    assert again.code == 0
    assert tree_digest(root) == before  # no new backup, nothing rewritten
    assert again.json()["backups"] == [] and again.json()["changed"] == []
    human = cli("split", root, "--train", "50", "--gallery", "30", "--query", "20", "--seed", "3")
    assert "nothing changed" in human.stderr and "kept the previous" not in human.stderr

    # Back to the first options: the content equals .bak.1, so that backup is not duplicated.
    assert cli("split", root, *ARGS, "--seed", "3").code == 0
    assert {split: (root / f"{split}.txt").read_bytes() for split in SPLITS} == first
    for split in SPLITS:
        assert (root / f"{split}.txt.bak.2").exists()  # the 50/30/20 lists, kept
        assert not (root / f"{split}.txt.bak.3").exists()


def test_missing_lists_are_created_without_backups(cli, tmp_path):
    root = make_lists(tmp_path / "ds", {"train": numbered(20)})
    result = cli("split", root, *ARGS, "--json")
    assert result.code == 0
    doc = result.json()
    assert doc["backups"] == [str(root / "train.txt.bak")]
    assert doc["counts"] == {"train": 14, "gallery": 4, "query": 2}
    assert not (root / "gallery.txt.bak").exists()


def test_json_prints_one_document(cli, tmp_path):
    root = make_lists(tmp_path / "ds", three_way(numbered(20)))
    result = cli("split", root, *ARGS, "--seed", "1", "--json")
    assert result.code == 0
    assert len(result.stdout.strip().splitlines()) == 1
    assert result.json() == {
        "dataset_path": str(root),
        "counts": {"train": 14, "gallery": 4, "query": 2},
        "backups": [str(root / f"{s}.txt.bak") for s in SPLITS],
        "changed": [str(root / f"{s}.txt") for s in SPLITS],
    }
    assert result.stderr == ""


def _class_dataset(root: Path, sizes: list[int]) -> Path:
    lines = [f"images/c{c}/{i}.jpg {c}" for c, size in enumerate(sizes) for i in range(size)]
    return make_lists(root, three_way(lines))


def test_split_by_class_is_open_set(cli, tmp_path):
    sizes = [5, 4, 3, 2, 1, 6, 4, 3, 5, 2]
    root = _class_dataset(tmp_path / "ds", sizes)
    result = cli("split", root, "--train", "60", "--gallery", "20", "--query", "20", "--by", "class", "--seed", "7")
    assert result.code == 0, result.stderr

    def classes(split: str) -> Counter[int]:
        return Counter(int(line.rsplit(" ", 1)[1]) for line in lines_of(root, split))

    train, gallery, query = classes("train"), classes("gallery"), classes("query")
    assert len(train) == 6  # round(10 * 60 / 100) whole classes
    assert not set(train) & (set(gallery) | set(query))
    for label in set(gallery) | set(query):
        assert gallery[label] + query[label] == sizes[label]  # every image of an eval class is used
        if sizes[label] >= 2:
            assert gallery[label] >= 1 and query[label] >= 1
        else:
            assert query[label] == 0  # a single image can only be a gallery entry
    assert sum(train.values()) + sum(gallery.values()) + sum(query.values()) == sum(sizes)

    other = _class_dataset(tmp_path / "copy", sizes)
    cli("split", other, "--train", "60", "--gallery", "20", "--query", "20", "--by", "class", "--seed", "7")
    for split in SPLITS:
        assert (other / f"{split}.txt").read_bytes() == (root / f"{split}.txt").read_bytes()


def test_split_by_class_gallery_query_ratio():
    samples = [Sample(f"images/c{c}/{i}.jpg", c) for c in range(4) for i in range(10)]
    parts = split_samples(samples, SplitOptions(50, 30, 20, seed=0, by="class"))
    per_class: dict[str, Counter[int]] = defaultdict(Counter)
    for split in SPLITS:
        per_class[split].update(s.label for s in parts[split])
    assert len(per_class["train"]) == 2
    for label in per_class["gallery"]:
        assert (per_class["gallery"][label], per_class["query"][label]) == (6, 4)  # 10 images at 30:20


def _dataset_with_malformed_line(tmp_path: Path) -> tuple[Path, str]:
    root = make_lists(tmp_path / "ds", three_way(numbered(20)))
    (root / "gallery.txt").write_text("images/c1/img001.jpg 1\nimages/c1/img005.jpg\n")
    return root, (
        f"error: {root}/gallery.txt:2: malformed line 'images/c1/img005.jpg': expected '<image path> "
        "<integer label>' separated by one space (fix it before splitting)"
    )


ERROR_CASES = {
    "sum": (
        ["--train", "70", "--gallery", "20", "--query", "20"],
        "percentages must sum to 100, got 70 + 20 + 20 = 110",
    ),
    "zero": (["--train", "0", "--gallery", "90", "--query", "10"], "--train must be above 0, got 0"),
    "negative": (["--train", "80", "--gallery", "30", "--query", "-10"], "--query must be above 0, got -10"),
    "by": ([*ARGS, "--by", "foo"], "--by must be 'image' or 'class', got 'foo'"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_bad_options_are_one_line_and_change_nothing(cli, tmp_path, case):
    args, message = ERROR_CASES[case]
    root = make_lists(tmp_path / "ds", three_way(numbered(20)))
    before = tree_digest(root)
    result = cli("split", root, *args)
    assert result.code == 1
    assert result.stderr.splitlines() == [f"error: {message}"]
    assert result.stdout == ""
    assert tree_digest(root) == before


def test_malformed_line_is_located_and_nothing_changes(cli, tmp_path):
    root, expected = _dataset_with_malformed_line(tmp_path)
    before = tree_digest(root)
    result = cli("split", root, *ARGS, "--json")
    assert (result.code, result.stdout, result.stderr.splitlines()) == (1, "", [expected])
    assert tree_digest(root) == before


@pytest.mark.parametrize(
    ("content", "located"),
    [
        (b"images/a.jpg 1\nimages/b.jpg x\n", "2: label 'x' is not an integer"),
        (b"images/a.jpg 1\n../up.jpg 2\n", "2: image path '../up.jpg' leaves the dataset root through '..'"),
        (b"images/\xff.jpg 1\n", "1: line is not valid UTF-8"),
        (b"images/a.jpg 1 \n", "1: malformed line 'images/a.jpg 1 ': trailing space after the label"),
    ],
)
def test_every_bad_line_kind_refuses_the_split(cli, tmp_path, content, located):
    root = make_lists(tmp_path / "ds", three_way(numbered(20)))
    (root / "query.txt").write_bytes(content)
    before = tree_digest(root)
    result = cli("split", root, *ARGS)
    assert result.code == 1
    assert result.stderr.splitlines() == [f"error: {root}/query.txt:{located} (fix it before splitting)"]
    assert tree_digest(root) == before


def test_too_few_images(cli, tmp_path):
    root = make_lists(tmp_path / "ds", {"train": ["images/a.jpg 0", "images/b.jpg 1"]})
    before = tree_digest(root)
    result = cli("split", root, *ARGS)
    assert result.code == 1
    assert result.stderr.splitlines() == [
        "error: 2 images are too few to split 70/20/10 by image: the gallery list would be empty"
    ]
    assert tree_digest(root) == before
    by_class = cli("split", root, *ARGS, "--by", "class")
    assert by_class.stderr.splitlines() == [
        "error: 2 images are too few to split 70/20/10 by class: the query list would be empty"
    ]
    one_class = make_lists(tmp_path / "one", {"train": [f"images/{i}.jpg 0" for i in range(10)]})
    result = cli("split", one_class, *ARGS, "--by", "class")
    assert result.stderr.splitlines() == ["error: splitting by class needs at least 2 classes, the dataset has 1"]
    assert tree_digest(root) == before


def test_empty_lists_have_nothing_to_split(cli, tmp_path):
    root = make_lists(tmp_path / "ds", {"train": [], "gallery": [], "query": []})
    result = cli("split", root, *ARGS)
    assert result.stderr.splitlines() == [f"error: {root}: the dataset lists no images to split"]


def test_missing_folder_and_missing_option(cli, tmp_path):
    result = cli("split", tmp_path / "nope", *ARGS)
    assert (result.code, result.stderr.splitlines()) == (
        1,
        [f"error: {tmp_path / 'nope'}: dataset folder does not exist"],
    )
    root = make_lists(tmp_path / "ds", three_way(numbered(20)))
    before = tree_digest(root)
    usage = cli("split", root, "--train", "70", "--gallery", "30")
    assert usage.code == 2
    assert usage.stderr.splitlines() == ["error: Missing option '--query'. (see 'shitu split --help')"]
    assert tree_digest(root) == before


def test_library_rejects_bad_options_before_touching_anything(tmp_path):
    root = make_lists(tmp_path / "ds", three_way(numbered(20)))
    before = tree_digest(root)
    with pytest.raises(ShituError, match=r"--seed must be a whole number, got None"):
        split_dataset(root, SplitOptions(70, 20, 10, seed=None))  # type: ignore[arg-type]
    with pytest.raises(ShituError, match=r"--train must be a whole percentage, got 70.0"):
        split_dataset(root, SplitOptions(70.0, 20, 10))  # type: ignore[arg-type]
    assert tree_digest(root) == before


def test_library_split_returns_what_it_wrote(tmp_path):
    root = make_lists(tmp_path / "ds", three_way(numbered(20)))
    written = split_dataset(root, SplitOptions(50, 25, 25, seed=2))
    assert written.root == root
    assert written.counts == {"train": 10, "gallery": 5, "query": 5}
    assert written.backups == [root / f"{s}.txt.bak" for s in SPLITS]
    assert written.changed == [root / f"{s}.txt" for s in SPLITS]


def test_dataset_found_below_a_wrapper_folder(cli, tmp_path):
    root = make_lists(tmp_path / "wrap" / "inner", three_way(numbered(20)))
    result = cli("split", tmp_path / "wrap", *ARGS, "--json")
    assert result.code == 0
    assert result.json()["dataset_path"] == str(root)
    assert (root / "train.txt.bak").exists()


def test_pending_update_is_finished_before_splitting(cli, tmp_path):
    lines = numbered(20)
    root = make_lists(tmp_path / "ds", {"train": lines[:10], "gallery": lines[10:15], "query": lines[15:]})
    # An interrupted update that would add two lines to query.txt: they must take part in the split.
    extra = ["images/new/a.jpg 9", "images/new/b.jpg 9"]
    (root / ".query.txt.abc123.new").write_text("".join(f"{line}\n" for line in [*lines[15:], *extra]))
    (root / JOURNAL_NAME).write_text('{"rename": {".query.txt.abc123.new": "query.txt"}}')
    assert cli("split", root, *ARGS).code == 0
    assert not (root / JOURNAL_NAME).exists()
    union = [line for split in SPLITS for line in lines_of(root, split)]
    assert sorted(union) == sorted(lines + extra)
    assert lines_of(root, "query", ".bak") == lines[15:] + extra  # the completed update is what was backed up


def test_bundled_demo_is_refused(cli, demo_copy, monkeypatch):
    import shitu.data.demo

    monkeypatch.setattr(shitu.data.demo, "demo_dataset_path", lambda: demo_copy)
    before = tree_digest(demo_copy)
    result = cli("split", demo_copy, *ARGS)
    assert result.code == 1
    assert result.stderr.splitlines() == [
        f"error: {demo_copy}: the bundled demo dataset is read-only (copy it elsewhere before splitting or converting)"
    ]
    assert tree_digest(demo_copy) == before


def test_demo_copy_split_keeps_all_220_images(cli, demo_copy):
    before = sorted(line for s in SPLITS for line in lines_of(demo_copy, s))
    result = cli("split", demo_copy, *ARGS, "--by", "class", "--seed", "0", "--json")
    assert result.code == 0, result.stderr
    after = sorted(line for s in SPLITS for line in lines_of(demo_copy, s))
    assert after == before and len(after) == 220
