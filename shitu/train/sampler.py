"""Batch samplers: which dataset indices make up each batch of an epoch.

Both samplers plan a whole epoch at once (indices only, cheap) from ``(seed, epoch)`` alone, so any step
of any epoch can be recomputed after a restart, and every process of a multi-process run plans the same
global batches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from shitu.errors import ShituError

#: PKSampler's ways of weighting the identities.
SAMPLE_METHODS = ("sample_avg_prob", "id_avg_prob")

# Stream tags, so that the sampler's and the augmentations' random streams never coincide.
_PK_STREAM = 0x504B  # "PK"
_SHUFFLE_STREAM = 0x5348  # "SH"


def epoch_rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    """A generator determined by (seed, epoch, stream) only."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(stream)]))


class PKSampler:
    """PaddleClas' PKSampler: each batch holds P = batch_size / K identities, K images each.

    The P identities are drawn without replacement with probabilities ∝ their number of images
    (``sample_avg_prob``, PaddleClas' and PaddleX's default) or uniform (``id_avg_prob``); within an identity,
    K images without replacement when it has at least K, else with replacement. An epoch has
    ``ceil(N / batch_size)`` batches, all full. Batches are laid out identity by identity (K consecutive rows
    per identity), as PaddleClas does. (Upstream's ``id_list``/``ratio`` up-weighting is not supported.)
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        batch_size: int,
        sample_per_id: int = 4,
        *,
        sample_method: str = "sample_avg_prob",
        seed: int = 0,
    ) -> None:
        labels = np.asarray(labels)
        if labels.size == 0:
            raise ShituError("the PK sampler needs at least one image")
        if sample_per_id < 1 or batch_size < 1:
            raise ShituError(f"batch size ({batch_size}) and sample_per_id ({sample_per_id}) must be at least 1")
        if batch_size % sample_per_id:
            raise ShituError(
                f"the PK sampler needs Train.batch_size ({batch_size}) to be a multiple of "
                f"Train.sample_per_id ({sample_per_id})",
                hint="each batch holds batch_size / sample_per_id identities with sample_per_id images each",
            )
        identities, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        if len(identities) * sample_per_id < batch_size:
            raise ShituError(
                f"the PK sampler needs #classes × sample_per_id ≥ batch_size, but train.txt has "
                f"{len(identities)} classes × {sample_per_id} < {batch_size}",
                hint=f"lower -o Train.batch_size to at most {len(identities) * sample_per_id}",
            )
        if sample_method not in SAMPLE_METHODS:
            raise ShituError(f"unknown PK sample method {sample_method!r}; choose one of {', '.join(SAMPLE_METHODS)}")
        self.num_samples = int(labels.size)
        self.batch_size = int(batch_size)
        self.sample_per_id = int(sample_per_id)
        self.sample_method = sample_method
        self.seed = int(seed)
        self.identities = identities
        order = np.argsort(inverse, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(counts)])
        #: indices of each identity's images, in list order
        self.members = [order[bounds[i] : bounds[i + 1]] for i in range(len(identities))]
        if sample_method == "sample_avg_prob":
            self.probabilities = counts / counts.sum()
        else:
            self.probabilities = np.full(len(identities), 1.0 / len(identities))

    @property
    def ids_per_batch(self) -> int:
        return self.batch_size // self.sample_per_id

    def __len__(self) -> int:
        """Batches per epoch: ceil(N / batch_size)."""
        return math.ceil(self.num_samples / self.batch_size)

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """Dataset indices of every batch of ``epoch``: int64 [len(self), batch_size]."""
        rng = epoch_rng(self.seed, epoch, _PK_STREAM)
        k = self.sample_per_id
        plan = np.empty((len(self), self.batch_size), dtype=np.int64)
        for step in range(len(self)):
            chosen = rng.choice(len(self.identities), size=self.ids_per_batch, replace=False, p=self.probabilities)
            for slot, identity in enumerate(chosen):
                members = self.members[identity]
                plan[step, slot * k : (slot + 1) * k] = rng.choice(members, size=k, replace=len(members) < k)
        return plan


class ShuffleSampler:
    """A plain shuffled batch sampler (PaddleClas' DistributedBatchSampler with shuffle, one process): every
    epoch a fresh permutation cut into batches; the last, shorter batch is kept unless ``drop_last``."""

    def __init__(self, num_samples: int, batch_size: int, *, drop_last: bool = False, seed: int = 0) -> None:
        if num_samples < 1:
            raise ShituError("the sampler needs at least one image")
        if batch_size < 1:
            raise ShituError(f"batch size must be at least 1, got {batch_size}")
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.drop_last = bool(drop_last)
        self.seed = int(seed)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """Dataset indices of every batch of ``epoch`` (the last one may be shorter)."""
        order = epoch_rng(self.seed, epoch, _SHUFFLE_STREAM).permutation(self.num_samples)
        return [order[i * self.batch_size : (i + 1) * self.batch_size] for i in range(len(self))]
