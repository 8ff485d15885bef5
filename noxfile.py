"""Developer sessions: ``nox`` runs tests and lint; slow checks and benchmarks have sessions of their own."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.default_venv_backend = "venv"
PYTHON = "3.11"


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The default test run (what CI runs): fast tests only."""
    session.install("-e", ".[dev]")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def slow(session: nox.Session) -> None:
    """Long checks (marked ``slow``): crash loops and other long runs."""
    session.install("-e", ".[dev]")
    session.run("pytest", "-m", "slow", *session.posargs)


@nox.session(python=PYTHON)
def distributed(session: nox.Session) -> None:
    """Multi-process runs on this machine (2 processes joined by JAX's distributed runtime, Gloo on the CPU):
    training, stop and resume, evaluation and index building against one process."""
    session.install("-e", ".[dev]")
    session.run(
        "pytest", "-m", "slow or not slow", "tests/test_multiprocess.py", "tests/test_distributed.py", *session.posargs
    )


@nox.session(python=PYTHON)
def reliability(session: nox.Session) -> None:
    """The hardening checks of docs/RELIABILITY.md, long form: every fuzzer with SHITU_FUZZ_SCALE (default 10)
    times its examples, every kill loop and every damaged bundle (the slow tests included)."""
    session.install("-e", ".[dev]")
    files = sorted(str(p) for p in Path("tests/hardening").glob("test_hardening_*.py"))
    scale = os.environ.get("SHITU_FUZZ_SCALE", "10")
    session.run(
        "pytest", "-m", "slow or not slow", "-s", *files, "tests/test_fileio.py", *session.posargs,
        env={"SHITU_FUZZ_SCALE": scale},
    )  # fmt: skip


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff lint and format check."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks: side-by-side speed measurements; results go to benchmarks/RESULTS.md by hand."""
    session.install("-e", ".")
    session.run("python", "benchmarks/bench_check.py", *session.posargs)


PADDLE_DEPS = [
    "paddlepaddle",
    "easydict",
    "faiss-cpu",
    "opencv-python-headless",
    "prettytable",
    "scikit-learn",
    "ujson",
    "requests",
    "tqdm",
    "pyyaml",
    "six",
]


@nox.session(python=PYTHON)
def parity(session: nox.Session) -> None:
    """Parity with PaddlePaddle: build each model in PaddleClas with random weights, import, compare.

    Needs the photos in ../shared/data/grocery. Writes the full-size reference files to .work/parity
    (several GB) unless they are there already; the tests print the errors they measure.
    """
    session.install("-e", ".[dev]")
    session.install(*PADDLE_DEPS)
    session.install("--no-deps", "paddleclas")
    if not Path(".work/parity/manifest.json").is_file():
        session.run("python", "tests/parity/paddle_reference.py", "--out", ".work/parity")
    session.run(
        "pytest", "-m", "slow", "-s", "tests/parity", "tests/test_weights.py", "tests/test_pplcnetv2.py", "-k",
        "full_size or parity or matches", *session.posargs,
    )  # fmt: skip


@nox.session(python=PYTHON)
def train_parity(session: nox.Session) -> None:
    """Training parity with PaddleClas: 10 steps of each recipe from the same .pdparams on the same batches,
    in Paddle and in shitu's compiled step; prints the per-step table (losses, largest state differences, and
    what float32 rounding makes Paddle differ from itself).

    Needs the photos in ../shared/data/grocery and PaddleClas' loss and optimizer files: a PaddleClas checkout in
    $SHITU_PADDLECLAS_SRC or .work/paddleclas_src, or a clone in $SHITU_PADDLECLAS_GIT (see tests/paddle_support.py).
    """
    session.install("-e", ".[dev]")
    session.install(*PADDLE_DEPS)
    session.install("--no-deps", "paddleclas")
    python = Path(session.bin) / "python"
    session.run(
        "pytest", "-m", "slow", "-s", "tests/parity/test_train_parity.py", *session.posargs,
        env={"SHITU_PADDLE_PYTHON": str(python)},
    )  # fmt: skip


@nox.session(python=PYTHON)
def gpu(session: nox.Session) -> None:
    """Inference speed on every backend of this machine (GPU included), fp32 against bf16 and int8, full size:
    PP-ShiTuV2_rec at 224 px, then CLIP ViT-B/16 (benchmarks/bench_gpu.py; results to RESULTS.md by hand).

    With an NVIDIA driver (``nvidia-smi`` on the PATH) it adds JAX's CUDA plugin and ONNX Runtime's GPU build
    (CUDA and TensorRT providers); JAX then allocates GPU memory as it goes, so ONNX Runtime has its share."""
    session.install("-e", ".[onnx,openvino]")
    if shutil.which("nvidia-smi"):
        session.install("jax[cuda12]", "onnxruntime-gpu")
    env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    session.run("python", "benchmarks/bench_gpu.py", *session.posargs, env=env)
    session.run("python", "benchmarks/bench_gpu.py", "--clip", *session.posargs, env=env)
