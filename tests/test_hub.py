"""Official weights by name (shitu.hub): download, verify, extract safely, cache, ``shitu models pull``.

Every network test talks to a local HTTP server on 127.0.0.1 (a free port, started and stopped here) that
supports ``Range`` and can misbehave on demand; ``SHITU_MODEL_MIRROR`` points the published addresses at it
and a guard refuses any connection beyond 127.0.0.1. The archives are PaddleX's layout
(``<name>_infer.tar`` holding ``<name>_infer/inference.json, inference.pdiparams, inference.yml``) built from
the tiny Paddle fixtures in tests/fixtures/paddle/PP-ShiTuV2_rec/.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest

from shitu import hookimpl
from shitu.errors import ShituError
from shitu.hub import PublishedWeights, ensure_inference_bundle, mirrored, published_training_weights
from shitu.hub import download as download_module
from shitu.hub.archive import safe_extract
from shitu.models.spec import ModelSpec

FIXTURES = Path(__file__).parent / "fixtures" / "paddle"
REC = FIXTURES / "PP-ShiTuV2_rec"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
NAME = "Tiny-ShiTu_rec"
ARCH = MANIFEST["models"]["PP-ShiTuV2_rec"]["arch"]


def tiny_spec(**published: object) -> ModelSpec:
    """PP-ShiTuV2_rec at the fixtures' size (its other hooks as registered), publishing where PaddleX would."""
    from shitu.plugins import get_host

    return dataclasses.replace(
        get_host().model("PP-ShiTuV2_rec"),
        name=NAME,
        description="tiny PP-ShiTuV2_rec of the Paddle fixtures",
        embedding_size=ARCH["class_expand"],
        input_size=ARCH["input_size"],
        arch={"scale": ARCH["scale"], "embedding_size": ARCH["class_expand"]},
        published=PublishedWeights(**{**vars(PublishedWeights.paddlex(NAME)), **published}),
    )


class TinyModels:
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec

    @hookimpl
    def register_models(self, register):
        register(self.spec)


def register_tiny(**published: object) -> ModelSpec:
    from shitu.plugins import get_host

    spec = tiny_spec(**published)
    get_host().register(TinyModels(spec), name="tiny-hub-models")
    return spec


INFERENCE_PATH = urlsplit(PublishedWeights.paddlex(NAME).inference_url or "").path
PRETRAINED_PATH = urlsplit(PublishedWeights.paddlex(NAME).pretrained_url or "").path


