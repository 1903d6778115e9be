"""The attacks Switchyard defends against, each sent from outside as an
attacker would, with the server's memory and liveness checked after each group:

1. reading files through repository config overrides (label_filename,
   default_model_filename, symlinks) and `file://` registry artifacts;
2. repository control, feedback and the registry without the right key, and
   keys that mean nothing (empty, short, duplicate, padded);
3. unbounded memory: compressed bombs, oversized bodies on every route
   family, oversized gRPC messages, huge declared shapes, unbounded
   instance counts;
4. wedging the LLM engine through KServe with parameters the OpenAI front
   refuses (max_tokens near 2^64, negative temperature, ...);
5. starving the server: slow request heads, connection floods, and heavy
   tokenization that must not block `/health`.
"""
import gzip
import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import ROOT, MODEL, Triton, binary, free_port, wait_for

KEYS = {
    "admin": "admin-secret-0123456789",
    "viewer": "viewer-secret-0123456789",
    "invoke": "invoke-secret-0123456789",
    "deployer": "deployer-secret-0123456789",
}
LIMITS = {
    "max_body_bytes": 8 << 20,
    "max_tensor_body_bytes": 4 << 20,
    "max_decompressed_bytes": 8 << 20,
    "grpc_max_message_bytes": 4 << 20,
    "header_read_timeout_secs": 2,
    "max_connections": 64,
}
# The server's resident memory may grow by this much over a whole group of
# attacks: the bombs and bodies sent are each many times larger.
RSS_BOUND = 200 << 20


def default_source() -> str:
    """The default model's `source:` block from configs/default.yaml."""
    text = (ROOT / "configs" / "default.yaml").read_text()
    start = text.index("    source:\n")
    end = text.index("    engine:\n")
    return text[start:end]


def rss(server) -> int:
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def assert_alive(server, baseline: int):
    r = httpx.get(f"{server.url}/health", timeout=10)
    assert r.status_code == 200, r.text
    grown = rss(server) - baseline
    assert grown < RSS_BOUND, f"resident memory grew by {grown >> 20} MiB"


def iris_repo(root: Path) -> Path:
    """One XGBoost classifier with labels, and a secret beside the repository."""
    import xgboost as xgb
    from sklearn.datasets import load_iris

    X, y = load_iris(return_X_y=True)
    booster = xgb.XGBClassifier(n_estimators=5, max_depth=2).fit(X, y).get_booster()
    repo = root / "repo"
    d = repo / "iris"
    (d / "1").mkdir(parents=True)
    booster.save_model(str(d / "1" / "xgboost.json"))
    (d / "labels.txt").write_text("setosa\nversicolor\nvirginica\n")
    (d / "config.pbtxt").write_text(IRIS_CONFIG)
    (root / "secret.txt").write_text("TOP-SECRET-LINE\n")
    return repo


IRIS_CONFIG = """backend: "fil"
max_batch_size: 8
input [ { name: "input__0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "output__0" data_type: TYPE_FP32 dims: [ 3 ] label_filename: "labels.txt" } ]
parameters [ { key: "model_type" value: { string_value: "xgboost_json" } },
             { key: "predict_proba" value: { string_value: "true" } } ]
"""


def override(**changes) -> str:
    cfg = {
        "backend": "fil",
        "max_batch_size": 8,
        "input": [{"name": "input__0", "data_type": "TYPE_FP32", "dims": [4]}],
        "output": [{"name": "output__0", "data_type": "TYPE_FP32", "dims": [3], "label_filename": "labels.txt"}],
        "parameters": {"model_type": {"string_value": "xgboost_json"}, "predict_proba": {"string_value": "true"}},
    }
    for k, v in changes.items():
        if k == "label_filename":
            cfg["output"][0]["label_filename"] = v
        else:
            cfg[k] = v
    return json.dumps(cfg)


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """One server with every front: the default LLM with a small KV pool, a
    model repository in explicit mode, a registry, API keys, tight limits."""
    root = tmp_path_factory.mktemp("security")
    repo = iris_repo(root)
    keys = "".join(f"    - {{ name: {role}-user, role: {role}, key: {key} }}\n" for role, key in KEYS.items())
    limits = ", ".join(f"{k}: {v}" for k, v in LIMITS.items())
    config = root / "config.yaml"
    config.write_text(
        f"server:\n  data_dir: {root / 'data'}\n  limits: {{ {limits} }}\n"
        # Inference stays open here (the attacks below are on open fronts);
        # keyed inference has its own tests (test_rate_limits.py).
        f"auth:\n  inference_requires_key: false\n  api_keys:\n{keys}"
        f"registry:\n  reconcile_interval_secs: 1\n"
        "  engine: { max_num_seqs: 4, kv_cache_bytes: 20000000 }\n"
        f"models:\n  - name: {MODEL}\n{default_source()}"
        "    engine: { max_num_seqs: 4, kv_cache_bytes: 3000000, max_waiting: 8 }\n"
        f"model_repository:\n  path: {repo}\n  control_mode: explicit\n  load_models: ['*']\n"
    )
    s = Triton(None, config=str(config))
    s.root = root
    s.repo = repo
    yield s
    s.stop()


