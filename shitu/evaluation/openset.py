"""Open-set numbers: how a decision rule treats queries whose class has no gallery image ("unknowns").

Each query's top ``k`` gallery images (cosine, exact) go through a :class:`shitu.index.DecisionRule`. An
unknown query is *rejected correctly* when the answer is "unknown" and *accepted wrongly* otherwise; a known
query is right, wrong (another label) or rejected.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from shitu.index.decision import DecisionRule

#: Queries per block of similarities (keeps the [block, gallery] matrix small).
_BLOCK = 1024


@dataclass(frozen=True)
class OpenSetMetrics:
    """Counts of one rule on a query set; ``rule`` is the rule's JSON."""

    rule: dict[str, Any]
    k: int
    unknown_queries: int
    unknown_rejected: int
    unknown_accepted: int
    known_queries: int
    known_right: int
    known_wrong: int
    known_rejected: int

    @property
    def precision(self) -> float | None:
        """Right answers among accepted ones (None when nothing was accepted)."""
        accepted = self.known_right + self.known_wrong + self.unknown_accepted
        return self.known_right / accepted if accepted else None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "precision": self.precision}


@dataclass(frozen=True)
class _Hit:
    label: int
    score: float


def open_set_metrics(
    query_features: Any,
    query_labels: Sequence[int],
    gallery_features: Any,
    gallery_labels: Sequence[int],
    rule: DecisionRule,
    *,
    k: int = 5,
) -> OpenSetMetrics:
    """Apply ``rule`` to every query's top ``k`` gallery images and count the outcomes (see the module)."""
    queries = np.asarray(query_features, np.float32)
    gallery = np.asarray(gallery_features, np.float32)
    g_labels = np.asarray(gallery_labels, np.int64)
    q_labels = np.asarray(query_labels, np.int64)
    present = set(g_labels.tolist())
    counts = {int(label): int(n) for label, n in zip(*np.unique(g_labels, return_counts=True), strict=True)}
    top = min(k, len(g_labels))
    tally = dict.fromkeys(("ur", "ua", "kr", "kw", "kx"), 0)
    for start in range(0, len(q_labels), _BLOCK):
        sims = queries[start : start + _BLOCK] @ gallery.T
        order = np.argsort(-sims, axis=1, kind="stable")[:, :top]
        for row, columns in enumerate(order):
            label = int(q_labels[start + row])
            hits = [_Hit(int(g_labels[c]), float(sims[row, c])) for c in columns]
            decision = rule.decide(hits, counts)
            if label not in present:
                tally["ua" if decision.accepted else "ur"] += 1
            elif not decision.accepted:
                tally["kx"] += 1
            else:
                tally["kr" if decision.label == label else "kw"] += 1
    unknown = int(sum(label not in present for label in q_labels.tolist()))
    return OpenSetMetrics(
        rule=rule.to_json(),
        k=top,
        unknown_queries=unknown,
        unknown_rejected=tally["ur"],
        unknown_accepted=tally["ua"],
        known_queries=len(q_labels) - unknown,
        known_right=tally["kr"],
        known_wrong=tally["kw"],
        known_rejected=tally["kx"],
    )