def paddlex_archive(export: str = "inference_paddle30") -> bytes:
    """PaddleX's ``<name>_infer.tar`` made from a fixture export folder."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        folder = f"{NAME}_infer"
        tar.addfile(_dir_info(folder))
        for file in sorted((REC / export).iterdir()):
            tar.add(file, arcname=f"{folder}/{file.name}")
        _add_bytes(tar, f"{folder}/inference.yml", b"Global:\n  model_name: Tiny-ShiTu_rec\n")
    return buffer.getvalue()


def _dir_info(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    return info


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# -- the local server --------------------------------------------------------------------------------


class Server:
    """A file server on 127.0.0.1 with ``Range`` support and faults on demand:

    - ``drop_after``: the first response of a path is cut after that many body bytes;
    - ``lie_length``: announce this Content-Length whatever the body is;
    - ``ignore_range``: answer every request with the whole file (200);
    - ``delay``: seconds between 4 KiB chunks (a slow line).
    At most ``max_requests`` requests are answered; later ones get 503.
    """

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = dict(files)
        self.requests: list[tuple[str, str | None]] = []
        self.bytes_sent = 0
        self.drop_after: int | None = None
        self.lie_length: int | None = None
        self.ignore_range = False
        self.delay = 0.0
        self.max_requests = 60
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                server.handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def gets(self, path: str) -> list[str | None]:
        """The Range headers of the requests for ``path`` (None: no Range)."""
        return [header for p, header in self.requests if p == path]

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        path = urlsplit(request.path).path
        header = request.headers.get("Range")
        with self._lock:
            self.requests.append((path, header))
            count = len(self.requests)
            drop = self.drop_after if len(self.gets(path)) == 1 else None
        if count > self.max_requests:
            request.send_error(503)
            return
        data = self.files.get(path)
        if data is None:
            request.send_error(404)
            return
        start = 0
        if header and header.startswith("bytes=") and not self.ignore_range:
            start = int(header[6:].split("-")[0])
            if start >= len(data):
                request.send_error(416)
                return
            request.send_response(206)
            request.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            request.send_response(200)
        body = data[start:]
        request.send_header("Content-Length", str(self.lie_length if self.lie_length is not None else len(body)))
        request.send_header("Accept-Ranges", "bytes")
        request.end_headers()
        if drop is not None:
            body = body[:drop]
        try:
            for offset in range(0, len(body), 4096):
                request.wfile.write(body[offset : offset + 4096])
                with self._lock:
                    self.bytes_sent += len(body[offset : offset + 4096])
                if self.delay:
                    time.sleep(self.delay)
            request.wfile.flush()
        except OSError:
            return
        if drop is not None or self.lie_length is not None:
            request.close_connection = True
            request.connection.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def server(monkeypatch) -> Iterator[Server]:
    served = Server(
        {INFERENCE_PATH: paddlex_archive(), PRETRAINED_PATH: (REC / "PP-ShiTuV2_rec.pdparams").read_bytes()}
    )
    served.thread.start()
    monkeypatch.setenv("SHITU_MODEL_MIRROR", served.url)
    yield served
    served.httpd.shutdown()
    served.httpd.server_close()


@pytest.fixture(autouse=True)
def _local_only(monkeypatch, tmp_path):
    """A private cache, no proxies, quick retries, and no connection beyond 127.0.0.1."""
    monkeypatch.setenv("SHITU_CACHE_DIR", str(tmp_path / "cache"))
    for variable in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("SHITU_OFFLINE", raising=False)
    monkeypatch.delenv("SHITU_MODEL_MIRROR", raising=False)
    monkeypatch.setattr(download_module, "BACKOFF_SECONDS", 0.01)
    monkeypatch.setattr(download_module, "TIMEOUT_SECONDS", 10.0)
    real_connect = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1"):
            raise AssertionError(f"a test tried to reach {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


def cache() -> Path:
    from shitu.runtime import cache_dir

    return cache_dir()


def assert_nothing_cached() -> None:
    """No bundle, no record, no archive or extraction left: only (at most) an empty downloads folder."""
    downloads, models = cache() / "hub" / NAME, cache() / "models"
    assert not downloads.exists() or list(downloads.iterdir()) == []
    assert not models.exists() or list(models.glob(f"*{NAME}*")) == []


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def assert_matches_paddle(ours: np.ndarray) -> None:
    """L2-normalised features (what predict returns) within 1e-5 of Paddle Inference's on the same export.
    (Raw features differ by up to 2e-4 at norms of 15-25, less than Paddle's own two runs differ: 4e-4.)"""
    reference = np.load(REC / "features_inference_paddle30.npy")
    assert np.abs(unit(ours) - unit(reference)).max() <= 1e-5


def features(bundle: Path) -> np.ndarray:
    from shitu.models.bundle import load_bundle

    x = np.load(REC / "inputs.npy").transpose(0, 2, 3, 1)
    return np.asarray(load_bundle(bundle).model(x))


# -- success, cache, mirror -------------------------------------------------------------------------


def test_fetch_imports_the_published_archive(server, cli, tmp_path, monkeypatch):
    register_tiny()
    bundle = ensure_inference_bundle(NAME, show_progress=False)
    assert bundle == cache() / "models" / NAME
    assert server.gets(INFERENCE_PATH) == [None]  # the published path, on the mirror, once
    ours = features(bundle)

    # the same folder through `shitu import-weights`
    folder = tmp_path / "by-hand"
    with tarfile.open(fileobj=io.BytesIO(server.files[INFERENCE_PATH])) as tar:
        tar.extractall(folder, filter="data")
    result = cli("import-weights", folder / f"{NAME}_infer", "--model", NAME, "--output", tmp_path / "b", "--json")
    assert result.code == 0, result.stderr
    np.testing.assert_array_equal(ours, features(tmp_path / "b"))
    assert_matches_paddle(ours)  # and Paddle Inference's own output on this export

    source = json.loads((bundle / "shitu_source.json").read_text())
    assert source["url"] == server.url + INFERENCE_PATH and source["size"] == len(server.files[INFERENCE_PATH])
    assert not list((cache() / "hub" / NAME).glob("*.tar*"))  # the archive is not kept once imported
    from shitu.embed.predict import installed_bundle

    assert installed_bundle(NAME) == bundle

    # later calls: the cache, no network at all
    monkeypatch.setenv("SHITU_OFFLINE", "1")
    assert ensure_inference_bundle(NAME, show_progress=False) == bundle
    assert len(server.requests) == 1


def test_mirror_keeps_the_path(monkeypatch):
    url = "https://paddle-model-ecology.bj.bcebos.com/paddlex/official_inference_model/paddle3.0.0/X_infer.tar"
    assert mirrored(url) == url
    monkeypatch.setenv("SHITU_MODEL_MIRROR", "http://127.0.0.1:8080")
    assert mirrored(url) == "http://127.0.0.1:8080/paddlex/official_inference_model/paddle3.0.0/X_infer.tar"
    monkeypatch.setenv("SHITU_MODEL_MIRROR", "http://mirror.example:81/models/")
    assert mirrored(url) == "http://mirror.example:81/models/paddlex/official_inference_model/paddle3.0.0/X_infer.tar"
    for bad in ("ftp://host", "127.0.0.1:8080", "http://", "http://host/?q=1"):
        monkeypatch.setenv("SHITU_MODEL_MIRROR", bad)
        with pytest.raises(ShituError, match="SHITU_MODEL_MIRROR"):
            mirrored(url)


def test_builtin_models_name_paddlex_addresses():
    from shitu.plugins import get_host

    for name in ("PP-ShiTuV2_rec", "PP-ShiTuV2_rec_CLIP_vit_base", "PP-ShiTuV2_rec_CLIP_vit_large"):
        published = get_host().model(name).published
        assert published.inference_url == (
            f"https://paddle-model-ecology.bj.bcebos.com/paddlex/official_inference_model/paddle3.0.0/{name}_infer.tar"
        )
        assert published.pretrained_url == (
            f"https://paddle-model-ecology.bj.bcebos.com/paddlex/official_pretrained_model/{name}_pretrained.pdparams"
        )


def test_training_weights_are_cached_and_checked(server, monkeypatch):
    register_tiny()
    path = published_training_weights(NAME, show_progress=False)
    assert path.read_bytes() == server.files[PRETRAINED_PATH]
    record = json.loads((cache() / "hub" / NAME / "record.json").read_text())
    import hashlib

    assert record["files"][path.name]["sha256"] == hashlib.sha256(server.files[PRETRAINED_PATH]).hexdigest()
    assert published_training_weights(NAME, show_progress=False) == path
    assert len(server.gets(PRETRAINED_PATH)) == 1
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ShituError, match="changed since it was downloaded") as caught:
        published_training_weights(NAME, show_progress=False)
    assert str(path) in str(caught.value)


