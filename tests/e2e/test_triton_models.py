"""Model repositories of the kind people already run on Triton: scikit-learn
pipelines exported with skl2onnx (ai.onnx.ml operators, `reshape` on the
label), served by onnxruntime (its library fetched from the onnxruntime wheel
and pinned by sha256) or tract, judged by tritonclient against scikit-learn."""
import json
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from google.protobuf.json_format import MessageToJson

from conftest import Triton
from test_triton import perf_analyzer_run
from triton_repo import fil_config, write_model

ORT_VERSION = "1.32.0"
ORT_FILE = f"onnxruntime/capi/libonnxruntime.so.{ORT_VERSION}"
ORT_SHA256 = "6c1585d1bbf45b0712ea4a21b705c5fcb4ba04ff2e30f1fbf81a49faf658638f"

PIPELINE_CONFIG = """platform: "onnxruntime_onnx"
max_batch_size: 256
input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [
  { name: "label" data_type: TYPE_INT64 dims: [ 1 ] reshape: { shape: [ ] } },
  { name: "probabilities" data_type: TYPE_FP32 dims: [ 3 ] }
]
dynamic_batching { max_queue_delay_microseconds: 1000 }
"""


ENSEMBLE = """platform: "ensemble"
max_batch_size: 256
input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [
  { name: "label" data_type: TYPE_INT64 dims: [ 1 ] },
  { name: "probabilities" data_type: TYPE_FP32 dims: [ 3 ] }
]
ensemble_scheduling { step [
  { model_name: "scaler" model_version: -1
    input_map { key: "X" value: "X" } output_map { key: "variable" value: "scaled" } },
  { model_name: "classifier" model_version: -1
    input_map { key: "X" value: "scaled" }
    output_map [ { key: "label" value: "label" }, { key: "probabilities" value: "probabilities" } ] }
] }
"""


