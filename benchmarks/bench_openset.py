#!/usr/bin/env python3
"""Which vote recognises most query photos, and how well a calibrated rule answers "unknown".

For each dataset (ShiTuRecDataset folders with gallery.txt, query.txt and train.txt) the gallery and the
queries are embedded with ``--model-dir`` (default: the demo's starting weights at 64 px), the gallery is
indexed (exact search), and every vote of :mod:`shitu.index.decision` labels the queries from their top k:

- ``gallery``: the dataset's gallery as it is;
- ``uneven``: the gallery plus the training photos of every other product (labels 0, 2, 4, ...), so half
  the products have many more gallery pictures than the others, as in a real catalogue.

Then :func:`shitu.index.calibrate.calibrate` fits a rule (by class, half of the products held out) at each
``--target`` precision and with max F1, and reports it on the held-out products.

Finally, the calibration is repeated over ``--splits`` random fit/held-out splits of the products, with the
precision judged as observed (confidence 0) and by its lower confidence bound (each ``--confidence``), on
more queries: the query photos plus the training photos (``--no-train-queries``: query photos only; only
meaningful when the model never trained on the dataset's products, as with the starting weights). It reports
the mean held-out precision and recall and how often the held-out precision reached the target.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_openset.py --dataset shitu/demo_data/grocery --dataset OTHER [--model-dir B]

A markdown report goes to stdout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def embed_list(recognizer, root: Path, split: str) -> tuple[np.ndarray, list[int]]:
    from shitu.index.ops import read_labelled_list

    listed = read_labelled_list(root / f"{split}.txt")
    embedded = recognizer.embed(listed.paths, batch_size=32)
    assert not embedded.failures, embedded.failures[:1]
    return np.asarray(embedded.features, np.float32), listed.labels


def vote_table(gallery, gallery_labels, queries, query_labels, ks) -> dict[tuple[str, int], float]:
    from shitu.index import VOTES, build_index
    from shitu.index.decision import DecisionRule

    index = build_index(gallery, gallery_labels, [str(i) for i in range(len(gallery_labels))], output=None,
                        recognizer_info={})  # fmt: skip
    counts = index.label_counts
    hits = index.search(queries, max(ks), exact=True)
    accuracy = {}
    for vote in VOTES:
        rule = DecisionRule(vote=vote)
        for k in ks:
            right = [rule.decide(row[:k], counts).label == label for row, label in zip(hits, query_labels, strict=True)]
            accuracy[(vote, k)] = float(np.mean(right))
    return accuracy


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, action="append", required=True)
    parser.add_argument("--model-dir", type=Path, default=ROOT / "shitu" / "demo_data" / "start_weights")
    parser.add_argument("--input-size", type=int, default=None)
    parser.add_argument("-k", type=int, action="append", default=None)
    parser.add_argument("--target", type=float, action="append", default=None)
    parser.add_argument("--splits", type=int, default=20, help="random product splits for the repeated calibration")
    parser.add_argument("--confidence", type=float, action="append", default=None)
    parser.add_argument("--no-train-queries", action="store_true")
    args = parser.parse_args()
    ks = args.k or [3, 5, 10]
    targets = args.target or [0.9, 0.95]

    from shitu.embed.resolve import resolve_model
    from shitu.index import VOTES
    from shitu.index.calibrate import calibrate
    from shitu.runtime import configure_jax

    configure_jax()
    recognizer = resolve_model(args.model_dir, input_size=args.input_size)
    info = recognizer.describe()
    print(f"model: {args.model_dir} ({info.get('model')}, {info.get('input_size')} px)\n")
    for dataset in args.dataset:
        gallery, gallery_labels = embed_list(recognizer, dataset, "gallery")
        queries, query_labels = embed_list(recognizer, dataset, "query")
        train, train_labels = embed_list(recognizer, dataset, "train")
        extra = [i for i, label in enumerate(train_labels) if label % 2 == 0]
        uneven = np.concatenate([gallery, train[extra]])
        uneven_labels = gallery_labels + [train_labels[i] for i in extra]
        print(f"### {dataset} ({len(gallery_labels)} gallery, {len(query_labels)} query images)\n")
        print("| gallery | vote | " + " | ".join(f"accuracy k={k}" for k in ks) + " |")
        print("|---|---|" + "---:|" * len(ks))
        for name, g, g_labels in (("gallery", gallery, gallery_labels), (f"uneven ({len(uneven_labels)})", uneven,
                                                                          uneven_labels)):  # fmt: skip
            table = vote_table(g, g_labels, queries, query_labels, ks)
            for vote in VOTES:
                print(f"| {name} | {vote} | " + " | ".join(f"{table[(vote, k)]:.3f}" for k in ks) + " |")
        print()
        print("| objective | rule (vote nearest, k=5) | fit precision / recall | held-out precision / recall | "
              "held-out unknowns rejected | held-out, no rule: precision |")  # fmt: skip
        print("|---|---|---:|---:|---:|---:|")
        for target in [*targets, None]:
            result = calibrate(gallery, gallery_labels, queries, query_labels, by="class",
                               target_precision=target, max_f1=target is None)  # fmt: skip
            rule = result.rule
            margin = "none" if rule.min_margin is None else f"{rule.min_margin:g}"
            goal = "max F1" if target is None else f"precision ≥ {target:g}" + ("" if result.reached else " (not met)")
            held = result.held_out
            print(
                f"| {goal} | min score {rule.min_score:.3f}, margin {margin} | "
                f"{result.fit.precision:.3f} / {result.fit.recall:.3f} | {held.precision:.3f} / {held.recall:.3f} | "
                f"{held.unknown_rejected} of {held.unknown} | {result.without_rule.precision:.3f} |"
            )
        print()
        pool = queries if args.no_train_queries else np.concatenate([queries, train])
        pool_labels = query_labels if args.no_train_queries else query_labels + train_labels
        repeated_calibration(gallery, gallery_labels, pool, pool_labels, targets, args.confidence or [0.0, 0.9],
                             args.splits)  # fmt: skip
    return 0


def repeated_calibration(gallery, gallery_labels, queries, query_labels, targets, confidences, splits) -> None:
    """Mean held-out precision/recall over ``splits`` random product splits, per target and confidence."""
    from shitu.index.calibrate import calibrate

    print(f"Calibration over {splits} random splits of the products (fit on half, held out the other half), "
          f"{len(query_labels)} queries each searched as known and as unknown:\n")  # fmt: skip
    print("| target precision | confidence | reached on fit | held-out precision when reached | held-out recall when "
          "reached | held-out precision, all splits | splits with held-out precision ≥ target |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for target in targets:
        for confidence in confidences:
            results = [calibrate(gallery, gallery_labels, queries, query_labels, by="class", target_precision=target,
                                 confidence=confidence, seed=seed) for seed in range(splits)]  # fmt: skip
            reached = [r for r in results if r.reached]
            when = (f"{np.mean([r.held_out.precision for r in reached]):.3f} | "
                    f"{np.mean([r.held_out.recall for r in reached]):.3f}") if reached else "– | –"  # fmt: skip
            precision = [r.held_out.precision for r in results]
            print(f"| {target:g} | {confidence:g} | {len(reached)} of {splits} | {when} | {np.mean(precision):.3f} | "
                  f"{sum(p >= target for p in precision)} of {splits} |")  # fmt: skip
    print()


if __name__ == "__main__":
    sys.exit(main())
