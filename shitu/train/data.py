"""The training input pipeline: train.txt → relabelled samples → batches of augmented images, on Grain.

Determinism: the indices of an epoch's batches depend on ``(seed, epoch)`` only (see
:mod:`shitu.train.sampler`) and each image's augmentation on ``(seed, epoch, step, position in the global
batch)`` only, so ``loader.epoch(e, start_step=s)`` yields exactly the batches that a full pass over epoch
``e`` yields from step ``s`` on (how a resumed run picks up after a crash), whatever the number of worker
processes and however the batch is sharded.

Sharding: with ``shard_count`` > 1 (one per process of a multi-process run) every process plans the same
global batch and takes the **contiguous block** of rows ``[shard_index·b, (shard_index+1)·b)`` with
``b = batch_size / shard_count``; concatenating the shards' batches in shard order gives the global batch.

Workers: with ``num_workers`` > 0 whole batches are made in that many Grain worker processes, one batch ahead
per worker; with 0 they are made in the calling thread when asked for. The workers are started with ``spawn``
(each imports grain and with it jax: seconds) once per running stream: consecutive ``epoch()`` calls consumed
to their end continue the same stream, so a run starts them once; :meth:`TrainLoader.close` stops them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shitu.errors import ShituError
from shitu.train.sampler import PKSampler, ShuffleSampler

#: Samplers :class:`TrainLoader` knows.
SAMPLERS = ("pk", "shuffle")
#: Version of the dict :meth:`TrainLoader.state` returns.
LOADER_STATE_VERSION = 1

_AUGMENT_STREAM = 0x4147  # "AG": keeps the augmentation streams apart from the samplers'
_ENDLESS = 2**40  # batches in the running stream: more than any run asks for


@dataclass(frozen=True)
class TrainSamples:
    """The images of ``train.txt`` with their labels.

    ``labels`` are the class indices 0..C-1 the model is trained on: the sorted unique original labels,
    numbered in order (PaddleClas relabels by ``enumerate(set(labels))``, whose order is an implementation
    detail of Python sets; sorting gives the same result for small non-negative integers and a documented
    one otherwise). ``label_map`` maps each original label to its class index. Some PaddleClas recipes do
    not relabel; shitu trains every model on the relabelled indices and keeps the map.
    """

    root: Path
    paths: tuple[str, ...]  #: absolute image paths, in list order
    original_labels: np.ndarray  #: int64 [N], as written in train.txt
    labels: np.ndarray  #: int32 [N], relabelled 0..C-1
    label_map: dict[int, int]  #: original label → class index
    list_file: Path = field(default=Path("train.txt"))  #: the list these came from
    lines: tuple[int, ...] = ()  #: the 1-based line of each sample in ``list_file``

    @property
    def num_classes(self) -> int:
        return len(self.label_map)

    def __len__(self) -> int:
        return len(self.paths)

    def where(self, index: int) -> str:
        """``train.txt:<line>`` of sample ``index`` (for messages)."""
        line = self.lines[index] if index < len(self.lines) else None
        return f"{self.list_file}:{line}" if line is not None else str(self.list_file)


def read_train_samples(dataset_dir: str | os.PathLike[str]) -> TrainSamples:
    """The relabelled samples of ``<dataset>/train.txt``; a located ShituError for a missing, malformed or
    empty list (images are not opened here: ``shitu check`` decodes them)."""
    from shitu.data.lists import locate_root, read_list

    root = locate_root(dataset_dir)
    parsed = read_list(root, "train")
    errors = [issue for issue in parsed.issues if issue.severity == "error"]
    if errors:
        first = errors[0]
        more = f"{len(errors) - 1} more errors; " if len(errors) > 1 else ""
        raise ShituError(
            first.message, path=first.file, line=first.line, hint=f"{more}run 'shitu check {root}' for the report"
        )
    if not parsed.entries:
        raise ShituError("train.txt lists no images", path=parsed.file)
    original = np.array([entry.sample.label for entry in parsed.entries], dtype=np.int64)
    classes, relabelled = np.unique(original, return_inverse=True)
    return TrainSamples(
        root=root,
        paths=tuple(str(root / entry.sample.path) for entry in parsed.entries),
        original_labels=original,
        labels=relabelled.astype(np.int32).reshape(-1),
        label_map={int(label): index for index, label in enumerate(classes)},
        list_file=parsed.file,
        lines=tuple(entry.line for entry in parsed.entries),
    )


def augment_rng(seed: int, epoch: int, step: int, position: int) -> np.random.Generator:
    """The generator of the image at ``position`` of the global batch ``step`` of ``epoch``."""
    return np.random.default_rng(
        np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(step), int(position), _AUGMENT_STREAM])
    )


class _BatchMaker:
    """Makes this shard's part of the global batches, addressed by a running index counted from a start
    position (a module-level class, so worker processes can unpickle it; each keeps its last epoch's plan)."""

    def __init__(
        self,
        samples: TrainSamples,
        sampler: PKSampler | ShuffleSampler,
        transform: Callable[[np.ndarray, np.random.Generator], np.ndarray],
        *,
        size: int,
        seed: int,
        start_epoch: int,
        start_step: int,
        shard_index: int,
        shard_count: int,
    ) -> None:
        self.samples = samples
        self.sampler = sampler
        self.transform = transform
        self.size = size
        self.seed = seed
        self.start_epoch = start_epoch
        self.start_step = start_step
        self.shard_index = shard_index
        self.shard_count = shard_count
        self._plan: tuple[int, list[np.ndarray]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_plan": None}

    def position(self, index: int) -> tuple[int, int]:
        """(epoch, step) of the ``index``-th batch from the start position."""
        epoch, step = divmod(self.start_step + index, len(self.sampler))
        return self.start_epoch + epoch, step

    def plan(self, epoch: int) -> list[np.ndarray]:
        if self._plan is None or self._plan[0] != epoch:
            self._plan = (epoch, list(self.sampler.epoch_batches(epoch)))
        return self._plan[1]

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        from shitu.data.transforms import read_image

        epoch, step = self.position(index)
        indices = self.plan(epoch)[step]
        local = len(indices) // self.shard_count
        rows = range(self.shard_index * local, (self.shard_index + 1) * local)
        size = self.size
        images = np.empty((len(rows), size, size, 3), dtype=np.float32)
        labels = np.empty((len(rows),), dtype=np.int32)
        for out, position in enumerate(rows):
            sample = int(indices[position])
            try:
                image = read_image(self.samples.paths[sample])
            except ShituError as exc:
                raise ShituError(
                    exc.message,
                    path=self.samples.paths[sample],
                    hint=f"listed at {self.samples.where(sample)}; run 'shitu check' on the dataset",
                ) from None
            augmented = self.transform(image, augment_rng(self.seed, epoch, step, position))
            if getattr(augmented, "shape", None) != (size, size, 3):
                raise ShituError(
                    f"the train transform {self.transform!r} returned an array of shape "
                    f"{getattr(augmented, 'shape', type(augmented).__name__)}, not ({size}, {size}, 3)",
                    path=self.samples.paths[sample],
                )
            images[out] = augmented
            labels[out] = self.samples.labels[sample]
        return {"images": images, "labels": labels}


class _Stream:
    """A running Grain iterator over the batches from one position on, across epoch boundaries (so worker
    processes start once per run, not once per epoch); ``position`` is the next batch it yields."""

    def __init__(self, iterator: Any, epoch: int, step: int) -> None:
        self.iterator = iterator
        self.position = (epoch, step)

    def close(self) -> None:
        close = getattr(self.iterator, "close", None)
        if close is not None:
            close()


def _worker_init(worker_index: int, worker_count: int) -> None:
    """In each worker process: one OpenCV thread (the workers are the parallelism)."""
    import cv2

    cv2.setNumThreads(1)


def _ensure_absl_flags_parsed() -> None:
    """Grain's worker start reads absl flags, which fail with UnparsedFlagAccessError until parsed once in
    the parent (reference/stack_notes.md); parse the program name only when nobody has."""
    try:
        from absl import flags
    except ImportError:  # pragma: no cover - grain depends on absl
        return
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class TrainLoader:
    """Batches of augmented training images: ``{"images": float32 [B_local, S, S, 3] (NHWC, normalised),
    "labels": int32 [B_local]}`` with ``B_local = batch_size / shard_count``.

    ``transform(image, rng)`` is the model's train transform (its recipe's ``train_transform`` at
    ``input_size``): RGB uint8 [H, W, 3] → float32 [input_size, input_size, 3]; picklable when
    ``num_workers`` > 0. ``sampler`` "pk" (PaddleClas' PKSampler, ``sample_per_id`` images per identity,
    ``ceil(N / batch_size)`` full batches per epoch; ``drop_last`` has no effect) or "shuffle" (a permutation
    per epoch; the last, shorter batch is dropped when ``drop_last``). Every check runs here, before any compile.
    """

    def __init__(
        self,
        samples: TrainSamples,
        *,
        transform: Callable[[np.ndarray, np.random.Generator], np.ndarray],
        input_size: int,
        batch_size: int,
        sample_per_id: int = 4,
        sampler: str = "pk",
        seed: int = 0,
        num_workers: int = 0,
        shard_index: int = 0,
        shard_count: int = 1,
        drop_last: bool = False,
        sample_method: str = "sample_avg_prob",
    ) -> None:
        self._stream: _Stream | None = None
        if len(samples) == 0:
            raise ShituError("train.txt lists no images", path=samples.list_file)
        if sampler not in SAMPLERS:
            raise ShituError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if int(input_size) < 8:
            raise ShituError(f"the input size must be at least 8 px, got {input_size}")
        if num_workers < 0:
            raise ShituError(f"num_workers must be ≥ 0, got {num_workers}")
        if shard_count < 1 or not 0 <= shard_index < shard_count:
            raise ShituError(f"bad shard {shard_index} of {shard_count}")
        if batch_size < 1 or batch_size % shard_count:
            raise ShituError(
                f"the batch size ({batch_size}) must be a positive multiple of the number of processes ({shard_count})"
            )
        self.samples = samples
        self.input_size = int(input_size)
        self.batch_size = int(batch_size)
        self.sample_per_id = int(sample_per_id)
        self.sampler_name = sampler
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.shard_index = int(shard_index)
        self.shard_count = int(shard_count)
        self.drop_last = bool(drop_last)
        self.transform = transform
        self.sampler: PKSampler | ShuffleSampler
        if sampler == "pk":
            self.sampler = PKSampler(
                samples.labels, self.batch_size, self.sample_per_id, sample_method=sample_method, seed=self.seed
            )
        else:
            self.sampler = ShuffleSampler(len(samples), self.batch_size, drop_last=self.drop_last, seed=self.seed)
            tail = len(samples) % self.batch_size
            if not self.drop_last and tail and tail % self.shard_count:
                raise ShituError(
                    f"the last batch of an epoch holds {tail} images, which do not split over {shard_count} processes",
                    hint="drop the last batch (drop_last) or choose another batch size",
                )

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch (PK: ``ceil(N / batch_size)``)."""
        return len(self.sampler)

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.shard_count

    def epoch_plan(self, epoch: int) -> list[np.ndarray]:
        """The dataset indices of every global batch of ``epoch``."""
        return list(self.sampler.epoch_batches(epoch))

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """This process's batches of ``epoch`` from ``start_step`` to the end of the epoch.

        Batches come from one running stream: when the previous call was consumed to the end of its epoch,
        this call continues it (the workers have been preparing these batches meanwhile); any other position
        restarts it. Call :meth:`close` (or use the loader as a context manager) to stop the workers.
        """
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ShituError(f"start step {start_step} is outside the epoch's 0..{self.steps_per_epoch} steps")
        return self._iterate(int(epoch), int(start_step))

    def _iterate(self, epoch: int, start_step: int) -> Iterator[dict[str, np.ndarray]]:
        if start_step >= self.steps_per_epoch:
            return
        stream = self._stream
        if stream is None or stream.position != (epoch, start_step):
            self.close()
            stream = self._stream = self._open_stream(epoch, start_step)
        for step in range(start_step, self.steps_per_epoch):
            batch = next(stream.iterator)
            stream.position = (epoch, step + 1) if step + 1 < self.steps_per_epoch else (epoch + 1, 0)
            yield batch

    def _open_stream(self, epoch: int, step: int) -> _Stream:
        import grain

        maker = _BatchMaker(
            self.samples,
            self.sampler,
            self.transform,
            size=self.input_size,
            seed=self.seed,
            start_epoch=epoch,
            start_step=step,
            shard_index=self.shard_index,
            shard_count=self.shard_count,
        )
        # One element = one (local) batch: Grain's worker slicing then hands out whole batches round-robin,
        # which keeps every batch's composition and the order of the batches independent of num_workers.
        dataset = grain.MapDataset.range(0, _ENDLESS).map(maker)
        stream = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=1))
        if self.num_workers > 0:
            _ensure_absl_flags_parsed()
            stream = stream.mp_prefetch(
                grain.MultiprocessingOptions(num_workers=self.num_workers, per_worker_buffer_size=1),
                worker_init_fn=_worker_init,
            )
        return _Stream(iter(stream), epoch, step)

    def close(self) -> None:
        """Stop the running stream and its worker processes (a later :meth:`epoch` starts a new one)."""
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()

    def __enter__(self) -> TrainLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown, Grain's pieces may be gone already
            self.close()

    # -- resuming ----------------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        return {
            "sampler": self.sampler_name,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "sample_per_id": self.sample_per_id if self.sampler_name == "pk" else None,
            "num_samples": len(self.samples),
            "steps_per_epoch": self.steps_per_epoch,
        }

    def state(self, epoch: int, step: int) -> dict[str, Any]:
        """A JSON-serialisable position: the next batch to yield is ``step`` of ``epoch``."""
        return {"version": LOADER_STATE_VERSION, "epoch": int(epoch), "step": int(step), **self._identity()}

    def restore_position(self, state: dict[str, Any]) -> tuple[int, int]:
        """``(epoch, step)`` to pass to :meth:`epoch` to continue from ``state`` (a step at the end of an epoch
        becomes step 0 of the next); a ShituError if ``state`` was made by a loader that plans other batches."""
        if not isinstance(state, dict) or state.get("version") != LOADER_STATE_VERSION:
            raise ShituError("cannot resume: the data loader position in the checkpoint is not understood")
        differences = [
            f"{key} {state.get(key)!r} then, {value!r} now"
            for key, value in self._identity().items()
            if state.get(key) != value
        ]
        if differences:
            raise ShituError(
                "cannot resume: the training batches would differ (" + "; ".join(differences) + ")",
                hint="resume with the same dataset and settings, or start a new run",
            )
        epoch, step = int(state["epoch"]), int(state["step"])
        if not 0 <= step <= self.steps_per_epoch or epoch < 0:
            raise ShituError(f"cannot resume: position epoch {epoch}, step {step} is out of range")
        if step == self.steps_per_epoch:
            return epoch + 1, 0
        return epoch, step
