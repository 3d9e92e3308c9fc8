"""A second, independent reader of neutral LoRA files, written from spec/neutral-lora-v1.md (1.1) alone.

It imports json, struct, hashlib, re, sys and numpy only (no lorabridge, no safetensors, no jsonschema):
if it reaches the verdict spec/vectors/index.json expects on every vector and computes the same delta W,
the written spec suffices. It is also a conformance reader (spec 8):

    python tests/independent_reader.py FILE      # prints {"valid": ..., "reason": ..., "modules": ...}

so ``lorabridge conformance --reader 'python tests/independent_reader.py {file}'`` checks it in one command.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import sys
from collections import Counter

import numpy as np

# Spec 2: safetensors dtypes and their sizes; only the first six may appear in a neutral file.
SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
        "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
ALLOWED = ["F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"]
NUMPY = {"F64": "<f8", "F32": "<f4", "F16": "<f2"}
# Spec 3.2: kind -> (required roles, optional roles).
ROLES = {
    "lora": ({"lora_A.weight", "lora_B.weight"}, {"dora_scale", "lora_magnitude_vector"}),
    "loha": ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}, {"hada_t1", "hada_t2", "dora_scale"}),
    "lokr": (set(), {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "dora_scale"}),
    "full": ({"diff"}, {"diff_b"}),
}
ALL_ROLES = sorted(set().union(*[a | b for a, b in ROLES.values()]), key=len, reverse=True)
# Spec 8: reason classes in checking order.
ORDER = ["container", "not-neutral", "version", "dtype", "schema", "undeclared-tensor", "missing-tensor", "roles",
         "shape", "rank-mismatch", "dora", "manifest-mismatch", "interop", "hash"]
LAYOUT = {"key_grammar": "<module>.<role>", "module_naming": "diffusers",
          "matrix_order": "lora_A (rank, in_features), lora_B (out_features, rank), row-major little-endian",
          "conv_layout": "lora_A (rank, in_channels, kh, kw), lora_B (out_channels, rank, 1, 1)"}
CREATED = re.compile(r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?Z")
NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)+")
IDENT = re.compile(r"[A-Za-z0-9_]+")
SHA = re.compile(r"[0-9a-f]{64}")
PEFT = ["r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_dora"]


class Invalid(Exception):
    def __init__(self, reason, message):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def need(condition, reason, message):
    if not condition:
        raise Invalid(reason, message)


def _array(dtype, shape, raw):
    if dtype == "BF16":  # spec 2: little-endian; bfloat16 is the top half of a float32
        return (np.frombuffer(raw, "<u2").astype("<u4") << 16).view("<f4").reshape(shape)
    return np.frombuffer(raw, NUMPY[dtype]).reshape(shape).astype(np.float32)


def _container(blob):
    """Spec 2: (metadata, {key: (dtype, shape, raw)}) in header order."""
    need(len(blob) >= 8, "container", "shorter than 8 bytes")
    (n,) = struct.unpack("<Q", blob[:8])
    need(n <= 100_000_000 and 8 + n <= len(blob), "container", "bad header length")
    try:
        header = json.loads(blob[8:8 + n].decode("utf-8"))
    except ValueError:
        raise Invalid("container", "header is not UTF-8 JSON") from None
    need(isinstance(header, dict), "container", "header is not an object")
    meta = header.pop("__metadata__", {})
    need(isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values()), "container", "bad __metadata__")
    data = blob[8 + n:]
    tensors, spans = {}, []
    for key, e in header.items():
        ok = isinstance(e, dict) and e.get("dtype") in SIZE and isinstance(e.get("shape"), list) \
            and all(type(d) is int and d >= 0 for d in e["shape"]) and isinstance(e.get("data_offsets"), list) \
            and len(e["data_offsets"]) == 2 and all(type(o) is int for o in e["data_offsets"])
        need(ok, "container", f"bad header entry {key}")
        begin, end = e["data_offsets"]
        need(0 <= begin <= end <= len(data) and end - begin == SIZE[e["dtype"]] * int(np.prod(e["shape"], dtype=np.int64)),
             "container", f"bad offsets for {key}")
        tensors[key] = (e["dtype"], tuple(e["shape"]), data[begin:end])
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):  # spec 2: no gap, no overlap, no trailing bytes
        need(begin == position, "container", "gap or overlap in the data")
        position = end
    need(position == len(data), "container", "trailing bytes after the data")
    return meta, tensors


def _is_int(v, minimum):
    return not isinstance(v, bool) and isinstance(v, (int, float)) and float(v).is_integer() and v >= minimum


def _is_num(v):
    return not isinstance(v, bool) and isinstance(v, (int, float))


def _schema(m):
    """The JSON Schema's constraints, written out (spec 5)."""
    for field in ["format", "spec_version", "base_model", "layout", "modules", "provenance", "tensor_sha256"]:
        need(field in m, "schema", f"no {field}")
    need(m["format"] == "lorabridge.neutral-lora", "schema", "format")
    need(isinstance(m["spec_version"], str) and re.fullmatch(r"[0-9]+\.[0-9]+", m["spec_version"]), "schema", "spec_version")
    b = m["base_model"]
    need(isinstance(b, dict) and isinstance(b.get("architecture"), str) and b["architecture"], "schema", "architecture")
    c = b.get("components")
    need(isinstance(c, list) and all(isinstance(x, str) and IDENT.fullmatch(x) for x in c) and len(set(c)) == len(c),
         "schema", "components")
    lay = m["layout"]
    need(isinstance(lay, dict) and all(lay.get(k) == v for k, v in LAYOUT.items()), "schema", "layout")
    d = lay.get("dtypes")
    need(isinstance(d, list) and all(x in ALLOWED for x in d) and len(set(d)) == len(d), "schema", "layout.dtypes")
    need(isinstance(m["modules"], dict), "schema", "modules")
    for name, e in m["modules"].items():
        need(NAME.fullmatch(name) is not None, "schema", f"module name {name!r}")
        need(isinstance(e, dict) and {"kind", "rank", "alpha", "in_features", "out_features", "dtype"} <= e.keys(),
             "schema", f"{name}: required fields")
        need(e["kind"] in ROLES and _is_int(e["rank"], 1 if e["kind"] == "lora" else 0) and _is_num(e["alpha"])
             and (e["kind"] != "full" or e["rank"] == 0)
             and _is_int(e["in_features"], 1) and _is_int(e["out_features"], 1) and e["dtype"] in ALLOWED,
             "schema", f"{name}: field types")
        need(e.get("alpha_source", "stored") in ("stored", "user", "assumed"), "schema", f"{name}: alpha_source")
        need(e.get("dora_axis", "out") in ("out", "in"), "schema", f"{name}: dora_axis")
        k = e.get("kernel_size", [1])
        need(isinstance(k, list) and k and all(_is_int(x, 1) for x in k), "schema", f"{name}: kernel_size")
    t = m.get("targets", {})
    need(isinstance(t, dict) and all(isinstance(v, dict) and all(_is_int(n, 1) for n in v.values()) for v in t.values()),
         "schema", "targets")
    p = m["provenance"]
    need(isinstance(p, dict) and isinstance(p.get("source_format"), str) and p["source_format"]
         and isinstance(p.get("converter"), str) and isinstance(p.get("created"), str), "schema", "provenance")
    need(CREATED.fullmatch(p["created"]) is not None, "schema", "created is not RFC 3339 UTC (Z)")
    need(p.get("source_file") is None or isinstance(p["source_file"], str), "schema", "source_file")
    need(p.get("source_sha256") is None or (isinstance(p["source_sha256"], str) and SHA.fullmatch(p["source_sha256"])),
         "schema", "source_sha256")
    need(isinstance(p.get("history", []), list) and all(isinstance(h, dict) for h in p.get("history", [])), "schema", "history")
    need(isinstance(m.get("training", {}), dict), "schema", "training")
    need(isinstance(m["tensor_sha256"], str) and SHA.fullmatch(m["tensor_sha256"]) is not None, "schema", "tensor_sha256")


