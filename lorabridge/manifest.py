"""The manifest: the JSON that describes a neutral file, its schema, versioning and hashing.

The manifest is the neutral file's contract with other tools: a reader in any
language validates it against ``schemas/neutral-lora-v1.schema.json`` and then
checks the tensors against it. Unknown fields are preserved on read and write
so that files from newer minor versions survive a round trip through us.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
import struct
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from . import __version__
from .io.streaming import release_pages
from .io.zero_copy import READ_CHUNK_BYTES, chunks, in_one_piece
from .model import LoraModel, LoraModule, dominant_dtype
from .schema_check import surely_valid
from .tensor import Tensor

MANIFEST_KEY = "lorabridge.manifest"
FORMAT_NAME = "lorabridge.neutral-lora"
SPEC_VERSION = "1.1"  # the version this lorabridge writes, and the newest it reads
VERSION_PATTERN = re.compile(r"[0-9]+\.[0-9]+")  # spec 5.6: "MAJOR.MINOR"; anything else is a schema error
# Since 1.1 a kind-lora module's DoRA magnitude per output row is stored as PEFT spells it,
# ``<module>.lora_magnitude_vector`` of shape (out,) or (1, out, 1, 1), so that diffusers loads it.
PEFT_MAGNITUDE = "lora_magnitude_vector"
SCHEMA_NAME = "neutral-lora-v1.schema.json"
LAYOUT = {
    "key_grammar": "<module>.<role>",
    "module_naming": "diffusers",
    "matrix_order": "lora_A (rank, in_features), lora_B (out_features, rank), row-major little-endian",
    "conv_layout": "lora_A (rank, in_channels, kh, kw), lora_B (out_channels, rank, 1, 1)",
}
# Module fields this version writes; anything else in a module entry is kept in LoraModule.extra.
_MODULE_FIELDS = {"kind", "rank", "alpha", "alpha_source", "in_features", "out_features", "kernel_size", "dora_axis", "dtype"}
_TOP_FIELDS = {"format", "spec_version", "base_model", "layout", "modules", "targets", "provenance", "training", "tensor_sha256"}


class VersionError(ValueError):
    """The manifest's major version is newer than this reader understands."""


@lru_cache(maxsize=1)
def load_schema() -> dict:
    """The published JSON Schema (from the checkout's ``schemas/`` or the installed wheel)."""
    checkout = Path(__file__).resolve().parent.parent / "schemas" / SCHEMA_NAME
    if checkout.is_file():
        return json.loads(checkout.read_text("utf-8"))
    return json.loads(resources.files("lorabridge.schemas").joinpath(SCHEMA_NAME).read_text("utf-8"))


def dump_json(data: Any, **options: Any) -> str:
    """``data`` as strict JSON text; :class:`ValueError` for NaN or Inf, which JSON cannot hold."""
    return json.dumps(data, allow_nan=False, **options)


def check_version(version: Any) -> None:
    """Accept 1.x (any minor); refuse a newer major with a message saying what to do."""
    ours = int(SPEC_VERSION.split(".")[0])
    try:
        major = int(str(version).split(".")[0])
    except ValueError:
        raise VersionError(f"spec_version {version!r} is not MAJOR.MINOR") from None
    if major > ours:
        raise VersionError(f"written for neutral LoRA spec {version}; this lorabridge {__version__} reads {ours}.x only, upgrade lorabridge")
    if major < 1:
        raise VersionError(f"spec_version {version!r}: there is no 0.x version of the neutral LoRA spec, this lorabridge reads 1.x only")


@lru_cache(maxsize=2)
def _validator(check_module_entries: bool = True):
    """The schema's validator; without ``check_module_entries``, one that leaves module entries unchecked."""
    import jsonschema

    schema = load_schema() if check_module_entries else _schema_without_module_entries()
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def _sorted_problems(errors) -> list[tuple[str, str]]:
    return [(error.json_path, error.message) for error in sorted(errors, key=lambda e: e.json_path)]