def auth(role):
    return {"Authorization": f"Bearer {KEYS[role]}"}


def http_client(s):
    return httpclient.InferenceServerClient(s.http_url)


def grpc_client(s):
    return grpcclient.InferenceServerClient(s.grpc_url)


# 1. Reading files ---------------------------------------------------------


def test_config_overrides_cannot_name_files_outside_the_model(secured):
    base = rss(secured)
    c = http_client(secured)
    secret = secured.root / "secret.txt"
    # Each escape: absolute, `..`, and a nonexistent outside file answer alike.
    messages = []
    for name in [str(secret), "../../secret.txt", "/etc/shadow", str(secured.root / "absent.txt")]:
        with pytest.raises(InferenceServerException) as e:
            c.load_model("iris", config=override(label_filename=name), headers=auth("admin"))
        msg = str(e.value)
        assert "must name a file inside the model's directory" in msg, msg
        assert "TOP-SECRET" not in msg
        messages.append(msg.replace(name, "NAME"))
    assert len(set(messages)) == 1, messages
    for name in [str(secret), "../../../secret.txt"]:
        with pytest.raises(InferenceServerException, match="default_model_filename"):
            c.load_model("iris", config=override(default_model_filename=name), headers=auth("admin"))
    # A symlink inside the model folder that points out is refused too.
    link = secured.repo / "iris" / "out.txt"
    link.symlink_to(secret)
    try:
        with pytest.raises(InferenceServerException, match="inside the model's directory"):
            c.load_model("iris", config=override(label_filename="out.txt"), headers=auth("admin"))
    finally:
        link.unlink()
    # The model still serves, with its own labels.
    x = httpclient.InferInput("input__0", [1, 4], "FP32")
    x.set_data_from_numpy(np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32))
    out = httpclient.InferRequestedOutput("output__0", class_count=3)
    labels = c.infer("iris", [x], outputs=[out]).as_numpy("output__0")[0]
    assert {l.decode().split(":")[2] for l in labels} == {"setosa", "versicolor", "virginica"}
    assert_alive(secured, base)


def test_registry_artifacts_stay_under_the_artifact_roots(secured):
    api = httpx.Client(base_url=f"{secured.url}/v1/registry", timeout=30)
    spec = {"name": "leak", "class": "llm", "tier": "L2", "rollback_class": "stateless", "owner": "x"}
    assert api.post("/models", json=spec, headers=auth("deployer")).status_code == 201
    statuses = []
    for path in ["/etc/passwd", str(secured.root / "absent.gguf")]:
        v = {"artifact": {"uri": f"file://{path}", "sha256": "0" * 64, "format": "gguf"}}
        r = api.post("/models/leak/versions", json=v, headers=auth("deployer"))
        assert r.status_code == 201, r.text
        n = r.json()["number"]
        r = api.post(f"/models/leak/versions/{n}/transitions", json={"to": "offline_passed"}, headers=auth("deployer"))
        assert r.status_code == 200, r.text
        r = api.post(f"/models/leak/versions/{n}/transitions", json={"to": "shadow"}, headers=auth("deployer"))
        assert r.status_code == 200, r.text

        def failed():
            st = api.get(f"/models/leak/versions/{n}", headers=auth("viewer")).json()["status"]
            return st if st and st["phase"] == "failed" else None

        st = wait_for(f"version {n} to fail", failed, timeout=30)
        statuses.append(st["message"].replace(path, "PATH"))
    # The viewer learns neither whether /etc/passwd exists nor its hash.
    assert statuses[0] == statuses[1], statuses
    assert "artifact roots" in statuses[0]


