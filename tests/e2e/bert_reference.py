"""An independent reference for the sentence encoder: BERT's forward pass in
numpy, written from the architecture (embeddings, post-norm self-attention
layers with exact-erf GELU), reading the safetensors file directly, then mean
pooling over the attention mask and L2 normalization, as sentence-transformers'
all-MiniLM-L6-v2 does. Shares no code with the server's candle encoder."""
import json
import math
import struct
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

DTYPES = {"F32": np.float32, "I64": np.int64}


def load_safetensors(path: Path) -> dict[str, np.ndarray]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        start, end = t["data_offsets"]
        out[name] = np.frombuffer(data[start:end], dtype=DTYPES[t["dtype"]]).reshape(t["shape"])
    return out


def layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


_erf = np.vectorize(math.erf)


def gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


class Bert:
    def __init__(self, folder: Path):
        self.w = {k: v.astype(np.float64) for k, v in load_safetensors(folder / "model.safetensors").items()}
        self.cfg = json.loads((folder / "config.json").read_text())
        self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        # The file pads every sentence to 128 tokens; one sentence alone needs none.
        self.tok.no_padding()

    def linear(self, x, name):
        return x @ self.w[f"{name}.weight"].T + self.w[f"{name}.bias"]

    def norm(self, x, name):
        return layer_norm(x, self.w[f"{name}.weight"], self.w[f"{name}.bias"], self.cfg["layer_norm_eps"])

    def embed_one(self, text: str) -> np.ndarray:
        enc = self.tok.encode(text)
        ids, types = np.array(enc.ids), np.array(enc.type_ids)
        heads = self.cfg["num_attention_heads"]
        h = (self.w["embeddings.word_embeddings.weight"][ids]
             + self.w["embeddings.position_embeddings.weight"][: len(ids)]
             + self.w["embeddings.token_type_embeddings.weight"][types])
        h = self.norm(h, "embeddings.LayerNorm")
        n, d = h.shape
        dh = d // heads
        for i in range(self.cfg["num_hidden_layers"]):
            p = f"encoder.layer.{i}"
            split = lambda x: x.reshape(n, heads, dh).transpose(1, 0, 2)
            q = split(self.linear(h, f"{p}.attention.self.query"))
            k = split(self.linear(h, f"{p}.attention.self.key"))
            v = split(self.linear(h, f"{p}.attention.self.value"))
            scores = q @ k.transpose(0, 2, 1) / math.sqrt(dh)
            scores -= scores.max(-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(-1, keepdims=True)
            ctx = (probs @ v).transpose(1, 0, 2).reshape(n, d)
            h = self.norm(self.linear(ctx, f"{p}.attention.output.dense") + h, f"{p}.attention.output.LayerNorm")
            inner = gelu(self.linear(h, f"{p}.intermediate.dense"))
            h = self.norm(self.linear(inner, f"{p}.output.dense") + h, f"{p}.output.LayerNorm")
        pooled = h.mean(0)  # one sentence alone: every token is attended
        return pooled / np.linalg.norm(pooled)