def executor(name: str, **more: str) -> str:
    """The `parameters` line choosing an ONNX model's executor, with any more string parameters."""
    kv = {"executor": name, **more}
    return "parameters [ " + ", ".join(f'{{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in kv.items()) + " ]\n"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from skl2onnx import to_onnx
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    root = tmp_path_factory.mktemp("models")
    repo = root / "repo"
    X, y = load_iris(return_X_y=True)
    X = X.astype(np.float32)
    pipe = Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression(max_iter=500))]).fit(X, y)
    onx = to_onnx(pipe, X[:1], options={id(pipe.steps[-1][1]): {"zipmap": False}}, target_opset=17)
    assert [o.name for o in onx.graph.output] == ["label", "probabilities"]
    pipeline = onx.SerializeToString()
    # Served as the config asks: auto (tract refuses ai.onnx.ml, onnxruntime runs it).
    write_model(repo, "pipeline", PIPELINE_CONFIG, {"model.onnx": pipeline})
    write_model(repo, "pipeline_tract", PIPELINE_CONFIG + executor("tract"), {"model.onnx": pipeline})
    # String class labels: a BYTES output, and the same reshape.
    names = load_iris().target_names[y]
    spipe = Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression(max_iter=500))]).fit(X, names)
    sonx = to_onnx(spipe, X[:1], options={id(spipe.steps[-1][1]): {"zipmap": False}}, target_opset=17)
    write_model(repo, "pipeline_strings", PIPELINE_CONFIG.replace("TYPE_INT64", "TYPE_STRING"),
                {"model.onnx": sonx.SerializeToString()})
    # A graph tract runs too: the same model on either executor.
    mlp = MLPClassifier(hidden_layer_sizes=(16,), max_iter=2000, random_state=0).fit(X, y)
    mlp_onx = to_onnx(mlp, X[:1], options={id(mlp): {"zipmap": False}}, target_opset=17).SerializeToString()
    for name in ["tract", "onnxruntime"]:
        write_model(repo, f"mlp_{name}", PIPELINE_CONFIG + executor(name), {"model.onnx": mlp_onx})
    # Warmed up from zeros, random values and a file, 2 + 3 + 1 runs.
    warm = PIPELINE_CONFIG + """model_warmup [
  { name: "zeros" batch_size: 8 count: 2 inputs { key: "X" value: { data_type: TYPE_FP32 dims: [ 4 ] zero_data: true } } },
  { name: "random" batch_size: 1 count: 3 inputs { key: "X" value: { data_type: TYPE_FP32 dims: [ 4 ] random_data: true } } },
  { name: "file" batch_size: 2 inputs { key: "X" value: { data_type: TYPE_FP32 dims: [ 4 ] input_data_file: "row.bin" } } }
]
"""
    write_model(repo, "pipeline_warm", warm, {"model.onnx": pipeline})
    (repo / "pipeline_warm" / "warmup").mkdir()
    (repo / "pipeline_warm" / "warmup" / "row.bin").write_bytes(X[0].tobytes())
    write_model(repo, "bad_warmup", warm.replace('"row.bin"', '"missing.bin"'), {"model.onnx": pipeline})
    # The response cache.
    write_model(repo, "pipeline_cached", PIPELINE_CONFIG + "response_cache { enable: true }\n", {"model.onnx": pipeline})
    # The same pipeline as an ensemble: a scaler model feeding a classifier.
    scaler, clf = pipe.steps[0][1], pipe.steps[1][1]
    write_model(repo, "scaler", """platform: "onnxruntime_onnx"
max_batch_size: 256
input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "variable" data_type: TYPE_FP32 dims: [ 4 ] } ]
dynamic_batching { max_queue_delay_microseconds: 500 }
""", {"model.onnx": to_onnx(scaler, X[:1], target_opset=17).SerializeToString()})
    Xs = scaler.transform(X).astype(np.float32)
    write_model(repo, "classifier", PIPELINE_CONFIG,
                {"model.onnx": to_onnx(clf, Xs[:1], options={id(clf): {"zipmap": False}}, target_opset=17).SerializeToString()})
    write_model(repo, "pipeline_ensemble", ENSEMBLE, {})
    write_model(repo, "ensemble_cycle", ENSEMBLE.replace('value: "X" } output_map { key: "variable" value: "scaled"',
                                                         'value: "label" } output_map { key: "variable" value: "scaled"'), {})
    write_model(repo, "ensemble_missing", ENSEMBLE.replace('model_name: "scaler"', 'model_name: "nope"'), {})
    write_model(repo, "ensemble_ghost", ENSEMBLE.replace('input_map { key: "X" value: "scaled" }', 'input_map { key: "X" value: "ghost" }'), {})
    # A reshape whose element count differs from dims.
    write_model(repo, "bad_reshape", PIPELINE_CONFIG.replace("reshape: { shape: [ ] }", "reshape: { shape: [ 2 ] }"),
                {"model.onnx": pipeline})
    trees = tree_models(repo, root)
    expected = {
        "trees": trees,
        "X": X,
        "label": pipe.predict(X),
        "proba": pipe.predict_proba(X).astype(np.float32),
        "mlp_proba": mlp.predict_proba(X).astype(np.float32),
        "names": spipe.predict(X),
    }
    cfg = root / "config.yaml"
    cfg.write_text(
        f"model_repository:\n  path: {repo}\n  onnxruntime_library:\n    pypi:\n"
        f"      package: onnxruntime\n      version: '{ORT_VERSION}'\n"
        f"      file: {ORT_FILE}\n      sha256: {ORT_SHA256}\n")
    return repo, cfg, expected, pipeline