def _surely_valid_by_distinct_entries(manifest: Any) -> bool:
    """:func:`~lorabridge.schema_check.surely_valid` on the manifest, each distinct module entry checked once.

    Module entries are checked against one subschema whatever their name, and entries with the same
    ``repr`` are equal JSON values of the same types (``1``, ``1.0`` and ``true`` differ), so one check
    answers for all of them: an SDXL LoRA's 1,000 entries have a few dozen distinct ones. The repr keeps
    the keys' order: an equal entry in another order is checked once more, which is only slower (the
    writer builds every entry in one order; sorting each first cost 2.3 ms of a rank-4 LoRA's 5.7).
    """
    schema = load_schema()
    modules = manifest.get("modules") if isinstance(manifest, dict) else None
    if not isinstance(modules, dict):
        return surely_valid(manifest, schema)
    entry_schema = schema["properties"]["modules"]["additionalProperties"]
    passed: set[str] = set()
    for entry in modules.values():
        key = repr(entry) if isinstance(entry, dict) else None
        if key in passed:
            continue
        if not surely_valid(entry, entry_schema, schema):
            return False
        if key is not None:
            passed.add(key)
    return surely_valid(manifest, _schema_without_module_entries())


@lru_cache(maxsize=1)
def _schema_without_module_entries() -> dict:
    """The schema with module entries left unchecked (their names still are)."""
    schema = load_schema()
    modules = {k: v for k, v in schema["properties"]["modules"].items() if k != "additionalProperties"}
    return {**schema, "properties": {**schema["properties"], "modules": modules}}


def schema_problems(manifest: Any) -> list[tuple[str, str]]:
    """Every schema violation as (JSON path, message); empty when valid.

    A file has hundreds of module entries but few distinct ones, and every entry is checked
    against the same subschema whatever its name, so identical entries have identical problems:
    each distinct entry is checked once (its problems repeated under every module holding it),
    and the rest of the manifest, module names included, with module entries left unchecked.
    The result is what checking the whole manifest in one go gives (tested), several times faster.
    A manifest :func:`~lorabridge.schema_check.surely_valid` passes has no problems, and jsonschema
    is not even imported for it (most files: that import is a good part of a small conversion's start-up).
    """
    if _surely_valid_by_distinct_entries(manifest):
        return []
    modules = manifest.get("modules") if isinstance(manifest, dict) else None
    groups: dict[str, list[str]] = {}
    try:
        for name, entry in (modules.items() if isinstance(modules, dict) else ()):
            groups.setdefault(json.dumps(entry, sort_keys=True), []).append(name)
    except (TypeError, ValueError):  # not JSON data: no grouping
        groups = {}
    if not isinstance(modules, dict) or len(groups) in (0, len(modules)):  # nothing to gain: check it all
        return _sorted_problems(_validator().iter_errors(manifest))
    errors = list(_validator(check_module_entries=False).iter_errors(manifest))
    sample = {**manifest, "modules": {names[0]: modules[names[0]] for names in groups.values()}}
    problems = []
    for error in _validator().iter_errors(sample):
        path = error.relative_path
        if len(path) < 2 or path[0] != "modules":
            continue  # outside the module entries: found by the first pass
        for name in groups[json.dumps(modules[path[1]], sort_keys=True)]:
            path[1] = name
            problems.append((error.json_path, error.message))
    return sorted(_sorted_problems(errors) + problems, key=lambda problem: problem[0])


