"""``shitu serve``: the real server process on a loopback port, its PaddleX routes, its /v1 API, bad requests,
dynamic batching, metrics, the API key, and crash safety (kill -9 during a stream of writes)."""

from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serve_support import REQUEST_TIMEOUT, Server, b64, make_bundle, png_bytes

API_KEY = "test-key-0123456789"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
FUZZ_EXAMPLES = 300


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle") / "rec")


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory) -> Path:
    """One JAX compilation cache for every server of this module: the second start skips most compiles."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def server(tiny_bundle, compile_cache, tmp_path_factory):
    """One server for the API tests: small limits so the refusals are cheap to provoke."""
    state = tmp_path_factory.mktemp("serve") / "state"
    running = Server(
        tiny_bundle,
        state,
        compile_cache,
        "--max-batch",
        "4",
        "--max-wait-ms",
        "30",
        "--max-images",
        "4",
        "--max-body-mb",
        "1",
        "--max-pixels",
        "1000000",
        env={"SHITU_API_KEY": API_KEY},
    ).start()
    yield running
    # uvicorn shuts down cleanly, then ends by the signal it caught
    assert running.stop() in (0, -15)
    journals = list(state.glob("galleries/*/journal.log"))
    assert journals and all(j.stat().st_size == 0 for j in journals)  # folded into the indexes at shutdown


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=HEADERS, timeout=REQUEST_TIMEOUT) as client:
        yield client


def _alive(http: httpx.Client) -> None:
    assert http.get("/readyz").status_code == 200


# -- PaddleX's routes -------------------------------------------------------------------------------------------


def test_paddlex_routes_build_add_infer_and_remove_with_its_schemas(http):
    apple, pear, plum = png_bytes(1), png_bytes(2), png_bytes(3)
    built = http.post("/shitu-index-build", json={"imageLabelPairs": [{"image": b64(apple), "label": "apple"}]})
    assert built.status_code == 200
    doc = built.json()
    assert doc["errorCode"] == 0 and doc["errorMsg"] == "Success" and isinstance(doc["logId"], str)
    key = doc["result"]["indexKey"]
    assert doc["result"]["idMap"] == {"0": "apple"}

    pairs = [{"image": b64(pear), "label": "pear"}, {"image": b64(plum), "label": "plum"}]
    added = http.post("/shitu-index-add", json={"imageLabelPairs": pairs, "indexKey": key}).json()
    assert added["result"]["idMap"] == {"0": "apple", "1": "pear", "2": "plum"}

    found = http.post("/shitu-infer", json={"image": b64(pear), "indexKey": key, "recThreshold": -1.0, "topk": 2})
    result = found.json()["result"]
    assert result["image"] is None and len(result["detectedObjects"]) == 1
    detected = result["detectedObjects"][0]
    assert detected["bbox"] == [0.0, 0.0, 40.0, 30.0] and detected["score"] == 1.0  # the whole image
    assert detected["recResults"][0]["label"] == "pear"
    assert detected["recResults"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert len(detected["recResults"]) == 2

    removed = http.post("/shitu-index-remove", json={"ids": [1], "indexKey": key}).json()
    assert removed["result"]["idMap"] == {"0": "apple", "2": "plum"}
    after = http.post("/shitu-infer", json={"image": b64(pear), "indexKey": key, "recThreshold": -1.0}).json()
    assert "pear" not in [r["label"] for r in after["result"]["detectedObjects"][0]["recResults"]]

    # errors come in PaddleX's envelope, naming the field
    bad = http.post("/shitu-infer", json={"image": b64(b"not an image"), "indexKey": key})
    assert bad.status_code == 422
    assert bad.json()["errorCode"] == 422 and bad.json()["errorMsg"].startswith("image:")
    missing = http.post("/shitu-index-add", json={"imageLabelPairs": pairs})
    assert missing.status_code == 422 and "indexKey" in missing.json()["errorMsg"]
    unknown = http.post("/shitu-index-remove", json={"ids": [0], "indexKey": "no-such-key"})
    assert unknown.status_code == 404 and unknown.json()["errorCode"] == 404


# -- the native API -----------------------------------------------------------------------------------------


def test_embed_json_and_multipart_give_the_same_unit_features(http):
    images = [png_bytes(10), png_bytes(11, size=(64, 20))]
    by_json = http.post("/v1/embed", json={"images": [b64(i) for i in images]})
    assert by_json.status_code == 200
    features = np.asarray(by_json.json()["features"], np.float32)
    assert features.shape == (2, by_json.json()["dim"])
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)
    files = [("images", (f"{n}.png", data, "image/png")) for n, data in enumerate(images)]
    by_form = http.post("/v1/embed", files=files)
    assert by_form.status_code == 200
    np.testing.assert_allclose(np.asarray(by_form.json()["features"]), features, atol=1e-6)


def test_live_gallery_add_dedupe_search_filter_page_and_remove(http):
    gallery = {"gallery": "native"}
    assert http.post("/shitu-index-build", json={"imageLabelPairs": [{"image": b64(png_bytes(99)), "label": "x"}]})
    images = [png_bytes(20 + n) for n in range(4)]
    created = http.post(
        "/v1/items",
        params={"gallery": "nope"},
        json={"images": [b64(images[0])], "labels": ["a"]},
    )
    assert created.status_code == 404  # galleries other than the default come from /shitu-index-build

    body = {"images": [b64(i) for i in images], "labels": ["a", "a", "b", "c"], "refs": ["r0", None, None, None]}
    first = http.post("/v1/items", json=body).json()
    ids = first["ids"]
    assert len(set(ids)) == 4 and not any(item["existing"] for item in first["items"])
    again = http.post("/v1/items", json={"images": [b64(images[1])], "labels": ["a"]}).json()
    assert again["ids"] == [ids[1]] and again["items"][0]["existing"] is True  # same bytes: no duplicate
    copy = http.post("/v1/items", json={"images": [b64(images[1])], "labels": ["a"], "allow_duplicates": True})
    assert copy.json()["ids"][0] not in ids
    taken = http.post("/v1/items", json={"images": [b64(png_bytes(30))], "labels": ["z"], "refs": ["r0"]})
    assert taken.status_code == 409 and taken.json()["error"]["field"] == "refs"

    search = http.post("/v1/search", json={"images": [b64(images[3])], "k": 3, "min_score": -1.0}).json()
    row = search["results"][0]
    assert row["matches"][0]["id"] == ids[3] and row["matches"][0]["label"] == "c"
    assert row["matches"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert row["decision"]["label"] in {"a", "b", "c"}
    filtered = http.post("/v1/search", json={"images": [b64(images[3])], "k": 5, "labels": ["b"], "min_score": -1})
    assert {m["label"] for m in filtered.json()["results"][0]["matches"]} == {"b"}
    none = http.post("/v1/search", json={"images": [b64(images[3])], "labels": ["no-such-label"]}).json()
    assert none["results"][0] == {"matches": [], "decision": None}  # nothing matched: unknown

    page = http.get("/v1/items", params={"offset": 1, "limit": 2}).json()
    assert page["total"] == 5 and [i["id"] for i in page["items"]] == sorted(ids + copy.json()["ids"])[1:3]
    assert http.get("/v1/items", params={"label": "a"}).json()["total"] == 3
    assert http.get("/v1/items", params={"ref": "r0"}).json()["items"][0]["id"] == ids[0]
    assert http.get("/v1/items", params={"limit": 100000}).status_code == 422  # never the whole map at once
    one = http.get(f"/v1/items/{ids[2]}").json()
    assert one["label"] == "b" and len(one["sha256"]) == 64
    assert http.get("/v1/items/999999").status_code == 404

    gone = http.post("/v1/items/remove", json={"labels": ["a"]}).json()
    assert len(gone["removed"]) == 3 and gone["count"] == 2
    assert http.delete(f"/v1/items/{ids[2]}").json()["removed"] == [ids[2]]
    assert http.post("/v1/items/remove", json={"ids": [ids[2]]}).status_code == 404  # all or nothing
    info = http.get("/v1/index").json()
    assert info["count"] == 1 and info["dim"] == 512 and info["dtype"] == "f32"
    assert info["model"]["model"] == "PP-ShiTuV2_rec" and info["model"]["input_size"] == 32
    assert set(http.get("/v1/galleries").json()["galleries"]) >= {"default"}
    del gallery


def test_python_client_and_the_cli_server_option(server, tmp_path, cli, monkeypatch):
    from shitu.serve.client import Client

    monkeypatch.setenv("SHITU_API_KEY", API_KEY)
    photo = tmp_path / "kiwi.png"
    photo.write_bytes(png_bytes(40))
    with Client(server.url, timeout=REQUEST_TIMEOUT) as client:
        assert client.ready()
        [kiwi] = client.add([photo], labels=["kiwi"])
        assert client.item(kiwi)["label"] == "kiwi"
        assert client.search([photo.read_bytes()], k=1)[0]["decision"]["label"] == "kiwi"
        assert len(client.embed([photo])[0]) == 512
    result = cli("search", str(photo), "--server", server.url, "-k", "1", "--json")
    assert result.code == 0, result.stderr
    [line] = result.json_lines()
    assert line["label"] == "kiwi" and line["hits"][0]["id"] == kiwi
    predicted = cli("predict", str(photo), "--server", server.url, "--json")
    assert predicted.code == 0 and len(predicted.json_lines()[0]["feature"]) == 512
    with Client(server.url, api_key="wrong") as client, pytest.raises(Exception, match="HTTP 401"):
        client.info()


# -- refusals ------------------------------------------------------------------------------------------------


def test_bad_requests_get_4xx_naming_the_field_and_the_service_keeps_serving(http):
    good = png_bytes(50)
    truncated = good[: len(good) // 2]
    import io

    from PIL import Image

    bomb = io.BytesIO()
    Image.new("L", (1200, 1000)).save(bomb, format="PNG")  # above this server's --max-pixels 1000000
    cases = [
        ({"images": [b64(truncated)]}, 422, "images.0"),
        ({"images": [b64(b"\x89PNG\r\n\x1a\n garbage")]}, 422, "images.0"),
        ({"images": [b64(bomb.getvalue())]}, 422, "images.0"),
        ({"images": ["/etc/passwd"]}, 422, "images.0"),
        ({"images": ["file:///etc/passwd"]}, 422, "images.0"),
        ({"images": ["http://127.0.0.1:1/x.png"]}, 422, "images.0"),  # URL inputs are off
        ({"images": "not a list"}, 422, "images"),
        ({"images": [b64(good)], "k": "5"}, 422, "k"),
        ({"images": [b64(good)], "k": True}, 422, "k"),
        ({"images": [b64(good)], "k": 0}, 422, "k"),
        ({"images": [b64(good)], "min_score": 7}, 422, "min_score"),
        ({"images": [b64(good)], "surprise": 1}, 422, "surprise"),
        ({"images": [b64(good)] * 5}, 413, "images"),  # --max-images 4
        ({"images": []}, 422, "images"),
    ]
    for body, status, field in cases:
        response = http.post("/v1/search", json=body)
        assert response.status_code == status, (body if len(str(body)) < 200 else field, response.text)
        assert response.json()["error"]["field"] == field, response.text
    huge = http.post("/v1/embed", json={"images": ["A" * (2 * 1024 * 1024)]})  # --max-body-mb 1
    assert huge.status_code == 413 and huge.json()["error"]["field"] == "body"
    not_json = http.post("/v1/search", content=b"{nope", headers={"content-type": "application/json"})
    assert not_json.status_code == 422
    wrong_type = http.post("/v1/search", content=b"<xml/>", headers={"content-type": "text/xml"})
    assert wrong_type.status_code == 415
    mismatch = http.post("/v1/items", json={"images": [b64(good)], "labels": ["a", "b"]})
    assert mismatch.status_code == 422 and mismatch.json()["error"]["field"] == "labels"
    assert http.get("/v1/items/-1").status_code == 422
    _alive(http)
    assert http.post("/v1/search", json={"images": [b64(good)]}).status_code == 200


def test_an_api_key_guards_every_route_but_the_probes(server):
    assert httpx.get(server.url + "/healthz", timeout=REQUEST_TIMEOUT).status_code == 200
    assert httpx.get(server.url + "/readyz", timeout=REQUEST_TIMEOUT).status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}):
        refused = httpx.get(server.url + "/v1/index", headers=headers, timeout=REQUEST_TIMEOUT)
        assert refused.status_code == 401 and refused.json()["error"]["field"] == "authorization"
    assert httpx.get(server.url + "/v1/index", headers={"X-API-Key": API_KEY}, timeout=REQUEST_TIMEOUT).is_success


def test_binding_beyond_loopback_needs_an_api_key(cli, monkeypatch, tiny_bundle):
    monkeypatch.delenv("SHITU_API_KEY", raising=False)
    result = cli("serve", "--model-dir", tiny_bundle, "--host", "0.0.0.0")
    assert result.code == 1 and "needs an API key" in result.stderr and len(result.stderr.splitlines()) == 1


# -- batching and metrics -------------------------------------------------------------------------------------


def test_concurrent_requests_are_batched_and_metrics_report_it(http, server):
    images = [b64(png_bytes(200 + n)) for n in range(16)]

    def one(image: str) -> list[float]:
        response = http.post("/v1/embed", json={"images": [image]})
        assert response.status_code == 200
        return response.json()["features"][0]

    alone = np.asarray(http.post("/v1/embed", json={"images": images[:4]}).json()["features"])
    with ThreadPoolExecutor(16) as pool:
        together = np.asarray(list(pool.map(one, images)))
    np.testing.assert_allclose(together[:4], alone, atol=1e-5)  # batching changes no result
    text = http.get("/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and line[0] != "#"}
    single = values['shitu_batch_size_bucket{le="1.0"}']
    assert values["shitu_batch_size_count"] > single  # some model calls took more than one image
    assert values["shitu_batch_size_sum"] / values["shitu_batch_size_count"] > 1.0
    assert 'shitu_index_items{gallery="default"}' in values and "shitu_queue_depth" in values
    assert values['shitu_requests_total{method="POST",route="/v1/embed",status="200"}'] >= 17
    assert "shitu_request_seconds_bucket" in text
    assert "/v1/search" in http.get("/openapi.json").json()["paths"]


# -- fuzzing ---------------------------------------------------------------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
_field_names = st.sampled_from(
    ["images", "labels", "refs", "ids", "k", "min_score", "allow_duplicates", "image", "indexKey", "topk", "x"]
)
_bodies = _json_values | st.dictionaries(_field_names, _json_values, max_size=5)
_routes = st.sampled_from(
    ["/v1/search", "/v1/embed", "/v1/items", "/v1/items/remove", "/shitu-infer", "/shitu-index-add"]
)
fuzzed: list[int] = []


def test_fuzzed_json_bodies_never_break_the_service(http):
    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(route=_routes, body=_bodies)
    def check(route: str, body: object) -> None:
        fuzzed.append(1)
        response = http.post(route, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
        assert response.status_code < 500, response.text
        assert response.status_code in (200, 404, 409, 413, 415, 422), response.text

    check()
    assert len(fuzzed) >= FUZZ_EXAMPLES
    _alive(http)


# -- crash safety ------------------------------------------------------------------------------------------------


def _write_stream(url: str, stop: threading.Event, log: list[dict], seed: int) -> None:
    """Adds (two new images under a new label each) and removals (of an earlier label), one at a time,
    logging each before it is sent and marking it acknowledged once answered."""
    rng = random.Random(seed)
    with httpx.Client(base_url=url, headers=HEADERS, timeout=REQUEST_TIMEOUT) as client:
        number = 0
        while not stop.is_set():
            added = [entry for entry in log if entry["op"] == "add" and entry["acked"]]
            if added and rng.random() < 0.3:
                entry = {"op": "remove", "label": rng.choice(added)["label"], "acked": False}
                log.append(entry)
                try:
                    response = client.post("/v1/items/remove", json={"labels": [entry["label"]]})
                except httpx.HTTPError:
                    return
            else:
                label = f"s{seed}-op{number}"
                number += 1
                images = [b64(png_bytes(seed * 100_000 + number * 2 + i)) for i in range(2)]
                entry = {"op": "add", "label": label, "acked": False}
                log.append(entry)
                try:
                    response = client.post("/v1/items", json={"images": images, "labels": [label, label]})
                except httpx.HTTPError:
                    return
                entry["ids"] = response.json().get("ids")
            assert response.status_code == 200, response.text
            entry["acked"] = True


def _check_after_restart(url: str, log: list[dict]) -> None:
    """Every acknowledged write is there with its ids; the write in flight is whole or absent."""
    with httpx.Client(base_url=url, headers=HEADERS, timeout=REQUEST_TIMEOUT) as client:
        expected: dict[str, int | None] = {}
        ids: dict[str, list[int]] = {}
        for entry in log:
            if entry["op"] == "add":
                expected[entry["label"]] = 2 if entry["acked"] else None
                if entry["acked"]:
                    ids[entry["label"]] = entry["ids"]
            elif entry["op"] == "lost":
                continue
            elif entry["acked"]:
                expected[entry["label"]] = 0
            else:
                expected[entry["label"]] = None  # removal in flight: all or nothing
        for label, count in expected.items():
            found = client.get("/v1/items", params={"label": label}).json()
            if count is None:
                assert found["total"] in (0, 2), (label, found)
            else:
                assert found["total"] == count, (label, found)
            if found["total"] == 2 and label in ids:
                assert sorted(item["id"] for item in found["items"]) == sorted(ids[label])  # ids are stable
        for entry in log:  # settle what was in flight: from now on it counts as what really happened
            if not entry["acked"]:
                found = client.get("/v1/items", params={"label": entry["label"]}).json()
                entry["acked"] = True
                entry["in_flight"] = True
                if entry["op"] == "add":
                    entry["op"] = "add" if found["total"] == 2 else "lost"
                    entry["ids"] = [item["id"] for item in found["items"]]
                elif found["total"] != 0:
                    entry["op"] = "lost"  # the removal never happened
        info = client.get("/v1/index").json()
        assert info["count"] == sum(
            client.get("/v1/items", params={"label": label}).json()["total"] for label in expected
        )


def _kill_during_writes(tiny_bundle: Path, cache: Path, state: Path, kills: int, seed: int) -> None:
    rng = random.Random(seed)
    log: list[dict] = []
    args = ("--max-batch", "2", "--compact-every", "7")
    server = Server(tiny_bundle, state, cache, *args, env={"SHITU_API_KEY": API_KEY}).start()
    try:
        for round_number in range(kills):
            stop = threading.Event()
            writer = threading.Thread(target=_write_stream, args=(server.url, stop, log, seed * 1000 + round_number))
            writer.start()
            time.sleep(rng.uniform(0.3, 2.5))
            server.kill()
            stop.set()
            writer.join(timeout=REQUEST_TIMEOUT)
            assert not writer.is_alive()
            server = Server(tiny_bundle, state, cache, *args, env={"SHITU_API_KEY": API_KEY}).start()
            _check_after_restart(server.url, log)
        assert sum(entry["op"] == "add" and entry["acked"] for entry in log) >= kills  # writes really happened
        in_flight = [entry for entry in log if entry.get("in_flight")]
        print(  # the counts of docs/RELIABILITY.md's row (pytest -s)
            f"{kills} kills: {sum(not e.get('in_flight') and e['op'] == 'add' for e in log)} acknowledged adds and "
            f"{sum(not e.get('in_flight') and e['op'] == 'remove' for e in log)} acknowledged removals all present; "
            f"{len(in_flight)} writes in flight at a kill: {sum(e['op'] != 'lost' for e in in_flight)} applied whole, "
            f"{sum(e['op'] == 'lost' for e in in_flight)} not applied"
        )
    finally:
        server.kill()


def test_kill_9_during_writes_loses_no_acknowledged_write(tiny_bundle, compile_cache, tmp_path):
    _kill_during_writes(tiny_bundle, compile_cache, tmp_path / "state", kills=2, seed=1)


@pytest.mark.slow
def test_kill_9_twenty_times_during_writes(tiny_bundle, compile_cache, tmp_path):
    _kill_during_writes(tiny_bundle, compile_cache, tmp_path / "state", kills=20, seed=2)
