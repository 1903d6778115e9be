"""Remote nodes on the Triton plane.

Shadows: a tree model's requests are copied to a copy of itself, to a smaller
model, to a model that does not exist, to a remote Switchyard over gRPC, to a
node that hangs and to one that is down. The primary's answers stay exactly
the library's own, it never waits for a shadow, and the divergence report
tells the same model from a different one.

Upstreams: a model served by two remote Switchyard nodes over KServe gRPC,
reached through our HTTP and gRPC fronts with tritonclient; balancing,
failover when one is killed, a clear error when none is left, and an
answer over the upstream's max_response_bytes refused by name."""
import socket
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import Triton, bucket, free_port, metric, wait_for
from triton_repo import fil_config, write_model

HANG_TIMEOUT_MS = 2000


def xgb_model(repo: Path, name: str, X, y, trees: int):
    import xgboost as xgb

    m = xgb.XGBClassifier(n_estimators=trees, max_depth=3, random_state=0).fit(X, y)
    m.save_model(repo.parent / f"{name}.json")
    params = {"model_type": "xgboost_json", "predict_proba": "true", "output_class": "true"}
    write_model(repo, name, fil_config(name, 4, 3, params), {"xgboost.json": repo.parent / f"{name}.json"})
    return m.predict_proba(X).astype(np.float32)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    from sklearn.datasets import load_iris

    repo = tmp_path_factory.mktemp("shadows") / "repo"
    repo.mkdir()
    X, y = load_iris(return_X_y=True)
    X = X.astype(np.float32)
    want = {name: xgb_model(repo, name, X, y, trees)
            for name, trees in [("iris", 20), ("iris_copy", 20), ("iris_plain", 20), ("iris_small", 2)]}
    assert np.array_equal(want["iris"], want["iris_copy"])
    assert not np.allclose(want["iris"], want["iris_small"])
    return repo, X, want


class Hanging:
    """Accepts connections and never answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.fixture(scope="module")
def servers(repo, tmp_path_factory):
    path = repo[0]
    started, hang = [], Hanging()
    try:
        remote = Triton(path)
        started.append(remote)
        replicas = [Triton(path), Triton(path)]
        started += replicas
        down = free_port()
        endpoints = ", ".join(f'"grpc://{r.grpc_url}"' for r in replicas)
        cfg = tmp_path_factory.mktemp("cfg") / "shadows.yaml"
        cfg.write_text(f"""
model_repository:
  path: {path}
  shadows:
    - {{model: iris, target: iris_copy}}
    - {{model: iris, target: iris_small}}
    - {{model: iris, target: nowhere}}
    - {{model: iris, target: iris, endpoint: "grpc://{remote.grpc_url}"}}
    - {{model: iris, target: iris, endpoint: "grpc://127.0.0.1:{hang.port}", timeout_ms: {HANG_TIMEOUT_MS}, max_in_flight: 2}}
    - {{model: iris, target: iris, endpoint: "grpc://127.0.0.1:{down}", timeout_ms: {HANG_TIMEOUT_MS}}}
    - {{model: iris_copy, target: iris_small, sample_percent: 50}}
upstreams:
  - {{name: iris_far, protocol: kserve, model: iris, endpoints: [{endpoints}],
     health_interval_ms: 300, failure_threshold: 2, open_secs: 30, timeout_secs: 10}}
  - {{name: iris_tight, protocol: kserve, model: iris, endpoints: [{endpoints}], max_response_bytes: 16}}
