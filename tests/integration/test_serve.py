"""The Serve app for real: models trained and registered here on a real `mlflow server`, deployed on
the session's Ray with Serve on a free port, exercised over HTTP (requests), decoded with PyAV."""

from __future__ import annotations

import base64
import io
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import serve_models
import torch
from mlflow_server import free_port

pytestmark = pytest.mark.slow
APP = "serve-test"
ADMIN_TOKEN = "test-admin-token-0123456789"


@pytest.fixture(scope="module")
def served(ray_session, mlflow_server, tiny_dataset, tmp_path_factory):
    from heygen_ray.config import ServeSpec
    from heygen_ray.serve import deploy, shutdown

    _, dataset = tiny_dataset
    out = str(tmp_path_factory.mktemp("serve_models"))
    ctx = serve_models.train_and_register(mlflow_server, dataset, out)
    u = ctx["uris"]
    fast = {"max_batch_size": 16, "batch_wait_timeout_s": 0.05}
    token_file = os.path.join(out, "admin_token")  # as a mounted Secret would be: read by the ingress replica
    with open(token_file, "w") as f:
        f.write(ADMIN_TOKEN + "\n")
    spec = ServeSpec.from_dict({
        "name": APP, "host": "127.0.0.1", "port": free_port(), "tracking_uri": mlflow_server,
        "classify": {"model": u["classify"], "batching": fast, "compile_int8": False,
                     "variants": {"bf16": "bf16", "int8": serve_models.INT8_VARIANT}},
        "generate": {"model": u["generate"], "batching": fast},
        "complete": {"model": u["complete"], "batching": fast},
        "match": {"model": u["match"], "batching": fast},
        "limits": {"max_body_bytes": 8192, "max_upload_bytes": 256 * 1024, "max_frames": 64, "max_prompt_chars": 200,
                   "max_tokens": 16, "max_captions": 4},
        "allowed_uri_root": dataset.output_dir,
        "auth": {"admin_token_file": token_file},
    })
    try:
        result = deploy(spec)
        yield {"url": result["url"], "result": result, "spec": spec, "ctx": ctx, "dataset": dataset, "out": out,
               "tracking_uri": mlflow_server}
    finally:
        shutdown()


def _clip_path(dataset, i: int = 0) -> str:
    import pyarrow.parquet as pq

    row = pq.read_table(dataset.manifest).to_pylist()[i]
    return os.path.join(os.path.dirname(dataset.manifest), row["path"])


def _classify(url, data: bytes, variant=None, **kw):
    headers = {"serve_multiplexed_model_id": variant} if variant else {}
    return requests.post(f"{url}/v1/videos/classify", files={"video": ("clip.mp4", data, "video/mp4")},
                         headers=headers, timeout=120, **kw)


