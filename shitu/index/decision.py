"""The decision rule: from the nearest gallery items of a query to a label, or "unknown".

A rule has a *vote* (how the hits choose a label) and two optional thresholds. The chosen label's *score* is
the best cosine similarity among its hits; its *margin* is that score minus the best score of any other label
among the hits (None when every hit has the chosen label: the margin test then passes). The answer is the
label when ``score >= min_score`` and ``margin >= min_margin`` (an unset threshold always passes), else
"unknown": ``label`` None, with the candidate label, its score and margin still reported and a reason.

Votes (ties go to the label of the higher-ranked hit, so no result depends on label values):

- ``nearest``: the label of the best hit (PP-ShiTu's rule);
- ``rank``: the largest sum of ``1 / (rank + 1)`` over the label's hits (rank 0 = the best hit);
- ``mean``: the largest sum of the label's scores divided by ``min(k, the label's gallery count)``, so that a
  product with one or two gallery pictures is not outvoted by one with many (without gallery counts: the
  mean of the label's scores among the hits);
- ``sum``: the largest sum of the label's scores (``shitu.index.vote``; favours labels with many pictures).

``nearest`` is the default: averaged over the measured splits (benchmarks/RESULTS.md, "Open-set recognition")
it recognised the most query photos; ``mean`` is close and better on some galleries with uneven picture counts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from shitu.errors import ShituError

VOTES = ("nearest", "rank", "mean", "sum")
DEFAULT_VOTE = "nearest"
#: Where an index keeps its rule in index.json.
INFO_KEY = "decision"


class _Hit(Protocol):
    label: int
    score: float


@dataclass(frozen=True)
class Decision:
    """What a rule made of one query's hits. ``label`` is None for "unknown" (then ``reason`` says why) and
    ``candidate`` is the label the vote chose either way (None without hits)."""

    label: int | None
    candidate: int | None
    score: float
    margin: float | None
    accepted: bool
    reason: str | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def label_scores(
    hits: Sequence[_Hit], vote: str = DEFAULT_VOTE, gallery_counts: Mapping[int, int] | None = None
) -> dict[int, float]:
    """Each label's vote among ``hits`` (best first), under ``vote`` (see the module docstring)."""
    if vote not in VOTES:
        raise ShituError(f"unknown vote {vote!r} (choose one of {', '.join(VOTES)})")
    totals: dict[int, float] = {}
    counts: dict[int, int] = {}
    for rank, hit in enumerate(hits):
        label = int(hit.label)
        counts[label] = counts.get(label, 0) + 1
        if vote == "nearest":
            totals.setdefault(label, float(hit.score))
        elif vote == "rank":
            totals[label] = totals.get(label, 0.0) + 1.0 / (rank + 1)
        else:
            totals[label] = totals.get(label, 0.0) + float(hit.score)
    if vote == "mean":
        for label in totals:
            available = gallery_counts.get(label) if gallery_counts is not None else None
            divisor = min(len(hits), available) if available else counts[label]
            totals[label] /= max(1, divisor)
    return totals


@dataclass(frozen=True)
class DecisionRule:
    """A vote and optional thresholds on the chosen label's score and margin (cosine similarities).

    Without thresholds (the default, and what an index without a calibrated rule uses) every query with at
    least one hit gets the voted label, as before thresholds existed."""

    min_score: float | None = None
    min_margin: float | None = None
    vote: str = DEFAULT_VOTE

    def __post_init__(self) -> None:
        if self.vote not in VOTES:
            raise ShituError(f"unknown vote {self.vote!r} (choose one of {', '.join(VOTES)})")
        for name in ("min_score", "min_margin"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not math.isfinite(float(value))):
                raise ShituError(f"{name} must be a finite number, got {value!r}")

    def decide(self, hits: Sequence[_Hit], gallery_counts: Mapping[int, int] | None = None) -> Decision:
        """The decision for one query's ``hits`` (best first); ``gallery_counts`` (label → items in the
        gallery) is used by the ``mean`` vote."""
        if not hits:
            return Decision(None, None, 0.0, None, False, "no gallery item")
        votes = label_scores(hits, self.vote, gallery_counts)
        first_rank: dict[int, int] = {}
        best: dict[int, float] = {}
        for rank, hit in enumerate(hits):
            first_rank.setdefault(int(hit.label), rank)
            best[int(hit.label)] = max(best.get(int(hit.label), -math.inf), float(hit.score))
        candidate = min(votes, key=lambda label: (-votes[label], first_rank[label]))
        score = best[candidate]
        others = [value for label, value in best.items() if label != candidate]
        margin = score - max(others) if others else None
        reason = None
        if self.min_score is not None and score < self.min_score:
            reason = f"score {score:.4f} is below the minimum {self.min_score:.4f}"
        elif self.min_margin is not None and margin is not None and margin < self.min_margin:
            reason = f"margin {margin:.4f} over the next label is below the minimum {self.min_margin:.4f}"
        accepted = reason is None
        return Decision(candidate if accepted else None, candidate, score, margin, accepted, reason)

    def with_overrides(
        self, *, min_score: float | None = None, min_margin: float | None = None, vote: str | None = None
    ) -> DecisionRule:
        """This rule with the given fields replaced (None keeps a field as it is)."""
        changes: dict[str, Any] = {}
        if min_score is not None:
            changes["min_score"] = float(min_score)
        if min_margin is not None:
            changes["min_margin"] = float(min_margin)
        if vote is not None:
            changes["vote"] = vote
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return {"min_score": self.min_score, "min_margin": self.min_margin, "vote": self.vote}

    @classmethod
    def from_json(cls, doc: Any, *, path: str | Path | None = None) -> DecisionRule:
        """The rule stored as ``doc`` (``{"min_score", "min_margin", "vote"}``); a ShituError naming ``path``
        when it is malformed."""
        if not isinstance(doc, dict):
            raise ShituError(f"field {INFO_KEY!r} must be an object", path=path)
        values: dict[str, Any] = {}
        for key in ("min_score", "min_margin"):
            value = doc.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ShituError(f"{INFO_KEY}.{key} must be a number or null, got {value!r}", path=path)
            values[key] = None if value is None else float(value)
        vote = doc.get("vote", DEFAULT_VOTE)
        if vote not in VOTES:
            raise ShituError(f"{INFO_KEY}.vote must be one of {', '.join(VOTES)}, got {vote!r}", path=path)
        try:
            return cls(vote=vote, **values)
        except ShituError as exc:
            raise ShituError(exc.message, path=path) from None


def resolve_rule(
    index: Any,
    rule: DecisionRule | Mapping[str, Any] | None = None,
    *,
    min_score: float | None = None,
    min_margin: float | None = None,
    vote: str | None = None,
) -> DecisionRule:
    """The rule a search uses: ``rule`` when given (a DecisionRule or its JSON), else the one stored in
    ``index`` (its ``decision_rule``; no thresholds for an index without one or an object without the
    attribute), then with ``min_score``/``min_margin``/``vote`` replaced where given."""
    if rule is None:
        base = getattr(index, "decision_rule", None)
        rule = base if isinstance(base, DecisionRule) else DecisionRule()
    elif not isinstance(rule, DecisionRule):
        rule = DecisionRule.from_json(dict(rule))
    return rule.with_overrides(min_score=min_score, min_margin=min_margin, vote=vote)
