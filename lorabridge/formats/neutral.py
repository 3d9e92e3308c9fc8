"""The neutral file: one safetensors file, tensors under ``<module>.<role>``, manifest in metadata.

Besides the manifest (key ``lorabridge.manifest``) the writer adds what other
tools read, so the file loads unchanged in diffusers and mindone.diffusers
``load_lora_weights`` with the right alpha: ``format`` = ``pt``, a prefixed
``lora_adapter_metadata`` LoraConfig per component, and ModelSpec keys.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from ..errors import LoraBridgeError, ValidationProblem
from ..io.json_safe import load_json
from ..io.safetensors_file import SafetensorsFile, write_safetensors
from ..io.streaming import in_background
from ..manifest import (MANIFEST_KEY, PEFT_MAGNITUDE, VERSION_PATTERN, VersionError, build_manifest, check_version,
                        dump_json, model_facts, module_facts, schema_problems, stored_role, tensor_sha256)
from ..model import LoraModel, LoraModule, Pending, dominant_dtype, split_key
from ..naming.peft_config import adapter_metadata
from ..neutral_rules import ALLOWED_DTYPES, REASONS, interop_problems
from ..rules import module_findings
from ..tensor import Tensor
from .contract import READ_DEFAULTS, WRITE_DEFAULTS, DeclaredFormat, Progress, ReadOptions, WriteOptions

Problem = tuple[str, str]
Finding = tuple[str, str, str]  # (reason class of spec 8, location, message)


def interop_metadata(model: LoraModel, manifest: dict[str, Any]) -> dict[str, str]:
    """All safetensors metadata of a neutral file: the manifest plus the keys other tools read."""
    metadata = {
        MANIFEST_KEY: dump_json(manifest, separators=(",", ":"), sort_keys=False),
        "format": "pt",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{model.architecture}/lora",
        "modelspec.implementation": "https://github.com/huggingface/diffusers",
        "modelspec.title": str(model.training.get("title") or model.provenance.get("source_file") or "lorabridge LoRA"),
    }
    peft = adapter_metadata(model)
    if peft:
        metadata["lora_adapter_metadata"] = dump_json(peft, separators=(",", ":"))
    return metadata


def stored_tensors(model: LoraModel) -> dict[str, Tensor]:
    """The tensors under the keys and shapes a neutral file stores them: the model's, except that a
    kind-lora magnitude per output row is PEFT's ``<module>.lora_magnitude_vector`` (spec 1.1), the one
    spelling diffusers' ``load_lora_weights`` loads (it drops every key containing ``dora_scale``)."""
    out = {}
    for m in model.modules.values():
        for role, tensor in m.tensors.items():
            stored = stored_role(m, role)
            out[f"{m.name}.{stored}"] = tensor.reshaped(m.peft_magnitude_shape) if stored != role else tensor
    return out


def split_stored_key(key: str) -> tuple[str, str] | None:
    """(module name, role as stored) of a neutral file's tensor key: a model role or ``lora_magnitude_vector``."""
    if key.endswith("." + PEFT_MAGNITUDE):
        return key[: -len(PEFT_MAGNITUDE) - 1], PEFT_MAGNITUDE
    return split_key(key)