def _decode(data: bytes):
    import av

    with av.open(io.BytesIO(data)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_every_endpoint_with_lineage(served):
    from heygen_ray.data.decode import decode_clip
    from heygen_ray.data.transforms import video_to_float
    from heygen_ray.serve import smoke

    url, ctx, ds = served["url"], served["ctx"], served["dataset"]
    assert requests.get(f"{url}/healthz", timeout=30).json()["status"] == "ok"
    models = requests.get(f"{url}/v1/models", timeout=60).json()["endpoints"]
    assert set(models) == {"classify", "generate", "complete", "match"}
    for e, name in serve_models.NAMES.items():
        d = models[e]["default"]
        assert (d["name"], d["version"], d["alias"], d["precision"]) == (name, "1", "champion", "fp32")
        assert d["run_id"] and d["variant"] == "ema"
    assert models["classify"]["variants"]["int8"]["precision"] == "int8_dynamic"
    assert models["classify"]["variants"]["int8"]["version"] == ctx["int8_version"]

    # classify: multipart upload, raw body and a URI under the allowed root agree with the model in-process
    path = _clip_path(ds)
    data = open(path, "rb").read()
    r = _classify(url, data)
    assert r.status_code == 200, r.text
    body = r.json()
    assert r.headers["x-model-name"] == "serve-cls" and r.headers["x-model-version"] == "1"
    assert r.headers["x-model-variant"] == "ema" and r.headers["x-model-run-id"] == models["classify"]["default"]["run_id"]
    assert body["label_name"] == ctx["label_names"][body["label"]]
    probs = np.array([body["probabilities"][n] for n in ctx["label_names"]])
    clip, _ = decode_clip(data, 8, 32, 32, sampling="uniform")
    with torch.inference_mode():
        want = torch.softmax(ctx["models"]["classify"](video=video_to_float(torch.from_numpy(clip[None]))), -1)[0].numpy()
    np.testing.assert_allclose(probs, want, atol=1e-4)
    raw = requests.post(f"{url}/v1/videos/classify", data=data, headers={"Content-Type": "video/mp4"}, timeout=60)
    by_uri = requests.post(f"{url}/v1/videos/classify", json={"uri": path}, timeout=60)
    for other in (raw, by_uri):
        assert other.status_code == 200, other.text
        np.testing.assert_allclose([other.json()["probabilities"][n] for n in ctx["label_names"]], probs, atol=1e-5)

    # generate: a real mp4 of the model's clip shape, or a base64 GIF in JSON
    r = requests.post(f"{url}/v1/videos/generate", json={"prompt": "a red circle moves left", "seed": 3}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4", r.text
    assert r.headers["x-model-name"] == "serve-t2v" and r.headers["x-seed"] == "3"
    assert _decode(r.content).shape == (8, 32, 32, 3)
    g = requests.post(f"{url}/v1/videos/generate", json={"prompt": "a red circle moves left", "format": "gif"}, timeout=60)
    assert g.status_code == 200 and base64.b64decode(g.json()["gif_base64"])[:6] == b"GIF89a"

    # complete: greedy is deterministic and matches the in-process continuation
    req = {"prompt": "a red", "max_tokens": 6}
    a = requests.post(f"{url}/v1/text/complete", json=req, timeout=60)
    b = requests.post(f"{url}/v1/text/complete", json=req, timeout=60)
    assert a.status_code == 200, a.text
    assert a.json()["text"] == b.json()["text"] and 0 <= a.json()["completion_tokens"] <= 6
    assert a.headers["x-model-name"] == "serve-lm"
    from heygen_ray.train.tasks import greedy_generate

    tok = ctx["tokenizer"]
    ids = torch.tensor([tok.encode("a red")])
    out = greedy_generate(ctx["models"]["complete"], ids, max_new_tokens=6, max_length=serve_models.SEQ_LEN, stop_id=tok.eos_id)
    assert a.json()["text"] == tok.decode([t for t in out[0, ids.shape[1]:].tolist() if t != tok.eos_id])
    sampled = requests.post(f"{url}/v1/text/complete", json={**req, "temperature": 1.0, "seed": 7}, timeout=60).json()
    assert sampled == requests.post(f"{url}/v1/text/complete", json={**req, "temperature": 1.0, "seed": 7}, timeout=60).json()

    # match: one score per caption, by upload or by URI
    caps = ["a red circle moves left", "a blue square moves up"]
    m = requests.post(f"{url}/v1/match", files={"video": ("c.mp4", data, "video/mp4")},
                      data={"captions": json.dumps(caps)}, timeout=60)
    assert m.status_code == 200, m.text
    scores = m.json()["scores"]
    assert [s["caption"] for s in scores] == caps and all(0.0 <= s["match_probability"] <= 1.0 for s in scores)
    m2 = requests.post(f"{url}/v1/match", json={"uri": path, "captions": caps}, timeout=60).json()["scores"]
    np.testing.assert_allclose([s["similarity"] for s in m2], [s["similarity"] for s in scores], atol=1e-5)

    # the pipeline's smoke test against the same app
    report = smoke(url, served["spec"])
    assert all(v["status"] == 200 for v in report.values()) and report["classify"]["version"] == "1"


def test_variants_by_multiplexed_id(served):
    url, ctx = served["url"], served["ctx"]
    data = open(_clip_path(served["dataset"], 1), "rb").read()
    base = _classify(url, data)
    bf16 = _classify(url, data, "bf16")
    int8 = requests.post(f"{url}/v1/videos/classify?variant=int8", files={"video": ("c.mp4", data, "video/mp4")}, timeout=120)
    for r in (base, bf16, int8):
        assert r.status_code == 200, r.text
    assert bf16.headers["x-model-precision"] == "bf16" and bf16.headers["x-model-version"] == "1"
    assert int8.headers["x-model-precision"] == "int8_dynamic"
    assert int8.headers["x-model-variant"] == serve_models.INT8_VARIANT
    assert int8.headers["x-model-version"] == ctx["int8_version"]
    p = [np.array(list(r.json()["probabilities"].values())) for r in (base, bf16, int8)]
    assert not np.array_equal(p[0], p[1])  # really another precision...
    np.testing.assert_allclose(p[1], p[0], atol=0.05)  # ...of the same model
    np.testing.assert_allclose(p[2], p[0], atol=0.05)
    bad = _classify(url, data, "fp8")
    assert bad.status_code == 404 and "known: default, bf16, int8" in bad.text


def test_concurrent_requests_are_batched(served):
    url = served["url"]
    data = open(_clip_path(served["dataset"], 2), "rb").read()
    prompts = [f"a red circle moves {d}" for d in ("left", "right", "up", "down")] * 4
    with ThreadPoolExecutor(16) as pool:
        cls = list(pool.map(lambda _: _classify(url, data), range(16)))
        gen = list(pool.map(lambda p: requests.post(f"{url}/v1/text/complete", json={"prompt": p, "max_tokens": 4}, timeout=120), prompts))
    assert all(r.status_code == 200 for r in cls + gen)
    assert max(int(r.headers["x-batch-size"]) for r in cls) > 1
    assert max(int(r.headers["x-batch-size"]) for r in gen) > 1
    # a batched completion equals the one computed alone
    alone = requests.post(f"{url}/v1/text/complete", json={"prompt": prompts[0], "max_tokens": 4}, timeout=60).json()
    assert gen[0].json()["text"] == alone["text"]


def _detail(r) -> str:
    d = r.json()["detail"]
    return " ".join(".".join(map(str, e["loc"])) + ": " + e["msg"] for e in d) if isinstance(d, list) else str(d)


def test_bad_input_gets_4xx_naming_the_field(served, tmp_path):
    url = served["url"]
    post = lambda path, **kw: requests.post(url + path, timeout=60, **kw)  # noqa: E731
    cases = [
        (post("/v1/text/complete", data=b'{"prompt": "a", "max_tokens": ', headers={"Content-Type": "application/json"}),
         400, "malformed JSON"),
        (post("/v1/text/complete", json={"prompt": "a", "max_tokens": "ten"}), 422, "max_tokens"),
        (post("/v1/text/complete", json={"prompt": "a", "max_tokens": 4, "top_k": 3}), 422, "top_k"),
        (post("/v1/text/complete", json={"prompt": "a"}), 422, "max_tokens"),
        (post("/v1/text/complete", json={"prompt": "a", "max_tokens": 17}), 422, "max_tokens"),
        (post("/v1/text/complete", json={"prompt": "x" * 201, "max_tokens": 2}), 422, "prompt"),
        (post("/v1/text/complete", json=[1, 2]), 422, "JSON object"),
        (post("/v1/text/complete", data="prompt=a", headers={"Content-Type": "text/plain"}), 415, "content-type"),
        (post("/v1/videos/generate", json={"prompt": "y" * 9000}), 413, "limit"),
        (post("/v1/videos/generate", json={"prompt": 5}), 422, "prompt"),
        (post("/v1/videos/generate", json={"prompt": "   "}), 422, "prompt"),
        (post("/v1/videos/classify", files={"video": ("x.mp4", os.urandom(4000), "video/mp4")}), 422, "video"),
        (post("/v1/videos/classify", files={"video": ("x.mp4", b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64, "video/mp4")}), 422, "video"),
        (post("/v1/videos/classify", files={"video": ("x.mp4", os.urandom(300 * 1024), "video/mp4")}), 413, "limit"),
        (post("/v1/videos/classify", files={"clip": ("x.mp4", b"abc", "video/mp4")}), 422, "video"),
        (post("/v1/videos/classify", files={"video": ("x.txt", b"abc", "text/plain")}), 415, "video"),
        (post("/v1/videos/classify", json={"uri": "/etc/passwd"}), 403, "uri"),
        (post("/v1/videos/classify", json={"uri": served["dataset"].output_dir + "/../x.mp4"}), 403, "uri"),
        (post("/v1/videos/classify", json={"uri": served["dataset"].output_dir + "/nope.mp4"}), 404, "uri"),
        (post("/v1/videos/classify", json={"url": "/x.mp4"}), 422, "url"),
        (post("/v1/match", json={"uri": _clip_path(served["dataset"]), "captions": []}), 422, "captions"),
        (post("/v1/match", json={"uri": _clip_path(served["dataset"]), "captions": ["a"] * 5}), 422, "captions"),
        (post("/v1/match", json={"uri": _clip_path(served["dataset"]), "captions": ["a", 3]}), 422, "captions"),
    ]
    for r, status, needle in cases:
        assert r.status_code == status, (needle, r.status_code, r.text)
        assert needle in _detail(r), (needle, r.text)
    # a long video (over max_frames) is refused before decoding
    from heygen_ray.data.media import encode_mp4

    long = encode_mp4(np.zeros((80, 16, 16, 3), np.uint8), 8)
    r = _classify(url, long)
    assert r.status_code == 413 and "frames" in _detail(r)
    # a chunked body with no Content-Length is counted as it arrives
    r = requests.post(f"{url}/v1/text/complete", data=iter([b'{"prompt": "', b"z" * 9000, b'", "max_tokens": 2}']),
                      headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200


def test_500_requests_at_concurrency_32(served):
    url = served["url"]
    clips = [open(_clip_path(served["dataset"], i), "rb").read() for i in range(4)]

    def one(i):
        if i % 2:
            return requests.post(f"{url}/v1/text/complete", json={"prompt": "a green", "max_tokens": 2}, timeout=300).status_code
        return requests.post(f"{url}/v1/videos/classify", data=clips[i % 4], headers={"Content-Type": "video/mp4"},
                             timeout=300).status_code

    with ThreadPoolExecutor(32) as pool:
        codes = list(pool.map(one, range(500)))
    assert codes.count(200) == 500, {c: codes.count(c) for c in set(codes)}


def test_killed_replica_is_replaced(served):
    import ray

    url = served["url"]

    def replicas():
        return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith(f"SERVE_REPLICA::{APP}#complete#")}

    before = replicas()
    assert len(before) == 1
    ray.kill(ray.get_actor(next(iter(before)), namespace="serve"), no_restart=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        now = replicas()
        if now and now != before:
            try:
                r = requests.post(f"{url}/v1/text/complete", json={"prompt": "a", "max_tokens": 2}, timeout=30)
                if r.status_code == 200:
                    break
            except requests.RequestException:
                pass
        time.sleep(0.5)
    assert replicas() and replicas() != before
    codes = [requests.post(f"{url}/v1/text/complete", json={"prompt": "a blue", "max_tokens": 2}, timeout=60).status_code
             for _ in range(5)]
    assert codes == [200] * 5


def test_alias_move_and_reload_with_the_admin_token_serves_new_version(served):
    from heygen_ray.tracking import set_alias

    url, ctx = served["url"], served["ctx"]
    data = open(_clip_path(served["dataset"], 3), "rb").read()
    old = _classify(url, data)
    assert old.headers["x-model-version"] == "1"
    version = serve_models.register_new_classifier(ctx, served["tracking_uri"], served["out"])
    set_alias(serve_models.NAMES["classify"], "champion", version, tracking_uri=served["tracking_uri"])
    assert _classify(url, data).headers["x-model-version"] == "1"  # nothing moves before a reload
    # the admin endpoint without its token: 401, naming the header, and nothing moves
    for headers in ({}, {"Authorization": f"Bearer {ADMIN_TOKEN}x"}, {"Authorization": ADMIN_TOKEN}):
        refused = requests.post(f"{url}/v1/admin/reload", headers=headers, timeout=60)
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer", refused.text
        assert refused.json()["detail"][0]["loc"] == ["body", "authorization"]
    assert _classify(url, data).headers["x-model-version"] == "1"
    with ThreadPoolExecutor(8) as pool:  # requests in flight while the models swap
        inflight = [pool.submit(_classify, url, data) for _ in range(8)]
        r = requests.post(f"{url}/v1/admin/reload", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=120)
        inflight += [pool.submit(_classify, url, data) for _ in range(8)]
        codes = [f.result().status_code for f in inflight]
    assert r.status_code == 200, r.text
    assert r.json()["endpoints"]["classify"]["changed"]["default"] == {"from": "1", "to": version}
    assert codes == [200] * 16
    new = _classify(url, data)
    assert new.headers["x-model-version"] == version and new.headers["x-model-alias"] == "champion"
    assert new.json()["probabilities"] != old.json()["probabilities"]
    models = requests.get(f"{url}/v1/models", timeout=60).json()["endpoints"]
    assert models["classify"]["default"]["version"] == version
