"""The registry drives the Triton plane: tree and DNN versions registered
with `switchyard registry` (artifacts made here by XGBoost and scikit-learn
→ ONNX) are served by NVIDIA's `tritonclient` over HTTP and gRPC through
shadow → canary → promoted → rolled back, each answer equal to the library's
own prediction for the version that named itself; a contract the artifact
does not match fails that version only; a rollout policy promotes a good tree
candidate and rolls back one whose argmax agreement is below its bound."""
import hashlib
import io
import itertools
import json
import os
import subprocess
import tarfile
import threading

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from conftest import Server, binary, bucket, wait_for
from test_registry import KEYS, Api, status, write_config
from triton_repo import fil_config

POLICY = """\
  rollout_interval_ms: 300
  rollouts:
    - model: iris_policy
      steps: [50, 100]
      min_requests: 8
      min_step_secs: 1
      min_success_rate: 0.9
      max_p99_latency_ms: 60000
      min_shadow_argmax_agreement: 0.9
      max_shadow_abs_diff: 0.05
"""


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plane")
    s = Server(write_config(tmp, extra=POLICY), args=["--grpc", "127.0.0.1:0"])
    s.grpc_url = "127.0.0.1:" + s.wait_for_log(r"KServe gRPC on 127\.0\.0\.1:(\d+)")
    s.http_url = f"127.0.0.1:{s.port}"
    # The data directory is an artifact root.
    s.artifacts = tmp / "data" / "artifacts"
    s.artifacts.mkdir(parents=True)
    yield s
    s.stop()