# -- faults on the line -----------------------------------------------------------------------------


def test_dropped_connection_is_resumed_not_restarted(server):
    register_tiny()
    size = len(server.files[INFERENCE_PATH])
    server.drop_after = 50_000
    bundle = ensure_inference_bundle(NAME, show_progress=False)
    assert server.gets(INFERENCE_PATH) == [None, "bytes=50000-"]
    assert server.bytes_sent == size  # every byte sent once
    assert (bundle / "shitu_model.json").is_file()


def test_server_ignoring_range_restarts_cleanly(server):
    register_tiny()
    server.drop_after = 30_000
    server.ignore_range = True
    bundle = ensure_inference_bundle(NAME, show_progress=False)
    assert server.gets(INFERENCE_PATH) == [None, "bytes=30000-"]
    assert (bundle / "shitu_model.json").is_file()


def test_wrong_size_is_refused(server):
    size = len(server.files[INFERENCE_PATH])
    register_tiny(inference_size=size + 1)
    with pytest.raises(ShituError, match=f"{size} bytes, not the expected {size + 1}"):
        ensure_inference_bundle(NAME, show_progress=False)
    assert_nothing_cached()


def test_short_body_is_retried_then_refused(server, monkeypatch):
    monkeypatch.setattr(download_module, "RETRIES", 2)
    register_tiny()
    server.lie_length = len(server.files[INFERENCE_PATH]) + 1000  # announces more than it ever sends
    with pytest.raises(ShituError, match=r"cannot download .* \(3 attempts\).*shitu import-weights"):
        ensure_inference_bundle(NAME, show_progress=False)
    assert not (cache() / "models" / NAME).exists()


