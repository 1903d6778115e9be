"""The ONNX executors alone: the time the server's executor spends per
request (its `compute_infer` statistics) for three models served on tract and
on onnxruntime side by side, sequential gRPC requests of batch 1 with no
batcher, so every request is one execution. The anchor is onnxruntime in the
same server and run: tract ÷ onnxruntime.

    cargo build --release -p gateway
    .venv/bin/python benches/onnx_executors.py

The models are built here with the `onnx` package and seeded random weights:
the iris MLP of `triton_models.py` (skl2onnx: a few microseconds of
arithmetic, so the executor's own bookkeeping), a small CNN on 3×64×64 images
(three 3×3 convolutions, batch norm, a residual add, SiLU, pooling, a dense
layer, softmax) and a transformer MLP block on 64 tokens of width 256 (layer
norm, GELU by `Erf`, two matmuls, a residual add, softmax).
"""
import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
from test_triton_models import executor  # noqa: E402
from triton_repo import write_model  # noqa: E402


def cnn(onnx, h, nh, T):
    rng = np.random.default_rng(0)

    def w(name, *shape):
        return nh.from_array((rng.standard_normal(shape) * 0.1).astype(np.float32), name)

    inits = [w("c1", 32, 3, 3, 3), w("b1", 32), w("c2", 32, 32, 3, 3), w("b2", 32),
             w("c3", 32, 32, 3, 3), w("b3", 32), w("s", 32), w("o", 32), w("m", 32),
             nh.from_array(np.ones(32, np.float32), "v"), w("fc", 32, 10), w("fb", 10)]
    nodes = [
        h.make_node("Conv", ["x", "c1", "b1"], ["a1"], pads=[1, 1, 1, 1]),
        h.make_node("Relu", ["a1"], ["r1"]),
        h.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        h.make_node("Conv", ["p1", "c2", "b2"], ["a2"], pads=[1, 1, 1, 1]),
        h.make_node("BatchNormalization", ["a2", "s", "o", "m", "v"], ["n2"]),
        h.make_node("Relu", ["n2"], ["r2"]),
        h.make_node("Conv", ["r2", "c3", "b3"], ["a3"], pads=[1, 1, 1, 1]),
        h.make_node("Add", ["a3", "p1"], ["s3"]),
        h.make_node("Sigmoid", ["s3"], ["g3"]),
        h.make_node("Mul", ["s3", "g3"], ["r3"]),
        h.make_node("GlobalAveragePool", ["r3"], ["gp"]),
        h.make_node("Flatten", ["gp"], ["f"]),
        h.make_node("Gemm", ["f", "fc", "fb"], ["l"]),
        h.make_node("Softmax", ["l"], ["y"], axis=1),
    ]
    g = h.make_graph(nodes, "cnn", [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, 64, 64])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["N", 10])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)]).SerializeToString()


def block(onnx, h, nh, T, d=256, f=1024):
    rng = np.random.default_rng(1)

    def w(name, *shape):
        return nh.from_array((rng.standard_normal(shape) * 0.1).astype(np.float32), name)

    def c(name, value):
        return nh.from_array(np.array(value, np.float32), name)

    inits = [w("w1", d, f), w("b1", f), w("w2", f, d), w("b2", d),
             nh.from_array(np.ones(d, np.float32), "gam"), w("bet", d),
             c("sq2", 2 ** 0.5), c("one", 1.0), c("half", 0.5)]
    nodes = [
        h.make_node("LayerNormalization", ["x", "gam", "bet"], ["ln"], axis=-1),
        h.make_node("MatMul", ["ln", "w1"], ["m1"]), h.make_node("Add", ["m1", "b1"], ["a1"]),
        h.make_node("Div", ["a1", "sq2"], ["d1"]), h.make_node("Erf", ["d1"], ["e1"]),
        h.make_node("Add", ["e1", "one"], ["e2"]), h.make_node("Mul", ["a1", "e2"], ["e3"]),
        h.make_node("Mul", ["e3", "half"], ["ge"]),
        h.make_node("MatMul", ["ge", "w2"], ["m2"]), h.make_node("Add", ["m2", "b2"], ["a2"]),
        h.make_node("Add", ["a2", "x"], ["y0"]),
        h.make_node("Softmax", ["y0"], ["y"], axis=-1),
    ]
    g = h.make_graph(nodes, "block", [h.make_tensor_value_info("x", T.FLOAT, ["N", 64, d])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["N", 64, d])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)]).SerializeToString()


