"""A small Python client of ``shitu serve``'s native API (httpx).

Images are read here (a path is a file on the client's machine, never the server's) and sent as Base64::

    from shitu.serve.client import Client

    with Client("http://127.0.0.1:8000") as client:
        ids = client.add(["apple.jpg"], labels=["apple"])
        best = client.search(["query.jpg"], k=3)[0]["decision"]
"""

from __future__ import annotations

import base64
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shitu.errors import ShituError

ImageLike = str | os.PathLike[str] | bytes


def _encode(image: ImageLike) -> str:
    data = bytes(image) if isinstance(image, (bytes, bytearray, memoryview)) else _read(Path(image))
    return base64.b64encode(data).decode("ascii")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ShituError(f"cannot read: {exc.strerror or exc}", path=path) from None


class Client:
    """Talks to one server. Every call returns the decoded JSON answer; a refused request raises a
    ShituError with the server's message (and field), a server out of reach one that names its URL.
    ``api_key`` defaults to ``$SHITU_API_KEY``; ``gallery`` to the default gallery."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        gallery: str | None = None,
        transport: Any | None = None,
    ) -> None:
        import httpx

        key = api_key if api_key is not None else os.environ.get("SHITU_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.url = url.rstrip("/")
        self.gallery = gallery
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None) -> Any:
        import httpx

        query = {k: v for k, v in (params or {}).items() if v is not None}
        if self.gallery is not None and path.startswith("/v1/"):
            query.setdefault("gallery", self.gallery)
        try:
            response = self._http.request(method, path, json=json, params=query)
        except httpx.HTTPError as exc:
            raise ShituError(f"cannot reach the server: {type(exc).__name__}: {exc}", path=self.url + path) from None
        try:
            document = response.json()
        except ValueError:
            document = None
        if response.status_code >= 400:
            error = (document or {}).get("error") if isinstance(document, dict) else None
            message = error.get("message") if isinstance(error, dict) else response.text[:200]
            raise ShituError(f"HTTP {response.status_code}: {message}", path=self.url + path)
        return document

    # -- the API -------------------------------------------------------------------------------------
    def ready(self) -> bool:
        """Whether the server answers /readyz with 200."""
        import httpx

        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    def embed(self, images: Sequence[ImageLike]) -> list[list[float]]:
        """Unit-length features of ``images``, one row each."""
        return self._call("POST", "/v1/embed", json={"images": [_encode(i) for i in images]})["features"]

    def search(
        self,
        images: Sequence[ImageLike],
        *,
        k: int = 5,
        min_score: float | None = None,
        labels: Sequence[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Per image: ``{"matches": [{"id", "label", "score", "ref"}], "decision": {"label", "score"} | None}``."""
        body: dict[str, Any] = {"images": [_encode(i) for i in images], "k": k}
        if min_score is not None:
            body["min_score"] = min_score
        if labels is not None:
            body["labels"] = list(labels)
        return self._call("POST", "/v1/search", json=body)["results"]

    def add(
        self,
        images: Sequence[ImageLike],
        labels: Sequence[str],
        *,
        refs: Sequence[str | None] | None = None,
        allow_duplicates: bool = False,
    ) -> list[int]:
        """Store ``images`` under ``labels``; their ids (an image already stored gives its existing id)."""
        body: dict[str, Any] = {
            "images": [_encode(i) for i in images],
            "labels": list(labels),
            "allow_duplicates": allow_duplicates,
        }
        if refs is not None:
            body["refs"] = list(refs)
        return self._call("POST", "/v1/items", json=body)["ids"]

    def remove(self, *, ids: Sequence[int] = (), labels: Sequence[str] = (), refs: Sequence[str] = ()) -> list[int]:
        """Remove items by id, label or ref; the ids removed."""
        body = {"ids": list(ids), "labels": list(labels), "refs": list(refs)}
        return self._call("POST", "/v1/items/remove", json=body)["removed"]

    def items(self, *, offset: int = 0, limit: int = 100, label: str | None = None) -> dict[str, Any]:
        """A page of items: ``{"items", "total", "offset", "limit"}``."""
        return self._call("GET", "/v1/items", params={"offset": offset, "limit": limit, "label": label})

    def item(self, item_id: int) -> dict[str, Any]:
        return self._call("GET", f"/v1/items/{int(item_id)}")

    def info(self) -> dict[str, Any]:
        """The gallery's description: model, count, labels, dim, dtype."""
        return self._call("GET", "/v1/index")


def _chunks(items: Sequence[Any], size: int) -> Any:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def remote_predict(url: str, paths: Sequence[str], *, batch_size: int = 8) -> Any:
    """``shitu predict --server``: yield ``{"input_path", "page_index": None, "feature"}`` per image of
    ``paths`` (files read here), as the local command's JSON lines."""
    with Client(url) as client:
        for chunk in _chunks(list(paths), batch_size):
            for path, feature in zip(chunk, client.embed(chunk), strict=True):
                yield {"input_path": path, "page_index": None, "feature": feature}


def remote_search(url: str, paths: Sequence[str], *, k: int = 5, batch_size: int = 8) -> Any:
    """``shitu search --server``: yield ``{"input", "label", "score", "hits"}`` per image of ``paths``,
    searched in the server's default gallery (hits: ``{"id", "label", "score", "ref"}``, best first)."""
    with Client(url) as client:
        for chunk in _chunks(list(paths), batch_size):
            for path, result in zip(chunk, client.search(chunk, k=k, min_score=-1.0), strict=True):
                decision = result["decision"] or {}
                yield {
                    "input": path,
                    "label": decision.get("label"),
                    "score": decision.get("score", 0.0),
                    "hits": result["matches"],
                }