def _split(key):
    for role in ALL_ROLES:
        if key.endswith("." + role):
            return key[: -len(role) - 1], role
    return None, None


def _roles(kind, have):
    """Spec 3.2: missing-tensor, then roles."""
    required, optional = ROLES[kind]
    need(required <= have, "missing-tensor", f"needs {sorted(required - have)}")
    need(("hada_t1" in have) == ("hada_t2" in have), "missing-tensor", "one Tucker core without the other")
    if kind == "lokr":
        for w in ("lokr_w1", "lokr_w2"):
            need(w in have or {w + "_a", w + "_b"} <= have, "missing-tensor", f"{w} in neither form")
    need(have <= required | optional, "roles", f"foreign roles {sorted(have - required - optional)}")
    need(not {"dora_scale", "lora_magnitude_vector"} <= have, "roles", "two DoRA magnitudes")
    if kind == "lokr":
        for w in ("lokr_w1", "lokr_w2"):
            need(not (w in have and (w + "_a" in have or w + "_b" in have)), "roles", f"{w} in both forms")
        need(not ("lokr_t2" in have and "lokr_w2" in have), "roles", "lokr_t2 with a whole lokr_w2")


def _dims(s, role, *allowed):
    need(len(s[role]) in allowed, "shape", f"{role} has {len(s[role])} dimensions")
    return s[role]