""")
        main = Triton(None, config=str(cfg))
        started.append(main)
        yield main, remote, hang, down, replicas
    finally:
        # Also when a server fails to start: none is left behind.
        for s in started:
            if s.proc.poll() is None:
                s.stop()
        hang.close()


def infer(client, model, x, request_id=""):
    i = httpclient.InferInput("input__0", list(x.shape), "FP32")
    i.set_data_from_numpy(x, binary_data=True)
    return client.infer(model, [i], request_id=request_id).as_numpy("output__0")


def shadows(server, model):
    report = httpx.get(f"{server.url}/v1/routes/{model}/shadows").json()
    return {s["version"]: s for s in report["shadows"]}


def test_the_primary_is_untouched_and_divergence_tells_models_apart(repo, servers):
    _, X, want = repo
    main, remote, hang, down, _ = servers
    client = httpclient.InferenceServerClient(main.http_url)
    hanging = f"grpc://127.0.0.1:{hang.port}/iris"
    for k in range(30):
        rows = X[(k * 5) % 150:(k * 5) % 150 + 5]
        got = infer(client, "iris", rows, request_id=f"r{k}")
        # Exactly the library's own probabilities, whatever the shadows do.
        np.testing.assert_allclose(got, want["iris"][(k * 5) % 150:(k * 5) % 150 + 5], rtol=1e-6, atol=1e-7)
        if k == 0:
            # The answer came while its copy to the hanging node was still
            # waiting (it fails only after 2 s): the primary never waits.
            first = shadows(main, "iris").get(hanging, {"errors": 0})
            assert first["errors"] == 0, first
    report = wait_for("every shadow to settle", lambda: (
        lambda r: r if sum(s["compared"] + s["errors"] + s["skipped"] for s in r.values()) >= 6 * 30 else None
    )(shadows(main, "iris")))
    same, small = report["iris_copy"], report["iris_small"]
    assert same["compared"] == 30 and same["errors"] == 0, same
    t = same["tensors"]
    assert t["rows"] == 150 and t["argmax_agreement"] == 1.0 and t["mean_abs_diff"] == 0.0 and t["mean_kl"] == 0.0, t
    # Served over gRPC by another Switchyard: the same model, no divergence.
    far = report[f"grpc://{remote.grpc_url}/iris"]
    assert far["compared"] == 30 and far["errors"] == 0 and far["tensors"]["mean_kl"] == 0.0, far
    # Two trees instead of twenty: the probabilities move.
    t = small["tensors"]
    assert small["compared"] == 30 and t["mean_abs_diff"] > 0.01 and t["mean_kl"] > 0.001, t
    assert small["exact_match_rate"] is None
    # Failing, hanging and down shadows are counted, never compared.
    assert report["nowhere"]["errors"] == 30 and report["nowhere"]["compared"] == 0
    hung = report[hanging]
    assert hung["compared"] == 0 and hung["errors"] + hung["skipped"] == 30 and hung["skipped"] > 0, hung
    gone = report[f"grpc://127.0.0.1:{down}/iris"]
    assert gone["compared"] == 0 and gone["errors"] == 30, gone
    assert metric(main, "switchyard:shadow_errors_total", route="iris", version="nowhere") == 30
    assert metric(main, "switchyard:shadow_skipped_total", route="iris", version=hanging) == hung["skipped"]


def test_a_sampled_shadow_gets_its_share_by_request_id(repo, servers):
    _, X, _ = repo
    main = servers[0]
    client = grpcclient.InferenceServerClient(main.grpc_url)
    ids = [f"req-{k}" for k in range(200)]
    for rid in ids:
        i = grpcclient.InferInput("input__0", [1, 4], "FP32")
        i.set_data_from_numpy(X[:1])
        client.infer("iris_copy", [i], request_id=rid)
    # Exactly the ids whose hash falls in the sampled half, about 100 of 200.
    want = sum(bucket("iris_copy/shadow/iris_small", rid) < 5000 for rid in ids)
    assert 70 <= want <= 130, want
    wait_for("copies", lambda: metric(main, "switchyard:shadow_requests_total", missing=0.0, route="iris_copy") == want)
    wait_for("comparisons", lambda: shadows(main, "iris_copy")["iris_small"]["compared"] == want)


def test_a_bad_shadow_config_names_the_key(tmp_path, repo):
    from conftest import binary
    import subprocess

    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"model_repository:\n  path: {repo[0]}\n  shadows:\n    - {{model: iris, target: iris_small, sample_percent: 150}}\n")
    out = subprocess.run([binary(), "serve", "--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "model_repository.shadows[0].sample_percent" in out.stderr + out.stdout


def successes(node, model="iris"):
    stats = httpx.get(f"{node.url}/v2/models/{model}/stats").json()["model_stats"][0]
    return stats["inference_stats"]["success"]["count"]


def test_a_remote_answer_over_max_response_bytes_is_refused_by_name(repo, servers):
    _, X, want = repo
    main, *_ = servers
    client = httpclient.InferenceServerClient(main.http_url)
    wait_for("iris_tight ready", lambda: client.is_model_ready("iris_tight"), timeout=30)
    with pytest.raises(InferenceServerException, match="max_response_bytes") as e:
        infer(client, "iris_tight", X[:10])
    assert "the limit is: 16 bytes" in str(e.value), e.value
    # The same replicas under the default bound answer in full.
    np.testing.assert_allclose(infer(client, "iris_far", X[:10]), want["iris"][:10], rtol=1e-6, atol=1e-7)


def test_a_remote_kserve_upstream_balances_and_fails_over(repo, servers):
    _, X, want = repo
    main, *_, (r1, r2) = servers
    http = httpclient.InferenceServerClient(main.http_url)
    grpc = grpcclient.InferenceServerClient(main.grpc_url)
    assert http.is_model_ready("iris_far") and grpc.is_model_ready("iris_far")
    md = http.get_model_metadata("iris_far")
    assert md["name"] == "iris_far" and md["inputs"][0]["name"] == "input__0", md
    assert grpc.get_model_config("iris_far").config.max_batch_size == 1024

    def ask(client, k):
        mod = httpclient if client is http else grpcclient
        rows = X[k % 140:k % 140 + 10]
        i = mod.InferInput("input__0", list(rows.shape), "FP32")
        i.set_data_from_numpy(rows)
        r = client.infer("iris_far", [i])
        np.testing.assert_allclose(r.as_numpy("output__0"), want["iris"][k % 140:k % 140 + 10], rtol=1e-6, atol=1e-7)
        return r

    # Answers carry the name the client used.
    assert ask(grpc, 0).get_response().model_name == "iris_far"
    assert ask(http, 0).get_response()["model_name"] == "iris_far"
    before = [successes(r) for r in (r1, r2)]
    for k in range(12):
        ask(http if k % 2 else grpc, k)
    used = [successes(r) - b for r, b in zip((r1, r2), before)]
    assert sum(used) == 12 and min(used) > 0, used

    # One replica dies: the next requests go to the other at once.
    r1.kill()
    for k in range(8):
        ask(http if k % 2 else grpc, k)
    assert successes(r2) - before[1] - used[1] == 8
    # None left: a clear error, not a hang (a client that waited out its
    # 10 s limit would raise a timeout, without the model's name).
    r2.kill()
    wait_for("the health check to mark both down", lambda: not http.is_model_ready("iris_far"))
    quick = httpclient.InferenceServerClient(main.http_url, network_timeout=10)
    i = httpclient.InferInput("input__0", [1, 4], "FP32")
    i.set_data_from_numpy(X[:1])
    with pytest.raises(InferenceServerException) as e:
        quick.infer("iris_far", [i])
    assert e.value.status() == "503" and "iris_far" in str(e.value), str(e.value)