def write_neutral(model: LoraModel, path: str | os.PathLike, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write ``model`` as a neutral file (atomically) and return the manifest written.

    One pass over the tensor data: ``tensor_sha256`` is computed in a thread while the data is
    written, behind a placeholder of the same length that is overwritten in the header at the end.

    Example:
        >>> manifest = write_neutral(model, "lora.safetensors")   # doctest: +SKIP
    """
    problems = [(where, what) for m in model.modules.values() for _, where, what in _rule_findings(m)]
    if problems:  # before anything computes shapes from the factors
        raise ValidationProblem(problems, path)
    tensors = stored_tensors(model)
    digest = in_background(tensor_sha256, tensors)
    placeholder = os.urandom(32).hex()  # 64 hex digits, like the hash, and nowhere else in the header
    late: dict[str, Callable[[], str]] = {placeholder: digest}
    pending = model.provenance.get("source_sha256")
    if not isinstance(pending, Pending):
        pending = None
    else:  # the source's hash, still being computed beside this write: written the same way
        model.provenance["source_sha256"] = source_placeholder = os.urandom(32).hex()
        late[source_placeholder] = pending.value
    try:
        manifest = build_manifest(model, placeholder)
        problems = schema_problems(manifest)
        if problems:
            raise ValidationProblem(problems, path)
        try:
            metadata = interop_metadata(model, manifest)
        except ValueError as exc:  # a NaN/Inf in the training facts or unknown fields kept from a source
            raise LoraBridgeError(f"the manifest cannot be written as JSON ({exc})", path) from None
        write_safetensors(path, tensors, metadata, progress=progress, late=late)
    except BaseException:
        if pending is not None:  # as it was, without waiting for a hash no one will read
            model.provenance["source_sha256"] = pending
        raise
    manifest["tensor_sha256"] = digest()
    if pending is not None:  # known since the header was patched
        model.provenance["source_sha256"] = manifest["provenance"]["source_sha256"] = pending.value()
    return manifest


def _manifest_of(handle: SafetensorsFile) -> tuple[dict[str, Any] | None, list[Finding]]:
    """Spec 8 stages not-neutral, version, dtype and schema: the manifest, or the first stage's findings.

    The manifest is strict JSON (a NaN or Infinity token makes it a ``schema`` problem), read with
    the one bounded JSON loader every untrusted JSON goes through.
    """
    raw = handle.metadata.get(MANIFEST_KEY)
    if raw is None:
        return None, [("not-neutral", "__metadata__", f"no {MANIFEST_KEY!r} key: not a neutral LoRA file")]
    where = f"__metadata__.{MANIFEST_KEY}"
    try:
        manifest = load_json(raw, "manifest", handle.path, strict=True)
    except LoraBridgeError as exc:
        return None, [("schema", where, exc.message)]
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


def _as_model_roles(name: str, module: LoraModule) -> list[Finding]:
    """Turn a stored ``lora_magnitude_vector`` into the model's ``dora_scale`` (out, 1[, 1, 1]), in place."""
    stored = module.tensors.pop(PEFT_MAGNITUDE, None)
    if stored is None:
        return []
    where = f"tensor '{name}.{PEFT_MAGNITUDE}'"
    if module.kind != "lora":
        return [("roles", where, f"{PEFT_MAGNITUDE} is not part of a {module.kind} module")]
    if "dora_scale" in module.tensors:
        return [("roles", where, "a module has one DoRA magnitude: both lora_magnitude_vector and dora_scale are present")]
    if module.dora_axis != "out":
        return [("dora", where, f"holds a magnitude per output row; the manifest says dora_axis {module.dora_axis!r}")]
    shape = stored.shape
    if len(shape) == 1 or (len(shape) == 4 and shape[0] == 1 and shape[2:] == (1, 1)):
        module.tensors["dora_scale"] = stored.reshaped((stored.numel, 1, *(1 for _ in shape[2:])))
        return []
    return [("dora", where, f"shape {list(shape)} is neither (out,) nor (1, out, 1, 1)")]


def _rule_findings(module: LoraModule) -> list[Finding]:
    """One module against the rules every reader applies too (:mod:`lorabridge.rules`), located."""
    return [(reason, f"$.modules['{module.name}'].{role}" if role in ("alpha", "dora_axis") else f"tensor '{module.name}.{role}'", what)
            for reason, role, what in module_findings(module)]


def _module_findings(name: str, entry: dict[str, Any], module: LoraModule) -> list[Finding]:
    """Spec 3.2-3.3 and 5.3: one module's tensors (as stored) against the rules and its manifest entry."""
    where = f"$.modules['{name}']"
    stored_dtypes = {role: t.dtype for role, t in module.tensors.items()}  # by stored role (spec 5.3), before renaming
    findings = _as_model_roles(name, module) or _rule_findings(module)
    if findings:  # missing tensors among them: a module without any has no dtype
        return findings
    dtype = dominant_dtype(stored_dtypes)
    declared = {"rank": module.rank, "in_features": module.in_features, "out_features": module.out_features,
                "kernel_size": list(module.kernel_size) if module.kernel_size else None, "dtype": dtype}
    return [("manifest-mismatch", f"{where}.{field}", f"manifest says {entry.get(field)!r}, tensors say {actual!r}")
            for field, actual in declared.items() if entry.get(field) != actual]


def _file_findings(handle: SafetensorsFile, manifest: dict[str, Any]) -> tuple[LoraModel, list[Finding]]:
    """Spec 8 stage tensors: every tensor declared, every module well-formed and as declared, components, dtypes.
    Returns the model of the modules that passed, too."""
    tensors_by_module: dict[str, dict] = {name: {} for name in manifest["modules"]}
    findings: list[Finding] = []
    for key in handle.keys():
        parts = split_stored_key(key)
        if parts is None or parts[0] not in tensors_by_module:
            findings.append(("undeclared-tensor", f"tensor '{key}'", "not described by any manifest module"))
            continue
        tensors_by_module[parts[0]][parts[1]] = handle.tensor(key)
    model = LoraModel(**model_facts(manifest))
    for name, entry in manifest["modules"].items():
        module = LoraModule(name=name, tensors=tensors_by_module[name], **module_facts(entry))
        found = _module_findings(name, entry, module)
        findings += found
        if not found:
            model.add(module)
    components = set(manifest["base_model"]["components"])
    actual = {name.split(".", 1)[0] for name in manifest["modules"]}
    if components != actual:
        findings.append(("manifest-mismatch", "$.base_model.components", f"lists {sorted(components)}, modules are in {sorted(actual)}"))
    dtypes = {handle.header_entry(key)[0] for key in handle.keys()}
    if set(manifest["layout"]["dtypes"]) != dtypes:
        findings.append(("manifest-mismatch", "$.layout.dtypes", f"lists {sorted(manifest['layout']['dtypes'])}, tensors are {sorted(dtypes)}"))
    return model, findings


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
    model, findings = _file_findings(handle, manifest)
    findings.sort(key=lambda f: REASONS.index(f[0]))
    if not findings:
        findings = [("interop", "__metadata__", what) for what in interop_problems(manifest, handle.metadata)]
    if verify_hash and not findings:
        digest = tensor_sha256(handle.tensors())
        if digest != manifest["tensor_sha256"]:
            findings.append(("hash", "$.tensor_sha256", f"hash mismatch: manifest {manifest['tensor_sha256'][:12]}..., "
                                                        f"tensor data {digest[:12]}... (data changed or corrupt)"))
    return (None if findings else model), manifest, findings


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
        >>> model.summary()["modules"]   # doctest: +SKIP
        576
    """
    model, _, problems = inspect_file(path, verify_hash=verify_hash)
    if problems or model is None:  # no model comes only with problems
        raise ValidationProblem(problems, path)
    return model


def is_neutral(path: str | os.PathLike) -> bool:
    """True when the file is a safetensors file carrying a lorabridge manifest (cheap: header only)."""
    try:
        return MANIFEST_KEY in SafetensorsFile(path).metadata
    except LoraBridgeError:
        return False


# The reader/writer pair as the converter registry calls it.
def detect(path: str | os.PathLike) -> bool:
    return is_neutral(path)


def read(path: str | os.PathLike, options: ReadOptions = READ_DEFAULTS) -> LoraModel:
    return read_neutral(path, verify_hash=options.verify_hash)


def write(model: LoraModel, path: str | os.PathLike, options: WriteOptions = WRITE_DEFAULTS, *,
          progress: Progress | None = None, force: bool = False) -> None:
    write_neutral(model, path, progress=progress)


FORMAT = DeclaredFormat(
    name="neutral", framework="neutral", description="lorabridge neutral LoRA v1 (.safetensors + manifest)",
    detect=detect, read=read, write=write, stores_metadata=True, stores_alpha=True,
    records_source_hash=True,  # the manifest's provenance stores source_sha256 (see converters.convert)
    kinds=("lora", "loha", "lokr", "full"), dora_axes=("out", "in"),
    read_options=frozenset({"verify_hash"}), write_options=frozenset())