def _one(*values):
    need(len(set(values)) == 1, "rank-mismatch", f"ranks {values}")
    return values[0]


def geometry(kind, s):
    """Spec 3.2-3.3: (rank, weight shape) from the factor shapes."""
    if kind == "full":
        d = _dims(s, "diff", 2, 4)
        need(s.get("diff_b", (d[0],)) == (d[0],), "shape", "diff_b is not (out,)")
        return 0, d
    if kind == "lora":
        a, b = _dims(s, "lora_A.weight", 2, 4), _dims(s, "lora_B.weight", 2, 4)
        need(len(a) == len(b) and b[2:] in ((), (1, 1)), "shape", "not linear or conv LoRA")
        return _one(a[0], b[1]), (b[0], a[1], *a[2:])
    if kind == "loha":
        if "hada_t1" in s:
            t1, t2 = _dims(s, "hada_t1", 4), _dims(s, "hada_t2", 4)
            a1, a2, b1, b2 = (_dims(s, r, 2) for r in ("hada_w1_a", "hada_w2_a", "hada_w1_b", "hada_w2_b"))
            r = _one(a1[0], a2[0], b1[0], b2[0], t1[0], t1[1], t2[0], t2[1])
            need(t1[2:] == t2[2:] and a1[1] == a2[1] and b1[1] == b2[1], "shape", "Tucker halves differ")
            return r, (a1[1], b1[1], *t1[2:])
        a1, a2, b1, b2 = _dims(s, "hada_w1_a", 2), _dims(s, "hada_w2_a", 2), _dims(s, "hada_w1_b", 2, 4), _dims(s, "hada_w2_b", 2, 4)
        r = _one(a1[1], b1[0], a2[1], b2[0])
        need(a1[0] == a2[0] and b1[1:] == b2[1:], "shape", "w1 and w2 differ")
        return r, (a1[0], *b1[1:])
    ranks = []
    if "lokr_w1" in s:
        w1 = _dims(s, "lokr_w1", 2)
    else:
        a, b = _dims(s, "lokr_w1_a", 2), _dims(s, "lokr_w1_b", 2)
        ranks.append(_one(a[1], b[0]))
        w1 = (a[0], b[1])
    if "lokr_w2" in s:
        w2 = _dims(s, "lokr_w2", 2, 4)
    elif "lokr_t2" in s:
        t, a, b = _dims(s, "lokr_t2", 4), _dims(s, "lokr_w2_a", 2), _dims(s, "lokr_w2_b", 2)
        ranks.append(_one(a[0], b[0], t[0], t[1]))
        w2 = (a[1], b[1], *t[2:])
    else:
        a, b = _dims(s, "lokr_w2_a", 2), _dims(s, "lokr_w2_b", 2, 4)
        ranks.append(_one(a[1], b[0]))
        w2 = (a[0], *b[1:])
    return (_one(*ranks) if ranks else 0), (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])


def _dora(entry, s, weight):
    """Spec 3.3: dora_axis exactly with a magnitude, and the one shape of its axis and spelling."""
    axis, shape = entry.get("dora_axis"), s.get("dora_scale", s.get("lora_magnitude_vector"))
    need((axis is None) == (shape is None), "dora", "dora_axis and a DoRA magnitude come together")
    if "lora_magnitude_vector" in s:  # 1.1: PEFT's spelling, per output row only
        need(axis == "out" and shape == ((1, weight[0], 1, 1) if len(weight) == 4 else (weight[0],)), "dora",
             f"lora_magnitude_vector {shape}")
    elif shape is not None:
        ones = (1,) * (len(weight) - 2)
        need(shape == ((weight[0], 1, *ones) if axis == "out" else (1, weight[1], *ones)), "dora", f"dora_scale {shape}")


