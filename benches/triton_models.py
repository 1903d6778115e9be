"""Model repositories people bring from Triton, measured: a scikit-learn
Pipeline(StandardScaler, LogisticRegression) exported with skl2onnx, served
on onnxruntime (tract cannot run its ai.onnx.ml operators) and as an
ensemble (scaler model -> classifier model); an MLP that both executors run,
on tract and on onnxruntime; the pipeline with the response cache (every
request a hit after the first). perf_analyzer over gRPC, concurrency 1 and
8, batch 1. Anchor in the same run: the pipeline in onnxruntime in-process
(Python's InferenceSession) at batch 1. Also the first request after a load
against the tenth, with and without model_warmup.

    cargo build --release -p gateway
    .venv/bin/python benches/triton_models.py
"""
import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
from test_triton_models import ENSEMBLE, PIPELINE_CONFIG, executor  # noqa: E402
from triton_plane import library_rate, perf, perf_env  # noqa: E402
from triton_repo import write_model  # noqa: E402


def iris_mlp():
    """An MLP classifier of iris, as ONNX (skl2onnx, probabilities without a zipmap)."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_iris
    from sklearn.neural_network import MLPClassifier

    X, y = load_iris(return_X_y=True)
    X = X.astype(np.float32)
    mlp = MLPClassifier(hidden_layer_sizes=(16,), max_iter=2000, random_state=0).fit(X, y)
    return to_onnx(mlp, X[:1], options={id(mlp): {"zipmap": False}}, target_opset=17).SerializeToString()


def onnxruntime_lib():
    """The shared library of the onnxruntime wheel in this environment."""
    import onnxruntime as ort
    return next((Path(ort.__file__).parent / "capi").glob("libonnxruntime.so.*"))


def serve(binary, repository, http_port, grpc_url, env, *extra):
    """Starts `switchyard serve` on `repository`; returns it and a gRPC client once it is ready."""
    import tritonclient.grpc as g
    s = subprocess.Popen([binary, "serve", "--model-repository", str(repository), "--http", f"127.0.0.1:{http_port}",
                          "--grpc", grpc_url, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    client = g.InferenceServerClient(grpc_url)
    for _ in range(300):
        try:
            if client.is_server_ready():
                return s, client
        except Exception:
            pass
        time.sleep(0.1)
    raise RuntimeError("the server did not come up")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=str(ROOT / "target" / "release" / "switchyard"))
    ap.add_argument("--window-ms", type=int, default=3000)
    ap.add_argument("--concurrency", default="1,8")
    args = ap.parse_args()

    import onnxruntime as ort
    import tritonclient.grpc as g
    from skl2onnx import to_onnx
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    work = Path(tempfile.mkdtemp(prefix="switchyard-models-"))
    repo = work / "repo"
    X, y = load_iris(return_X_y=True)
    X = X.astype(np.float32)
    pipe = Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression(max_iter=500))]).fit(X, y)
    clf = pipe.steps[1][1]
    pipeline = to_onnx(pipe, X[:1], options={id(clf): {"zipmap": False}}, target_opset=17).SerializeToString()
    mlp_onx = iris_mlp()
    write_model(repo, "pipeline", PIPELINE_CONFIG, {"model.onnx": pipeline})
    write_model(repo, "pipeline_cached", PIPELINE_CONFIG + "response_cache { enable: true }\n", {"model.onnx": pipeline})
    for name in ["tract", "onnxruntime"]:
        write_model(repo, f"mlp_{name}", PIPELINE_CONFIG + executor(name), {"model.onnx": mlp_onx})
    write_model(repo, "scaler", """platform: "onnxruntime_onnx"
