"""Regenerate the conformance vectors in spec/vectors/ (deterministic: same bytes every run).

Run: python tools/make_vectors.py. Valid vectors are written by lorabridge itself (and one, scratch,
by a from-scratch writer below that uses only json, struct and numpy); invalid ones are valid files
with exactly one rule of spec 3-6 broken, written below the library's own safety checks, each with
the hash of the tensors it really holds so that it fails for its one reason only (spec 8).
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lorabridge.formats.neutral import interop_metadata, stored_tensors  # noqa: E402
from lorabridge.io.safetensors_file import write_safetensors  # noqa: E402
from lorabridge.manifest import MANIFEST_KEY, SPEC_VERSION, build_manifest, tensor_sha256  # noqa: E402
from lorabridge.model import LoraModel, LoraModule  # noqa: E402
from lorabridge.tensor import Tensor  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "spec" / "vectors"
FIXED_TIME = "2026-01-01T00:00:00Z"
ATTN_Q = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
ATTN_K = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
CONV = "unet.down_blocks.1.resnets.0.conv1"
PROJ_IN, PROJ_OUT = "unet.mid_block.attentions.0.proj_in", "unet.mid_block.attentions.0.proj_out"
PIPELINE = ["lorabridge", "diffusers", "mindone.diffusers"]  # spec 1: who loads a file of plain LoRA modules


def t(rng, shape, dtype="F32"):
    return Tensor.from_numpy((rng.standard_normal(shape) * 0.1).astype(np.float32), dtype)


def lora(rng, name, inp, out, rank, alpha, kernel=(), dtype="F32", **kw):
    tensors = {"lora_A.weight": t(rng, (rank, inp, *kernel), dtype),
               "lora_B.weight": t(rng, (out, rank, *([1, 1] if kernel else [])), dtype)}
    return LoraModule(name, "lora", tensors, alpha=alpha, **kw)


def model_of(*modules, **facts) -> LoraModel:
    model = LoraModel(provenance={"source_format": "conformance-vector", "source_file": None, "source_sha256": None,
                                  "converter": "lorabridge tools/make_vectors.py", "created": FIXED_TIME},
                      training={"title": "conformance vector"}, **facts)
    for m in modules:
        model.add(m)
    return model


def save(name: str, model: LoraModel, mutate=None, tensors=None, interop=None) -> None:
    """Write a vector; ``mutate(manifest)`` breaks the manifest, ``tensors`` replaces the tensor set (the
    model's as a neutral file stores them otherwise), ``interop(metadata)`` breaks the metadata other
    tools read. The hash is always the written tensors'."""
    written = tensors if tensors is not None else stored_tensors(model)
    manifest = build_manifest(model, tensor_sha256(written))
    if mutate:
        mutate(manifest)
    metadata = interop_metadata(model, manifest)
    if interop:
        interop(metadata)
    metadata[MANIFEST_KEY] = json.dumps(manifest, separators=(",", ":"))
    path = OUT / name
    path.unlink(missing_ok=True)
    write_safetensors(path, written, metadata)


def raw_file(path: Path, tensors: list[tuple[str, str, list[int], bytes]], metadata: dict[str, str],
             gap: int = 0, trailing: bytes = b"") -> None:
    """A safetensors file from scratch, as a third-party writer following spec 2 would write it;
    ``gap`` bytes are left before the second tensor and ``trailing`` appended, to break spec 2 on purpose."""
    header: dict = {"__metadata__": metadata}
    data = b""
    for i, (key, dtype, shape, raw) in enumerate(tensors):
        if i == 1:
            data += b"\0" * gap
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data + trailing)


