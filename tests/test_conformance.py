"""The conformance vectors in spec/vectors/ decide both our reader and an independent one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lorabridge.errors import LoraBridgeError
from lorabridge.formats.neutral import inspect_file
from lorabridge.report import validation_report
from tests import independent_reader

VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors"
INDEX = json.loads((VECTORS / "index.json").read_text())["vectors"]
VALID = [v for v in INDEX if v["verdict"] == "valid"]
INVALID = [v for v in INDEX if v["verdict"] == "invalid"]
# What our validator's problem text must mention for each reason class of the index.
REASON_WORDS = {
    "schema": "is not of type", "missing-tensor": "missing", "rank-mismatch": "rank mismatch",
    "manifest-mismatch": "manifest says|lists", "hash": "hash mismatch", "version": "reads 1.x only",
    "undeclared-tensor": "not described", "container": "truncated|not JSON|limit", "not-neutral": "not a neutral",
}


def test_index_covers_every_reason_and_file():
    assert {v["reason"] for v in INVALID} == set(REASON_WORDS)
    assert {v["file"] for v in INDEX} == {p.name for p in VECTORS.glob("*.safetensors")}


@pytest.mark.parametrize("vector", VALID, ids=lambda v: v["file"])
def test_our_reader_accepts_valid_vectors(vector):
    model, manifest, problems = inspect_file(VECTORS / vector["file"])
    assert problems == []
    assert len(model.modules) == vector["modules"]


@pytest.mark.parametrize("vector", INVALID, ids=lambda v: v["file"])
def test_our_validator_rejects_invalid_vectors_with_the_reason(vector):
    report = validation_report(VECTORS / vector["file"])
    assert not report["valid"]
    text = " ".join(p["problem"] for p in report["problems"])
    assert any(word in text for word in REASON_WORDS[vector["reason"]].split("|")), text


@pytest.mark.parametrize("vector", VALID, ids=lambda v: v["file"])
def test_independent_reader_reads_valid_vectors_like_ours(vector):
    manifest, tensors = independent_reader.read(VECTORS / vector["file"])
    assert len(manifest["modules"]) == vector["modules"]
    ours, _, _ = inspect_file(VECTORS / vector["file"])
    for name, entry in manifest["modules"].items():
        by_role = {k.rsplit(name + ".", 1)[1]: independent_reader._array(*t) for k, t in tensors.items()
                   if k.startswith(name + ".")}
        np.testing.assert_allclose(independent_reader.delta_w(entry, by_role), ours.modules[name].delta_weight(),
                                   rtol=1e-5, atol=1e-7)
        theirs, mine = independent_reader.magnitude(entry, by_role), ours.modules[name].tensors.get("dora_scale")
        assert (theirs is None) == (mine is None)
        if mine is not None:
            np.testing.assert_array_equal(theirs, mine.to_float32())


@pytest.mark.parametrize("vector", INVALID, ids=lambda v: v["file"])
def test_independent_reader_rejects_invalid_vectors(vector):
    with pytest.raises((independent_reader.Invalid, KeyError, ValueError, TypeError)):
        independent_reader.read(VECTORS / vector["file"])


def test_newer_minor_version_keeps_unknown_fields(tmp_path):
    from lorabridge.formats.neutral import read_neutral, write_neutral

    model = read_neutral(VECTORS / "newer-minor.safetensors")
    write_neutral(model, tmp_path / "again.safetensors")
    _, manifest, _ = inspect_file(tmp_path / "again.safetensors")
    assert manifest["future_field"] == {"kept": True}
    assert next(iter(manifest["modules"].values()))["future_module_field"] == 3


def test_vectors_are_reproducible(tmp_path, monkeypatch):
    """tools/make_vectors.py regenerates byte-identical files, so the committed vectors are its output."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_vectors", VECTORS.parent.parent / "tools" / "make_vectors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "OUT", tmp_path)
    module.main()
    for vector in INDEX:
        assert (tmp_path / vector["file"]).read_bytes() == (VECTORS / vector["file"]).read_bytes(), vector["file"]


def test_container_errors_name_the_file():
    with pytest.raises(LoraBridgeError, match="truncated.safetensors: .*truncated"):
        inspect_file(VECTORS / "truncated.safetensors")
