"""The Triton-compatible plane, judged by NVIDIA's own clients: tritonclient
(HTTP and gRPC) and perf_analyzer against a repository built from real
libraries, every output checked against the library's own prediction."""
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import ROOT, Triton, metric, wait_for
from triton_repo import build

CACHE = Path(os.environ.get("SWITCHYARD_TEST_CACHE", Path.home() / ".cache" / "switchyard" / "test-models"))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("triton")
    repo = root / "repo"
    repo.mkdir()
    return repo, build(repo, CACHE)


@pytest.fixture(scope="module")
def triton(repo):
    s = Triton(repo[0])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(triton):
    return httpclient.InferenceServerClient(triton.http_url)


@pytest.fixture(scope="module")
def grpc(triton):
    return grpcclient.InferenceServerClient(triton.grpc_url)


def client_module(client):
    return httpclient if isinstance(client, httpclient.InferenceServerClient) else grpcclient


def run(client, model, arrays, outputs=None, binary=True, **kw):
    mod = client_module(client)
    inputs = []
    for name, arr in arrays.items():
        dtype = "BYTES" if arr.dtype == object else {np.float32: "FP32", np.int64: "INT64"}[arr.dtype.type]
        i = mod.InferInput(name, list(arr.shape), dtype)
        if mod is httpclient:
            i.set_data_from_numpy(arr, binary_data=binary)
        else:
            i.set_data_from_numpy(arr)
        inputs.append(i)
    outs = None
    if outputs:
        outs = [mod.InferRequestedOutput(o, binary_data=binary) if mod is httpclient else mod.InferRequestedOutput(o) for o in outputs]
    return client.infer(model, inputs, outputs=outs, **kw)


def test_health_and_server_metadata(http, grpc):
    assert http.is_server_live() and http.is_server_ready()
    assert grpc.is_server_live() and grpc.is_server_ready()
    md = http.get_server_metadata()
    assert md["name"] == "switchyard"
    assert {"binary_tensor_data", "model_repository", "statistics", "classification"} <= set(md["extensions"])
    assert http.is_model_ready("iris_xgb") and grpc.is_model_ready("iris_xgb", "1")
    assert not http.is_model_ready("nope") and not grpc.is_model_ready("nope")


def test_metadata_and_config_show_the_batch_dimension(http, grpc):
    md = http.get_model_metadata("cancer_xgb")
    assert md["inputs"] == [{"name": "input__0", "datatype": "FP32", "shape": [-1, 30]}]
    assert md["versions"] == ["1"]
    g = grpc.get_model_metadata("cancer_xgb", as_json=True)
    assert [int(d) for d in g["inputs"][0]["shape"]] == [-1, 30]
    cfg = http.get_model_config("iris_onnx")
    assert cfg["max_batch_size"] == 64 and cfg["platform"] == "onnxruntime_onnx"
    assert cfg["input"][0]["dims"] == [4] and cfg["input"][0]["data_type"] == "TYPE_FP32"
    assert "dynamic_batching" in cfg and cfg["instance_group"][0]["count"] == 1
    gcfg = grpc.get_model_config("iris_onnx", as_json=True)["config"]
    assert gcfg["name"] == "iris_onnx" and int(gcfg["max_batch_size"]) == 64


@pytest.mark.parametrize("proto", ["http", "grpc"])
@pytest.mark.parametrize("model", ["iris_xgb", "cancer_xgb", "cancer_lgbm", "diabetes_lgbm"])
def test_trees_equal_the_library(repo, http, grpc, proto, model):
    client = http if proto == "http" else grpc
    exp = repo[1][model]
    X, y = exp["X"], exp["y"]
    for lo in range(0, len(X), 200):
        out = run(client, model, {"input__0": X[lo:lo + 200]}).as_numpy("output__0")
        np.testing.assert_allclose(out, y[lo:lo + 200], rtol=1e-5, atol=1e-6)


