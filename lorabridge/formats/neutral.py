"""The neutral file: one safetensors file, tensors under ``<module>.<role>``, manifest in metadata.

Besides the manifest (key ``lorabridge.manifest``) the writer adds what other
tools read, so the file loads unchanged in diffusers and mindone.diffusers
``load_lora_weights`` with the right alpha: ``format`` = ``pt``, a prefixed
``lora_adapter_metadata`` LoraConfig per component, and ModelSpec keys.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any, Callable

from ..errors import LoraBridgeError, ValidationProblem
from ..io.safetensors_file import SafetensorsFile, write_safetensors
from ..io.streaming import in_background
from ..manifest import (MANIFEST_KEY, VERSION_PATTERN, VersionError, build_manifest, check_version, model_facts,
                        module_facts, schema_problems, tensor_sha256)
from ..model import LoraModel, LoraModule, dominant_dtype, split_key
from ..neutral_rules import (ALLOWED_DTYPES, REASONS, RuleBroken, check_dora, check_roles, interop_problems, module_geometry)

Problem = tuple[str, str]
Finding = tuple[str, str, str]  # (reason class of spec 8, location, message)
RECORDS_SOURCE_HASH = True  # the manifest's provenance stores source_sha256 (see converters.convert)


def adapter_metadata(model: LoraModel) -> dict[str, Any]:
    """diffusers' prefixed LoraConfig per component: the most common rank/alpha plus patterns for the rest."""
    out: dict[str, Any] = {}
    for component in model.components:
        modules = [m for m in model.modules.values() if m.component == component and m.kind == "lora"]
        if not modules:
            continue
        rank = Counter(m.rank for m in modules).most_common(1)[0][0]
        alpha = Counter(m.alpha for m in modules).most_common(1)[0][0]
        out.update({
            f"{component}.r": rank,
            f"{component}.lora_alpha": alpha,
            f"{component}.target_modules": [m.path for m in modules],
            f"{component}.rank_pattern": {m.path: m.rank for m in modules if m.rank != rank},
            f"{component}.alpha_pattern": {m.path: m.alpha for m in modules if m.alpha != alpha},
            f"{component}.use_dora": any(m.dora_axis for m in modules),
        })
    return out


def interop_metadata(model: LoraModel, manifest: dict[str, Any]) -> dict[str, str]:
    """All safetensors metadata of a neutral file: the manifest plus the keys other tools read."""
    metadata = {
        MANIFEST_KEY: json.dumps(manifest, separators=(",", ":"), sort_keys=False),
        "format": "pt",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{model.architecture}/lora",
        "modelspec.implementation": "https://github.com/huggingface/diffusers",
        "modelspec.title": str(model.training.get("title") or model.provenance.get("source_file") or "lorabridge LoRA"),
    }
    peft = adapter_metadata(model)
    if peft:
        metadata["lora_adapter_metadata"] = json.dumps(peft, separators=(",", ":"))
    return metadata


