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
import itertools
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
from test_triton_models import executor  # noqa: E402
from triton_models import iris_mlp, onnxruntime_lib, serve  # noqa: E402
from triton_repo import write_model  # noqa: E402


def weights(seed):
    """A namer of seeded random initializers: `w(name, *shape)`."""
    rng = np.random.default_rng(seed)
    return lambda name, *shape: nh.from_array((rng.standard_normal(shape) * 0.1).astype(np.float32), name)


def constant(name, value):
    return nh.from_array(np.asarray(value, np.float32), name)


def graph(name, nodes, inits, x_dims, y_dims):
    """A float32 graph from `x` (batch `N` first) to `y`, serialized at opset 17."""
    g = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_dims])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", *y_dims])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def cnn():
    w, n = weights(0), helper.make_node
    inits = [w("c1", 32, 3, 3, 3), w("b1", 32), w("c2", 32, 32, 3, 3), w("b2", 32),
             w("c3", 32, 32, 3, 3), w("b3", 32), w("s", 32), w("o", 32), w("m", 32),
             constant("v", np.ones(32)), w("fc", 32, 10), w("fb", 10)]
    nodes = [
        n("Conv", ["x", "c1", "b1"], ["a1"], pads=[1, 1, 1, 1]),
        n("Relu", ["a1"], ["r1"]),
        n("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        n("Conv", ["p1", "c2", "b2"], ["a2"], pads=[1, 1, 1, 1]),
        n("BatchNormalization", ["a2", "s", "o", "m", "v"], ["n2"]),
        n("Relu", ["n2"], ["r2"]),
        n("Conv", ["r2", "c3", "b3"], ["a3"], pads=[1, 1, 1, 1]),
        n("Add", ["a3", "p1"], ["s3"]),
        n("Sigmoid", ["s3"], ["g3"]),
        n("Mul", ["s3", "g3"], ["r3"]),
        n("GlobalAveragePool", ["r3"], ["gp"]),
        n("Flatten", ["gp"], ["f"]),
        n("Gemm", ["f", "fc", "fb"], ["l"]),
        n("Softmax", ["l"], ["y"], axis=1),
    ]
    return graph("cnn", nodes, inits, [3, 64, 64], [10])


def block(d=256, f=1024):
    w, n = weights(1), helper.make_node
    inits = [w("w1", d, f), w("b1", f), w("w2", f, d), w("b2", d), constant("gam", np.ones(d)), w("bet", d),
             constant("sq2", 2 ** 0.5), constant("one", 1.0), constant("half", 0.5)]
    nodes = [
        n("LayerNormalization", ["x", "gam", "bet"], ["ln"], axis=-1),
        n("MatMul", ["ln", "w1"], ["m1"]), n("Add", ["m1", "b1"], ["a1"]),
        n("Div", ["a1", "sq2"], ["d1"]), n("Erf", ["d1"], ["e1"]),
        n("Add", ["e1", "one"], ["e2"]), n("Mul", ["a1", "e2"], ["e3"]),
        n("Mul", ["e3", "half"], ["ge"]),
        n("MatMul", ["ge", "w2"], ["m2"]), n("Add", ["m2", "b2"], ["a2"]),
        n("Add", ["a2", "x"], ["y0"]),
        n("Softmax", ["y0"], ["y"], axis=-1),
    ]
    return graph("block", nodes, inits, [64, d], [64, d])


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

    from sklearn.datasets import load_iris

    models = {
        "mlp": (iris_mlp(), config("X", "probabilities", [4], [3]), "X", load_iris().data[:1].astype(np.float32)),
        "cnn": (cnn(), config("x", "y", [3, 64, 64], [10]), "x",
                np.random.default_rng(2).random((1, 3, 64, 64), np.float32)),
        "block": (block(), config("x", "y", [64, 256], [64, 256]), "x",
                  np.random.default_rng(3).random((1, 64, 256), np.float32)),
    }
    with tempfile.TemporaryDirectory(prefix="switchyard-executors-") as repo:
        per = run(args, models, Path(repo))
    print("\n| model | tract µs per request (each round) | onnxruntime µs (each round) | tract ÷ onnxruntime (median) |")
    print("|---|---|---|---|")
    for name in models:
        t, o = per[f"{name}_tract"], per[f"{name}_onnxruntime"]
        fmt = " / ".join
        print(f"| {name} | {fmt(f'{v:.1f}' for v in t)} | {fmt(f'{v:.1f}' for v in o)} "
              f"| {statistics.median(t) / statistics.median(o):.2f} |")


def run(args, models, repo):
    """Serves every model on both executors from `repo`; µs of `compute_infer` a request, per model and round."""
    for name, (model, cfg, _, _) in models.items():
        write_model(repo, f"{name}_tract", cfg + executor("tract"), {"model.onnx": model})
        # tract runs a model on one thread; onnxruntime is given one as well
        # (the client shares the cores).
        write_model(repo, f"{name}_onnxruntime", cfg + executor("onnxruntime", intra_op_thread_count="1"),
                    {"model.onnx": model})
    url = "127.0.0.1:18621"
    env = {"SWITCHYARD_ONNXRUNTIME_LIB": str(onnxruntime_lib()), "PATH": "/usr/bin:/bin"}
    server, client = serve(args.bin, repo, 18620, url, env)
    try:
        per = {}
        for _, (name, (_, _, inp, data)), ex in itertools.product(range(args.rounds), models.items(),
                                                                   ["tract", "onnxruntime"]):
            per.setdefault(f"{name}_{ex}", []).append(timed(client, f"{name}_{ex}", inp, data, args.requests))
    finally:
        server.terminate()
        server.wait()
    return per


def timed(client, model, inp, data, requests):
    """µs of the model's `compute_infer` a request, over `requests` after 10 untimed."""
    import tritonclient.grpc as grpcclient

    i = grpcclient.InferInput(inp, list(data.shape), "FP32")
    i.set_data_from_numpy(data)
    for _ in range(10):
        client.infer(model, [i])
    before = stats(client, model)
    for _ in range(requests):
        client.infer(model, [i])
    ns, n = (a - b for a, b in zip(stats(client, model), before))
    return ns / n / 1e3


def stats(client, model):
    """(ns, count) of the model's `compute_infer` so far."""
    st = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    infer = st["inference_stats"]["compute_infer"]
    return int(infer.get("ns", 0)), int(infer.get("count", 0))


if __name__ == "__main__":
    main()