def config(inp, out, dims_in, dims_out):
    return f"""platform: "onnxruntime_onnx"
max_batch_size: 8
input [ {{ name: "{inp}" data_type: TYPE_FP32 dims: [ {", ".join(map(str, dims_in))} ] }} ]
output [ {{ name: "{out}" data_type: TYPE_FP32 dims: [ {", ".join(map(str, dims_out))} ] }} ]
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=str(ROOT / "target" / "release" / "switchyard"))
    ap.add_argument("--requests", type=int, default=200, help="timed requests per model (after 10 untimed)")
    ap.add_argument("--rounds", type=int, default=3, help="passes over the models, interleaved")
    args = ap.parse_args()

    import onnx
    import onnxruntime as ort
    import tritonclient.grpc as g
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh
    from skl2onnx import to_onnx
    from sklearn.datasets import load_iris
    from sklearn.neural_network import MLPClassifier

    X, y = load_iris(return_X_y=True)
    X = X.astype(np.float32)
    mlp = MLPClassifier(hidden_layer_sizes=(16,), max_iter=2000, random_state=0).fit(X, y)
    mlp_onx = to_onnx(mlp, X[:1], options={id(mlp): {"zipmap": False}}, target_opset=17).SerializeToString()
    models = {
        "mlp": (mlp_onx, config("X", "probabilities", [4], [3]), "X", X[:1]),
        "cnn": (cnn(onnx, h, nh, T), config("x", "y", [3, 64, 64], [10]), "x",
                np.random.default_rng(2).random((1, 3, 64, 64), np.float32)),
        "block": (block(onnx, h, nh, T), config("x", "y", [64, 256], [64, 256]), "x",
                  np.random.default_rng(3).random((1, 64, 256), np.float32)),
    }
    repo = Path(tempfile.mkdtemp(prefix="switchyard-executors-"))
    for name, (model, cfg, _, _) in models.items():
        # tract runs a model on one thread; onnxruntime is given one as well
        # (the client shares the cores).
        one = ' ]\n', ', { key: "intra_op_thread_count" value: { string_value: "1" } } ]\n'
        write_model(repo, f"{name}_tract", cfg + executor("tract"), {"model.onnx": model})
        write_model(repo, f"{name}_onnxruntime", cfg + executor("onnxruntime").replace(*one), {"model.onnx": model})
    lib = next((Path(ort.__file__).parent / "capi").glob("libonnxruntime.so.*"))
    url = "127.0.0.1:18621"
    env = {"SWITCHYARD_ONNXRUNTIME_LIB": str(lib), "PATH": "/usr/bin:/bin"}
    server = subprocess.Popen([args.bin, "serve", "--model-repository", str(repo), "--http", "127.0.0.1:18620",
                               "--grpc", url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        client = g.InferenceServerClient(url)
        for _ in range(300):
            try:
                if client.is_server_ready():
                    break
            except Exception:
                pass
            time.sleep(0.1)
        else:
            raise RuntimeError("the server did not come up")
        per = {}
        for _ in range(args.rounds):
            for name, (_, _, inp, data) in models.items():
                for ex in ["tract", "onnxruntime"]:
                    m = f"{name}_{ex}"
                    i = g.InferInput(inp, list(data.shape), "FP32")
                    i.set_data_from_numpy(data)
                    before = stats(client, m)
                    for k in range(10 + args.requests):
                        if k == 10:
                            before = stats(client, m)
                        client.infer(m, [i])
                    ns, n = (a - b for a, b in zip(stats(client, m), before))
                    per.setdefault(m, []).append(ns / n / 1e3)
    finally:
        server.terminate()
        server.wait()
    print("\n| model | tract µs per request (each round) | onnxruntime µs (each round) | tract ÷ onnxruntime (median) |")
    print("|---|---|---|---|")
    for name in models:
        t, o = per[f"{name}_tract"], per[f"{name}_onnxruntime"]
        fmt = " / ".join
        print(f"| {name} | {fmt(f'{v:.1f}' for v in t)} | {fmt(f'{v:.1f}' for v in o)} "
              f"| {statistics.median(t) / statistics.median(o):.2f} |")


def stats(client, model):
    """(ns, count) of the model's `compute_infer` so far."""
    st = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    infer = st["inference_stats"]["compute_infer"]
    return int(infer.get("ns", 0)), int(infer.get("count", 0))


if __name__ == "__main__":
    main()
