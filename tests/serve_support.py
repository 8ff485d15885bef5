"""Starting the real ``shitu serve`` process on a free loopback port, and small images to send it."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

#: Pixels the tiny test model embeds at.
SIZE = 32
#: The longest any single request may take in these tests.
REQUEST_TIMEOUT = 30.0
#: The longest a server may take to load and compile before the test gives up.
START_TIMEOUT = 180.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def png_bytes(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def make_bundle(folder: Path) -> Path:
    """PP-ShiTuV2_rec with random weights (seed 0), saved as a bundle that embeds at ``SIZE`` px."""
    from shitu.models.bundle import save_bundle
    from shitu.plugins import get_host

    spec = get_host().model("PP-ShiTuV2_rec")
    save_bundle(folder, spec=spec, model=spec.build(1, seed=0), num_classes=1, extra={"input_size": SIZE})
    return folder


class Server:
    """``shitu serve`` in a subprocess on 127.0.0.1; :meth:`start` waits for /readyz."""

    def __init__(self, bundle: Path, state: Path, cache: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [
            sys.executable,
            "-m",
            "shitu",
            "serve",
            "--model-dir",
            str(bundle),
            "--state-dir",
            str(state),
            "--port",
            str(self.port),
            *args,
        ]
        self.env = {**os.environ, "SHITU_CACHE_DIR": str(cache), "JAX_PLATFORMS": "cpu", **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None
        self.log = state.parent / f"serve-{self.port}.log"

    def start(self) -> Server:
        import httpx

        with self.log.open("ab") as log:
            self.process = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"shitu serve exited with {self.process.returncode}: {self.log.read_text()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"shitu serve was not ready in {START_TIMEOUT} s: {self.log.read_text()}")

    def stop(self) -> int:
        """SIGTERM and wait (a clean shutdown compacts the journals)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL: no chance to clean up."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
