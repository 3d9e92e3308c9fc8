"""Mutated neutral files never crash the reader: they parse or give the project's own error.

Bounded hypothesis runs (part of ``make test``); ``bench/fuzz_atheris.py`` runs the same
targets for longer under atheris.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorabridge.errors import LoraBridgeError
from lorabridge.formats.neutral import inspect_file
from lorabridge.manifest import MANIFEST_KEY

VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors"
SEEDS = [(VECTORS / name).read_bytes() for name in ("minimal.safetensors", "mixed.safetensors", "kinds.safetensors")]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def read_bytes_safely(blob: bytes, tmp_path) -> None:
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(blob)
    try:
        inspect_file(path, verify_hash=True)
    except LoraBridgeError:
        pass  # the only acceptable failure


@st.composite
def mutated(draw):
    blob = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        action = draw(st.sampled_from(["flip", "cut", "insert", "overwrite_len"]))
        pos = draw(st.integers(0, max(len(blob) - 1, 0)))
        if action == "flip" and blob:
            blob[pos] ^= 1 << draw(st.integers(0, 7))
        elif action == "cut":
            del blob[pos:]
        elif action == "insert":
            blob[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif len(blob) >= 8:
            blob[:8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1)))
    return bytes(blob)


@FUZZ
@given(blob=mutated())
def test_mutated_files_give_our_error_or_parse(blob, tmp_path):
    read_bytes_safely(blob, tmp_path)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
                    max_leaves=20)


def with_manifest_edit(path: str, value) -> dict:
    """The minimal vector's manifest with the field at dotted ``path`` replaced by ``value``."""
    raw = SEEDS[0]
    (n,) = struct.unpack("<Q", raw[:8])
    manifest = json.loads(json.loads(raw[8:8 + n])["__metadata__"][MANIFEST_KEY])
    node = manifest
    *parents, last = path.split("/")
    for part in parents:
        node = node[part]
    node[last] = value
    return manifest


MANIFEST_PATHS = ["spec_version", "base_model", "base_model/components", "layout", "modules",
                  "modules/unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                  "modules/unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q/kind",
                  "modules/unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q/rank",
                  "provenance", "tensor_sha256", "training"]


@FUZZ
@given(path=st.sampled_from(MANIFEST_PATHS), value=JSON)
def test_arbitrary_manifest_values_give_our_error_or_parse(path, value, tmp_path):
    raw = SEEDS[0]
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header["__metadata__"][MANIFEST_KEY] = json.dumps(with_manifest_edit(path, value))
    head = json.dumps(header).encode()
    read_bytes_safely(struct.pack("<Q", len(head)) + head + raw[8 + n:], tmp_path)


def test_a_declared_module_without_tensors_is_missing_tensors_not_a_crash(tmp_path):
    """atheris finding (bench/fuzz_atheris.py neutral): a manifest module whose tensors were renamed away
    made the module-dtype rule index an empty list (IndexError) instead of reporting missing tensors."""
    from lorabridge.formats.neutral import examine

    raw = SEEDS[0]
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    manifest = json.loads(header["__metadata__"][MANIFEST_KEY])
    (name,) = manifest["modules"]
    manifest["modules"]["unet.conv_in"] = dict(manifest["modules"][name])  # declared, and no tensor has its name
    manifest["base_model"]["components"] = ["unet"]
    header["__metadata__"][MANIFEST_KEY] = json.dumps(manifest)
    head = json.dumps(header).encode()
    path = tmp_path / "empty-module.safetensors"
    path.write_bytes(struct.pack("<Q", len(head)) + head + raw[8 + n:])
    _, _, findings = examine(path)
    assert ("missing-tensor", "tensor 'unet.conv_in.lora_A.weight'") in [finding[:2] for finding in findings]


@FUZZ
@given(field=st.sampled_from(["dtype", "shape", "data_offsets", None, "__metadata__"]), value=JSON)
def test_arbitrary_header_entry_values_give_our_error_or_parse(field, value, tmp_path):
    """Any JSON value as a tensor's dtype, shape or data_offsets, as a whole tensor entry (None) or as the
    metadata, is read or refused with our error: a list or an object where a string belongs is unhashable, and
    was once a crash."""
    raw = SEEDS[0]
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name = next(key for key in header if key != "__metadata__")
    if field == "__metadata__":
        header["__metadata__"] = value
    elif field is None:
        header[name] = value
    else:
        header[name][field] = value
    head = json.dumps(header).encode()
    read_bytes_safely(struct.pack("<Q", len(head)) + head + raw[8 + n:], tmp_path)