max_batch_size: 256
input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "variable" data_type: TYPE_FP32 dims: [ 4 ] } ]
dynamic_batching { max_queue_delay_microseconds: 1000 }
""", {"model.onnx": to_onnx(pipe.steps[0][1], X[:1], target_opset=17).SerializeToString()})
    Xs = pipe.steps[0][1].transform(X).astype(np.float32)
    write_model(repo, "classifier", PIPELINE_CONFIG,
                {"model.onnx": to_onnx(clf, Xs[:1], options={id(clf): {"zipmap": False}}, target_opset=17).SerializeToString()})
    write_model(repo, "pipeline_ensemble", ENSEMBLE, {})
    warm = PIPELINE_CONFIG + """model_warmup [ { name: "zeros" batch_size: 1 count: 3
  inputs { key: "X" value: { data_type: TYPE_FP32 dims: [ 4 ] zero_data: true } } } ]
"""

    port, grpc_port = 18610, 18611
    url = f"127.0.0.1:{grpc_port}"
    env = dict(perf_env(), SWITCHYARD_ONNXRUNTIME_LIB=str(onnxruntime_lib()))

    def start(repository):
        return serve(args.bin, repository, port, url, env, "--cache-config", "local,size=1048576")

    models = ["pipeline", "pipeline_ensemble", "pipeline_cached", "mlp_tract", "mlp_onnxruntime"]
    server, client = start(repo)
    rows = []
    try:
        for m in models:
            assert client.is_model_ready(m), m
            for c in [int(c) for c in args.concurrency.split(",")]:
                rate, p99 = perf(m, url, c, args.window_ms)
                rows.append((m, c, rate, p99))
                print(f"{m} c={c}: {rate:.0f}/s p99 {p99:.2f} ms", flush=True)
        # The executor's own time per batch, from the server's statistics.
        compute = {}
        for m in models:
            st = client.get_inference_statistics(m, as_json=True)["model_stats"][0]
            infer = st["inference_stats"]["compute_infer"]
            executions = int(st.get("execution_count", 0))
            compute[m] = int(infer.get("ns", 0)) / executions / 1e3 if executions else None
    finally:
        server.terminate()
        server.wait()
    sess = ort.InferenceSession(pipeline, providers=["CPUExecutionProvider"])
    anchor = library_rate(lambda: sess.run(None, {"X": X[:1]}))

    print("\n| model (executor) | concurrency | infer/s | p99 ms | executor µs per batch (all runs) | ours ÷ onnxruntime in-process (batch 1) |")
    print("|---|---|---|---|---|---|")
    what = {"pipeline": "pipeline (onnxruntime)", "pipeline_ensemble": "ensemble scaler → classifier (onnxruntime ×2)",
            "pipeline_cached": "pipeline, response cache hits", "mlp_tract": "MLP (tract)",
            "mlp_onnxruntime": "MLP (onnxruntime)"}
    for m, c, rate, p99 in rows:
        us = f"{compute[m]:.1f}" if compute[m] else "—"
        print(f"| {what[m]} | {c} | {rate:.0f} | {p99:.2f} | {us} | {rate / anchor:.3f} |")
    print(f"| anchor: pipeline in onnxruntime's own InferenceSession.run, batch 1 | — | {anchor:.0f} | — "
          f"| {1e6 / anchor:.1f} | 1.000 |")

    # The first request after a load against the tenth, with and without warmup.
    print("\n| model | first request ms | tenth request ms | first ÷ tenth |")
    print("|---|---|---|---|")
    for label, config in [("pipeline, no warmup", PIPELINE_CONFIG), ("pipeline, model_warmup ×3", warm)]:
        one = work / "one"
        if one.exists():
            import shutil
            shutil.rmtree(one)
        write_model(one, "m", config, {"model.onnx": pipeline})
        server, client = start(one)
        try:
            times = []
            for _ in range(10):
                i = g.InferInput("X", [1, 4], "FP32")
                i.set_data_from_numpy(X[:1])
                t = time.perf_counter()
                client.infer("m", [i])
                times.append((time.perf_counter() - t) * 1e3)
        finally:
            server.terminate()
            server.wait()
        print(f"| {label} | {times[0]:.2f} | {times[9]:.2f} | {times[0] / times[9]:.2f} |")


if __name__ == "__main__":
    main()
