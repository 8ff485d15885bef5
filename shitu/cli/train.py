"""``shitu train``: train a recognition model on a ShiTuRecDataset (PaddleX's ``Global.mode=train``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from shitu.cli._distributed import (
    CoordinatorOption,
    DistributedOption,
    NumProcessesOption,
    ProcessIdOption,
    join,
)
from shitu.cli._options import JsonOption, OverrideOption
from shitu.cli._output import Output
from shitu.errors import ShituError

DEFAULT_MODEL = "PP-ShiTuV2_rec"


def train_command(
    dataset: Annotated[
        Path | None,
        typer.Option(
            "--dataset", help="ShiTuRecDataset root (train.txt, gallery.txt, query.txt); or Global.dataset_dir."
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help=f"Model (its config gives the defaults); default {DEFAULT_MODEL}."),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", help="Folder for the run (default: Global.output, 'output'; required with --resume)."),
    ] = None,
    pretrained: Annotated[
        Path | None,
        typer.Option("--pretrained", help="Start from a bundle (import-weights, an earlier best_model) or .pdparams."),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --output from its newest checkpoint.")
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace another run in --output (deleted once this one has a checkpoint)."),
    ] = False,
    override: OverrideOption = None,
    json: JsonOption = False,
    distributed: DistributedOption = False,
    coordinator: CoordinatorOption = None,
    num_processes: NumProcessesOption = None,
    process_id: ProcessIdOption = None,
) -> int:
    """Train a model; evaluate Recall@1/5 and mAP on gallery/query every Train.eval_interval epochs.

    Writes PaddleX's train_result.json, train.log and config.yaml, plus best_model/ (a bundle that eval, predict
    and index take), latest_model/, checkpoints/ and train_curves.png.

    Settings as PaddleX: -o Train.epochs_iters=10 -o Train.batch_size=64 -o Train.learning_rate=0.02
    -o Train.input_size=128 -o Global.device=gpu (Train.batch_size is the global batch over all devices);
    -o Train.precision=bf16 for mixed precision (float32 weights, bf16 matmuls and convolutions).

    Ctrl-C saves a checkpoint and exits 130; --resume continues exactly the run in --output (with its own
    config: -o may change only what does not alter the results, such as Global.device or Train.num_workers).
    With --json: one JSON line per epoch on stdout, then a summary line.

    Many processes (hosts): start the same command in each with --distributed (SLURM, Open MPI, Kubernetes)
    or --coordinator HOST:PORT --num-processes N --process-id I; one global mesh spans every device, and only
    process 0 writes the outputs and prints.
    """
    from shitu.runtime import configure_jax
    from shitu.train.trainer import TrainingInterrupted, train

    if resume and overwrite:
        raise ShituError("give --resume or --overwrite, not both")
    out, _ = join(
        json, distributed=distributed, coordinator=coordinator, num_processes=num_processes, process_id=process_id
    )
    configure_jax()
    renderer = _Renderer(out)
    try:
        with renderer:
            result = train(
                model if resume else (model or DEFAULT_MODEL),
                overrides=list(override or []),
                dataset_dir=dataset,
                output=output,
                pretrained=pretrained,
                resume=resume,
                overwrite=overwrite,
                on_event=renderer,
            )
    except TrainingInterrupted as exc:
        out.warning(str(exc))
        raise typer.Exit(130) from None
    summary = result.to_json()
    summary.pop("history")
    out.emit({"event": "done", **summary})
    if result.best is not None:
        out.info(
            f"[green]Training done[/]: best recall1 {result.best['recall1']:.5f} at epoch {result.best['epoch']} "
            f"→ {result.best_model}"
        )
    out.info(f"results: {result.output / 'train_result.json'}")
    return 0


class _Renderer:
    """Turns the trainer's events into a rich progress display on stderr and JSON lines on stdout."""

    def __init__(self, out: Output) -> None:
        self.out = out
        self.progress: Any = None
        self.task: Any = None

    def __enter__(self) -> _Renderer:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.progress = Progress(
            TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("{task.fields[terms]}"),
            TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[ips]} img/s"),
            TextColumn("ETA {task.fields[eta]}"),
            console=self.out.console,
            transient=True,
            disable=self.out.json_mode or not self.out.console.is_terminal,
        )
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        from rich.markup import escape

        from shitu.train.rundir import format_eta

        out = self.out
        if kind == "warning":
            out.warning(data["message"])
        elif kind == "start":
            resumed = data.get("resumed_at")
            where = f", resuming at epoch {resumed['epoch']} step {resumed['step']}" if resumed else ""
            out.info(
                f"Training {escape(data['model'])}: {data['train_images']} images, {data['num_classes']} classes, "
                f"{data['epochs']} epochs × {data['steps_per_epoch']} iterations of {data['batch_size']} at "
                f"{data['input_size']} px ({data.get('precision', 'fp32')}) on {data['devices']} {data['platform']} "
                f"device(s){where}"
            )
            out.info(f"output: {escape(data['output'])}")
        elif kind == "compiled":
            out.info(f"compiled the training step in {data['seconds']:.1f} s")
        elif kind == "step":
            fields = {
                "epoch": data["epoch"],
                "epochs": data["epochs"],
                "terms": "  ".join(f"{k} {v:.4f}" for k, v in data["terms"].items()),
                "lr": f"{data['lr']:.2e}",
                "ips": f"{data['images_per_s']:.1f}",
                "eta": format_eta(data["eta_seconds"]),
            }
            if self.task is None:
                self.task = self.progress.add_task("train", total=data["steps"], **fields)
            self.progress.update(self.task, completed=data["step"], total=data["steps"], **fields)
        elif kind == "eval":
            out.info(
                f"  [Eval][Epoch {data['epoch']}] recall1 {data['recall1']:.5f}  recall5 {data['recall5']:.5f}  "
                f"mAP {data['mAP']:.5f}  ({data['seconds']:.1f} s)"
            )
        elif kind == "epoch":
            terms = {k: v for k, v in data.items() if k not in _EPOCH_FIELDS}
            ips = data.get("images_per_s")
            out.info(
                f"epoch {data['epoch']}: loss {data['loss']:.5f} ("
                + ", ".join(f"{k} {v:.5f}" for k, v in terms.items())
                + f"), lr {data['lr']:.2e}"
                + (f", {ips:.1f} img/s" if ips else "")
                + f", {data['seconds']:.1f} s"
            )
            out.emit({"event": "epoch", **data})
        elif kind == "best":
            out.info(f"  new best recall1 {data['recall1']:.5f} → {escape(data['path'])}")
        elif kind == "interrupted":
            out.info(f"checkpoint: {escape(data['checkpoint'])}")


_EPOCH_FIELDS = frozenset({"epoch", "loss", "lr", "images_per_s", "recall1", "recall5", "mAP", "seconds"})


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