def tree_models(repo: Path, root: Path) -> dict:
    """XGBoost (JSON and UBJSON) and LightGBM models with categorical
    features and missing values, and a multi-target XGBoost regressor; each
    with the rows to send and the library's own predictions."""
    import lightgbm as lgb
    import pandas as pd
    import xgboost as xgb

    rng = np.random.default_rng(1)
    n = 400
    cat = rng.integers(0, 12, n).astype(np.float32)
    cat2 = rng.integers(0, 40, n).astype(np.float32)
    num = rng.normal(size=n).astype(np.float32)
    y = np.isin(cat, [1, 3, 7]) * 2.0 + (cat2 % 5 == 0) * 1.5 + num + rng.normal(scale=0.1, size=n)
    X = np.stack([cat, num, cat2], axis=1)
    X[rng.random(X.shape) < 0.1] = np.nan
    def categorical(col, k):
        return pd.Series(col).astype("Int64").astype(pd.CategoricalDtype(categories=range(k)))

    frame = pd.DataFrame({"c": categorical(X[:, 0], 12), "x": X[:, 1], "c2": categorical(X[:, 2], 40)})
    out = {}
    reg = xgb.XGBRegressor(n_estimators=30, max_depth=4, enable_categorical=True, tree_method="hist",
                           max_cat_to_onehot=1, random_state=0).fit(frame, y)
    want = reg.predict(frame).astype(np.float32).reshape(-1, 1)
    for fmt, ext in [("xgboost_json", "json"), ("xgboost_ubj", "ubj")]:
        path = root / f"cat_xgb.{ext}"
        reg.save_model(path)
        name = f"cat_{fmt}"
        write_model(repo, name, fil_config(name, 3, 1, {"model_type": fmt}), {f"xgboost.{ext}": path})
        out[name] = (X, want)
    trees_json = json.loads((root / "cat_xgb.json").read_text())["learner"]["gradient_booster"]["model"]["trees"]
    assert any(1 in t["split_type"] for t in trees_json), "the XGBoost model has no categorical split"
    clf = xgb.XGBClassifier(n_estimators=20, max_depth=3, enable_categorical=True, tree_method="hist",
                            max_cat_to_onehot=1, random_state=0).fit(frame, (y > 1.5).astype(int))
    clf.save_model(root / "cat_xgb_clf.json")
    write_model(repo, "cat_xgb_clf", fil_config("cat_xgb_clf", 3, 1, {"model_type": "xgboost_json"}),
                {"xgboost.json": root / "cat_xgb_clf.json"})
    out["cat_xgb_clf"] = (X, clf.predict_proba(frame)[:, 1:].astype(np.float32))
    g = lgb.LGBMRegressor(n_estimators=40, num_leaves=15, min_data_per_group=5, cat_smooth=1, verbose=-1,
                          random_state=0).fit(X, y, categorical_feature=[0, 2])
    g.booster_.save_model(str(root / "cat_lgbm.txt"))
    assert "cat_threshold=" in (root / "cat_lgbm.txt").read_text(), "the LightGBM model has no categorical split"
    write_model(repo, "cat_lgbm", fil_config("cat_lgbm", 3, 1, {"model_type": "lightgbm"}),
                {"model.txt": root / "cat_lgbm.txt"})
    out["cat_lgbm"] = (X, g.predict(X).astype(np.float32).reshape(-1, 1))
    # Multi-target regression, one tree per target per round.
    Y = np.stack([y, -2 * y + num], axis=1)
    multi = xgb.XGBRegressor(n_estimators=20, max_depth=3, tree_method="hist", multi_strategy="one_output_per_tree",
                             random_state=0).fit(X[:, 1:2], Y)
    multi.save_model(root / "multi.json")
    write_model(repo, "multi_xgb", fil_config("multi_xgb", 1, 2, {"model_type": "xgboost_json"}),
                {"xgboost.json": root / "multi.json"})
    out["multi_xgb"] = (np.ascontiguousarray(X[:, 1:2]), multi.predict(X[:, 1:2]).astype(np.float32))
    return out


@pytest.fixture(scope="module")
def triton(models):
    s = Triton(None, "--cache-config", "local,size=1048576", config=str(models[1]))
    yield s
    s.stop()


def infer(client, model, X, outputs):
    mod = httpclient if isinstance(client, httpclient.InferenceServerClient) else grpcclient
    i = mod.InferInput("X", list(X.shape), "FP32")
    i.set_data_from_numpy(X)
    res = client.infer(model, [i], outputs=[mod.InferRequestedOutput(o) for o in outputs])
    return [res.as_numpy(o) for o in outputs]