def _module_dtype(dtypes):
    """Spec 5.3: most common; a tie goes to the first tensor in UTF-8 key order."""
    ordered = [dtypes[r] for r in sorted(dtypes, key=lambda r: r.encode())]
    counts = Counter(ordered)
    return next(d for d in ordered if counts[d] == max(counts.values()))


def _tensor_rules(m, tensors):
    """Spec 8 stage 6: every class found, over all modules; the caller reports the earliest."""
    found = []
    by_module = {name: {} for name in m["modules"]}
    for key, (dtype, shape, _) in tensors.items():
        name, role = _split(key)
        if name not in by_module:
            found.append("undeclared-tensor")
        else:
            by_module[name][role] = (dtype, shape)
    for name, e in m["modules"].items():
        have = by_module[name]
        s = {role: shape for role, (_, shape) in have.items()}
        try:
            _roles(e["kind"], set(s))
            rank, weight = geometry(e["kind"], {r: v for r, v in s.items() if r not in ("dora_scale", "lora_magnitude_vector")})
            _dora(e, s, weight)
        except Invalid as exc:
            found.append(exc.reason)
            continue
        actual = [rank, weight[0], weight[1], list(weight[2:]) or None, _module_dtype({r: d for r, (d, _) in have.items()})]
        declared = [e["rank"], e["out_features"], e["in_features"], e.get("kernel_size"), e["dtype"]]
        if actual != declared:
            found.append("manifest-mismatch")
    if set(m["base_model"]["components"]) != {n.split(".")[0] for n in m["modules"]}:
        found.append("manifest-mismatch")
    if set(m["layout"]["dtypes"]) != {d for d, _, _ in tensors.values()}:
        found.append("manifest-mismatch")
    if found:
        raise Invalid(min(found, key=ORDER.index), "tensors disagree with the manifest")


def _interop(m, meta):
    """Spec 6: format, ModelSpec and the flat PEFT LoraConfig per component."""
    need(meta.get("format") == "pt", "interop", "format")
    need(meta.get("modelspec.sai_model_spec") == "1.0.0", "interop", "sai_model_spec")
    need(meta.get("modelspec.architecture") == m["base_model"]["architecture"] + "/lora", "interop", "architecture")
    need(meta.get("modelspec.implementation") == "https://github.com/huggingface/diffusers", "interop", "implementation")
    need(bool(meta.get("modelspec.title")), "interop", "title")
    lora = {}
    for name, e in m["modules"].items():
        if e["kind"] == "lora":
            comp, path = name.split(".", 1)
            lora.setdefault(comp, {})[path] = e
    if "lora_adapter_metadata" not in meta:
        need(not lora, "interop", "no lora_adapter_metadata")
        return
    try:
        cfg = json.loads(meta["lora_adapter_metadata"])
    except ValueError:
        raise Invalid("interop", "lora_adapter_metadata is not JSON") from None
    need(isinstance(cfg, dict), "interop", "lora_adapter_metadata is not an object")
    need(set(cfg) <= {f"{c}.{f}" for c in lora for f in PEFT}, "interop", "keys are not flat <component>.<field>")
    for comp, mods in lora.items():
        got = {f: cfg.get(f"{comp}.{f}") for f in PEFT}
        need(all(f"{comp}.{f}" in cfg for f in PEFT), "interop", f"{comp}: fields missing")
        for field, value, pattern in (("rank", got["r"], got["rank_pattern"]), ("alpha", got["lora_alpha"], got["alpha_pattern"])):
            counts = Counter(e[field] for e in mods.values())
            top = max(counts.values())
            need(_is_num(value) and any(value == v for v, n in counts.items() if n == top), "interop", f"{comp}: {field} not most common")
            need(pattern == {p: e[field] for p, e in mods.items() if e[field] != value}, "interop", f"{comp}: {field} pattern")
        targets = got["target_modules"]
        need(isinstance(targets, list) and len(targets) == len(mods) and set(targets) == set(mods), "interop", f"{comp}: targets")
        need(got["use_dora"] is any("dora_axis" in e for e in mods.values()), "interop", f"{comp}: use_dora")