def test_corrupt_archive_is_refused(server):
    register_tiny()
    server.files[INFERENCE_PATH] = bytes(random.Random(0).randrange(256) for _ in range(20_000))
    with pytest.raises(ShituError, match="not a readable tar archive"):
        ensure_inference_bundle(NAME, show_progress=False)
    assert_nothing_cached()


def test_archive_without_a_model_is_refused(server):
    register_tiny()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        _add_bytes(tar, f"{NAME}_infer/readme.txt", b"hello")
    server.files[INFERENCE_PATH] = buffer.getvalue()
    with pytest.raises(ShituError, match="no Paddle inference model"):
        ensure_inference_bundle(NAME, show_progress=False)
    assert_nothing_cached()


def test_wrong_sha256_is_refused(server):
    register_tiny(inference_sha256="0" * 64)
    with pytest.raises(ShituError, match="not the published 0000"):
        ensure_inference_bundle(NAME, show_progress=False)
    assert_nothing_cached()


def test_a_changed_republished_file_is_refused(server):
    register_tiny()
    bundle = ensure_inference_bundle(NAME, show_progress=False)
    shutil.rmtree(bundle)
    server.files[INFERENCE_PATH] = paddlex_archive("inference")  # another export under the same address
    with pytest.raises(ShituError, match="first download's"):
        ensure_inference_bundle(NAME, show_progress=False)
    assert not bundle.exists()


def test_http_404_names_the_url_and_the_manual_route(server):
    register_tiny()
    del server.files[INFERENCE_PATH]
    with pytest.raises(ShituError) as caught:
        ensure_inference_bundle(NAME, show_progress=False)
    message = str(caught.value)
    assert "HTTP 404" in message and server.url + INFERENCE_PATH in message
    assert f"shitu import-weights {NAME}_infer --model {NAME} --output {cache() / 'models' / NAME}" in message
    assert len(server.requests) == 1  # a 404 is not retried
    assert_nothing_cached()


# -- hostile archives -------------------------------------------------------------------------------


