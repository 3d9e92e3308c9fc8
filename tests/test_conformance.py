"""The conformance vectors in spec/vectors/ decide both our validator and an independent reader (spec 8),
and ``lorabridge conformance`` runs any reader over them."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lorabridge.errors import LoraBridgeError
from lorabridge.formats.neutral import inspect_file, split_stored_key
from lorabridge.io.safetensors_file import SafetensorsFile
from lorabridge.manifest import MANIFEST_KEY
from lorabridge.neutral_rules import REASONS
from lorabridge.report import inspection_report, validation_report
from tests import independent_reader

VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors"
INDEX = json.loads((VECTORS / "index.json").read_text())["vectors"]
VALID = [v for v in INDEX if v["verdict"] == "valid"]
INVALID = [v for v in INDEX if v["verdict"] == "invalid"]


def expected(vector):
    valid = vector["verdict"] == "valid"
    return {"valid": valid, "reason": vector.get("reason"), "modules": vector.get("modules")}


def test_index_covers_every_reason_class_and_file():
    assert {v["reason"] for v in INVALID} == set(REASONS)
    assert {v["file"] for v in INDEX} == {p.name for p in VECTORS.glob("*.safetensors")}


@pytest.mark.parametrize("vector", INDEX, ids=lambda v: v["file"])
def test_validate_reaches_the_index_verdict_for_exactly_one_reason(vector):
    report = validation_report(VECTORS / vector["file"])
    assert {k: report[k] for k in ("valid", "reason", "modules")} == expected(vector), report["problems"]
    assert {p["reason"] for p in report["problems"]} <= {vector.get("reason")}


@pytest.mark.parametrize("vector", INDEX, ids=lambda v: v["file"])
def test_independent_reader_reaches_the_index_verdict(vector):
    assert independent_reader.verdict(VECTORS / vector["file"]) == expected(vector)


@pytest.mark.parametrize("vector", INVALID, ids=lambda v: v["file"])
def test_invalid_vectors_break_their_rule_only_and_not_the_hash(vector):
    """Spec 8: every vector with a readable container and manifest holds the hash of the tensors it holds."""
    try:
        _, tensors = independent_reader._container((VECTORS / vector["file"]).read_bytes())
        manifest = json.loads(SafetensorsFile(VECTORS / vector["file"]).metadata[MANIFEST_KEY])
    except (independent_reader.Invalid, KeyError, LoraBridgeError):
        return  # container / not-neutral vectors
    if vector["reason"] != "hash":
        assert independent_reader._hash(tensors) == manifest["tensor_sha256"]


@pytest.mark.parametrize("vector", VALID, ids=lambda v: v["file"])
def test_independent_reader_computes_our_delta_w(vector):
    manifest, tensors = independent_reader.read(VECTORS / vector["file"])
    ours, _, _ = inspect_file(VECTORS / vector["file"])
    for name, entry in manifest["modules"].items():
        by_role = {k[len(name) + 1:]: independent_reader._array(*t) for k, t in tensors.items()
                   if k.startswith(name + ".") and split_stored_key(k)[0] == name}
        np.testing.assert_allclose(independent_reader.delta_w(entry, by_role), ours.modules[name].delta_weight(),
                                   rtol=1e-5, atol=1e-6)
        theirs, mine = independent_reader.magnitude(entry, by_role), ours.modules[name].tensors.get("dora_scale")
        assert (theirs is None) == (mine is None)
        if mine is not None:
            np.testing.assert_array_equal(theirs, mine.to_float32())


@pytest.mark.parametrize("vector", VALID, ids=lambda v: v["file"])
def test_inspect_names_the_consumers_the_index_lists(vector):
    report = inspection_report(VECTORS / vector["file"])
    assert [c for c, verdict in report["loads_in"].items() if verdict == "yes"] == vector["loads_in"]


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


ROOT = VECTORS.parent.parent


def conformance_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "cli.py", "conformance", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_runner_finds_full_agreement_with_the_independent_reader():
    proc = conformance_cli("--reader", f"{shlex.quote(sys.executable)} tests/independent_reader.py {{file}}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.stdout.strip().endswith(f"{len(INDEX)}/{len(INDEX)} vectors agree")
    assert proc.stdout.count("\nok   ") == len(INDEX) - 1 and proc.stderr == ""


def test_runner_reports_a_reader_that_accepts_everything():
    proc = conformance_cli("--reader", "sh -c 'echo \"{\\\"valid\\\": true, \\\"modules\\\": 1}\"' {file}", "--json")
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    agreeing = {r["file"] for r in report["results"] if r["agrees"]}
    assert agreeing == {v["file"] for v in VALID if v["modules"] == 1}
    wrong = next(r for r in report["results"] if r["file"] == "wrong-hash.safetensors")
    assert wrong["problem"] == "expected invalid (hash), reader says valid (None)"


def test_runner_gives_one_line_per_vector_for_readers_that_hang_crash_or_babble(tmp_path):
    names = ["minimal.safetensors", "wrong-hash.safetensors", "mixed.safetensors", "kinds.safetensors"]
    for name in names:
        shutil.copy(VECTORS / name, tmp_path / name)
    (tmp_path / "index.json").write_text(json.dumps({"vectors": [v for v in INDEX if v["file"] in names]}))
    reader = tmp_path / "reader.sh"
    reader.write_text('case "$1" in\n'
                      '  *minimal*) sleep 60;;\n'
                      '  *wrong-hash*) echo "Traceback: boom" >&2; exit 3;;\n'
                      '  *mixed*) echo "this is not json";;\n'
                      '  *) echo \'{"valid": true, "reason": null, "modules": 3}\';;\n'
                      'esac\n')
    started = time.monotonic()
    proc = conformance_cli("--reader", f"sh {reader} {{file}}", "--vectors", str(tmp_path), "--timeout", "2", timeout=120)
    assert time.monotonic() - started < 60
    assert proc.returncode == 1 and proc.stderr == ""
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == len(names) + 1 and "Traceback (most recent call last)" not in proc.stdout
    by_file = {line.split()[1].rstrip(":"): line for line in lines[:-1]}
    assert "timed out after 2 s" in by_file["minimal.safetensors"]
    assert "crashed (exit 3): Traceback: boom" in by_file["wrong-hash.safetensors"]
    assert "no JSON verdict: 'this is not json'" in by_file["mixed.safetensors"]
    assert by_file["kinds.safetensors"].startswith("ok   kinds.safetensors")
    assert lines[-1] == "1/4 vectors agree"


def test_runner_refuses_a_reader_command_without_file():
    proc = conformance_cli("--reader", "cat")
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and "{file}" in proc.stderr


def test_validate_json_is_a_conformance_verdict(run_cli):
    result = run_cli("validate", "--json", VECTORS / "dora-axis-contradicts.safetensors")
    report = json.loads(result.output)
    assert result.exit_code == 1 and report["valid"] is False and report["reason"] == "dora" and report["modules"] is None
    assert "needs [1, 32] (that is the out axis' shape)" in report["problems"][0]["problem"]
    report = json.loads(run_cli("validate", "--json", VECTORS / "kinds.safetensors").output)
    assert (report["valid"], report["reason"], report["modules"]) == (True, None, 3)