# 2. Keys ------------------------------------------------------------------


def test_repository_control_takes_an_admin_key_on_both_protocols(secured):
    c, g = http_client(secured), grpc_client(secured)
    for headers, status in [(None, 401), ({"x-api-key": ""}, 401), ({"x-api-key": "wrong-secret-0123456789"}, 401),
                            (auth("viewer"), 403), (auth("invoke"), 403)]:
        r = httpx.post(f"{secured.url}/v2/repository/models/iris/unload", headers=headers or {})
        assert r.status_code == status, (headers, r.text)
        assert "error" in r.json()
        with pytest.raises(InferenceServerException) as e:
            # gRPC metadata keys are lower case.
            g.unload_model("iris", headers={k.lower(): v for k, v in (headers or {}).items()})
        code = "StatusCode.UNAUTHENTICATED" if status == 401 else "StatusCode.PERMISSION_DENIED"
        assert e.value.status() == code, e.value
    assert c.is_model_ready("iris")
    g.unload_model("iris", headers={"authorization": f"Bearer {KEYS['admin']}"})
    assert not c.is_model_ready("iris")
    c.load_model("iris", headers=auth("admin"))
    assert c.is_model_ready("iris")


def test_an_empty_key_header_is_no_key(secured):
    for h in [{"x-api-key": ""}, {"Authorization": "Bearer"}, {"Authorization": "Bearer  " + KEYS["admin"]}]:
        r = httpx.get(f"{secured.url}/v1/registry/models", headers=h)
        assert r.status_code == 401, (h, r.text)
    assert httpx.get(f"{secured.url}/v1/registry/models", headers=auth("viewer")).status_code == 200
    # An application key calls models, but does not read the registry.
    assert httpx.get(f"{secured.url}/v1/registry/models", headers=auth("invoke")).status_code == 403


def test_feedback_takes_an_invoke_key(secured):
    body = {"request_id": "chatcmpl-unknown", "score": 1}
    r = httpx.post(f"{secured.url}/v1/feedback", json=body)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(f"{secured.url}/v1/feedback", json=body, headers=auth("viewer"))
    assert r.status_code == 403
    r = httpx.post(f"{secured.url}/v1/feedback", json=body, headers=auth("invoke"))
    assert r.status_code == 404 and r.json()["error"]["code"] == "request_not_found"


def test_only_admins_create_models_below_the_tier_floor(secured):
    api = httpx.Client(base_url=f"{secured.url}/v1/registry", timeout=30)
    spec = {"name": "lax", "class": "llm", "tier": "L0", "rollback_class": "stateless", "owner": "x"}
    r = api.post("/models", json=spec, headers=auth("deployer"))
    assert r.status_code == 403 and "floor" in r.json()["error"]["message"], r.text
    assert api.post("/models", json=spec, headers=auth("admin")).status_code == 201