def test_trees_json_tensors_and_nan(repo, http):
    exp = repo[1]["cancer_xgb"]
    X = exp["X"][:20]
    out = run(http, "cancer_xgb", {"input__0": X}, outputs=["output__0"], binary=False).as_numpy("output__0")
    np.testing.assert_allclose(out, exp["y"][:20], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("proto", ["http", "grpc"])
def test_onnx_equals_onnxruntime(repo, http, grpc, proto):
    client = http if proto == "http" else grpc
    exp = repo[1]["iris_onnx"]
    (lname, label), (pname, proba) = exp["label"], exp["proba"]
    res = run(client, "iris_onnx", {"X": exp["X"][:64]})
    np.testing.assert_allclose(res.as_numpy(pname), proba[:64], atol=1e-5)
    np.testing.assert_array_equal(res.as_numpy(lname), label[:64])
    res = run(client, "iris_onnx", {"X": exp["X"][64:100]}, outputs=[pname], binary=False)
    np.testing.assert_allclose(res.as_numpy(pname), proba[64:100], atol=1e-5)


def test_classification_extension(repo, http, grpc):
    exp = repo[1]["iris_onnx"]
    _, proba = exp["proba"]
    X = exp["X"][:3]
    inp = httpclient.InferInput("X", [3, 4], "FP32")
    inp.set_data_from_numpy(X)
    out = httpclient.InferRequestedOutput(exp["proba"][0], class_count=2)
    res = http.infer("iris_onnx", [inp], outputs=[out]).as_numpy(exp["proba"][0])
    assert res.shape == (3, 2)
    labels = ["setosa", "versicolor", "virginica"]
    for row, p in zip(res, proba[:3]):
        best = int(np.argmax(p))
        value, index, label = row[0].decode().split(":")
        assert int(index) == best and label == labels[best]
        assert abs(float(value) - p[best]) < 1e-5
    ginp = grpcclient.InferInput("X", [3, 4], "FP32")
    ginp.set_data_from_numpy(X)
    gres = grpc.infer("iris_onnx", [ginp], outputs=[grpcclient.InferRequestedOutput(exp["proba"][0], class_count=1)])
    assert gres.as_numpy(exp["proba"][0]).shape == (3, 1)


@pytest.mark.parametrize("proto", ["http", "grpc"])
def test_sentence_encoder_takes_bytes(http, grpc, proto):
    client = http if proto == "http" else grpc
    texts = np.array([[b"A man is playing a guitar."], [b"Someone plays an acoustic guitar."], [b"The stock market fell sharply today."]], dtype=object)
    emb = run(client, "minilm", {"text": texts}).as_numpy("embedding")
    assert emb.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    similar, unrelated = emb[0] @ emb[1], emb[0] @ emb[2]
    assert similar > 0.5 > unrelated, (similar, unrelated)
    # One sentence alone embeds the same as inside a batch (padding is masked).
    alone = run(client, "minilm", {"text": texts[2:]}).as_numpy("embedding")
    np.testing.assert_allclose(alone[0], emb[2], atol=1e-4)
    # And each equals an independent numpy implementation of the model.
    reference = minilm_reference()
    for row, [text] in zip(emb, texts):
        np.testing.assert_allclose(row, reference.embed_one(text.decode()), atol=1e-4)


@functools.cache
def minilm_reference():
    from bert_reference import Bert

    return Bert(CACHE / "minilm")


def series(triton):
    """The batcher's Prometheus series for iris_xgb, read together."""
    m = lambda name, **kw: metric(triton, name, missing=0.0, model="iris_xgb", **kw)
    return {
        "exec": m("nv_inference_exec_count", version="1"),
        "success": m("nv_inference_request_success", version="1"),
        "batches": m("nv_inference_batch_size_count"),
        "rows": m("nv_inference_batch_size_sum"),
        "single": m("nv_inference_batch_size_bucket", le="1"),
        "inferences": m("nv_inference_count", version="1"),
        "request_us": m("nv_inference_request_duration_us", version="1"),
        "queue_us": m("nv_inference_queue_duration_us", version="1"),
        "compute_us": m("nv_inference_compute_infer_duration_us", version="1"),
        "request_s": m("nv_inference_request_duration_seconds_count", version="1"),
        "queue_s": m("nv_inference_queue_duration_seconds_count", version="1"),
    }


def test_dynamic_batching_forms_batches_and_stats_are_exact(repo, triton, grpc):
    X = repo[1]["iris_xgb"]["X"]
    before = grpc.get_inference_statistics("iris_xgb", as_json=True)["model_stats"][0]
    before_series = series(triton)
    n = 48
    done = []
    for i in range(n):
        inp = grpcclient.InferInput("input__0", [1, 4], "FP32")
        inp.set_data_from_numpy(X[i:i + 1])
        grpc.async_infer("iris_xgb", [inp], callback=lambda result, error: done.append((result, error)))
    deadline = time.time() + 30
    while len(done) < n and time.time() < deadline:
        time.sleep(0.01)
    assert len(done) == n and all(e is None for _, e in done)
    after = grpc.get_inference_statistics("iris_xgb", as_json=True)["model_stats"][0]
    count = lambda s, k: int(s.get(k, 0))
    assert count(after, "inference_count") - count(before, "inference_count") == n
    execs = count(after, "execution_count") - count(before, "execution_count")
    assert 1 <= execs < n, f"{n} concurrent requests ran in {execs} executions"
    succ = lambda s: int(s["inference_stats"]["success"].get("count", 0))
    assert succ(after) - succ(before) == n
    # This test's batches alone (earlier tests filled the counters before it).
    per_size = lambda s: {int(b["batch_size"]): int(b["compute_infer"].get("count", 0)) for b in s.get("batch_stats", [])}
    formed = {size: k - per_size(before).get(size, 0) for size, k in per_size(after).items()}
    assert sum(formed.values()) == execs, formed
    assert sum(size * k for size, k in formed.items()) == n, formed
    assert any(k > 0 for size, k in formed.items() if size > 1), formed
    # The Prometheus series moved by exactly as much: one batch-size
    # observation per execution, their sum the inferences.
    grown = {k: v - before_series[k] for k, v in series(triton).items()}
    assert grown["exec"] == execs and grown["batches"] == execs, grown
    assert grown["success"] == n and grown["rows"] == n, grown
    assert grown["single"] == formed.get(1, 0), (grown, formed)
    assert grown["inferences"] == n and grown["request_s"] == n and grown["queue_s"] == n, grown
    assert grown["request_us"] > grown["compute_us"] > 0 and grown["queue_us"] > 0, grown
    assert metric(triton, "nv_inference_pending_request_count", model="iris_xgb", version="1") == 0


def test_a_failure_inside_the_runtime_is_internal(triton, http, grpc):
    """An index past the row fails in the ONNX runtime, not in our checks:
    500 over HTTP, INTERNAL over gRPC, counted as a backend failure; a good
    index answers."""
    failures = lambda: metric(triton, "nv_inference_request_failure", missing=0.0,
                              model="pick_onnx", reason="BACKEND")
    before = failures()
    for client in (http, grpc):
        mod = client_module(client)
        for index, want in [(2, 2.0), (9, None)]:
            x = mod.InferInput("X", [1, 4], "FP32")
            x.set_data_from_numpy(np.arange(4, dtype=np.float32).reshape(1, 4))
            i = mod.InferInput("I", [1, 1], "INT64")
            i.set_data_from_numpy(np.array([[index]], dtype=np.int64))
            if want is not None:
                assert client.infer("pick_onnx", [x, i]).as_numpy("Y")[0, 0] == want
                continue
            with pytest.raises(InferenceServerException) as e:
                client.infer("pick_onnx", [x, i])
            code = "500" if mod is httpclient else "StatusCode.INTERNAL"
            assert e.value.status() == code and "GatherElements" in str(e.value), e.value
    assert failures() - before == 2


def post(triton, path, body, headers=None):
    return httpx.post(f"{triton.url}{path}", content=body, headers=headers or {}, timeout=30)


def test_errors_have_tritons_shape(triton, grpc):
    url = "/v2/models/iris_xgb/infer"
    cases = [
        (b"{not json", {}, 400, "failed to parse"),
        (json.dumps({"inputs": [{"name": "input__0", "datatype": "FP32", "shape": [1, 5], "data": [0, 0, 0, 0, 0]}]}).encode(), {}, 400, "shape"),
        (json.dumps({"inputs": [{"name": "input__0", "datatype": "FP64", "shape": [1, 4], "data": [0, 0, 0, 0]}]}).encode(), {}, 400, "data-type"),
        (json.dumps({"inputs": [{"name": "input__0", "datatype": "FP99", "shape": [1, 4], "data": [0, 0, 0, 0]}]}).encode(), {}, 400, "datatype"),
        (json.dumps({"inputs": [{"name": "nope", "datatype": "FP32", "shape": [1, 4], "data": [0, 0, 0, 0]}]}).encode(), {}, 400, "unexpected inference input"),
        (json.dumps({"inputs": [{"name": "input__0", "datatype": "FP32", "shape": [2000, 4], "data": [0] * 8000}]}).encode(), {}, 400, "batch-size"),
    ]
    head = json.dumps({"inputs": [{"name": "input__0", "datatype": "FP32", "shape": [1, 4], "parameters": {"binary_data_size": 16}}]}).encode()
    cases.append((head + b"\0" * 10, {"Inference-Header-Content-Length": str(len(head))}, 400, "binary_data_size"))
    cases.append((head + b"\0" * 16, {"Inference-Header-Content-Length": str(len(head) + 100)}, 400, "Inference-Header-Content-Length"))
    for body, headers, status, needle in cases:
        r = post(triton, url, body, headers)
        assert r.status_code == status, (needle, r.status_code, r.text)
        assert needle in r.json()["error"], (needle, r.json())
    r = post(triton, "/v2/models/unknown/infer", b"{}")
    assert r.status_code == 404 and "unknown model" in r.json()["error"]
    r = httpx.get(f"{triton.url}/v2/models/iris_xgb/versions/7")
    assert r.status_code == 404 and "error" in r.json()
    # Random bytes never crash the server.
    rng = np.random.default_rng(1)
    for _ in range(50):
        junk = rng.bytes(int(rng.integers(0, 300)))
        r = post(triton, url, junk, {"Inference-Header-Content-Length": str(int(rng.integers(0, 300)))})
        assert r.status_code == 400 and "error" in r.json()
    # gRPC: status codes.
    inp = grpcclient.InferInput("input__0", [1, 5], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 5), np.float32))
    with pytest.raises(InferenceServerException) as e:
        grpc.infer("iris_xgb", [inp])
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException) as e:
        grpc.infer("unknown", [inp])
    assert e.value.status() == "StatusCode.NOT_FOUND"
    assert httpx.get(f"{triton.url}/v2/health/ready").status_code == 200