def tensor_sha256(tensors: Mapping[str, Tensor]) -> str:
    """The spec's tensor hash: sha256 over tensors sorted by key (UTF-8 bytes) of
    ``key NUL dtype NUL dims-comma-separated NUL u64le(nbytes) data``.

    Binding names, dtypes and shapes means a renamed or reshaped tensor changes the hash,
    not only a flipped data byte. Bytes lying in an input file are read from it into one small
    buffer (:func:`~lorabridge.io.zero_copy.chunks`), others' mapped pages let go once hashed, so
    hashing a large file does not leave it all resident.

    Example:
        >>> tensor_sha256({})
        'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855'
    """
    digest, buffer = hashlib.sha256(), bytearray(READ_CHUNK_BYTES)
    described: dict[tuple[str, tuple[int, ...]], bytes] = {}  # a LoRA has few distinct (dtype, shape): each told once
    for encoded, key in sorted((key.encode("utf-8"), key) for key in tensors):
        t = tensors[key]
        description = described.get((t.dtype, t.shape))
        if description is None:
            description = described[t.dtype, t.shape] = (
                f"\0{t.dtype}\0{','.join(map(str, t.shape))}\0".encode("utf-8") + struct.pack("<Q", t.nbytes))
        digest.update(encoded + description)
        if in_one_piece(t):  # as chunks would give it: its generator costs more than a small tensor's hash
            digest.update(t.data)
            release_pages(t.data)
            continue
        for piece in chunks(t, buffer):
            digest.update(piece)
    return digest.hexdigest()


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def module_entry(module: LoraModule) -> dict[str, Any]:
    weight_shape = module.weight_shape  # worked out once for in_features, out_features and kernel_size
    entry: dict[str, Any] = {
        "kind": module.kind,
        "rank": module.rank,
        "alpha": module.alpha,
        "alpha_source": module.alpha_source,
        "in_features": weight_shape[1],
        "out_features": weight_shape[0],
    }
    if weight_shape[2:]:
        entry["kernel_size"] = list(weight_shape[2:])
    if module.dora_axis:
        entry["dora_axis"] = module.dora_axis
    entry["dtype"] = dominant_dtype({stored_role(module, role): t.dtype for role, t in module.tensors.items()})
    return {**module.extra, **entry}


def stores_peft_magnitude(module: LoraModule) -> bool:
    """Whether a neutral file stores this module's DoRA magnitude as :data:`PEFT_MAGNITUDE` (spec 1.1)."""
    return module.kind == "lora" and module.dora_axis == "out" and "dora_scale" in module.tensors


def stored_role(module: LoraModule, role: str) -> str:
    """The role a neutral file stores ``module``'s tensor ``role`` under: :data:`PEFT_MAGNITUDE` for a
    magnitude :func:`stores_peft_magnitude` says so of, else the model's role."""
    return PEFT_MAGNITUDE if role == "dora_scale" and stores_peft_magnitude(module) else role


def build_manifest(model: LoraModel, tensor_hash: str) -> dict[str, Any]:
    """The manifest for ``model`` (whose tensors hash to ``tensor_hash``)."""
    provenance = {"converter": f"lorabridge {__version__}", "created": now_utc(), **model.provenance}
    provenance.setdefault("source_format", "lorabridge-neutral")
    return {
        **model.extra,
        "format": FORMAT_NAME,
        "spec_version": SPEC_VERSION,
        "base_model": {"architecture": model.architecture, "components": model.components},
        "layout": {**LAYOUT, "dtypes": sorted({t.dtype for t in model.tensors().values()})},
        "modules": {name: module_entry(m) for name, m in model.modules.items()},
        "targets": model.targets(),
        "provenance": provenance,
        "training": model.training,
        "tensor_sha256": tensor_hash,
    }


def model_facts(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The file-level facts of a manifest as :class:`LoraModel` keyword arguments."""
    return {
        "architecture": manifest["base_model"]["architecture"],
        "provenance": dict(manifest.get("provenance", {})),
        "training": dict(manifest.get("training", {})),
        "extra": {k: v for k, v in manifest.items() if k not in _TOP_FIELDS},
    }


def module_facts(entry: Mapping[str, Any]) -> dict[str, Any]:
    """One manifest module entry as :class:`LoraModule` keyword arguments (tensors aside)."""
    return {
        "kind": entry["kind"],
        "alpha": float(entry["alpha"]),
        "alpha_source": entry.get("alpha_source", "stored"),
        "dora_axis": entry.get("dora_axis"),
        "extra": {k: v for k, v in entry.items() if k not in _MODULE_FIELDS},
    }
