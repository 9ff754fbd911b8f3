"""An independent forward pass of a GGUF file in numpy, for the exactness tests.

Nothing here shares code with selfextend_mlx or mlx-lm: the file is read by the `gguf`
package's own GGUFReader and dequantizer, and the model is computed as llama.cpp computes it
from the stored tensors, with llama.cpp's conventions rather than Hugging Face's:

- llama: q/k rows stay in llama.cpp's permuted order and the rotary embedding turns adjacent
  pairs (llama.cpp's "normal" rope), so the loader's un-permutation is checked, not repeated;
- gemma3: norm weights are used as stored (1 + w, llama.cpp's plain multiply), so the
  loader's "- 1" is checked; the rotary embedding turns halves ("neox"); sliding layers
  (all but every sixth) see the last `sliding_window` keys with the local base 10000.

One deliberate match with mlx-lm: Gemma's embedding scale sqrt(hidden) is rounded to bf16
(as mlx-lm and Hugging Face's bf16 Gemma do; llama.cpp keeps it in fp32).
"""

import numpy as np


class Reference:
    def __init__(self, path):
        from gguf import GGUFReader
        from gguf.quants import dequantize

        reader = GGUFReader(str(path))
        self.meta = {}
        for name, fld in reader.fields.items():
            if not name.startswith("tokenizer.") and fld.data:
                self.meta[name] = fld.contents()
        self.arch = self.meta["general.architecture"]
        self.tensors = {}
        for tensor in reader.tensors:
            values = dequantize(tensor.data, tensor.tensor_type)
            self.tensors[tensor.name] = np.asarray(values, np.float32).reshape(tuple(reversed(tensor.shape.tolist())))

    def get(self, key, default=None):
        return self.meta.get(f"{self.arch}.{key}", default)

    def w(self, name):
        return self.tensors[name]

    # ------------------------------------------------------------ pieces

    def rms(self, x, weight):
        eps = self.get("attention.layer_norm_rms_epsilon")
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight

    @staticmethod
    def rope(x, positions, base, neox):
        """x: (n, heads, d). neox turns (i, i + d/2) pairs, llama.cpp's normal rope (i, i + 1) pairs."""
        d = x.shape[-1]
        freqs = base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
        angles = positions[:, None].astype(np.float64) * freqs[None]
        cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
        if neox:
            a, b = x[..., : d // 2], x[..., d // 2 :]
            return np.concatenate([a * cos - b * sin, a * sin + b * cos], -1).astype(np.float32)
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
        return out

    def attention(self, i, x, window):
        n = x.shape[0]
        heads, kv = self.get("attention.head_count"), self.get("attention.head_count_kv")
        blk = f"blk.{i}."
        q = (x @ self.w(blk + "attn_q.weight").T).reshape(n, heads, -1)
        k = (x @ self.w(blk + "attn_k.weight").T).reshape(n, kv, -1)
        v = (x @ self.w(blk + "attn_v.weight").T).reshape(n, kv, -1)
        d = q.shape[-1]
        gemma = self.arch == "gemma3"
        if gemma:
            q, k = self.rms(q, self.w(blk + "attn_q_norm.weight")), self.rms(k, self.w(blk + "attn_k_norm.weight"))
        local = gemma and i % 6 != 5
        base = 10000.0 if local else self.get("rope.freq_base", 10000.0)
        pos = np.arange(n)
        q, k = self.rope(q, pos, base, neox=gemma), self.rope(k, pos, base, neox=gemma)
        k, v = np.repeat(k, heads // kv, axis=1), np.repeat(v, heads // kv, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d)
        allowed = pos[None, :] <= pos[:, None]
        if local:
            allowed &= pos[:, None] - pos[None, :] < window
        scores = np.where(allowed[None], scores, -np.inf)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        out = np.einsum("hqk,khd->qhd", probs, v).reshape(n, -1)
        return out @ self.w(blk + "attn_output.weight").T

    def mlp(self, i, x):
        blk = f"blk.{i}."
        gate, up = x @ self.w(blk + "ffn_gate.weight").T, x @ self.w(blk + "ffn_up.weight").T
        if self.arch == "gemma3":
            act = 0.5 * gate * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate**3)))
        else:
            act = gate / (1 + np.exp(-gate))
        return (act * up) @ self.w(blk + "ffn_down.weight").T

    # ------------------------------------------------------------ the model

    def hidden(self, tokens) -> np.ndarray:
        """The final normed hidden states (n, hidden) for a list of token ids."""
        h = self.w("token_embd.weight")[np.asarray(tokens)]
        gemma = self.arch == "gemma3"
        if gemma:
            h = h * _bf16(np.sqrt(h.shape[-1]))
        window = self.get("attention.sliding_window", 0)
        for i in range(self.get("block_count")):
            blk = f"blk.{i}."
            if gemma:
                h = h + self.rms(self.attention(i, self.rms(h, self.w(blk + "attn_norm.weight")), window),
                                 self.w(blk + "post_attention_norm.weight"))  # fmt: skip
                h = h + self.rms(self.mlp(i, self.rms(h, self.w(blk + "ffn_norm.weight"))),
                                 self.w(blk + "post_ffw_norm.weight"))  # fmt: skip
            else:
                h = h + self.attention(i, self.rms(h, self.w(blk + "attn_norm.weight")), window)
                h = h + self.mlp(i, self.rms(h, self.w(blk + "ffn_norm.weight")))
        return self.rms(h, self.w("output_norm.weight"))

    def logits(self, hidden) -> np.ndarray:
        head = self.tensors.get("output.weight", self.w("token_embd.weight"))
        return hidden @ head.T

    def greedy(self, tokens, steps: int) -> list:
        out = list(tokens)
        for _ in range(steps):
            out.append(int(self.logits(self.hidden(out)[-1:])[0].argmax()))
        return out[len(tokens) :]


def _bf16(value: float) -> np.float32:
    bits = np.array([value], np.float32).view(np.uint32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # round to nearest even
    return rounded.view(np.float32)[0]