def test_gzip_bodies(repo, http):
    exp = repo[1]["iris_xgb"]
    inp = httpclient.InferInput("input__0", [5, 4], "FP32")
    inp.set_data_from_numpy(exp["X"][:5])
    res = http.infer("iris_xgb", [inp], request_compression_algorithm="gzip", response_compression_algorithm="deflate")
    np.testing.assert_allclose(res.as_numpy("output__0"), exp["y"][:5], rtol=1e-5, atol=1e-6)


def test_stream_infer(repo, grpc):
    X = repo[1]["iris_xgb"]["X"]
    results = []
    grpc.start_stream(callback=lambda result, error: results.append((result, error)))
    try:
        for i in range(5):
            inp = grpcclient.InferInput("input__0", [1, 4], "FP32")
            inp.set_data_from_numpy(X[i:i + 1])
            grpc.async_stream_infer("iris_xgb", [inp], request_id=str(i))
        deadline = time.time() + 20
        while len(results) < 5 and time.time() < deadline:
            time.sleep(0.01)
    finally:
        grpc.stop_stream()
    assert len(results) == 5 and all(e is None for _, e in results)
    by_id = {r.get_response().id: r.as_numpy("output__0") for r, _ in results}
    for i in range(5):
        np.testing.assert_allclose(by_id[str(i)][0], repo[1]["iris_xgb"]["y"][i], rtol=1e-5, atol=1e-6)


