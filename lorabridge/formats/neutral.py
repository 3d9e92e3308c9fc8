"""The neutral file: one safetensors file, tensors under ``<module>.<role>``, manifest in metadata.

Besides the manifest (key ``lorabridge.manifest``) the writer adds what other
tools read, so the file loads unchanged in diffusers and mindone.diffusers
``load_lora_weights`` with the right alpha: ``format`` = ``pt``, a prefixed
``lora_adapter_metadata`` LoraConfig per component, and ModelSpec keys.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any, Callable

from ..errors import LoraBridgeError, ValidationProblem
from ..io.json_safe import load_json
from ..io.safetensors_file import SafetensorsFile, write_safetensors
from ..io.streaming import in_background
from ..manifest import (MANIFEST_KEY, PEFT_MAGNITUDE, SPEC_VERSION, VersionError, build_manifest, check_version,
                        dump_json, model_facts, module_facts, schema_problems, stores_peft_magnitude, tensor_sha256)
from ..model import LoraModel, LoraModule, split_key
from ..rules import module_problems
from ..tensor import Tensor
from .checks import listed

Problem = tuple[str, str]
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
            if role == "dora_scale" and stores_peft_magnitude(m):
                out[f"{m.name}.{PEFT_MAGNITUDE}"] = tensor.reshaped(m.peft_magnitude_shape)
            else:
                out[f"{m.name}.{role}"] = tensor
    return out


def split_stored_key(key: str) -> tuple[str, str] | None:
    """(module name, role as stored) of a neutral file's tensor key: a model role or ``lora_magnitude_vector``."""
    if key.endswith("." + PEFT_MAGNITUDE):
        return key[: -len(PEFT_MAGNITUDE) - 1], PEFT_MAGNITUDE
    return split_key(key)


def diffusers_limits(model: LoraModel) -> list[str]:
    """Why diffusers' or mindone.diffusers' ``load_lora_weights`` cannot load this (valid) file, if they cannot.

    PEFT holds one DoRA magnitude per output row and turns DoRA on for all LoRA modules of a component
    (``use_dora`` in its LoraConfig): magnitudes per input column and components mixing DoRA and plain
    LoRA modules have no PEFT form, and diffusers fails on them ("Cannot copy out of meta tensor").
    """
    notes = []
    dora = [m.name for m in model.modules.values() if m.dora_axis]
    if dora:
        notes.append(f"{len(dora)} module(s) have DoRA magnitudes: mindone.diffusers (0.5.0) cannot load them, its "
                     f"PEFT port has no DoRA (dora_init raises NotImplementedError) ({listed(dora)})")
    per_column = [m.name for m in model.modules.values() if m.dora_axis == "in"]
    if per_column:
        notes.append(f"{len(per_column)} module(s) have DoRA magnitudes per input column (dora_axis in), which "
                     f"diffusers and PEFT cannot hold: load_lora_weights cannot load this file ({listed(per_column)}); "
                     "convert it with --to kohya or --to lycoris, which keep that axis")
    for component in model.components:
        lora = [m for m in model.modules.values() if m.component == component and m.kind == "lora"]
        plain = [m.name for m in lora if not m.dora_axis]
        if plain and len(plain) < len(lora):
            notes.append(f"{component}: {len(lora) - len(plain)} LoRA module(s) have DoRA magnitudes and {len(plain)} "
                         f"do not ({listed(plain)}); PEFT turns DoRA on for a whole component, so diffusers' "
                         "load_lora_weights cannot load this file")
    return notes