def cli(s, *args, role="deployer"):
    """`switchyard registry ARGS` against the node, as the role's key."""
    env = {**os.environ, "SWITCHYARD_URL": s.url, "SWITCHYARD_API_KEY": KEYS[role]}
    r = subprocess.run([binary(), "registry", *args], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def register(s, model, klass, version_doc, **record):
    """Creates `model` (tier L0: no approvals) once, and registers a version."""
    spec = s.artifacts / f"{model}.model.json"
    if not spec.exists():
        spec.write_text(json.dumps({
            "name": model, "class": klass, "tier": "L0", "rollback_class": "stateless",
            "owner": "ml-platform", "gates": {"thresholds": {"accuracy": {"min": 0.5}}}, **record}))
        cli(s, "models", "create", str(spec))
    doc = s.artifacts / f"{model}.version.json"
    doc.write_text(json.dumps({"metrics": {"overall": {"accuracy": 0.9}}, **version_doc}))
    return json.loads(cli(s, "versions", "register", model, str(doc)))["number"]


ARCHIVES = itertools.count()


def xgb_archive(s, name, booster_json, features, outputs, params):
    """A Triton model folder (config.pbtxt + 1/xgboost.json) as a .tar.gz."""
    path = s.artifacts / f"{name}-{next(ARCHIVES)}.tar.gz"
    config = fil_config(name, features, outputs, params).encode()
    with tarfile.open(path, "w:gz") as tar:
        for member, data in [(f"{name}/config.pbtxt", config), (f"{name}/1/xgboost.json", booster_json)]:
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return {"artifact": {"uri": f"file://{path}", "sha256": sha256(path), "format": "triton"}}


UNIT_HEADERS = {"mlp": "x-tenant"}


def infer(client, mod, model, x, unit, name="input__0", out="output__0"):
    """One request with `unit` as the rollout unit: (served version, output)."""
    t = mod.InferInput(name, list(x.shape), "FP32")
    t.set_data_from_numpy(x)
    r = client.infer(model, [t], headers={UNIT_HEADERS.get(model, "x-switchyard-unit"): unit})
    resp = r.get_response(as_json=True) if mod is grpcclient else r.get_response()
    return int(resp["model_version"]), r.as_numpy(out)


def test_tree_and_onnx_versions_walk_to_production_and_back(node):
    import xgboost as xgb
    from skl2onnx import to_onnx
    from sklearn.datasets import load_diabetes
    from sklearn.neural_network import MLPRegressor

    X, y = load_diabetes(return_X_y=True)
    X = X.astype(np.float32)
    rows = X[:4]
    # XGBoost: two versions that predict differently.
    expect = {}
    for v, trees in [(1, 6), (2, 30)]:
        m = xgb.XGBRegressor(n_estimators=trees, max_depth=3, random_state=0).fit(X, y)
        path = node.artifacts / f"diab-{v}.json"
        m.save_model(path)
        doc = xgb_archive(node, "diab", path.read_bytes(), 10, 1, {"model_type": "xgboost_json"})
        assert register(node, "diab", "tree", doc) == v
        expect[("diab", v)] = m.get_booster().inplace_predict(rows).astype(np.float32).reshape(-1, 1)
    # ONNX: one model file; its config comes from the version's contract.
    for v, hidden in [(1, 8), (2, 24)]:
        m = MLPRegressor(hidden_layer_sizes=(hidden,), max_iter=300, random_state=0).fit(X, y)
        onx = to_onnx(m, X[:1], target_opset=17)
        path = node.artifacts / f"mlp-{v}.onnx"
        path.write_bytes(onx.SerializeToString())
        out = onx.graph.output[0].name
        contract = {"inputs": [{"name": "X", "datatype": "FP32", "shape": [-1, 10]}],
                    "outputs": [{"name": out, "datatype": "FP32", "shape": [-1, 1]}]}
        doc = {"artifact": {"uri": f"file://{path}", "sha256": sha256(path), "format": "onnx"},
               "contract": contract, "requirements": {"max_batch_size": 16}}
        # The record names its own rollout unit: a tenant header.
        assert register(node, "mlp", "dnn", doc, rollout_unit="header:x-tenant") == v
        import onnxruntime as ort
        sess = ort.InferenceSession(onx.SerializeToString(), providers=["CPUExecutionProvider"])
        expect[("mlp", v)] = sess.run(None, {"X": rows})[0].astype(np.float32)

    http = httpclient.InferenceServerClient(node.http_url)
    grpc = grpcclient.InferenceServerClient(node.grpc_url)
    io_names = {"diab": ("input__0", "output__0"), "mlp": ("X", out)}

    def answers(model, units, steady=True):
        """Per unit, the version each protocol saw, after checking each
        answer; in a steady state, both protocols see the same version."""
        seen = {}
        for unit in units:
            for client, mod in [(http, httpclient), (grpc, grpcclient)]:
                v, got = infer(client, mod, model, rows, unit, *io_names[model])
                np.testing.assert_allclose(got, expect[(model, v)], rtol=1e-4, atol=1e-3)
                if steady:
                    assert seen.setdefault(unit, v) == v, f"{unit} moved between versions"
                seen[unit] = v
        return seen

    units = [f"unit-{i}" for i in range(30)]
    for model in ["diab", "mlp"]:
        cli(node, "transition", model, "1", "offline_passed")
        cli(node, "transition", model, "1", "promoted")
        wait_for(f"{model} v1 serving", lambda: status(Api(node), model, 1) == "serving")
        wait_for(f"{model} routed", lambda: http.is_model_ready(model))
        assert set(answers(model, units[:3]).values()) == {1}
        cli(node, "transition", model, "2", "offline_passed")
        cli(node, "transition", model, "2", "shadow")
        wait_for(f"{model} v2 shadow", lambda: status(Api(node), model, 2) == "serving")
        assert set(answers(model, units[:3]).values()) == {1}, "a shadow never answers"
        cli(node, "transition", model, "2", "canary", "--percent", "50")
        wait_for(f"{model} canary", lambda: 2 in answers(model, units, steady=False).values())
        seen = answers(model, units)
        # The canary owns the units whose sticky hash falls in its 50%.
        assert seen == {u: 2 if bucket(f"{model}/rollout", u) < 5000 else 1 for u in units}
        meta = http.get_model_metadata(model)
        assert meta["name"] == model and sorted(meta["versions"]) == ["1", "2"]
        # Triton's statistics name the model and each serving version.
        for stats in [http.get_inference_statistics(model)["model_stats"],
                      grpc.get_inference_statistics(model, as_json=True)["model_stats"]]:
            counts = {st["version"]: int(st.get("inference_count", 0)) for st in stats}
            assert {st["name"] for st in stats} == {model} and counts.keys() == {"1", "2"}, stats
            assert counts["1"] > 0 and counts["2"] > 0, stats
        cli(node, "transition", model, "2", "promoted")
        wait_for(f"{model} v2 promoted", lambda: set(answers(model, units[:6], steady=False).values()) == {2})
        cli(node, "rollback", model, "--reason", "e2e")
        wait_for(f"{model} rolled back", lambda: set(answers(model, units, steady=False).values()) == {1})
        assert set(answers(model, units).values()) == {1}
    # The shadow phase compared the tensors it copied.
    shadows = {s["version"]: s for s in httpclient_json(node, "/v1/routes/diab/shadows")["shadows"]}
    assert shadows["2"]["tensors"]["compared"] > 0

    # A version whose contract names an input the artifact lacks, or the
    # wrong datatype, fails with the field named; v1 keeps serving.
    good = json.loads((node.artifacts / "mlp.version.json").read_text())
    for field, change, named in [("name", "features", "input 'X' is not declared in the contract"),
                                 ("datatype", "FP64", "declares input 'X' as FP64")]:
        doc = json.loads(json.dumps(good))
        doc.pop("metrics")
        doc["contract"]["inputs"][0][field] = change
        v = register(node, "mlp", "dnn", doc)
        cli(node, "transition", "mlp", str(v), "offline_passed")
        cli(node, "transition", "mlp", str(v), "shadow")
        wait_for(f"mlp v{v} failed", lambda: status(Api(node), "mlp", v) == "failed")
        message = Api(node).get(f"/models/mlp/versions/{v}").json()["status"]["message"]
        assert "does not match the version's contract" in message and named in message, message
        assert set(answers("mlp", units[:3]).values()) == {1}


def httpclient_json(node, path):
    import httpx
    return httpx.get(f"{node.url}{path}", timeout=30).json()


def test_a_policy_promotes_an_agreeing_tree_and_rolls_back_a_disagreeing_one(node):
    import xgboost as xgb
    from sklearn.datasets import load_iris

    X, y = load_iris(return_X_y=True)
    X = X.astype(np.float32)
    params = {"model_type": "xgboost_json", "predict_proba": "true", "output_class": "true"}

    def version(labels):
        m = xgb.XGBClassifier(n_estimators=10, max_depth=3, random_state=0).fit(X, labels)
        path = node.artifacts / "iris-policy.json"
        m.save_model(path)
        return xgb_archive(node, "iris_policy", path.read_bytes(), 4, 3, params)

    assert register(node, "iris_policy", "tree", version(y)) == 1
    cli(node, "transition", "iris_policy", "1", "offline_passed")
    cli(node, "transition", "iris_policy", "1", "promoted")
    http = httpclient.InferenceServerClient(node.http_url)
    wait_for("iris_policy routed", lambda: http.is_model_ready("iris_policy"))
    stop, failures = threading.Event(), []

    def traffic():
        client = httpclient.InferenceServerClient(node.http_url)
        i = 0
        while not stop.is_set():
            try:
                infer(client, httpclient, "iris_policy", X[i % 150: i % 150 + 8], f"u{i % 40}")
            except Exception as e:  # noqa: BLE001 - every failure is reported
                failures.append(repr(e))
            i += 8

    worker = threading.Thread(target=traffic)
    worker.start()
    api = Api(node)
    try:
        # The same training: full agreement, promoted by the policy.
        assert register(node, "iris_policy", "tree", version(y)) == 2
        cli(node, "transition", "iris_policy", "2", "offline_passed")
        cli(node, "transition", "iris_policy", "2", "shadow")
        wait_for("v2 promoted by the policy",
                 lambda: api.get("/models/iris_policy/versions/2").json()["state"] == "promoted", timeout=240)
        # Labels rotated: the argmax agrees on no row.
        assert register(node, "iris_policy", "tree", version((y + 1) % 3)) == 3
        cli(node, "transition", "iris_policy", "3", "offline_passed")
        cli(node, "transition", "iris_policy", "3", "shadow")
        wait_for("v3 rolled back by the policy",
                 lambda: api.get("/models/iris_policy/versions/3").json()["state"] == "rolled_back", timeout=240)
    finally:
        stop.set()
        worker.join(timeout=60)
    assert failures == [], failures[:3]
    audit = api.get("/audit", params={"model": "iris_policy"}).json()["entries"]
    # (Promoting v2 also deprecates v1, in the same step.)
    mine = [e for e in audit if e["actor"] == "rollout-policy:iris_policy" and e["version"] > 1]
    assert [(e["version"], e["action"]) for e in mine] == [
        (2, "transition"), (2, "transition"), (3, "rollback")], mine
    assert "argmax agreement 1.000" in mine[0]["details"]["reason"], mine[0]
    assert "argmax agreement 0.000" in mine[2]["details"]["reason"], mine[2]