@pytest.mark.parametrize("proto", ["http", "grpc"])
def test_pipeline_with_reshape_equals_scikit_learn(triton, models, proto):
    _, _, expected, _ = models
    client = (httpclient.InferenceServerClient(triton.http_url) if proto == "http"
              else grpcclient.InferenceServerClient(triton.grpc_url))
    X = expected["X"]
    label, proba = infer(client, "pipeline", X, ["label", "probabilities"])
    # Clients see the declared dims, [N, 1]; the graph gives [N].
    assert label.shape == (len(X), 1)
    np.testing.assert_array_equal(label[:, 0], expected["label"])
    np.testing.assert_allclose(proba, expected["proba"], rtol=1e-5, atol=1e-6)
    meta = client.get_model_metadata("pipeline")
    if proto == "http":
        assert meta["outputs"][0]["shape"] == [-1, 1]
        config = client.get_model_config("pipeline")
    else:
        assert list(meta.outputs[0].shape) == [-1, 1]
        config = json.loads(MessageToJson(client.get_model_config("pipeline").config,
                                          preserving_proto_field_name=True))
    assert "reshape" in config["output"][0] and "reshape" not in config["output"][1]
    # Which executor serves it is in the completed config.
    assert config["parameters"]["executor"]["string_value"] == "onnxruntime"


@pytest.mark.parametrize("proto", ["http", "grpc"])
def test_string_labels_come_back_as_bytes(triton, models, proto):
    expected = models[2]
    client = (httpclient.InferenceServerClient(triton.http_url) if proto == "http"
              else grpcclient.InferenceServerClient(triton.grpc_url))
    label, proba = infer(client, "pipeline_strings", expected["X"], ["label", "probabilities"])
    assert label.shape == (len(expected["X"]), 1)
    assert [v.decode() for v in label[:, 0]] == list(expected["names"])
    np.testing.assert_allclose(proba, expected["proba"], rtol=1e-5, atol=1e-6)


def test_the_same_graph_on_tract_and_onnxruntime(triton, models):
    _, _, expected, _ = models
    client = httpclient.InferenceServerClient(triton.http_url)
    X = expected["X"]
    (tract,) = infer(client, "mlp_tract", X, ["probabilities"])
    (ort,) = infer(client, "mlp_onnxruntime", X, ["probabilities"])
    np.testing.assert_allclose(tract, expected["mlp_proba"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ort, expected["mlp_proba"], rtol=1e-5, atol=1e-6)
    for name, want in [("mlp_tract", "tract"), ("mlp_onnxruntime", "onnxruntime")]:
        assert client.get_model_config(name)["parameters"]["executor"]["string_value"] == want


def test_bad_models_fail_with_the_field_named(triton, models):
    repo = models[0]
    index = {m["name"]: m for m in httpx.post(f"{triton.url}/v2/repository/index", json={}).json()}
    # tract asked for explicitly names what it cannot run.
    reason = index["pipeline_tract"]["reason"]
    assert index["pipeline_tract"]["state"] == "UNAVAILABLE"
    assert str(repo / "pipeline_tract" / "1" / "model.onnx") in reason and "Scaler" in reason, reason
    reason = index["bad_reshape"]["reason"]
    assert str(repo / "bad_reshape" / "config.pbtxt") in reason and "output[0] ('label').reshape.shape" in reason, reason
    # The others serve.
    assert index["pipeline"]["state"] == "READY"


def test_a_missing_onnxruntime_library_fails_only_those_models(models, tmp_path):
    repo, _, expected, pipeline = models
    other = tmp_path / "repo"
    write_model(other, "pipeline", PIPELINE_CONFIG, {"model.onnx": pipeline})
    write_model(other, "mlp", PIPELINE_CONFIG, {"model.onnx": (repo / "mlp_tract" / "1" / "model.onnx").read_bytes()})
    missing = tmp_path / "nowhere" / "libonnxruntime.so"
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"model_repository:\n  path: {other}\n  onnxruntime_library:\n    path: {missing}\n")
    s = Triton(None, config=str(cfg))
    try:
        index = {m["name"]: m for m in httpx.post(f"{s.url}/v2/repository/index", json={}).json()}
        assert index["pipeline"]["state"] == "UNAVAILABLE"
        assert str(missing) in index["pipeline"]["reason"], index["pipeline"]["reason"]
        # tract runs the MLP without onnxruntime.
        client = httpclient.InferenceServerClient(s.http_url)
        (proba,) = infer(client, "mlp", expected["X"], ["probabilities"])
        np.testing.assert_allclose(proba, expected["mlp_proba"], rtol=1e-4, atol=1e-5)
        assert client.get_model_config("mlp")["parameters"]["executor"]["string_value"] == "tract"
    finally:
        s.stop()


