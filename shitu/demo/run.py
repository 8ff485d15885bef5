"""``shitu demo``: the whole job on the bundled grocery photos, and a report worth looking at.

Stages: check the data → measure the untrained model → train → measure the trained model → build a
vector index of the gallery → recognise the held-out query photos with it → write ``report.html`` (one
self-contained file: curves, metrics, and a grid of query photos with their top matches marked right or
wrong) and ``demo_result.json``.

Budgets (the bundled set has 20 products: 120 train, 40 gallery, 60 query photos):

- ``quick``: fine-tunes PP-ShiTuV2_rec at half width (``Train.model_scale=0.5``) and 64 px from the bundled
  starting weights (``shitu/demo_data/start_weights``: trained by shitu on 61 *other* grocery products, so
  none of the demo's products or photos was seen), batch 20 (5 products × 4 photos), a short cosine schedule
  — a few minutes on two CPU cores. This is how recognizers are trained in practice (PaddleX starts from
  pretrained weights too); the report shows random weights, the starting weights and the fine-tuned model.
- ``full``: PaddleX's recipe (224 px, 20 epochs, learning rate 0.01, warm-up 5 epochs) from random weights
  with the batch reduced to 80 (20 products × 4), since PaddleX's 128 needs at least 32 products.
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shitu.errors import ShituError
from shitu.fileio import atomic_write_json, writing

MODEL = "PP-ShiTuV2_rec"
RESULT_FILE = "demo_result.json"
REPORT_FILE = "report.html"


@dataclass(frozen=True)
class Budget:
    """Training settings of a demo budget (overrides of the model's config)."""

    name: str
    input_size: int
    epochs: int
    batch_size: int
    learning_rate: float
    warmup_epochs: int
    model_scale: float = 1.0
    start_weights: bool = False  # fine-tune the bundled starting weights instead of random ones

    def overrides(self) -> list[str]:
        return [
            f"Train.input_size={self.input_size}",
            f"Train.epochs_iters={self.epochs}",
            f"Train.batch_size={self.batch_size}",
            f"Train.learning_rate={self.learning_rate}",
            f"Train.warmup_steps={self.warmup_epochs}",
            f"Train.model_scale={self.model_scale}",
            "Train.pretrain_weight_path=null",  # the demo trains offline: bundled starting weights or random ones
        ]


QUICK_EPOCHS = 20
QUICK_LR = 0.02

BUDGETS: dict[str, Budget] = {
    "quick": Budget(
        "quick",
        input_size=64,
        epochs=QUICK_EPOCHS,
        batch_size=20,
        learning_rate=QUICK_LR,
        warmup_epochs=1,
        model_scale=0.5,
        start_weights=True,
    ),
    "full": Budget("full", input_size=224, epochs=20, batch_size=80, learning_rate=0.01, warmup_epochs=5),
}

#: How many of the recognised query photos the report shows (every query photo is searched).
SHOWN_SEARCHES = 12


@dataclass
class DemoResult:
    """What the demo did and measured; ``demo_result.json`` holds :meth:`to_json`."""

    output: Path
    budget: Budget
    seconds: dict[str, float] = field(default_factory=dict)
    metrics_before: dict[str, float] = field(default_factory=dict)
    metrics_start: dict[str, float] | None = None
    metrics_after: dict[str, float] = field(default_factory=dict)
    search: list[dict[str, Any]] = field(default_factory=list)
    search_accuracy: float = 0.0
    shown: list[int] = field(default_factory=list)  # positions in ``search`` drawn in the report
    report: Path | None = None
    best_model: Path | None = None
    index: Path | None = None
    machine: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "budget": self.budget.__dict__,
            "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
            "metrics_before": self.metrics_before,
            "metrics_start": self.metrics_start,
            "metrics_after": self.metrics_after,
            "search_accuracy": self.search_accuracy,
            "search": self.search,
            "report": str(self.report) if self.report else None,
            "best_model": str(self.best_model) if self.best_model else None,
            "index": str(self.index) if self.index else None,
            "machine": self.machine,
        }


EventFn = Callable[[str, dict[str, Any]], None]


def _machine() -> dict[str, Any]:
    import jax

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "jax_devices": [str(d) for d in jax.devices()],
    }


def _prepare_output(output: Path, overwrite: bool) -> None:
    """A demo folder is ours to replace; anything else that is not empty is refused."""
    with writing(output):
        if output.exists() and any(output.iterdir()):
            if not (output / RESULT_FILE).is_file() and not (output / "train").is_dir():
                raise ShituError("folder is not empty and holds no earlier demo; choose another --output", path=output)
            if not overwrite:
                raise ShituError("holds an earlier demo; pass --overwrite to replace it", path=output)
            aside = output.with_name(output.name + ".old")
            if aside.exists():
                shutil.rmtree(aside)
            output.rename(aside)
            output.mkdir(parents=True)
            shutil.rmtree(aside)
        output.mkdir(parents=True, exist_ok=True)