def _hostile(kind: str) -> tuple[bytes, str]:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_dir_info(f"{NAME}_infer"))
        if kind == "traversal":
            name = f"{NAME}_infer/../../../outside.txt"
            _add_bytes(tar, name, b"x")
        elif kind == "absolute":
            name = "/tmp/shitu-hub-absolute.txt"
            _add_bytes(tar, name, b"x")
        elif kind in ("symlink", "hardlink", "device", "fifo"):
            name = f"{NAME}_infer/inference.pdiparams"
            info = tarfile.TarInfo(name)
            info.type = {
                "symlink": tarfile.SYMTYPE,
                "hardlink": tarfile.LNKTYPE,
                "device": tarfile.CHRTYPE,
                "fifo": tarfile.FIFOTYPE,
            }[kind]
            info.linkname = "/etc/passwd" if kind in ("symlink", "hardlink") else ""
            info.devmajor, info.devminor = 1, 3
            tar.addfile(info)
        elif kind == "huge":
            name = f"{NAME}_infer/inference.pdiparams"
            info = tarfile.TarInfo(name)
            info.size = 1 << 40  # the header claims a TiB; the data is not there
            buffer.write(info.tobuf(tarfile.PAX_FORMAT))
            return buffer.getvalue() + bytes(2048), name
        for file in sorted((REC / "inference_paddle30").iterdir()):
            tar.add(file, arcname=f"{NAME}_infer/x_{file.name}")
    return buffer.getvalue(), name


@pytest.mark.parametrize("kind", ["traversal", "absolute", "symlink", "hardlink", "device", "fifo", "huge"])
def test_hostile_archives_are_refused(server, kind, tmp_path):
    register_tiny()
    server.files[INFERENCE_PATH], member = _hostile(kind)
    with pytest.raises(ShituError) as caught:
        ensure_inference_bundle(NAME, show_progress=False)
    message = str(caught.value)
    assert f"refusing archive member {member!r}" in message and "\n" not in message
    assert_nothing_cached()
    assert not Path("/tmp/shitu-hub-absolute.txt").exists()
    assert not (cache() / "outside.txt").exists() and not (cache().parent / "outside.txt").exists()


def test_total_size_and_member_limits(tmp_path):
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tar:
        for index in range(3):
            _add_bytes(tar, f"m/{index}.bin", bytes(1000))
    (tmp_path / "out").mkdir()
    with pytest.raises(ShituError, match=r"'m/2\.bin': the archive unpacks to over 2500 bytes"):
        safe_extract(archive, tmp_path / "out", max_total_bytes=2500)
    with pytest.raises(ShituError, match=r"'m/0\.bin': 1000 bytes, over the 999-byte limit"):
        safe_extract(archive, tmp_path / "out", max_member_bytes=999)
    with pytest.raises(ShituError, match="more than 2 members"):
        safe_extract(archive, tmp_path / "out", max_members=2)
    assert list((tmp_path / "out").iterdir()) == []  # nothing is written before every member passed
    safe_extract(archive, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out" / "m").iterdir()) == ["0.bin", "1.bin", "2.bin"]


# -- offline and unreachable ------------------------------------------------------------------------


def test_offline_never_opens_a_socket(monkeypatch):
    register_tiny()
    monkeypatch.setenv("SHITU_OFFLINE", "1")
    opened: list[object] = []

    class NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            opened.append(args)
            raise AssertionError("a socket was opened offline")

    monkeypatch.setattr(socket, "socket", NoSocket)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: opened.append(a))
    with pytest.raises(ShituError, match="SHITU_OFFLINE") as caught:
        ensure_inference_bundle(NAME, show_progress=False)
    assert f"{NAME}_infer.tar by hand" in str(caught.value) and "shitu import-weights" in str(caught.value)
    with pytest.raises(ShituError, match=f"SHITU_OFFLINE.*{NAME}_pretrained.pdparams by hand"):
        published_training_weights(NAME, show_progress=False)
    assert opened == []


def test_unreachable_server_names_the_url(monkeypatch):
    register_tiny()
    monkeypatch.setattr(download_module, "RETRIES", 1)
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("SHITU_MODEL_MIRROR", f"http://127.0.0.1:{port}")
    with pytest.raises(ShituError) as caught:
        ensure_inference_bundle(NAME, show_progress=False)
    message = str(caught.value)
    assert f"http://127.0.0.1:{port}{INFERENCE_PATH}" in message and "cannot be reached" in message
    assert "by hand" in message and f"shitu import-weights {NAME}_infer --model {NAME}" in message


# -- the command line -------------------------------------------------------------------------------