def stats(client, model):
    return client.get_inference_statistics(model)["model_stats"][0]


def test_warmup_runs_before_the_model_is_ready(triton, models):
    client = httpclient.InferenceServerClient(triton.http_url)
    # Ready as soon as the server is: warmup ran during the load.
    assert client.is_model_ready("pipeline_warm")
    s = stats(client, "pipeline_warm")
    assert s["execution_count"] == 6, s
    assert s["inference_count"] == 2 * 8 + 3 * 1 + 1 * 2, s
    X = models[2]["X"]
    label, _ = infer(client, "pipeline_warm", X[:5], ["label", "probabilities"])
    np.testing.assert_array_equal(label[:, 0], models[2]["label"][:5])
    assert stats(client, "pipeline_warm")["execution_count"] == 7


def test_a_warmup_file_that_is_missing_fails_the_load(triton, models):
    index = {m["name"]: m for m in httpx.post(f"{triton.url}/v2/repository/index", json={}).json()}
    reason = index["bad_warmup"]["reason"]
    assert index["bad_warmup"]["state"] == "UNAVAILABLE"
    assert 'model_warmup[2] (\'file\').inputs["X"].input_data_file' in reason and "missing.bin" in reason, reason


@pytest.mark.parametrize("proto", ["http", "grpc"])
def test_a_repeated_request_is_a_cache_hit(triton, models, proto):
    client = (httpclient.InferenceServerClient(triton.http_url) if proto == "http"
              else grpcclient.InferenceServerClient(triton.grpc_url))
    X = models[2]["X"][10:13] + (0.5 if proto == "grpc" else 0.25)

    def counts():
        s = httpclient.InferenceServerClient(triton.http_url).get_inference_statistics("pipeline_cached")["model_stats"][0]
        inf = s["inference_stats"]
        return s["execution_count"], inf["cache_hit"]["count"], inf["cache_miss"]["count"]

    ex0, hit0, miss0 = counts()
    first = infer(client, "pipeline_cached", X, ["label", "probabilities"])
    second = infer(client, "pipeline_cached", X, ["label", "probabilities"])
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    ex1, hit1, miss1 = counts()
    assert (ex1 - ex0, hit1 - hit0, miss1 - miss0) == (1, 1, 1)
    # Another input is a miss.
    infer(client, "pipeline_cached", X + 1, ["label"])
    assert counts()[2] == miss1 + 1
    metrics = httpx.get(f"{triton.url}/metrics").text
    assert 'nv_cache_num_hits_per_model{model="pipeline_cached",version="1"}' in metrics


def test_a_cache_the_server_lacks_is_refused_by_name(models, tmp_path):
    repo, _, _, pipeline = models
    other = tmp_path / "repo"
    write_model(other, "cached", PIPELINE_CONFIG + "response_cache { enable: true }\n", {"model.onnx": pipeline})
    s = Triton(other)
    try:
        index = {m["name"]: m for m in httpx.post(f"{s.url}/v2/repository/index", json={}).json()}
        assert "response_cache.enable" in index["cached"]["reason"] and "--cache-config" in index["cached"]["reason"]
    finally:
        s.stop()