def write_neutral(model: LoraModel, path: str | os.PathLike, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write ``model`` as a neutral file (atomically) and return the manifest written.

    One pass over the tensor data: ``tensor_sha256`` is computed in a thread while the data is
    written, behind a placeholder of the same length that is overwritten in the header at the end.

    Example:
        >>> manifest = write_neutral(model, "lora.safetensors")   # doctest: +SKIP
    """
    tensors = model.tensors()
    digest = in_background(tensor_sha256, tensors)
    placeholder = os.urandom(32).hex()  # 64 hex digits, like the hash, and nowhere else in the header
    manifest = build_manifest(model, placeholder)
    problems = schema_problems(manifest)
    if problems:
        raise ValidationProblem(problems, path)
    write_safetensors(path, tensors, interop_metadata(model, manifest), progress=progress, late={placeholder: digest})
    manifest["tensor_sha256"] = digest()
    return manifest


def _manifest_of(handle: SafetensorsFile) -> tuple[dict[str, Any] | None, list[Finding]]:
    """Spec 8 stages not-neutral, version, dtype and schema: the manifest, or the first stage's findings."""
    raw = handle.metadata.get(MANIFEST_KEY)
    if raw is None:
        return None, [("not-neutral", "__metadata__", f"no {MANIFEST_KEY!r} key: not a neutral LoRA file")]
    where = f"__metadata__.{MANIFEST_KEY}"
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as exc:
        return None, [("schema", where, f"manifest is not JSON ({exc})")]
    if not isinstance(manifest, dict):
        return None, [("schema", where, "manifest is not a JSON object")]
    version = manifest.get("spec_version")
    if isinstance(version, str) and VERSION_PATTERN.fullmatch(version):
        try:
            check_version(version)
        except VersionError as exc:
            return None, [("version", "$.spec_version", str(exc))]
    foreign = [(key, handle.header_entry(key)[0]) for key in handle.keys() if handle.header_entry(key)[0] not in ALLOWED_DTYPES]
    if foreign:
        return None, [("dtype", f"tensor '{key}'", f"dtype {dtype} is not one of {', '.join(ALLOWED_DTYPES)}")
                      for key, dtype in foreign]
    problems = schema_problems(manifest)
    if problems:
        return None, [("schema", where, what) for where, what in problems]
    return manifest, []


def _module_findings(name: str, entry: dict[str, Any], headers: dict[str, tuple[str, tuple[int, ...]]]) -> list[Finding]:
    """Spec 3.2-3.3 and 5.3: one module's tensors (role -> (dtype, shape)) against its manifest entry."""
    where = f"$.modules['{name}']"
    shapes = {role: shape for role, (_, shape) in headers.items()}
    try:
        check_roles(entry["kind"], set(shapes))
        rank, weight = module_geometry(entry["kind"], shapes)
        check_dora(entry.get("dora_axis"), shapes.get("dora_scale"), weight)
    except RuleBroken as exc:
        return [(exc.reason, where, exc.message)]
    actual = {"rank": rank, "out_features": weight[0], "in_features": weight[1],
              "kernel_size": list(weight[2:]) or None, "dtype": dominant_dtype({r: d for r, (d, _) in headers.items()})}
    return [("manifest-mismatch", f"{where}.{field}", f"manifest says {entry.get(field)!r}, tensors say {value!r}")
            for field, value in actual.items() if entry.get(field) != value]


def _file_findings(handle: SafetensorsFile, manifest: dict[str, Any]) -> list[Finding]:
    """Spec 8 stage tensors: every tensor declared, every module well-formed and as declared, components, dtypes."""
    headers: dict[str, dict] = {name: {} for name in manifest["modules"]}
    findings: list[Finding] = []
    for key in handle.keys():
        parts = split_key(key)
        if parts is None or parts[0] not in headers:
            findings.append(("undeclared-tensor", f"tensor '{key}'", "not described by any manifest module"))
            continue
        headers[parts[0]][parts[1]] = handle.header_entry(key)
    for name, entry in manifest["modules"].items():
        findings += _module_findings(name, entry, headers[name])
    components = set(manifest["base_model"]["components"])
    actual = {name.split(".", 1)[0] for name in manifest["modules"]}
    if components != actual:
        findings.append(("manifest-mismatch", "$.base_model.components", f"lists {sorted(components)}, modules are in {sorted(actual)}"))
    dtypes = {handle.header_entry(key)[0] for key in handle.keys()}
    if set(manifest["layout"]["dtypes"]) != dtypes:
        findings.append(("manifest-mismatch", "$.layout.dtypes", f"lists {sorted(manifest['layout']['dtypes'])}, tensors are {sorted(dtypes)}"))
    return findings


def examine(path: str | os.PathLike, verify_hash: bool = True) -> tuple[LoraModel | None, dict | None, list[Finding]]:
    """Check a neutral file stage by stage (spec 8): (model or None, manifest or None, findings).

    A finding is (reason class, location, message); the location is a JSON path into the manifest,
    a tensor name or a metadata key. Each stage runs only when the ones before it found nothing,
    so the first finding's class is the file's reason. Container errors (truncated file, header
    not JSON, gaps in the data...) raise :class:`LoraBridgeError` instead.
    """
    handle = SafetensorsFile(path)
    layout = handle.layout_problem()
    if layout:
        raise LoraBridgeError(layout, path)
    manifest, findings = _manifest_of(handle)
    if manifest is None:
        return None, None, findings
    findings = sorted(_file_findings(handle, manifest), key=lambda f: REASONS.index(f[0]))
    if not findings:
        findings = [("interop", "__metadata__", what) for what in interop_problems(manifest, handle.metadata)]
    if verify_hash and not findings:
        digest = tensor_sha256(handle.tensors())
        if digest != manifest["tensor_sha256"]:
            findings.append(("hash", "$.tensor_sha256", f"hash mismatch: manifest {manifest['tensor_sha256'][:12]}..., "
                                                        f"tensor data {digest[:12]}... (data changed or corrupt)"))
    if findings:
        return None, manifest, findings
    tensors: dict[str, dict] = {name: {} for name in manifest["modules"]}
    for key in handle.keys():
        name, role = split_key(key)
        tensors[name][role] = handle.tensor(key)
    model = LoraModel(**model_facts(manifest))
    for name, entry in manifest["modules"].items():
        model.add(LoraModule(name=name, tensors=tensors[name], **module_facts(entry)))
    return model, manifest, []


def inspect_file(path: str | os.PathLike, verify_hash: bool = True) -> tuple[LoraModel | None, dict | None, list[Problem]]:
    """:func:`examine` with findings as (location, message) problems, for callers that need no reason class."""
    model, manifest, findings = examine(path, verify_hash=verify_hash)
    return model, manifest, [(where, what) for _, where, what in findings]


def read_neutral(path: str | os.PathLike, verify_hash: bool = False) -> LoraModel:
    """Read a neutral file into a :class:`LoraModel` (tensors are zero-copy views).

    Raises :class:`ValidationProblem` listing what is wrong, or :class:`LoraBridgeError` for a
    broken container. ``verify_hash`` also checks ``tensor_sha256`` (one pass over the data).

    Example:
        >>> model = read_neutral("lora.safetensors")   # doctest: +SKIP
        >>> model.summary()["modules"]
    """
    model, _, problems = inspect_file(path, verify_hash=verify_hash)
    if problems:
        raise ValidationProblem(problems, path)
    return model


def is_neutral(path: str | os.PathLike) -> bool:
    """True when the file is a safetensors file carrying a lorabridge manifest (cheap: header only)."""
    try:
        return MANIFEST_KEY in SafetensorsFile(path).metadata
    except LoraBridgeError:
        return False


# The reader/writer pair as the converter registry calls it (options other formats take are ignored).
def detect(path: str | os.PathLike) -> bool:
    return is_neutral(path)


def read(path: str | os.PathLike, *, verify_hash: bool = False, **_options) -> LoraModel:
    return read_neutral(path, verify_hash=verify_hash)


def write(model: LoraModel, path: str | os.PathLike, *, progress: Callable[[int], None] | None = None, **_options) -> None:
    write_neutral(model, path, progress=progress)
