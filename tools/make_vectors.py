"""Regenerate the conformance vectors in spec/vectors/ (deterministic: same bytes every run).

Run: python tools/make_vectors.py. Valid vectors are written by lorabridge itself; invalid ones
are valid files with exactly one thing broken, written below the library's own safety checks.
"""

from __future__ import annotations

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


def save(name: str, model: LoraModel, mutate=None, tensors=None, spelled=None) -> None:
    """Write a vector; ``mutate(manifest)`` breaks the manifest, ``tensors`` replaces the tensor set,
    ``spelled`` replaces it and the hash too (a valid file as another, older writer spells it)."""
    real = spelled if spelled is not None else stored_tensors(model)
    manifest = build_manifest(model, tensor_sha256(real))
    if mutate:
        mutate(manifest)
    metadata = interop_metadata(model, manifest)
    metadata[MANIFEST_KEY] = json.dumps(manifest, separators=(",", ":"))
    path = OUT / name
    path.unlink(missing_ok=True)
    write_safetensors(path, tensors if tensors is not None else real, metadata)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2026)
    index = []

    def valid(name, model, modules, note, **kw):
        save(name, model, **kw)
        index.append({"file": name, "verdict": "valid", "modules": modules, "note": note})

    def invalid(name, model, reason, note, **kw):
        save(name, model, **kw)
        index.append({"file": name, "verdict": "invalid", "reason": reason, "note": note})

    minimal = model_of(lora(rng, ATTN_Q, 64, 64, 4, 4.0))
    valid("minimal.safetensors", minimal, 1, "one linear LoRA module, F32, alpha = rank")

    mixed = model_of(
        lora(rng, ATTN_Q, 64, 64, 4, 8.0),
        lora(rng, "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", 32, 64, 2, 1.0, dtype="F16"),
        lora(rng, "unet.down_blocks.1.resnets.0.conv1", 16, 32, 2, 2.0, kernel=(3, 3)),
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
        LoraModule("unet.mid_block.attentions.0.proj_in", "loha",
                   {"hada_w1_a": t(rng, (48, 4)), "hada_w1_b": t(rng, (4, 40)),
                    "hada_w2_a": t(rng, (48, 4)), "hada_w2_b": t(rng, (4, 40))}, alpha=2.0),
        LoraModule("unet.mid_block.attentions.0.proj_out", "lokr",
                   {"lokr_w1": t(rng, (4, 4)), "lokr_w2_a": t(rng, (12, 2)), "lokr_w2_b": t(rng, (2, 10))}, alpha=1.0),
        LoraModule(ATTN_Q, "lora", {"lora_A.weight": t(rng, (4, 64)), "lora_B.weight": t(rng, (64, 4)),
                                    "dora_scale": t(rng, (64, 1))}, alpha=4.0, dora_axis="out"),
    )
    valid("kinds.safetensors", kinds, 3, "LoHa, LoKr and a DoRA LoRA module (lora_magnitude_vector, spec 1.1)")

    def spec_one_zero(m):
        m["spec_version"] = "1.0"
    valid("dora-1.0-spelling.safetensors", kinds, 3, "the same as spec 1.0 writers stored it: dora_scale (64, 1)",
          mutate=spec_one_zero, spelled=kinds.tensors())

    own = np.random.default_rng(2027)  # not rng: the vectors after this one keep their bytes
    per_column = model_of(
        LoraModule(ATTN_Q, "lora", {"lora_A.weight": t(own, (4, 64)), "lora_B.weight": t(own, (64, 4)),
                                    "dora_scale": t(own, (1, 64))}, alpha=4.0, dora_axis="in"),
        LoraModule("unet.down_blocks.1.resnets.0.conv1", "loha",
                   {"hada_w1_a": t(own, (16, 2)), "hada_w1_b": t(own, (2, 32, 3, 3)), "hada_w2_a": t(own, (16, 2)),
                    "hada_w2_b": t(own, (2, 32, 3, 3)), "dora_scale": t(own, (1, 32, 1, 1))}, alpha=1.0, dora_axis="in"),
    )
    valid("dora-in.safetensors", per_column, 2, "DoRA magnitudes per input column (dora_scale (1, in[, 1, 1])), linear and conv")

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

    # Container-level breakage, written as raw bytes.
    good = (OUT / "minimal.safetensors").read_bytes()
    (OUT / "truncated.safetensors").write_bytes(good[:-10])
    index.append({"file": "truncated.safetensors", "verdict": "invalid", "reason": "container", "note": "last 10 data bytes cut"})
    (OUT / "header-not-json.safetensors").write_bytes(struct.pack("<Q", 8) + b"{not js}")
    index.append({"file": "header-not-json.safetensors", "verdict": "invalid", "reason": "container", "note": "header is not JSON"})
    (OUT / "oversize-header.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}")
    index.append({"file": "oversize-header.safetensors", "verdict": "invalid", "reason": "container", "note": "header length 2^40"})
    write_safetensors(OUT / "no-manifest.safetensors", minimal.tensors(), {"format": "pt"})
    index.append({"file": "no-manifest.safetensors", "verdict": "invalid", "reason": "not-neutral", "note": "plain PEFT file, no manifest"})

    (OUT / "index.json").write_text(json.dumps({"spec_version": SPEC_VERSION, "vectors": index}, indent=2) + "\n")
    print(f"wrote {len(index)} vectors to {OUT}")


if __name__ == "__main__":
    main()