def test_models_pull_and_list(server, cli, monkeypatch):
    from shitu.models import info

    def quick_facts(spec):
        return info.ModelFacts(spec.name, spec.description, 1, 1, spec.input_size, spec.embedding_size, 0.0)

    monkeypatch.setattr(info, "model_facts", quick_facts)
    register_tiny()
    result = cli("models", "pull", NAME, "--json")
    assert result.code == 0, result.stderr
    pulled = result.json()
    assert pulled["model"] == NAME and pulled["kind"] == "bundle"
    assert pulled["path"] == str(cache() / "models" / NAME) and pulled["url"] == server.url + INFERENCE_PATH
    assert len(pulled["sha256"]) == 64
    result = cli("models", "pull", NAME, "--pretrained", "--json")
    assert result.code == 0, result.stderr
    assert result.json()["kind"] == "pretrained" and result.json()["size"] == len(server.files[PRETRAINED_PATH])

    for args in (("models", "--json"), ("models", "list", "--json")):
        result = cli(*args)
        assert result.code == 0, result.stderr
        listed = {m["name"]: m for m in result.json()["models"]}
        assert {"PP-ShiTuV2_rec", "PP-ShiTuV2_rec_CLIP_vit_base", NAME} <= set(listed)
        assert [c["kind"] for c in listed[NAME]["cached"]] == ["bundle", "pretrained"]
        assert listed[NAME]["cached"][0]["sha256"] == pulled["sha256"]
        assert listed["PP-ShiTuV2_rec"]["cached"] == []
    monkeypatch.setenv("COLUMNS", "300")  # room for the paths in the table
    result = cli("models")
    assert result.code == 0 and result.stdout == ""
    assert "cached weights" in result.stderr and f"{NAME}_pretrained.pdparams" in result.stderr

    monkeypatch.setenv("SHITU_OFFLINE", "1")
    result = cli("models", "pull", "PP-ShiTuV2_rec", "--json")
    assert result.code == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "PP-ShiTuV2_rec_infer.tar by hand" in result.stderr


# -- several processes ------------------------------------------------------------------------------

DRIVER = """
import sys
sys.path.insert(0, {tests!r})
from test_hub import register_tiny
from shitu.hub import ensure_inference_bundle
register_tiny()
print(ensure_inference_bundle({name!r}, show_progress=False), flush=True)
"""


def _driver(tmp_path: Path, server: Server) -> tuple[list[str], dict[str, str]]:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(tests=str(Path(__file__).parent), name=NAME))
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(SHITU_CACHE_DIR=str(cache()), SHITU_MODEL_MIRROR=server.url, NO_PROXY="127.0.0.1", JAX_PLATFORMS="cpu")
    return [sys.executable, str(script)], env


def test_two_processes_download_once(server, tmp_path):
    server.delay = 0.01  # ~1 s for the archive: the second process arrives while the first downloads
    command, env = _driver(tmp_path, server)
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    for process, (out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err.decode()
        assert out.decode().strip() == str(cache() / "models" / NAME)
    assert server.gets(INFERENCE_PATH) == [None]
    register_tiny()
    assert_matches_paddle(features(cache() / "models" / NAME))


@pytest.mark.slow
def test_kill_during_fetch_and_import(server, tmp_path):
    """20 SIGKILLs at random moments of a fetch (download, extraction, import, publication); after each the
    bundle is absent or complete (it loads with the right features); a bundle found complete is removed so
    the next run fetches again; finally a normal run succeeds."""
    server.delay = 0.02  # the download takes ~1.6 s of a ~6 s run, so kills land in it too
    command, env = _driver(tmp_path, server)
    register_tiny()
    bundle = cache() / "models" / NAME

    def check_bundle() -> bool:
        if not bundle.exists():
            return False
        assert_matches_paddle(features(bundle))
        return True

    started = time.monotonic()
    subprocess.run(command, env=env, check=True, capture_output=True, timeout=300)
    whole = time.monotonic() - started
    assert check_bundle()
    shutil.rmtree(bundle)
    rng = random.Random(7)
    outcomes = {"absent": 0, "complete": 0, "partial download left": 0}
    for _ in range(20):
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.05, 1.0) * whole)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        if list((cache() / "hub" / NAME).glob("*.part")):
            outcomes["partial download left"] += 1
        if check_bundle():
            outcomes["complete"] += 1
            shutil.rmtree(bundle)
        else:
            outcomes["absent"] += 1
    result = subprocess.run(command, env=env, capture_output=True, timeout=300, text=True)
    assert result.returncode == 0, result.stderr
    assert check_bundle()
    leftovers = [p.name for p in (cache() / "models").iterdir() if p.name != NAME]
    assert leftovers == []
    assert not list((cache() / "hub" / NAME).glob(".extract-*"))
    resumed = [h for h in server.gets(INFERENCE_PATH) if h]
    print(f"kills: {outcomes}, resumed downloads: {len(resumed)}, requests: {len(server.gets(INFERENCE_PATH))}")