@pytest.mark.parametrize("keys, error", [
    ("- { name: ops, role: admin, key_env: SWITCHYARD_TEST_EMPTY_KEY }", "secret is empty"),
    ("- { name: ops, role: admin, key: short }", "at least 16"),
    ("- { name: a, role: admin, key: same-long-secret-123 }\n    - { name: b, role: viewer, key: same-long-secret-123 }",
     "same secret"),
    ("- { name: ops, role: admin, key: ' padded-long-secret-1 ' }", "whitespace"),
])
def test_keys_that_mean_nothing_stop_the_server_at_start(tmp_path, keys, error):
    config = tmp_path / "c.yaml"
    config.write_text(f"auth:\n  api_keys:\n    {keys}\nupstreams:\n"
                      "  - { name: x, endpoints: [http://127.0.0.1:9] }\n")
    env = {**os.environ, "SWITCHYARD_TEST_EMPTY_KEY": ""}
    p = subprocess.run([binary(), "serve", "--config", str(config), "--http", f"127.0.0.1:{free_port()}"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode != 0
    assert error in p.stderr and "auth.api_keys" in p.stderr, p.stderr


def test_without_keys_repository_control_needs_an_explicit_flag(tmp_path):
    repo = iris_repo(tmp_path)
    s = Triton(repo, "--model-control-mode", "explicit", "--load-model", "iris")
    try:
        with pytest.raises(InferenceServerException, match="allow-unauthenticated-control"):
            http_client(s).unload_model("iris")
        with pytest.raises(InferenceServerException) as e:
            grpc_client(s).unload_model("iris")
        assert e.value.status() == "StatusCode.UNAUTHENTICATED"
        assert http_client(s).is_model_ready("iris")
    finally:
        s.stop()
    p = subprocess.run([binary(), "serve", "--model-repository", str(repo), "--allow-unauthenticated-control",
                        "--http", f"127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "explicit" in p.stderr, p.stderr


# 3. Memory ----------------------------------------------------------------


def test_compressed_bombs_stop_at_the_inflate_bound(secured):
    base = rss(secured)
    bomb = gzip.compress(b"\0" * (512 << 20), compresslevel=9)  # 512 MiB in ~0.5 MB
    assert len(bomb) < LIMITS["max_body_bytes"]
    for path in ["/v2/models/iris/infer", "/v2/repository/index", f"/v2/models/{MODEL}/generate",
                 "/v1/chat/completions"]:
        r = httpx.post(f"{secured.url}{path}", content=bomb, timeout=60,
                       headers={"content-encoding": "gzip", "content-type": "application/json", **auth("admin")})
        assert r.status_code == 413, (path, r.status_code, r.text)
        assert "decompressed" in r.text
    assert_alive(secured, base)


@pytest.mark.parametrize("path, limit", [
    ("/v1/chat/completions", "max_body_bytes"),
    ("/v1/completions", "max_body_bytes"),
    (f"/v2/models/{MODEL}/generate", "max_body_bytes"),
    (f"/v2/models/{MODEL}/generate_stream", "max_body_bytes"),
    ("/v1/registry/models", "max_body_bytes"),
    ("/v1/feedback", "max_body_bytes"),
    ("/v2/repository/models/iris/load", "max_body_bytes"),
    ("/v2/models/iris/infer", "max_tensor_body_bytes"),
])
def test_every_body_has_a_bound(secured, path, limit):
    base = rss(secured)
    size = LIMITS[limit] + 1
    # Declared: refused from Content-Length. Chunked: refused once past the bound.
    r = httpx.post(f"{secured.url}{path}", content=b"x" * size, headers=auth("admin"), timeout=60)
    assert r.status_code == 413, (path, r.status_code, r.text[:200])
    assert "error" in r.json()
    chunks = (b"y" * 65536 for _ in range(size // 65536 + 2))
    r = httpx.post(f"{secured.url}{path}", content=chunks, headers=auth("admin"), timeout=60)
    assert r.status_code == 413, (path, r.status_code)
    if path.startswith("/v1/") and "registry" not in path:
        # OpenAI's error shape, not plain text.
        assert r.json()["error"]["code"] == "request_too_large"
    assert_alive(secured, base)


def test_grpc_messages_have_a_bound(secured):
    g = grpc_client(secured)
    x = grpcclient.InferInput("input__0", [8, 4], "FP32")
    x.set_data_from_numpy(np.zeros((8, 4), dtype=np.float32))
    # Pad the message past the bound with a raw input of the wrong size.
    big = grpcclient.InferInput("pad", [LIMITS["grpc_max_message_bytes"]], "UINT8")
    big.set_data_from_numpy(np.zeros(LIMITS["grpc_max_message_bytes"], dtype=np.uint8))
    with pytest.raises(InferenceServerException) as e:
        g.infer("iris", [x, big])
    assert e.value.status() in ("StatusCode.RESOURCE_EXHAUSTED", "StatusCode.OUT_OF_RANGE"), e.value


def test_huge_declared_shapes_are_refused_not_allocated(secured):
    base = rss(secured)
    body = {"inputs": [{"name": "input__0", "datatype": "FP32", "shape": [2**62, 4],
                        "parameters": {"binary_data_size": 0}}]}
    r = httpx.post(f"{secured.url}/v2/models/iris/infer", json=body)
    assert r.status_code == 400, r.text
    g = grpc_client(secured)
    for shape in [[2**62, 4], [2**31, 2**31]]:
        x = grpcclient.InferInput("input__0", shape, "FP32")
        x._raw_content = b""
        with pytest.raises(InferenceServerException) as e:
            g.infer("iris", [x])
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT", e.value
    assert_alive(secured, base)


def test_instance_counts_have_a_bound(secured):
    c = http_client(secured)
    cfg = json.loads(override())
    cfg["instance_group"] = [{"count": 2000, "kind": "KIND_CPU"}]
    with pytest.raises(InferenceServerException, match="max_instances"):
        c.load_model("iris", config=json.dumps(cfg), headers=auth("admin"))
    assert c.is_model_ready("iris")


# 4. The LLM engine --------------------------------------------------------


BAD_PARAMETERS = [
    ({"max_tokens": 2**64 - 1}, "context"),
    ({"max_tokens": "18446744073709551615"}, "context"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"min_tokens": 9, "max_tokens": 2}, "min_tokens"),
    ({"best_of": 3}, "best_of"),
]


def llm_infer_inputs(mod, params):
    text = mod.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"Hello"], dtype=object))
    sp = mod.InferInput("sampling_parameters", [1], "BYTES")
    sp.set_data_from_numpy(np.array([json.dumps(params).encode()], dtype=object))
    return [text, sp]


@pytest.mark.parametrize("params, named", BAD_PARAMETERS)
def test_kserve_llm_fronts_validate_as_the_openai_front(secured, params, named):
    r = httpx.post(f"{secured.url}/v2/models/{MODEL}/generate", json={"text_input": "Hello", "parameters": params})
    assert r.status_code == 400 and named in r.json()["error"], r.text
    with pytest.raises(InferenceServerException, match=named):
        http_client(secured).infer(MODEL, llm_infer_inputs(httpclient, params))
    with pytest.raises(InferenceServerException, match=named):
        grpc_client(secured).infer(MODEL, llm_infer_inputs(grpcclient, params))


def test_no_request_wedges_the_engine(secured):
    """The pool holds 128 tokens: one request takes nearly all of it while
    others arrive; they are preempted and resumed, and every one finishes."""
    url = f"{secured.url}/v2/models/{MODEL}/generate"
    results = {}

    def call(key, text, max_tokens):
        body = {"text_input": text, "parameters": {"max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}}
        results[key] = httpx.post(url, json=body, timeout=300)

    threads = [threading.Thread(target=call, args=("long", "Count:", 100))]
    threads += [threading.Thread(target=call, args=(i, f"Hi {i}", 8)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert {k: r.status_code for k, r in results.items()} == {"long": 200, 0: 200, 1: 200, 2: 200}


# 5. Starving the server ---------------------------------------------------


def test_slow_request_heads_are_cut_off(secured):
    socks = []
    for _ in range(40):
        s = socket.create_connection(("127.0.0.1", secured.port))
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never finished
        socks.append(s)
    # Each is closed once the header read timeout (2 s) passes; a socket still
    # open after 30 s raises here.
    for s in socks:
        s.settimeout(30)
        data = s.recv(1024)
        assert data == b"" or data.startswith(b"HTTP/1.1 408"), data
        s.close()
    assert httpx.get(f"{secured.url}/health", timeout=10).status_code == 200


def test_connections_beyond_the_cap_wait(secured):
    held = []
    for _ in range(LIMITS["max_connections"]):
        s = socket.create_connection(("127.0.0.1", secured.port))
        held.append(s)
    extra = socket.create_connection(("127.0.0.1", secured.port))
    extra.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    extra.settimeout(0.5)
    with pytest.raises(socket.timeout):
        extra.recv(1024)  # not served while every place is taken
    for s in held:
        s.close()
    extra.settimeout(30)
    assert extra.recv(1024).startswith(b"HTTP/1.1 200")
    extra.close()


def test_heavy_tokenization_does_not_block_health(secured):
    prompt = "word " * 1_600_000  # 8 MB, seconds of tokenizing on the blocking pool
    done = []

    def big():
        httpx.post(f"{secured.url}/v1/completions", timeout=120,
                   json={"model": MODEL, "prompt": prompt, "max_tokens": 1})
        done.append(time.monotonic())

    threads = [threading.Thread(target=big) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    r = httpx.get(f"{secured.url}/health", timeout=30)
    answered = time.monotonic()
    for t in threads:
        t.join(120)
    assert r.status_code == 200
    assert len(done) == 2 and answered < min(done), "health waited for the tokenization"
