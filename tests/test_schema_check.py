"""schema_check.surely_valid: True only where jsonschema finds nothing, and True for what lorabridge writes,
so a conversion of a valid neutral file never imports jsonschema."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
from hypothesis import given, settings
from hypothesis import strategies as st

from lorabridge.manifest import build_manifest, load_schema
from lorabridge.schema_check import surely_valid
from tests.fixtures.core import make_lora_model

REPO = Path(__file__).resolve().parent.parent
VALIDATOR = jsonschema.Draft202012Validator(load_schema(), format_checker=jsonschema.FormatChecker())
MANIFEST = json.loads(json.dumps(build_manifest(make_lora_model(), "0" * 64)))
JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 3) | st.floats(-2, 2, allow_nan=False)
                    | st.sampled_from(["", "lora", "full", "F16", "x", "unet.a.b", "2026-02-30T00:00:00Z",
                                       "2026-01-01T00:00:60Z", "2026-01-01T00:00:00Z", "0" * 64, "1.0"]),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["kind", "rank", "a"]), inner, max_size=3),
                    max_leaves=6)


def _paths(value, path=()):
    """Every place in a JSON value (as key paths)."""
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _paths(item, (*path, i))


PLACES = list(_paths(MANIFEST))[1:]


@settings(max_examples=400, deadline=None)
@given(changes=st.lists(st.tuples(st.sampled_from(PLACES), JSON, st.booleans()), max_size=3))
def test_surely_valid_is_never_wrong(changes):
    manifest = copy.deepcopy(MANIFEST)
    for path, value, delete in changes:
        parent = manifest
        try:
            for key in path[:-1]:
                parent = parent[key]
            if delete and isinstance(parent, dict):
                del parent[path[-1]]
            else:
                parent[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue
    if surely_valid(manifest, load_schema()):
        assert list(VALIDATOR.iter_errors(manifest)) == []


def test_what_lorabridge_writes_is_surely_valid():
    assert surely_valid(MANIFEST, load_schema())
    kinds = {**MANIFEST, "modules": {"unet.a.b": {**next(iter(MANIFEST["modules"].values())), "kind": "full", "rank": 0}}}
    assert surely_valid(kinds, load_schema()) and not list(VALIDATOR.iter_errors(kinds))


def test_unknown_keywords_and_formats_are_not_surely_valid():
    assert not surely_valid(1, {"multipleOf": 2})
    assert not surely_valid("x", {"format": "email"})
    assert not surely_valid(2.0, {"type": "integer"})  # valid for jsonschema, but not surely here


def test_converting_a_neutral_file_does_not_import_jsonschema(tmp_path):
    from lorabridge.formats.neutral import write_neutral

    write_neutral(make_lora_model(), tmp_path / "in.safetensors")
    code = ("import sys; from lorabridge.converters import convert; "
            f"convert({str(tmp_path / 'in.safetensors')!r}, {str(tmp_path / 'out.safetensors')!r}, to='diffusers', progress=False); "
            "print('jsonschema' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.stdout.strip() == "False"


def test_each_distinct_module_entry_is_checked_once_and_every_bad_one_still_fails():
    """schema_problems checks one entry of each distinct value: a bad entry anywhere, even one differing
    from a good one only in a JSON type (1 against 1.0), is still found."""
    from lorabridge.manifest import schema_problems

    entry = next(iter(MANIFEST["modules"].values()))
    many = {**MANIFEST, "modules": {f"unet.m{i}.x": dict(entry) for i in range(300)}}
    assert schema_problems(many) == []
    for value in (0, "4", True, 4.0):  # 4.0 is an integer to JSON Schema: not surely valid, so jsonschema decides
        changed = copy.deepcopy(many)
        changed["modules"]["unet.m250.x"]["rank"] = value
        expected = sorted((e.json_path, e.message) for e in VALIDATOR.iter_errors(changed))
        assert schema_problems(changed) == expected and bool(expected) == (value != 4.0), value
    badly_named = {**many, "modules": {**many["modules"], "no-dots": dict(entry)}}
    assert schema_problems(badly_named)