# -- a name on first use: predict, index build, eval; training's default weights ---------------------


def test_a_model_name_fetches_its_published_model_on_first_use(server, cli, tmp_path, monkeypatch):
    """``create_model(NAME)`` installs the published inference model, then the commands load it offline."""
    from conftest import write_image

    from shitu.embed.predict import create_model

    register_tiny()
    predictor = create_model(NAME)
    assert predictor.describe()["bundle"] == str(cache() / "models" / NAME)
    assert_matches_paddle(features(cache() / "models" / NAME))
    monkeypatch.setenv("SHITU_OFFLINE", "1")  # from here on the cache alone
    for name, color in (("red.png", (200, 30, 30)), ("blue.png", (30, 30, 200))):
        write_image(tmp_path / "photos" / name, color=color, fmt="PNG")
    (tmp_path / "photos" / "gallery.txt").write_text("red.png 0\nblue.png 1\n")
    done = cli("predict", "--model", NAME, "--json", tmp_path / "photos" / "red.png")
    assert done.code == 0, done.stderr
    feature = np.asarray(done.json_lines()[0]["feature"])
    assert abs(np.linalg.norm(feature) - 1) < 1e-5 and "RANDOM" not in done.stderr
    built = cli("index", "build", "--model", NAME, "--gallery", tmp_path / "photos" / "gallery.txt",
                "--output", tmp_path / "index", "--json")  # fmt: skip
    assert built.code == 0, built.stderr
    assert built.json()["count"] == 2
    assert len(server.requests) == 1  # one download in all


def test_training_starts_from_the_published_weights_by_default(server, tmp_path):
    """``Train.pretrain_weight_path`` holds PaddleX's URL by default: it is fetched (through the mirror) and
    cached; ``null`` means random weights."""
    from shitu.config import load_config
    from shitu.data.demo import demo_dataset_path
    from shitu.train.settings import TrainSettings

    spec = register_tiny()
    assert (
        load_config("PP-ShiTuV2_rec")
        .get("Train.pretrain_weight_path")
        .endswith("/official_pretrained_model/PP-ShiTuV2_rec_pretrained.pdparams")
    )
    config = load_config(
        "PP-ShiTuV2_rec", {"Global.model": NAME, "Train.pretrain_weight_path": spec.published.pretrained_url}
    )
    settings = TrainSettings.from_config(config, output=tmp_path / "run", dataset_dir=demo_dataset_path())
    assert settings.pretrained is not None and settings.pretrained.read_bytes() == server.files[PRETRAINED_PATH]
    assert server.gets(PRETRAINED_PATH) == [None]
    config = load_config("PP-ShiTuV2_rec", ["Global.model=" + NAME, "Train.pretrain_weight_path=null"])
    assert (
        TrainSettings.from_config(config, output=tmp_path / "run", dataset_dir=demo_dataset_path()).pretrained is None
    )