def scratch_hash(tensors: list[tuple[str, str, list[int], bytes]]) -> str:
    """Spec 5.5 written out again: one running SHA-256 over the tensors in UTF-8 byte order of their keys."""
    digest = hashlib.sha256()
    for key, dtype, shape, raw in sorted(tensors, key=lambda t: t[0].encode("utf-8")):
        digest.update(key.encode("utf-8") + b"\0" + dtype.encode("ascii") + b"\0"
                      + ",".join(str(d) for d in shape).encode("ascii") + b"\0" + struct.pack("<Q", len(raw)) + raw)
    return digest.hexdigest()


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2026)
    index = []

    def valid(name, model, modules, note, loads_in=PIPELINE, **kw):
        save(name, model, **kw)
        index.append({"file": name, "verdict": "valid", "modules": modules, "loads_in": loads_in, "note": note})

    def invalid(name, model, reason, note, **kw):
        save(name, model, **kw)
        index.append({"file": name, "verdict": "invalid", "reason": reason, "note": note})

    def invalid_raw(name, reason, note):
        index.append({"file": name, "verdict": "invalid", "reason": reason, "note": note})

    minimal = model_of(lora(rng, ATTN_Q, 64, 64, 4, 4.0))
    valid("minimal.safetensors", minimal, 1, "one linear LoRA module, F32, alpha = rank")

    mixed = model_of(
        lora(rng, ATTN_Q, 64, 64, 4, 8.0),
        lora(rng, ATTN_K, 32, 64, 2, 1.0, dtype="F16"),
        lora(rng, CONV, 16, 32, 2, 2.0, kernel=(3, 3)),
        lora(rng, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj", 32, 32, 8, 4.0, dtype="BF16"),
        lora(rng, "text_encoder_2.text_model.encoder.layers.0.mlp.fc1", 32, 128, 4, 4.0, alpha_source="assumed"),
    )
    valid("mixed.safetensors", mixed, 5, "unet + both text encoders, conv, F16/BF16, per-module rank and alpha")

    def newer_minor(m):
        m["spec_version"] = "1.7"
        m["future_field"] = {"kept": True}
        m["modules"][ATTN_Q]["future_module_field"] = 3
    valid("newer-minor.safetensors", minimal, 1, "spec 1.7 with unknown fields: read and preserved", mutate=newer_minor)

    kinds = model_of(
        LoraModule(PROJ_IN, "loha",
                   {"hada_w1_a": t(rng, (48, 4)), "hada_w1_b": t(rng, (4, 40)),
                    "hada_w2_a": t(rng, (48, 4)), "hada_w2_b": t(rng, (4, 40))}, alpha=2.0),
        LoraModule(PROJ_OUT, "lokr",
                   {"lokr_w1": t(rng, (4, 4)), "lokr_w2_a": t(rng, (12, 2)), "lokr_w2_b": t(rng, (2, 10))}, alpha=1.0),
        LoraModule(ATTN_Q, "lora", {"lora_A.weight": t(rng, (4, 64)), "lora_B.weight": t(rng, (64, 4)),
                                    "dora_scale": t(rng, (64, 1))}, alpha=4.0, dora_axis="out"),
    )
    valid("kinds.safetensors", kinds, 3, "LoHa, LoKr and a DoRA LoRA module (lora_magnitude_vector (64,), spec 1.1)",
          loads_in=["lorabridge"])

    def spec_one_zero(m):
        m["spec_version"] = "1.0"
    valid("dora-1.0-spelling.safetensors", kinds, 3, "the same as spec 1.0 writers stored it: dora_scale (64, 1)",
          loads_in=["lorabridge"], mutate=spec_one_zero, tensors=kinds.tensors())

    own = np.random.default_rng(2027)  # not rng: the vectors after this one keep their bytes
    per_column = model_of(
        LoraModule(ATTN_Q, "lora", {"lora_A.weight": t(own, (4, 64)), "lora_B.weight": t(own, (64, 4)),
                                    "dora_scale": t(own, (1, 64))}, alpha=4.0, dora_axis="in"),
        LoraModule("unet.down_blocks.1.resnets.0.conv1", "loha",
                   {"hada_w1_a": t(own, (16, 2)), "hada_w1_b": t(own, (2, 32, 3, 3)), "hada_w2_a": t(own, (16, 2)),
                    "hada_w2_b": t(own, (2, 32, 3, 3)), "dora_scale": t(own, (1, 32, 1, 1))}, alpha=1.0, dora_axis="in"),
    )
    valid("dora-in.safetensors", per_column, 2, "DoRA magnitudes per input column (dora_scale (1, in[, 1, 1])), linear and conv",
          loads_in=["lorabridge"])

    # Spec 8: one vector per reason class, each breaking exactly one rule.
    def rank_as_string(m):
        m["modules"][ATTN_Q]["rank"] = "4"
    invalid("bad-schema.safetensors", minimal, "schema", "module rank is a string", mutate=rank_as_string)

    only_a = {k: v for k, v in minimal.tensors().items() if k.endswith("lora_A.weight")}
    invalid("missing-tensor.safetensors", minimal, "missing-tensor", "lora_B.weight absent", tensors=only_a)

    bad_rank = {f"{ATTN_Q}.lora_A.weight": t(rng, (4, 64)), f"{ATTN_Q}.lora_B.weight": t(rng, (64, 2))}
    invalid("rank-mismatch.safetensors", minimal, "rank-mismatch", "A has 4 rows, B 2 columns", tensors=bad_rank)

    def wrong_in(m):
        m["modules"][ATTN_Q]["in_features"] = 65
    invalid("manifest-mismatch.safetensors", minimal, "manifest-mismatch", "in_features disagrees with lora_A", mutate=wrong_in)

    def wrong_hash(m):
        m["tensor_sha256"] = "0" * 64
    invalid("wrong-hash.safetensors", minimal, "hash", "tensor_sha256 does not match the data", mutate=wrong_hash)

    def major_two(m):
        m["spec_version"] = "2.0"
    invalid("newer-major.safetensors", minimal, "version", "spec_version 2.0", mutate=major_two)

    extra = {**minimal.tensors(), "unet.conv_in.lora_A.weight": t(rng, (4, 4, 3, 3))}
    invalid("undeclared-tensor.safetensors", minimal, "undeclared-tensor", "a tensor no module entry describes", tensors=extra)

    def components_lie(m):
        m["base_model"]["components"] = ["unet", "text_encoder"]
    invalid("components-mismatch.safetensors", minimal, "manifest-mismatch", "components list disagrees with modules", mutate=components_lie)

    foreign = model_of(LoraModule(ATTN_Q, "lora", {**lora(rng, ATTN_Q, 64, 64, 4, 4.0).tensors, "hada_w1_a": t(rng, (64, 4))}, alpha=4.0))
    invalid("foreign-role.safetensors", foreign, "roles", "a lora module with a hada_w1_a tensor")

    linear_4d = model_of(LoraModule(ATTN_Q, "lora", {"lora_A.weight": t(rng, (4, 64, 3, 3)), "lora_B.weight": t(rng, (64, 4, 3, 3))}, alpha=4.0))
    invalid("conv-up-not-1x1.safetensors", linear_4d, "shape", "conv lora_B with a 3x3 kernel: neither linear nor conv LoRA")

    # Item 2, DoRA: the shapes of spec 3.3 only, and dora_axis exactly when dora_scale, agreeing with it.
    def dora(name, inp, out, scale_shape, axis, kernel=()):
        base = lora(rng, name, inp, out, 4, 4.0, kernel=kernel)
        return LoraModule(name, "lora", {**base.tensors, **({"dora_scale": t(rng, scale_shape)} if scale_shape else {})},
                          alpha=4.0, dora_axis=axis)
    def as_dora_scale(model):  # the model's spelling, dora_scale, not the lora_magnitude_vector a writer uses
        return model, {"tensors": model.tensors()}
    peft_shape, kw = as_dora_scale(model_of(dora(ATTN_K, 32, 64, (64,), "out")))
    invalid("dora-peft-shape.safetensors", peft_shape, "dora",
            "dora_scale (out,): PEFT's shape under the dora_scale name (only lora_magnitude_vector has it)", **kw)
    conv_kernel, kw = as_dora_scale(model_of(dora(CONV, 16, 32, (32, 1, 3, 3), "out", kernel=(3, 3))))
    invalid("dora-conv-kernel.safetensors", conv_kernel, "dora", "conv dora_scale (out, 1, kh, kw) instead of (out, 1, 1, 1)", **kw)
    invalid("dora-no-axis.safetensors", model_of(dora(ATTN_K, 32, 64, (64, 1), None)), "dora", "dora_scale without dora_axis")
    invalid("dora-axis-no-scale.safetensors", model_of(dora(ATTN_K, 32, 64, None, "out")), "dora", "dora_axis without dora_scale")
    invalid("dora-axis-contradicts.safetensors", model_of(dora(ATTN_K, 32, 64, (64, 1), "in")), "dora",
            "dora_axis in, but dora_scale has the out axis' shape (64, 1)")
    dora_mix = model_of(dora(ATTN_K, 32, 64, (1, 32), "in"), dora(CONV, 16, 32, (32, 1, 1, 1), "out", kernel=(3, 3)),
                        lora(rng, ATTN_Q, 64, 64, 4, 4.0))
    valid("dora-partial.safetensors", dora_mix, 3, "in-axis DoRA (1, in), conv out-axis DoRA (out, 1, 1, 1) and a module "
          "without DoRA in one component: use_dora true", loads_in=["lorabridge"])

    # Item 3, LoKr: one form per factor, one rank.
    both = model_of(LoraModule(PROJ_OUT, "lokr", {"lokr_w1": t(rng, (4, 4)), "lokr_w1_a": t(rng, (4, 2)), "lokr_w1_b": t(rng, (2, 4)),
                                                  "lokr_w2_a": t(rng, (12, 2)), "lokr_w2_b": t(rng, (2, 10))}, alpha=1.0))
    invalid("lokr-both-forms.safetensors", both, "roles", "lokr_w1 stored whole and as lokr_w1_a/lokr_w1_b")
    ranks = model_of(LoraModule(PROJ_OUT, "lokr", {"lokr_w1_a": t(rng, (4, 2)), "lokr_w1_b": t(rng, (2, 4)),
                                                   "lokr_w2_a": t(rng, (12, 3)), "lokr_w2_b": t(rng, (3, 10))}, alpha=1.0))
    invalid("lokr-rank-mismatch.safetensors", ranks, "rank-mismatch", "decomposed w1 of rank 2, w2 of rank 3: the scale is undefined")
    tucker = model_of(
        LoraModule(CONV, "loha", {"hada_w1_a": t(rng, (2, 32)), "hada_w1_b": t(rng, (2, 16)), "hada_t1": t(rng, (2, 2, 3, 3)),
                                  "hada_w2_a": t(rng, (2, 32)), "hada_w2_b": t(rng, (2, 16)), "hada_t2": t(rng, (2, 2, 3, 3))}, alpha=1.0),
        LoraModule("unet.down_blocks.1.resnets.0.conv2", "lokr", {"lokr_w1": t(rng, (4, 4)), "lokr_t2": t(rng, (2, 2, 3, 3)),
                                                                  "lokr_w2_a": t(rng, (2, 8)), "lokr_w2_b": t(rng, (2, 8))}, alpha=1.0),
        LoraModule(PROJ_OUT, "lokr", {"lokr_w1": t(rng, (4, 4)), "lokr_w2": t(rng, (12, 10))}, alpha=7.0),
    )
    valid("tucker-and-whole.safetensors", tucker, 3, "Tucker LoHa and LoKr convs; a LoKr with both factors whole (rank 0, "
          "scale 1 whatever alpha says)", loads_in=["lorabridge"])
    half = model_of(LoraModule(CONV, "loha", {"hada_w1_a": t(rng, (2, 32)), "hada_w1_b": t(rng, (2, 16)), "hada_t1": t(rng, (2, 2, 3, 3)),
                                              "hada_w2_a": t(rng, (2, 32)), "hada_w2_b": t(rng, (2, 16))}, alpha=1.0))
    invalid("loha-tucker-half.safetensors", half, "missing-tensor", "hada_t1 without hada_t2")

    # Item 4, dtypes: the allowed list only; the module dtype's tie rule.
    int_scale = LoraModule(ATTN_K, "lora", {**lora(rng, ATTN_K, 32, 64, 4, 4.0).tensors,
                                            "dora_scale": Tensor.from_numpy(np.ones((64, 1), np.int64))}, alpha=4.0, dora_axis="out")

    def f32_only(m):
        m["layout"]["dtypes"] = ["F32"]
    invalid("dtype-i64.safetensors", model_of(int_scale), "dtype", "an I64 dora_scale", mutate=f32_only)
    tie = LoraModule(ATTN_K, "lora", {"lora_B.weight": t(rng, (64, 4), "F32"), "lora_A.weight": t(rng, (4, 32), "F16")}, alpha=4.0)
    valid("dtype-tie.safetensors", model_of(tie), 1, "lora_B F32 stored first, lora_A F16: the tie goes to lora_A's F16 (UTF-8 key order)")

    def layout_f16(m):
        m["layout"]["dtypes"] = ["F16"]
    invalid("layout-dtypes.safetensors", minimal, "manifest-mismatch", "layout.dtypes lists F16, the tensors are F32", mutate=layout_f16)

    # Item 5, created: RFC 3339 in UTC with Z.
    def created(value):
        def mutate(m):
            m["provenance"]["created"] = value
        return mutate
    invalid("created-not-rfc3339.safetensors", minimal, "schema", "created is 'yesterday'", mutate=created("yesterday"))
    invalid("created-offset.safetensors", minimal, "schema", "created with +09:00 instead of Z",
            mutate=created("2026-01-01T09:00:00+09:00"))

    # Item 6, lora_adapter_metadata: flat keys, lora modules only, ties, use_dora.
    def nested(md):
        flat = json.loads(md["lora_adapter_metadata"])
        md["lora_adapter_metadata"] = json.dumps({"unet": {k.split(".", 1)[1]: v for k, v in flat.items()}}, separators=(",", ":"))
    invalid("interop-nested.safetensors", minimal, "interop", "lora_adapter_metadata nested per component", interop=nested)

    def edit_peft(change):
        def mutate(md):
            peft = json.loads(md["lora_adapter_metadata"])
            change(peft)
            md["lora_adapter_metadata"] = json.dumps(peft, separators=(",", ":"))
        return mutate
    invalid("interop-loha-target.safetensors", kinds, "interop", "the LoHa module's path in unet.target_modules",
            interop=edit_peft(lambda p: p["unet.target_modules"].append(PROJ_IN.split(".", 1)[1])))
    invalid("interop-use-dora.safetensors", kinds, "interop", "use_dora false though a lora module has a DoRA magnitude",
            interop=edit_peft(lambda p: p.update({"unet.use_dora": False})))
    invalid("interop-alpha-pattern.safetensors", mixed, "interop", "alpha_pattern misses a module whose alpha differs: "
            "diffusers would scale it wrongly", interop=edit_peft(lambda p: p.update({"unet.alpha_pattern": {}})))
    tied = model_of(lora(rng, ATTN_Q, 64, 64, 8, 8.0), lora(rng, ATTN_K, 32, 64, 4, 4.0))
    valid("interop-tie.safetensors", tied, 2, "ranks 8 and 4 tie: r = 8 (the first module's) with rank_pattern {to_k: 4} is as "
          "valid as r = 4")

    def arch(md):
        md["modelspec.architecture"] = "sdxl/lora"
    invalid("modelspec-wrong.safetensors", minimal, "interop", "modelspec.architecture is not <architecture>/lora", interop=arch)

    # Item 9: key grammar, kernel_size on a linear module, 0.x, targets, hash byte order, data layout.
    def dashed(m):
        m["modules"] = {ATTN_Q.replace("down_blocks", "down-blocks"): m["modules"][ATTN_Q]}
    dash_tensors = {k.replace("down_blocks", "down-blocks"): v for k, v in minimal.tensors().items()}
    invalid("key-not-identifier.safetensors", minimal, "schema", "a module path segment with '-'", mutate=dashed, tensors=dash_tensors)

    def linear_kernel(m):
        m["modules"][ATTN_Q]["kernel_size"] = [1, 1]
    invalid("kernel-on-linear.safetensors", minimal, "manifest-mismatch", "kernel_size [1, 1] on a linear module", mutate=linear_kernel)

    def zero_major(m):
        m["spec_version"] = "0.9"
    invalid("older-major.safetensors", minimal, "version", "spec_version 0.9: there is no 0.x", mutate=zero_major)

    def wrong_targets(m):
        m["targets"] = {"unet": {"attn2.to_v": 7}}
    valid("targets-informative.safetensors", minimal, 1, "targets summary disagrees with the modules: informative, not checked",
          mutate=wrong_targets)
    ordered = model_of(*[lora(rng, name, 32, 32, 2, 2.0) for name in (
        "unet.mid_block.attentions.0.proj_in", "unet.Zeta.proj", "text_encoder_2.text_model.encoder.layers.2.mlp.fc1",
        "text_encoder.text_model.encoder.layers.2.mlp.fc1", "text_encoder.text_model.encoder.layers.10.mlp.fc1")])
    valid("hash-order.safetensors", ordered, 5, "keys whose UTF-8 byte order differs from natural, case-insensitive and "
          "header order (layers.10 < layers.2, Zeta < mid_block, text_encoder. < text_encoder_2.)")

    # Spec 1.1 on main's side: DoRA per output row as diffusers loads it, both spellings at once, kind full.
    own = np.random.default_rng(2028)
    out_axis = model_of(
        LoraModule(ATTN_K, "lora", {**lora(own, ATTN_K, 32, 64, 4, 4.0).tensors, "dora_scale": t(own, (64, 1))},
                   alpha=4.0, dora_axis="out"),
        LoraModule(CONV, "lora", {**lora(own, CONV, 16, 32, 2, 2.0, kernel=(3, 3)).tensors, "dora_scale": t(own, (32, 1, 1, 1))},
                   alpha=2.0, dora_axis="out"))
    valid("dora-out.safetensors", out_axis, 2, "every lora module of the component with DoRA per output row, linear "
          "(lora_magnitude_vector (out,)) and conv ((1, out, 1, 1)): loads in diffusers, not in mindone.diffusers 0.5.0",
          loads_in=["lorabridge", "diffusers"])
    first = out_axis.modules[ATTN_K]
    invalid("dora-both-spellings.safetensors", out_axis, "roles", "one module with lora_magnitude_vector and dora_scale",
            tensors={**stored_tensors(out_axis), f"{ATTN_K}.dora_scale": first.tensors["dora_scale"]})
    full = model_of(
        LoraModule(ATTN_Q, "full", {"diff": t(own, (64, 64)), "diff_b": t(own, (64,))}, alpha=1.0),
        LoraModule(CONV, "full", {"diff": t(own, (32, 16, 3, 3))}, alpha=1.0))
    valid("full.safetensors", full, 2, "kind full: diff (the weight delta itself, rank 0, alpha no effect) with and "
          "without diff_b; diffusers refuses the file ('Invalid LoRA checkpoint')", loads_in=["lorabridge"])

    def full_rank(m):
        m["modules"][CONV]["rank"] = 1
    invalid("full-rank.safetensors", full, "schema", "a full module with rank 1 (full modules have rank 0)", mutate=full_rank)

    # Container-level breakage and the from-scratch writer, written as raw bytes.
    good = (OUT / "minimal.safetensors").read_bytes()
    (OUT / "truncated.safetensors").write_bytes(good[:-10])
    invalid_raw("truncated.safetensors", "container", "last 10 data bytes cut")
    (OUT / "header-not-json.safetensors").write_bytes(struct.pack("<Q", 8) + b"{not js}")
    invalid_raw("header-not-json.safetensors", "container", "header is not JSON")
    (OUT / "oversize-header.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}")
    invalid_raw("oversize-header.safetensors", "container", "header length 2^40")
    write_safetensors(OUT / "no-manifest.safetensors", minimal.tensors(), {"format": "pt"})
    invalid_raw("no-manifest.safetensors", "not-neutral", "plain PEFT file, no manifest")
    scratch(OUT, rng)
    valid_raw = {"file": "scratch.safetensors", "verdict": "valid", "modules": 1, "loads_in": PIPELINE,
                 "note": "written from scratch (json, struct, numpy) with only the required fields: source_format none"}
    index.append(valid_raw)
    invalid_raw("data-gap.safetensors", "container", "4 unused bytes between the two tensors")
    invalid_raw("trailing-bytes.safetensors", "container", "8 bytes after the last tensor")

    (OUT / "index.json").write_text(json.dumps({"spec_version": SPEC_VERSION, "vectors": index}, indent=2) + "\n")
    print(f"wrote {len(index)} vectors to {OUT}")


def scratch(out: Path, rng) -> None:
    """scratch.safetensors as a third-party writer reading only the spec would write it, plus two files whose
    data region breaks spec 2 (a gap, trailing bytes) and is otherwise the same."""
    a = (rng.standard_normal((4, 64)) * 0.1).astype("<f4")
    b = (rng.standard_normal((64, 4)) * 0.1).astype("<f4")
    tensors = [(f"{ATTN_Q}.lora_A.weight", "F32", [4, 64], a.tobytes()), (f"{ATTN_Q}.lora_B.weight", "F32", [64, 4], b.tobytes())]
    manifest = {
        "format": "lorabridge.neutral-lora", "spec_version": "1.1",
        "base_model": {"architecture": "stable-diffusion-xl-v1-base", "components": ["unet"]},
        "layout": {"key_grammar": "<module>.<role>", "module_naming": "diffusers",
                   "matrix_order": "lora_A (rank, in_features), lora_B (out_features, rank), row-major little-endian",
                   "conv_layout": "lora_A (rank, in_channels, kh, kw), lora_B (out_channels, rank, 1, 1)", "dtypes": ["F32"]},
        "modules": {ATTN_Q: {"kind": "lora", "rank": 4, "alpha": 2, "in_features": 64, "out_features": 64, "dtype": "F32"}},
        "provenance": {"source_format": "none", "converter": "make_vectors scratch writer", "created": FIXED_TIME},
        "tensor_sha256": scratch_hash(tensors),
    }
    path = ATTN_Q.split(".", 1)[1]
    metadata = {
        "lorabridge.manifest": json.dumps(manifest), "format": "pt",
        "lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 2, "unet.target_modules": [path],
                                             "unet.rank_pattern": {}, "unet.alpha_pattern": {}, "unet.use_dora": False}),
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/huggingface/diffusers", "modelspec.title": "from scratch",
    }
    raw_file(out / "scratch.safetensors", tensors, metadata)
    raw_file(out / "data-gap.safetensors", tensors, metadata, gap=4)
    raw_file(out / "trailing-bytes.safetensors", tensors, metadata, trailing=b"\0" * 8)


if __name__ == "__main__":
    main()