def test_explicit_load_unload(repo):
    s = Triton(repo[0], "--model-control-mode", "explicit", "--load-model", "iris_xgb",
               "--allow-unauthenticated-control")
    try:
        c = httpclient.InferenceServerClient(s.http_url)
        g = grpcclient.InferenceServerClient(s.grpc_url)
        states = {m["name"]: m["state"] for m in c.get_model_repository_index()}
        assert states["iris_xgb"] == "READY" and states["cancer_lgbm"] == "UNAVAILABLE"
        assert not c.is_model_ready("cancer_lgbm")
        c.load_model("cancer_lgbm")
        assert c.is_model_ready("cancer_lgbm")
        g.unload_model("iris_xgb")
        assert not g.is_model_ready("iris_xgb")
        g.load_model("iris_xgb")
        assert g.is_model_ready("iris_xgb")
        # A config override through the load API.
        cfg = c.get_model_config("diabetes_lgbm") if c.is_model_ready("diabetes_lgbm") else None
        assert cfg is None
        override = json.loads(json.dumps({"backend": "fil", "max_batch_size": 4, "input": [{"name": "input__0", "data_type": "TYPE_FP32", "dims": [10]}],
                                          "output": [{"name": "output__0", "data_type": "TYPE_FP32", "dims": [1]}],
                                          "parameters": {"model_type": {"string_value": "lightgbm"}}}))
        c.load_model("diabetes_lgbm", config=json.dumps(override))
        assert c.get_model_config("diabetes_lgbm")["max_batch_size"] == 4
        with pytest.raises(InferenceServerException, match="missing_model|no model directory"):
            c.load_model("missing_model")
        # Loading with files in the request is a feature this server does not have.
        with pytest.raises(InferenceServerException) as e:
            g.load_model("iris_xgb", files={"file:1/xgboost.json": b"{}"})
        assert e.value.status() == "StatusCode.UNIMPLEMENTED", e.value
    finally:
        s.stop()


