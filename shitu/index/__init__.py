"""Retrieval index: stored features with labels and paths, searched by cosine similarity (usearch HNSW).

See :mod:`shitu.index.core` for the folder layout and the guarantees.
"""

from __future__ import annotations

from shitu.index.core import (
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    STORAGES,
    Hit,
    Item,
    RetrievalIndex,
    build_index,
    choose_storage,
    open_index,
    vote,
)
from shitu.index.decision import VOTES, Decision, DecisionRule

__all__ = [
    "DTYPES",
    "FORMAT",
    "FORMAT_VERSION",
    "STORAGES",
    "VOTES",
    "Decision",
    "DecisionRule",
    "Hit",
    "Item",
    "RetrievalIndex",
    "build_index",
    "choose_storage",
    "open_index",
    "vote",
]
