"""Data-parallel scaling of the training step: images/s in total and per device, on whatever devices exist.

For each device count n in 1, 2, 4, ... up to every local device, the same per-device batch is run through
shitu's compiled training step (``shitu.train.step.TrainStep``) on a mesh of n devices; compile time is
reported apart. On a CPU-only machine, ``--cpu-devices N`` splits the host into N XLA devices (each run in its
own process, since XLA reads the flag at start-up) — that measures the partitioning overhead, not a speed-up,
because the devices share the same cores.

    python benchmarks/bench_scaling.py                       # every local GPU/TPU (or the one CPU device)
    python benchmarks/bench_scaling.py --cpu-devices 4       # 1, 2, 4 simulated CPU devices
    python benchmarks/bench_scaling.py --processes 2         # 1 process, then 2 processes of 1 device each

``--processes N`` starts N processes on this machine joined by JAX's distributed runtime (a local
coordinator; Gloo's collectives on the CPU), one device each, as ``shitu train --coordinator ...`` would: it
measures what the cross-process all-reduce costs per step (on a CPU-only host the processes share its cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from functools import partial

from _machine import cpu_model


def machine() -> str:
    cpu = cpu_model("unknown CPU")
    return f"{cpu}, {os.cpu_count()} logical cores, Python {platform.python_version()}, {platform.system()}"


def measure(devices: int, per_device_batch: int, size: int, scale: float, steps: int) -> dict:
    import jax
    import numpy as np

    from shitu.models.spec import resolve
    from shitu.plugins import get_host
    from shitu.runtime import configure_jax
    from shitu.train.optim import make_optimizer, parameter_groups
    from shitu.train.step import TrainStep

    configure_jax()
    chosen = jax.devices()[:devices]
    batch = per_device_batch * len(chosen)
    processes = jax.process_count()
    classes = max(2, batch // 4)
    spec = get_host().model("PP-ShiTuV2_rec")
    model = spec.build(classes, scale=scale)
    tx, schedule = make_optimizer(
        model,
        learning_rate=0.01,
        epochs=1,
        warmup_epochs=0,
        steps_per_epoch=steps + 1,
        weight_decay=spec.recipe.weight_decay,
        groups=parameter_groups(model, spec.recipe),
    )
    loss = partial(resolve(spec.recipe.loss), train=True)
    step = TrainStep(model, loss_fn=loss, tx=tx, schedule=schedule, devices=chosen, seed=0)
    state = step.initial_state(model)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
    labels = np.repeat(np.arange(batch // 4, dtype=np.int32), 4)
    compiled = step.compile(state, images.shape)
    rows = slice(batch * jax.process_index() // processes, batch * (jax.process_index() + 1) // processes)
    x, y = step.shard_batch(images[rows], labels[rows])  # this process's rows of the global batch
    state, metrics = step(state, x, y, 0)  # first run (allocations), not timed
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for i in range(steps):
        state, metrics = step(state, x, y, i + 1)
    jax.block_until_ready(metrics)
    seconds = time.perf_counter() - start
    rate = batch * steps / seconds
    return {
        "platform": chosen[0].platform,
        "processes": processes,
        "devices": len(chosen),
        "global_batch": batch,
        "input": size,
        "scale": scale,
        "compile_s": round(compiled.seconds, 2),
        "images_per_s": round(rate, 2),
        "images_per_s_per_device": round(rate / len(chosen), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-device-batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64, help="input size in pixels")
    parser.add_argument("--scale", type=float, default=1.0, help="PP-LCNetV2 width (1.0 = the published model)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--cpu-devices", type=int, default=0, help="split the CPU into this many XLA devices")
    parser.add_argument("--processes", type=int, default=0, help="compare 1 process with this many (1 device each)")
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--coordinator", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.coordinator:
            from shitu.runtime.distributed import initialize

            initialize(coordinator=args.coordinator, num_processes=args.processes, process_id=args.process_id)
        result = measure(args.child, args.per_device_batch, args.size, args.scale, args.steps)
        if args.process_id == 0:
            print(json.dumps(result))
        return

    print(f"machine: {machine()}")
    rows = [_run_processes(1, args), _run_processes(args.processes, args)] if args.processes else _run_devices(args)
    base = rows[0]["images_per_s"]
    print("| platform | processes | devices | global batch | input | compile s | images/s | per device | vs 1 device |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['platform']} | {row['processes']} | {row['devices']} | {row['global_batch']} | {row['input']} "
            f"| {row['compile_s']} | {row['images_per_s']} | {row['images_per_s_per_device']} "
            f"| {row['images_per_s'] / base:.2f}× |"
        )


def _child_command(devices: int, args: argparse.Namespace) -> list[str]:
    return [sys.executable, __file__, "--child", str(devices), "--per-device-batch", str(args.per_device_batch),
            "--size", str(args.size), "--scale", str(args.scale), "--steps", str(args.steps)]  # fmt: skip


def _run_processes(count: int, args: argparse.Namespace) -> dict:
    """One measurement over ``count`` local processes of one CPU device each (process 0's numbers)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    started = []
    for index in range(count):
        command = _child_command(count, args)
        if count > 1:
            command += ["--processes", str(count), "--coordinator", f"127.0.0.1:{port}", "--process-id", str(index)]
        started.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [process.communicate() for process in started]
    for process, (_, stderr) in zip(started, outputs, strict=True):
        if process.returncode != 0:
            print(stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"measuring {count} process(es) failed")
    return json.loads(outputs[0][0].strip().splitlines()[-1])


def _run_devices(args: argparse.Namespace) -> list[dict]:
    """One measurement per device count 1, 2, 4, ... in one process each."""
    if args.cpu_devices:
        counts, env_for = [], {}
        n = 1
        while n <= args.cpu_devices:
            counts.append(n)
            n *= 2
        env_for = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={args.cpu_devices}", "JAX_PLATFORMS": "cpu"}
    else:
        import jax

        total = jax.local_device_count()
        counts = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= total]
        env_for = {}
    rows = []
    for n in counts:
        command = _child_command(n, args)
        done = subprocess.run(command, env={**os.environ, **env_for}, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(done.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"measuring {n} device(s) failed")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


if __name__ == "__main__":
    main()