def _hash(tensors):
    """Spec 5.5: one running SHA-256 over the tensors in UTF-8 byte order of their keys."""
    digest = hashlib.sha256()
    for key in sorted(tensors, key=lambda k: k.encode("utf-8")):
        dtype, shape, raw = tensors[key]
        digest.update(key.encode("utf-8") + b"\0" + dtype.encode() + b"\0" + ",".join(map(str, shape)).encode() + b"\0")
        digest.update(struct.pack("<Q", len(raw)) + raw)
    return digest.hexdigest()


def _not_json(token):
    raise ValueError(f"{token} is not JSON")


def read(path):
    """Return (manifest, {key: (dtype, shape, raw bytes)}); raise Invalid(reason) at the first failing stage."""
    with open(path, "rb") as handle:
        blob = handle.read()
    meta, tensors = _container(blob)
    need("lorabridge.manifest" in meta, "not-neutral", "no manifest")
    try:  # spec 5: strict JSON, no NaN/Infinity
        manifest = json.loads(meta["lorabridge.manifest"], parse_constant=_not_json)
    except ValueError:
        raise Invalid("schema", "manifest is not JSON") from None
    need(isinstance(manifest, dict), "schema", "manifest is not an object")
    version = manifest.get("spec_version")
    if isinstance(version, str) and re.fullmatch(r"[0-9]+\.[0-9]+", version):
        need(int(version.split(".")[0]) == 1, "version", f"spec_version {version}")
    need(all(d in ALLOWED for d, _, _ in tensors.values()), "dtype", "a tensor dtype outside the allowed list")
    _schema(manifest)
    _tensor_rules(manifest, tensors)
    _interop(manifest, meta)
    need(_hash(tensors) == manifest["tensor_sha256"], "hash", "hash mismatch")
    return manifest, tensors


def verdict(path):
    """Spec 8's verdict object for one file."""
    try:
        manifest, _ = read(path)
    except Invalid as exc:
        return {"valid": False, "reason": exc.reason, "modules": None}
    return {"valid": True, "reason": None, "modules": len(manifest["modules"])}


def delta_w(entry, t):
    """Spec section 4, written out again (float32 arrays by role)."""
    kind, rank, alpha = entry["kind"], entry["rank"], entry["alpha"]
    if kind == "full":
        return t["diff"]
    scale = alpha / rank if rank else 1.0
    if kind == "lora":
        a, b = t["lora_A.weight"], t["lora_B.weight"]
        return (scale * (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1))).reshape(b.shape[0], *a.shape[1:])
    if kind == "loha":
        if "hada_t1" in t:
            w = [np.einsum("ijkl,jq,ip->pqkl", t[f"hada_t{i}"], t[f"hada_w{i}_b"], t[f"hada_w{i}_a"]) for i in (1, 2)]
            return scale * w[0] * w[1]
        w1 = t["hada_w1_a"] @ t["hada_w1_b"].reshape(t["hada_w1_b"].shape[0], -1)
        w2 = t["hada_w2_a"] @ t["hada_w2_b"].reshape(t["hada_w2_b"].shape[0], -1)
        return (scale * w1 * w2).reshape(w1.shape[0], *t["hada_w1_b"].shape[1:])
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_t2" in t:
        w2 = np.einsum("ijkl,ip,jq->pqkl", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    elif "lokr_w2" in t:
        w2 = t["lokr_w2"]
    else:
        b = t["lokr_w2_b"]
        w2 = (t["lokr_w2_a"] @ b.reshape(b.shape[0], -1)).reshape(t["lokr_w2_a"].shape[0], *b.shape[1:])
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    return scale * np.kron(w1, w2)


def magnitude(entry, t):
    """Spec 3.3 (DoRA): the magnitude in the shape it broadcasts in, (out, 1[, 1, 1]) or (1, in[, 1, 1]); None without one."""
    ones = [1] * len(entry.get("kernel_size", []))
    if "lora_magnitude_vector" in t:  # spec 1.1: kind lora, per output row, PEFT's shape (checked by read)
        return t["lora_magnitude_vector"].reshape(entry["out_features"], 1, *ones)
    return t.get("dora_scale")


if __name__ == "__main__":
    result = verdict(sys.argv[1])
    print(json.dumps(result))
    sys.exit(0 if result["valid"] else 1)
