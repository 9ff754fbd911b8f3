"""A small GGUF writer for tests: F32, F16, Q8_0, Q4_0, Q4_1 tensors (and raw bytes of any
other type id, to test the errors). Written from the GGUF spec (ggml docs/gguf.md) and the
ggml block layouts, so the loader is checked against MLX's own GGUF reader.
"""

import struct

import numpy as np

TYPE_IDS = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 8, "Q4_K": 12, "BF16": 30, "T99": 99}
BLOCK = 32
ALIGNMENT = 32


def _string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _value(value) -> bytes:
    """(type id, payload) for a metadata value."""
    if isinstance(value, bool):
        return struct.pack("<I?", 7, value)
    if isinstance(value, int):
        return struct.pack("<Ii", 5, value) if value < 2**31 else struct.pack("<IQ", 10, value)
    if isinstance(value, float):
        return struct.pack("<If", 6, value)
    if isinstance(value, str):
        return struct.pack("<I", 8) + _string(value)
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, str) for v in value):
            return struct.pack("<IIQ", 9, 8, len(value)) + b"".join(_string(v) for v in value)
        if all(isinstance(v, float) for v in value):
            return struct.pack("<IIQ", 9, 6, len(value)) + np.asarray(value, "<f4").tobytes()
        return struct.pack("<IIQ", 9, 5, len(value)) + np.asarray(value, "<i4").tobytes()
    raise TypeError(f"cannot write {value!r}")


def _blocks(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32).reshape(-1, BLOCK)


def quantize_q8_0(x: np.ndarray) -> bytes:
    blocks = _blocks(x)
    d = np.abs(blocks).max(axis=1) / 127
    q = np.round(blocks / np.where(d == 0, 1, d)[:, None]).clip(-127, 127).astype(np.int8)
    out = np.zeros(len(blocks), dtype=[("d", "<f2"), ("q", "i1", BLOCK)])
    out["d"], out["q"] = d, q
    return out.tobytes()


def _nibbles(q: np.ndarray) -> np.ndarray:
    # Element i sits in the low nibble of byte i, element i + 16 in its high nibble.
    return (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)


def quantize_q4_0(x: np.ndarray) -> bytes:
    blocks = _blocks(x)
    extreme = blocks[np.arange(len(blocks)), np.abs(blocks).argmax(axis=1)]
    d = extreme / -8
    q = (np.round(blocks / np.where(d == 0, 1, d)[:, None]) + 8).clip(0, 15).astype(np.uint8)
    out = np.zeros(len(blocks), dtype=[("d", "<f2"), ("q", "u1", 16)])
    out["d"], out["q"] = d, _nibbles(q)
    return out.tobytes()


def quantize_q4_1(x: np.ndarray) -> bytes:
    blocks = _blocks(x)
    low, high = blocks.min(axis=1), blocks.max(axis=1)
    d = (high - low) / 15
    q = np.round((blocks - low[:, None]) / np.where(d == 0, 1, d)[:, None]).clip(0, 15).astype(np.uint8)
    out = np.zeros(len(blocks), dtype=[("d", "<f2"), ("m", "<f2"), ("q", "u1", 16)])
    out["d"], out["m"], out["q"] = d, low, _nibbles(q)
    return out.tobytes()


def encode(x: np.ndarray, kind: str) -> bytes:
    if kind == "F32":
        return x.astype("<f4").tobytes()
    if kind == "F16":
        return x.astype("<f2").tobytes()
    if kind == "Q8_0":
        return quantize_q8_0(x)
    if kind == "Q4_0":
        return quantize_q4_0(x)
    if kind == "Q4_1":
        return quantize_q4_1(x)
    # Any other type: bytes of plausible size, enough to test the header check.
    return np.zeros(x.size // 2, np.uint8).tobytes()


def write_gguf(path, tensors: dict, metadata: dict) -> None:
    """tensors: name -> (numpy array in row-major order, type name)."""
    header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    header += b"".join(_string(key) + _value(value) for key, value in metadata.items())
    infos, blobs, offset = b"", [], 0
    for name, (array, kind) in tensors.items():
        data = encode(np.asarray(array), kind)
        dims = tuple(reversed(array.shape))  # fastest-moving dimension first
        infos += _string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        infos += struct.pack("<IQ", TYPE_IDS[kind], offset)
        padded = data + b"\0" * (-len(data) % ALIGNMENT)
        blobs.append(padded)
        offset += len(padded)
    head = header + infos
    with open(path, "wb") as file:
        file.write(head + b"\0" * (-len(head) % ALIGNMENT))
        file.writelines(blobs)


def dequantized(x: np.ndarray, kind: str) -> np.ndarray:
    """What a reader gets back for `x` stored as `kind` (fp32), to build reference models."""
    if kind == "F32":
        return x.astype(np.float32)
    if kind == "F16":
        return x.astype(np.float16).astype(np.float32)
    blocks = _blocks(x)
    raw = np.frombuffer(encode(x, kind), np.uint8)
    if kind == "Q8_0":
        rec = raw.view([("d", "<f2"), ("q", "i1", BLOCK)])
        values = rec["d"].astype(np.float32)[:, None] * rec["q"]
    else:
        fields = [("d", "<f2"), ("q", "u1", 16)] if kind == "Q4_0" else [("d", "<f2"), ("m", "<f2"), ("q", "u1", 16)]
        rec = raw.view(fields)
        q = np.concatenate([rec["q"] & 15, rec["q"] >> 4], axis=1).astype(np.float32)
        d = rec["d"].astype(np.float32)[:, None]
        values = d * (q - 8) if kind == "Q4_0" else d * q + rec["m"].astype(np.float32)[:, None]
    return values.reshape(blocks.shape).reshape(x.shape)