def run_demo(
    output: str | os.PathLike[str] = "shitu-demo",
    *,
    budget: str | Budget = "quick",
    overwrite: bool = False,
    on_event: EventFn | None = None,
    dataset_dir: str | os.PathLike[str] | None = None,
) -> DemoResult:
    """Run every stage on the bundled demo dataset (or ``dataset_dir``) and write the report in ``output``.

    ``on_event(kind, data)`` reports progress: "stage" (name, seconds when done) and the trainer's own
    events under "train". Raises ShituError if a stage fails; what was written so far stays in ``output``.
    """
    from shitu.data.check import check_dataset
    from shitu.data.demo import demo_dataset_path

    emit: EventFn = on_event or (lambda kind, data: None)
    plan = BUDGETS[budget] if isinstance(budget, str) else budget
    root = Path(dataset_dir) if dataset_dir is not None else demo_dataset_path()
    out = Path(output).absolute()
    _prepare_output(out, overwrite)
    result = DemoResult(output=out, budget=plan)
    clock = time.perf_counter

    def stage(name: str, start: float) -> None:
        result.seconds[name] = clock() - start
        emit("stage", {"name": name, "seconds": result.seconds[name]})

    # 1. check
    start = clock()
    emit("stage-start", {"name": "check"})
    checked = check_dataset(root, output=out / "check")
    if not checked.check_pass:
        first = checked.errors[0] if checked.errors else None
        raise ShituError(f"the demo dataset does not pass check: {first}", path=root)
    stage("check", start)
    result.machine = _machine()

    # 2. the untrained model, measured the same way as the trained one
    from shitu.config import load_config
    from shitu.embed.recognizer import Recognizer
    from shitu.evaluation.evaluate import evaluate_dataset

    config = load_config(MODEL, plan.overrides())
    start = clock()
    emit("stage-start", {"name": "evaluate untrained"})
    spec = _spec()
    untrained = spec.build(_num_classes(root), seed=int(config.get("Global.seed")), scale=plan.model_scale)
    untrained.eval()
    before = evaluate_dataset(Recognizer(spec, untrained, num_classes=1, input_size=plan.input_size), root)
    result.metrics_before = _headline(before.metrics.to_json())
    stage("evaluate untrained", start)

    pretrained = None
    if plan.start_weights:
        from shitu.data.demo import demo_start_weights_path
        from shitu.embed.resolve import resolve_model

        pretrained = demo_start_weights_path()
        start = clock()
        emit("stage-start", {"name": "evaluate starting weights"})
        starting = evaluate_dataset(resolve_model(pretrained, input_size=plan.input_size), root)
        result.metrics_start = _headline(starting.metrics.to_json())
        stage("evaluate starting weights", start)

    # 3. train
    from shitu.train.trainer import train

    start = clock()
    emit("stage-start", {"name": "train"})
    trained = train(
        config,
        dataset_dir=root,
        output=out / "train",
        pretrained=pretrained,
        overwrite=True,
        on_event=lambda kind, data: emit("train", {"kind": kind, **data}),
    )
    result.best_model = trained.best_model
    stage("train", start)
    if trained.best_model is None:
        raise ShituError("training produced no best model", path=out / "train")

    # 4. the trained model
    from shitu.embed.resolve import resolve_model

    start = clock()
    emit("stage-start", {"name": "evaluate trained"})
    recognizer = resolve_model(trained.best_model)
    after = evaluate_dataset(recognizer, root, examples=(out / "examples.png", 8))
    result.metrics_after = _headline(after.metrics.to_json())
    stage("evaluate trained", start)

    # 5. index the gallery, 6. recognise held-out photos
    from shitu.index import build_index

    start = clock()
    emit("stage-start", {"name": "index"})
    gallery = [root / entry.sample.path for entry in after.gallery]
    gallery_labels = [int(entry.sample.label) for entry in after.gallery]
    embedded = recognizer.embed([str(p) for p in gallery])
    index = build_index(
        embedded.features,
        [gallery_labels[i] for i in embedded.indices],
        [str(gallery[i]) for i in embedded.indices],
        output=out / "index",
        recognizer_info=recognizer.describe(),
        overwrite=True,
    )
    result.index = out / "index"
    stage("index", start)

    start = clock()
    emit("stage-start", {"name": "search"})
    queries = list(after.query)
    query_paths = [str(root / q.sample.path) for q in queries]
    searched = recognizer.embed(query_paths)
    hits = index.search(searched.features, k=5)
    correct = 0
    for row, position in enumerate(searched.indices):
        # PP-ShiTu's rule: the product of the nearest gallery picture (the top-5 vote is reported beside it)
        label, score = (hits[row][0].label, hits[row][0].score) if hits[row] else (None, 0.0)
        voted, _ = index.vote(hits[row])
        truth = int(queries[position].sample.label)
        correct += int(label == truth)
        result.search.append(
            {
                "input_path": query_paths[position],
                "label": truth,
                "predicted_label": label,
                "voted_label": voted,
                "score": round(float(score), 4),
                "hits": [h.to_json() for h in hits[row]],
            }
        )
    result.search_accuracy = correct / max(1, len(result.search))
    result.shown = _spread(len(result.search), SHOWN_SEARCHES)
    stage("search", start)

    # 7. report
    start = clock()
    result.report = _write_report(out, result, trained, root)
    stage("report", start)
    atomic_write_json(out / RESULT_FILE, result.to_json())
    return result