def test_load_is_refused_in_none_mode(http):
    # Without keys, control is refused before the mode is looked at.
    with pytest.raises(InferenceServerException, match="API key"):
        http.load_model("iris_xgb")


def test_poll_mode_picks_up_a_new_model(repo, tmp_path):
    live = tmp_path / "repo"
    live.mkdir()
    shutil.copytree(repo[0] / "iris_xgb", live / "iris_xgb")
    s = Triton(live, "--model-control-mode", "poll", "--repository-poll-secs", "1")
    try:
        c = httpclient.InferenceServerClient(s.http_url)
        assert c.is_model_ready("iris_xgb") and not c.is_model_ready("cancer_lgbm")
        shutil.copytree(repo[0] / "cancer_lgbm", live / "cancer_lgbm")
        (live / "broken").mkdir()
        (live / "broken" / "config.pbtxt").write_text('backend: "fil"\nmax_batch_sise: 3\n')
        deadline = time.time() + 20
        while not c.is_model_ready("cancer_lgbm") and time.time() < deadline:
            time.sleep(0.3)
        assert c.is_model_ready("cancer_lgbm")
        broken = [m for m in c.get_model_repository_index() if m["name"] == "broken"][0]
        assert broken["state"] == "UNAVAILABLE" and "config.pbtxt" in broken["reason"] and "line 2" in broken["reason"]
        # A model that failed to load answers UNAVAILABLE, naming why.
        g = grpcclient.InferenceServerClient(s.grpc_url)
        x = grpcclient.InferInput("input__0", [1, 4], "FP32")
        x.set_data_from_numpy(repo[1]["iris_xgb"]["X"][:1])
        with pytest.raises(InferenceServerException) as e:
            g.infer("broken", [x])
        assert e.value.status() == "StatusCode.UNAVAILABLE" and "config.pbtxt" in str(e.value), e.value
        # A changed model file is reloaded: the new trees answer.
        import xgboost as xgb
        from sklearn.datasets import load_iris

        X, y = repo[1]["iris_xgb"]["X"], load_iris(return_X_y=True)[1]
        retrained = xgb.XGBClassifier(n_estimators=3, max_depth=1, random_state=1).fit(X, y)
        # Written beside, then renamed into place, as a deploy tool does.
        retrained.save_model(tmp_path / "xgboost.json")
        os.replace(tmp_path / "xgboost.json", live / "iris_xgb" / "1" / "xgboost.json")
        want = retrained.predict_proba(X[:5])
        assert not np.allclose(want, repo[1]["iris_xgb"]["y"][:5], atol=1e-3)
        hx = httpclient.InferInput("input__0", [5, 4], "FP32")
        hx.set_data_from_numpy(X[:5])
        wait_for("the changed model to answer", lambda: np.allclose(
            c.infer("iris_xgb", [hx]).as_numpy("output__0"), want, rtol=1e-5, atol=1e-6), timeout=30)
        shutil.rmtree(live / "iris_xgb")
        deadline = time.time() + 20
        while c.is_model_ready("iris_xgb") and time.time() < deadline:
            time.sleep(0.3)
        assert not c.is_model_ready("iris_xgb")
    finally:
        s.stop()