@pytest.mark.parametrize("proto", ["http", "grpc"])
def test_perf_analyzer_on_the_cached_model(triton, proto):
    perf_analyzer_run(triton, proto, "pipeline_cached")
    # perf_analyzer sends the same data each time: all but the first are hits.
    s = httpclient.InferenceServerClient(triton.http_url).get_inference_statistics("pipeline_cached")["model_stats"][0]
    assert s["inference_stats"]["cache_hit"]["count"] > 10, s


@pytest.mark.parametrize("proto", ["http", "grpc"])
def test_an_ensemble_equals_the_pipeline(triton, models, proto):
    expected = models[2]
    client = (httpclient.InferenceServerClient(triton.http_url) if proto == "http"
              else grpcclient.InferenceServerClient(triton.grpc_url))
    http = httpclient.InferenceServerClient(triton.http_url)
    before = {m: stats(http, m)["execution_count"] for m in ["scaler", "classifier"]}
    label, proba = infer(client, "pipeline_ensemble", expected["X"], ["label", "probabilities"])
    np.testing.assert_array_equal(label[:, 0], expected["label"])
    np.testing.assert_allclose(proba, expected["proba"], rtol=1e-5, atol=1e-6)
    # Each composing model ran, and is counted under its own name.
    for m in ["scaler", "classifier"]:
        assert stats(http, m)["execution_count"] > before[m]
    ens = stats(http, "pipeline_ensemble")
    assert ens["inference_stats"]["success"]["count"] >= 1 and ens["inference_count"] >= len(expected["X"])
    assert http.get_model_metadata("pipeline_ensemble")["platform"] == "ensemble"


def test_bad_ensembles_fail_with_the_field_named(triton, models):
    index = {m["name"]: m for m in httpx.post(f"{triton.url}/v2/repository/index", json={}).json()}
    for name, words in [("ensemble_cycle", ["ensemble_scheduling", "cycle"]),
                        ("ensemble_missing", ["ensemble_scheduling.step[0].model_name", "'nope'"]),
                        ("ensemble_ghost", ["ensemble_scheduling.step[1].input_map", "'ghost'"])]:
        m = index[name]
        assert m["state"] == "UNAVAILABLE", m
        assert str(models[0] / name / "config.pbtxt") in m["reason"], m
        for w in words:
            assert w in m["reason"], m


@pytest.mark.parametrize("proto", ["http", "grpc"])
def test_perf_analyzer_on_the_ensemble(triton, proto):
    out = perf_analyzer_run(triton, proto, "pipeline_ensemble")
    # perf_analyzer reports the composing models' own statistics.
    assert "Composing models" in out and "scaler" in out, out[-3000:]


@pytest.mark.parametrize("proto", ["http", "grpc"])
@pytest.mark.parametrize("model", ["cat_xgboost_json", "cat_xgboost_ubj", "cat_xgb_clf", "cat_lgbm", "multi_xgb"])
def test_trees_with_categories_equal_the_library(triton, models, proto, model):
    X, want = models[2]["trees"][model]
    client = (httpclient.InferenceServerClient(triton.http_url) if proto == "http"
              else grpcclient.InferenceServerClient(triton.grpc_url))
    mod = httpclient if proto == "http" else grpcclient
    i = mod.InferInput("input__0", list(X.shape), "FP32")
    i.set_data_from_numpy(X)
    got = client.infer(model, [i]).as_numpy("output__0")
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_with_no_library_configured_the_pinned_wheel_serves(models, tmp_path):
    _, _, expected, pipeline = models
    other = tmp_path / "repo"
    write_model(other, "pipeline", PIPELINE_CONFIG, {"model.onnx": pipeline})
    s = Triton(other)
    try:
        client = httpclient.InferenceServerClient(s.http_url)
        label, _ = infer(client, "pipeline", expected["X"], ["label", "probabilities"])
        np.testing.assert_array_equal(label[:, 0], expected["label"])
        assert client.get_model_config("pipeline")["parameters"]["executor"]["string_value"] == "onnxruntime"
    finally:
        s.stop()