def write_neutral(model: LoraModel, path: str | os.PathLike, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write ``model`` as a neutral file (atomically) and return the manifest written.

    One pass over the tensor data: ``tensor_sha256`` is computed in a thread while the data is
    written, behind a placeholder of the same length that is overwritten in the header at the end.

    Example:
        >>> manifest = write_neutral(model, "lora.safetensors")   # doctest: +SKIP
    """
    problems = [problem for m in model.modules.values() for problem in _rule_problems(m)]
    if problems:  # before anything computes shapes from the factors
        raise ValidationProblem(problems, path)
    tensors = stored_tensors(model)
    digest = in_background(tensor_sha256, tensors)
    placeholder = os.urandom(32).hex()  # 64 hex digits, like the hash, and nowhere else in the header
    manifest = build_manifest(model, placeholder)
    problems = schema_problems(manifest)
    if problems:
        raise ValidationProblem(problems, path)
    try:
        metadata = interop_metadata(model, manifest)
    except ValueError as exc:  # a NaN/Inf in the training facts or unknown fields kept from a source
        raise LoraBridgeError(f"the manifest cannot be written as JSON ({exc})", path) from None
    write_safetensors(path, tensors, metadata, progress=progress, late={placeholder: digest})
    manifest["tensor_sha256"] = digest()
    return manifest


def _manifest_of(handle: SafetensorsFile) -> tuple[dict[str, Any] | None, list[Problem]]:
    raw = handle.metadata.get(MANIFEST_KEY)
    if raw is None:
        return None, [("__metadata__", f"no {MANIFEST_KEY!r} key: not a neutral LoRA file")]
    try:
        manifest = load_json(raw, "manifest", handle.path, strict=True)
    except LoraBridgeError as exc:
        return None, [(f"__metadata__.{MANIFEST_KEY}", exc.message)]
    if not isinstance(manifest, dict):
        return None, [(f"__metadata__.{MANIFEST_KEY}", "manifest is not a JSON object")]
    try:
        check_version(manifest.get("spec_version", ""))
    except VersionError as exc:
        return None, [("$.spec_version", str(exc))]
    problems = schema_problems(manifest)
    return (None if problems else manifest), problems


def _as_model_roles(name: str, module: LoraModule) -> list[Problem]:
    """Turn a stored ``lora_magnitude_vector`` into the model's ``dora_scale`` (out, 1[, 1, 1]), in place."""
    stored = module.tensors.pop(PEFT_MAGNITUDE, None)
    if stored is None:
        return []
    where = f"tensor '{name}.{PEFT_MAGNITUDE}'"
    if "dora_scale" in module.tensors:
        return [(where, "a module has one DoRA magnitude: both lora_magnitude_vector and dora_scale are present")]
    if module.kind != "lora" or module.dora_axis != "out":
        return [(where, f"holds a magnitude per output row of a kind 'lora' module; the manifest says kind "
                        f"{module.kind!r}, dora_axis {module.dora_axis!r}")]
    shape = stored.shape
    if len(shape) == 1 or (len(shape) == 4 and shape[0] == 1 and shape[2:] == (1, 1)):
        module.tensors["dora_scale"] = stored.reshaped((stored.numel, 1, *(1 for _ in shape[2:])))
        return []
    return [(where, f"shape {list(shape)} is neither (out,) nor (1, out, 1, 1)")]


def _rule_problems(module: LoraModule) -> list[Problem]:
    """One module against the rules every reader applies too (shapes per kind, finite alpha), located."""
    return [(f"$.modules['{module.name}'].{role}" if role in ("alpha", "dora_axis") else f"tensor '{module.name}.{role}'", what)
            for role, what in module_problems(module)]


def _module_problems(name: str, entry: dict[str, Any], module: LoraModule) -> list[Problem]:
    """Tensors of one module versus the rules (:func:`_rule_problems`) and what its manifest entry declares."""
    where = f"$.modules['{name}']"
    problems = _as_model_roles(name, module) or _rule_problems(module)
    if problems:
        return problems
    declared = {"rank": module.rank, "in_features": module.in_features, "out_features": module.out_features,
                "kernel_size": list(module.kernel_size) if module.kernel_size else None, "dtype": module.dtype}
    for field, actual in declared.items():
        if entry.get(field) != actual:
            problems.append((f"{where}.{field}", f"manifest says {entry.get(field)!r}, tensors say {actual!r}"))
    return problems


def inspect_file(path: str | os.PathLike, verify_hash: bool = True) -> tuple[LoraModel | None, dict | None, list[Problem]]:
    """Read a neutral file and list every problem found: (model or None, manifest or None, problems).

    Problems are (location, message); the location is a JSON path into the manifest or a tensor name.
    Container errors (truncated file, header not JSON...) raise :class:`LoraBridgeError` instead.
    """
    handle = SafetensorsFile(path)
    manifest, problems = _manifest_of(handle)
    if manifest is None:
        return None, None, problems
    model = LoraModel(**model_facts(manifest))
    tensors_by_module: dict[str, dict] = {name: {} for name in manifest["modules"]}
    for key in handle.keys():
        parts = split_stored_key(key)
        if parts is None or parts[0] not in tensors_by_module:
            problems.append((f"tensor '{key}'", "not described by any manifest module"))
            continue
        tensors_by_module[parts[0]][parts[1]] = handle.tensor(key)
    for name, entry in manifest["modules"].items():
        module = LoraModule(name=name, tensors=tensors_by_module[name], **module_facts(entry))
        found = _module_problems(name, entry, module)
        problems += found
        if not found:
            model.add(module)
    components = set(manifest["base_model"]["components"])
    actual = {name.split(".", 1)[0] for name in manifest["modules"]}
    if components != actual:
        problems.append(("$.base_model.components", f"lists {sorted(components)}, modules are in {sorted(actual)}"))
    if verify_hash and not problems:
        digest = tensor_sha256(handle.tensors())
        if digest != manifest["tensor_sha256"]:
            problems.append(("$.tensor_sha256", f"hash mismatch: manifest {manifest['tensor_sha256'][:12]}..., tensor data {digest[:12]}... (data changed or corrupt)"))
    return (None if problems else model), manifest, problems


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