def _spec() -> Any:
    from shitu.plugins import get_host

    return get_host().model(MODEL)


def _num_classes(root: Path) -> int:
    from shitu.data.lists import read_list

    parsed = read_list(root, "train")
    return max(1, len({entry.sample.label for entry in parsed.entries}))


def _headline(metrics: dict[str, Any]) -> dict[str, float]:
    return {key: float(metrics[key]) for key in ("recall1", "recall5", "mAP") if key in metrics}


def _spread(total: int, count: int) -> list[int]:
    """``count`` positions spread evenly over ``range(total)`` (deterministic)."""
    if total <= count:
        return list(range(total))
    return [round(i * (total - 1) / (count - 1)) for i in range(count)]


def _label_names(root: Path) -> dict[int, str]:
    """Names from the dataset's ``label.txt`` (line i = label i) when it has one."""
    names: dict[int, str] = {}
    file = root / "label.txt"
    if file.is_file():
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines()):
            text = line.strip()
            if text:
                parts = text.split(maxsplit=1)
                if len(parts) == 2 and parts[0].isdigit():
                    names[int(parts[0])] = parts[1]
                else:
                    names[number] = text
    return names


def _write_report(out: Path, result: DemoResult, trained: Any, root: Path) -> Path:
    from shitu import __version__
    from shitu.demo.report import MatchRow, Report, match_grid, png_tag, table

    report = Report(
        title="shitu demo: recognising grocery products",
        subtitle=(
            f"shitu {__version__} · model {MODEL} · budget '{result.budget.name}' "
            f"({result.budget.input_size} px, {result.budget.epochs} epochs) · {result.machine.get('platform', '')}"
        ),
    )
    columns = [("random weights" if result.metrics_start is not None else "untrained", result.metrics_before)]
    if result.metrics_start is not None:
        columns.append(("starting weights (other products)", result.metrics_start))
    columns.append(("fine-tuned" if result.metrics_start is not None else "trained", result.metrics_after))
    rows = [[key, *(values.get(key, float("nan")) for _, values in columns)] for key in ("recall1", "recall5", "mAP")]
    report.add(
        "Retrieval quality on the held-out query photos",
        table(["metric", *(title for title, _ in columns)], rows)
        + '<p class="note">Each query photo is matched against the gallery (a catalogue picture and one photo per '
        "product); Recall@k = share of queries whose k best matches include the right product."
        + (
            " The starting weights were trained by shitu on 61 other grocery products (none of these 20), "
            "then fine-tuned here on the 120 training photos.</p>"
            if result.metrics_start is not None
            else "</p>"
        ),
    )
    from shitu.train.rundir import CURVES

    curves = out / "train" / CURVES
    if curves.is_file():
        report.add("Training", png_tag(curves, "loss and recall curves"))
    names = _label_names(root)
    grid_rows = [
        MatchRow(
            query_path=item["input_path"],
            query_label=item["label"],
            matches=[(h["path"], int(h["label"]), float(h["score"])) for h in item["hits"]],
            predicted_label=item["predicted_label"],
        )
        for item in (result.search[i] for i in result.shown)
    ]
    report.add(
        f"Recognition with the vector index: {result.search_accuracy:.0%} of {len(result.search)} query photos "
        f"right ({len(grid_rows)} shown)",
        match_grid(grid_rows, names)
        + '<p class="note">Blue: the query photo; green: a match of the right product; red: another product. '
        "The recognised product is the one of the nearest gallery picture, as in PP-ShiTu.</p>",
    )
    report.add(
        "Time per stage",
        table(["stage", "seconds"], [[name, round(seconds, 1)] for name, seconds in result.seconds.items()]),
    )
    report.add(
        "Files",
        "<ul>"
        + "".join(
            f"<li>{name}</li>"
            for name in ("check/check_dataset_result.json", "train/train_result.json", "train/best_model/",
                         "index/", "examples.png", RESULT_FILE)
        )
        + "</ul>",
    )  # fmt: skip
    return report.write(out / REPORT_FILE)
