"""A second, independent reader of neutral LoRA files, written from spec/neutral-lora-v1.md alone.

It imports json, struct, hashlib and numpy only (no lorabridge, no safetensors package): if it
reads every valid conformance vector and computes the same delta W, the written spec suffices.
"""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np

NUMPY = {"F64": "<f8", "F32": "<f4", "F16": "<f2"}
SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
ROLES = {  # spec section 3.2: kind -> (required, optional)
    "lora": ({"lora_A.weight", "lora_B.weight"}, {"dora_scale", "lora_magnitude_vector"}),
    "loha": ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}, {"hada_t1", "hada_t2", "dora_scale"}),
    "lokr": (set(), {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "dora_scale"}),
}


class Invalid(Exception):
    pass


def _array(dtype, shape, raw):
    if dtype == "BF16":  # spec 2: little-endian; bfloat16 is the top half of a float32
        return (np.frombuffer(raw, "<u2").astype("<u4") << 16).view("<f4").reshape(shape)
    return np.frombuffer(raw, NUMPY[dtype]).reshape(shape).astype(np.float32)


def read(path):
    """Return (manifest, {key: (dtype, shape, raw bytes)}); raise Invalid on anything the spec forbids."""
    blob = open(path, "rb").read()
    if len(blob) < 8:
        raise Invalid("too short")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > 100_000_000 or 8 + n > len(blob):
        raise Invalid("bad header length")
    try:
        header = json.loads(blob[8:8 + n])
    except ValueError:
        raise Invalid("header not JSON")
    meta = header.pop("__metadata__", {})
    data = blob[8 + n:]
    tensors = {}
    for key, entry in header.items():
        begin, end = entry["data_offsets"]
        count = SIZE[entry["dtype"]] * int(np.prod(entry["shape"], dtype=np.int64))
        if end > len(data) or end - begin != count:
            raise Invalid(f"bad offsets for {key}")
        tensors[key] = (entry["dtype"], tuple(entry["shape"]), data[begin:end])
    if "lorabridge.manifest" not in meta:
        raise Invalid("no manifest")
    manifest = json.loads(meta["lorabridge.manifest"])
    if int(manifest["spec_version"].split(".")[0]) != 1:
        raise Invalid("unsupported major version")
    _check(manifest, tensors)
    return manifest, tensors


def _split(key):
    roles = sorted(set().union(*[a | b for a, b in ROLES.values()]), key=len, reverse=True)
    for role in roles:
        if key.endswith("." + role):
            return key[: -len(role) - 1], role
    raise Invalid(f"no role in {key}")


def _check(manifest, tensors):
    modules = manifest["modules"]
    if not isinstance(modules, dict):
        raise Invalid("modules is not an object")
    by_module = {}
    for key in tensors:
        name, role = _split(key)
        if name not in modules:
            raise Invalid(f"undeclared tensor {key}")
        by_module.setdefault(name, {})[role] = tensors[key]
    for name, entry in modules.items():
        if not isinstance(entry.get("rank"), int) or not isinstance(entry.get("alpha"), (int, float)):
            raise Invalid(f"{name}: rank/alpha of wrong type")
        have = by_module.get(name, {})
        required, optional = ROLES[entry["kind"]]
        if not required <= have.keys() or not have.keys() <= required | optional:
            raise Invalid(f"{name}: roles {sorted(have)}")
        delta = delta_w(entry, {role: _array(*t) for role, t in have.items()})
        if [entry["out_features"], entry["in_features"], *entry.get("kernel_size", [])] != list(delta.shape):
            raise Invalid(f"{name}: shape disagrees with manifest")
        magnitude(entry, {role: _array(*t) for role, t in have.items()})
    if set(manifest["base_model"]["components"]) != {n.split(".")[0] for n in modules}:
        raise Invalid("components disagree with modules")
    digest = hashlib.sha256()  # spec 5.5
    for key in sorted(tensors, key=lambda k: k.encode()):
        dtype, shape, raw = tensors[key]
        digest.update(key.encode() + b"\0" + dtype.encode() + b"\0" + ",".join(map(str, shape)).encode() + b"\0")
        digest.update(struct.pack("<Q", len(raw)) + raw)
    if digest.hexdigest() != manifest["tensor_sha256"]:
        raise Invalid("hash mismatch")


def delta_w(entry, t):
    """Spec section 4, written out again."""
    kind, rank, alpha = entry["kind"], entry["rank"], entry["alpha"]
    scale = alpha / rank if rank else 1.0
    if kind == "lora":
        a, b = t["lora_A.weight"], t["lora_B.weight"]
        if a.shape[0] != b.shape[1]:
            raise Invalid("rank mismatch")
        if rank != a.shape[0]:
            raise Invalid("rank disagrees with manifest")
        return (scale * (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1))).reshape(b.shape[0], *a.shape[1:])
    if kind == "loha":
        w1 = t["hada_w1_a"] @ t["hada_w1_b"].reshape(t["hada_w1_b"].shape[0], -1)
        w2 = t["hada_w2_a"] @ t["hada_w2_b"].reshape(t["hada_w2_b"].shape[0], -1)
        return (scale * w1 * w2).reshape(w1.shape[0], *t["hada_w1_b"].shape[1:])
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    return scale * np.kron(w1, w2)


def magnitude(entry, t):
    """Spec 3.3 (DoRA): the magnitude in the shape it broadcasts in, (out, 1[, 1, 1]) or (1, in[, 1, 1]); None without one."""
    ones = [1] * len(entry.get("kernel_size", []))
    if "lora_magnitude_vector" in t:  # spec 1.1: kind lora, per output row, PEFT's shape
        m = t["lora_magnitude_vector"]
        peft = [1, entry["out_features"], 1, 1] if ones else [entry["out_features"]]
        if "dora_scale" in t or entry.get("dora_axis") != "out" or list(m.shape) != peft:
            raise Invalid("lora_magnitude_vector does not fit")
        return m.reshape(entry["out_features"], 1, *ones)
    if "dora_scale" not in t:
        return None
    want = {"out": [entry["out_features"], 1, *ones], "in": [1, entry["in_features"], *ones]}.get(entry.get("dora_axis"))
    if list(t["dora_scale"].shape) != want:
        raise Invalid("dora_scale does not fit dora_axis")
    return t["dora_scale"]