def perf_analyzer() -> list[str]:
    exe = Path(sys.executable).parent / "perf_analyzer"
    return [str(exe)]


def perf_env() -> dict:
    """perf_analyzer links the CUDA runtime library even when it never uses a GPU."""
    import nvidia.cuda_runtime
    lib = Path(nvidia.cuda_runtime.__path__[0]) / "lib"
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = f"{lib}:{env.get('LD_LIBRARY_PATH', '')}"
    return env


def perf_analyzer_run(server, proto, model) -> str:
    """perf_analyzer at concurrency 1 and 4, batch 2; its output, once it ran clean.
    Any spread between windows is taken as stable: the machine is shared, and
    what is judged is that every request is answered."""
    url = server.http_url if proto == "http" else server.grpc_url
    cmd = perf_analyzer() + ["-m", model, "-i", proto, "-u", url, "--concurrency-range", "1:4:3",
                             "-p", "500", "-s", "999", "--max-trials", "4", "-b", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=perf_env(), timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Concurrency: 4, throughput:" in r.stdout, r.stdout[-3000:]
    return r.stdout


@pytest.mark.parametrize("proto", ["http", "grpc"])
@pytest.mark.parametrize("model", ["iris_onnx", "cancer_xgb"])
def test_perf_analyzer_runs_clean(triton, proto, model):
    perf_analyzer_run(triton, proto, model)


def test_llm_over_kserve(repo):
    """The LLM engine through the same protocol: infer with text_input, Triton's
    generate and generate_stream, and gRPC streaming, all agreeing with the
    OpenAI API on a greedy completion."""
    from conftest import MODEL
    s = Triton(repo[0], "--config", str(ROOT / "configs" / "default.yaml"))
    try:
        prompt = "The capital of France is"
        sampling = {"temperature": 0, "max_tokens": 8}
        http = httpclient.InferenceServerClient(s.http_url)
        assert http.is_model_ready(MODEL) and http.is_model_ready("iris_xgb")
        assert http.get_model_metadata(MODEL)["platform"] == "switchyard_llm"
        assert http.get_model_config(MODEL)["model_transaction_policy"]["decoupled"] is True

        def tensors(mod, stream=False):
            vals = [("text_input", np.array([prompt.encode()], dtype=object), "BYTES"),
                    ("sampling_parameters", np.array([json.dumps(sampling).encode()], dtype=object), "BYTES"),
                    ("exclude_input_in_output", np.array([True]), "BOOL"),
                    ("stream", np.array([stream]), "BOOL")]
            out = []
            for name, arr, dt in vals:
                t = mod.InferInput(name, [1], dt)
                t.set_data_from_numpy(arr)
                out.append(t)
            return out

        text = http.infer(MODEL, tensors(httpclient)).as_numpy("text_output")[0].decode()
        assert text.strip()
        gen = httpx.post(f"{s.url}/v2/models/{MODEL}/generate", json={"text_input": prompt, "parameters": sampling}, timeout=60).json()
        assert gen["text_output"] == prompt + text and gen["model_name"] == MODEL
        with httpx.stream("POST", f"{s.url}/v2/models/{MODEL}/generate_stream", json={"text_input": prompt, "parameters": sampling}, timeout=60) as r:
            pieces = [json.loads(line[5:])["text_output"] for line in r.iter_lines() if line.startswith("data:")]
        assert len(pieces) > 1 and "".join(pieces) == text
        openai = httpx.post(f"{s.url}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0}, timeout=60).json()
        assert openai["choices"][0]["text"] == text

        g = grpcclient.InferenceServerClient(s.grpc_url)
        assert g.infer(MODEL, tensors(grpcclient)).as_numpy("text_output")[0].decode() == text
        got = []
        g.start_stream(callback=lambda result, error: got.append((result, error)))
        try:
            g.async_stream_infer(MODEL, tensors(grpcclient, stream=True), request_id="s1")
            deadline = time.time() + 60
            while "".join(r.as_numpy("text_output")[0].decode() for r, _ in got if r) != text and time.time() < deadline:
                time.sleep(0.05)
        finally:
            g.stop_stream()
        assert all(e is None for _, e in got) and len(got) > 1
        assert "".join(r.as_numpy("text_output")[0].decode() for r, _ in got) == text
    finally:
        s.stop()


def test_openai_embeddings_equal_the_kserve_encoder(triton, http):
    import base64

    import openai
    from tokenizers import Tokenizer

    texts = ["A man is playing a guitar.", "Someone plays an acoustic guitar.", "The stock market fell sharply today."]
    c = openai.OpenAI(base_url=f"{triton.url}/v1", api_key="unused", max_retries=0)
    # The client asks for base64 by default and decodes it; float is asked by name.
    for fmt in [openai.NOT_GIVEN, "float"]:
        r = c.embeddings.create(model="minilm", input=texts, encoding_format=fmt)
        kserve = run(http, "minilm", {"text": np.array([[t.encode()] for t in texts], dtype=object)}).as_numpy("embedding")
        got = np.array([d.embedding for d in sorted(r.data, key=lambda d: d.index)])
        np.testing.assert_allclose(got, kserve, atol=1e-6)
    tok = Tokenizer.from_file(str(CACHE / "minilm" / "tokenizer.json"))
    tok.no_padding()
    assert r.usage.prompt_tokens == sum(len(tok.encode(t).ids) for t in texts) == r.usage.total_tokens
    one = c.embeddings.create(model="minilm", input=texts[2], encoding_format="base64")
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(one.data[0].embedding), dtype="<f4"), kserve[2], atol=1e-6)
    for kw, param in [({"dimensions": 64}, "dimensions"), ({"input": [[101, 2023]]}, "input"),
                      ({"model": "iris_onnx"}, "model"), ({"user": "u", "extra_body": {"truncate": 5}}, "truncate")]:
        args = {"model": "minilm", "input": texts[0], **kw}
        with pytest.raises(openai.BadRequestError) as e:
            c.embeddings.create(**args)
        assert e.value.body["param"] == param, e.value.body
    with pytest.raises(openai.NotFoundError):
        c.embeddings.create(model="no-such-encoder", input="x")
