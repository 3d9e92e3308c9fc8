"""The neutral spec's file-level rules: reason classes, dtypes, the interoperability keys, who loads a file.

spec/neutral-lora-v1.md section 8 names a reason class for every way a file can be invalid and the
order in which a validator checks them; ``validate --json`` reports the first class found, and a
third-party reader's verdict is compared against it by ``lorabridge conformance``. The rules on a
module's tensors (roles, shapes, ranks, DoRA) are not here: they live in :mod:`lorabridge.rules`,
which every reader applies too, and carry their reason class from there.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Mapping

from .errors import LoraBridgeError, listed
from .io.json_safe import load_json
from .architectures import ARCHITECTURES, DEFAULT
from .model import LoraModel
from .tensor import FLOAT_DTYPES

# Spec 8: the reason classes, in the order a reader checks (and reports) them.
REASONS = ("container", "not-neutral", "version", "dtype", "schema", "undeclared-tensor", "missing-tensor", "roles",
           "shape", "rank-mismatch", "dora", "manifest-mismatch", "interop", "hash")
# Spec 2: the tensor dtypes a neutral file may hold.
ALLOWED_DTYPES = FLOAT_DTYPES
# Spec 6: the values a writer stores beside the manifest for diffusers, mindone.diffusers and ModelSpec readers.
MODELSPEC = {"modelspec.sai_model_spec": "1.0.0", "modelspec.implementation": "https://github.com/huggingface/diffusers"}
PEFT_FIELDS = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_dora")

def _is_most_common(value: Any, values: list) -> bool:
    """Whether ``value`` equals one of the most common of ``values`` (any of them on a tie)."""
    counts = Counter(values)
    top = max(counts.values())
    return isinstance(value, (int, float)) and not isinstance(value, bool) and any(
        value == v for v, n in counts.items() if n == top)


def peft_config_problems(component: str, modules: Mapping[str, Mapping[str, Any]], got: Mapping[str, Any]) -> list[str]:
    """Spec 6: one component's PEFT LoraConfig (``got``, prefix removed) against its ``lora`` modules
    (path -> {"rank", "alpha", "dora"}): any most common rank/alpha, patterns for exactly the others."""
    missing = [f for f in PEFT_FIELDS if f not in got]
    if missing:
        return [f"{component}.{', '.join(missing)} absent"]
    problems = []
    r, alpha = got["r"], got["lora_alpha"]
    if not _is_most_common(r, [m["rank"] for m in modules.values()]):
        problems.append(f"{component}.r is {r!r}, not a most common rank of its lora modules")
    if not _is_most_common(alpha, [m["alpha"] for m in modules.values()]):
        problems.append(f"{component}.lora_alpha is {alpha!r}, not a most common alpha of its lora modules")
    targets = got["target_modules"]
    if not isinstance(targets, list) or len(targets) != len(modules) or set(map(str, targets)) != set(modules):
        problems.append(f"{component}.target_modules must list exactly the paths of its lora modules")
    if got["rank_pattern"] != {p: m["rank"] for p, m in modules.items() if m["rank"] != r}:
        problems.append(f"{component}.rank_pattern must map exactly the modules whose rank differs from r to their rank")
    if got["alpha_pattern"] != {p: m["alpha"] for p, m in modules.items() if m["alpha"] != alpha}:
        problems.append(f"{component}.alpha_pattern must map exactly the modules whose alpha differs from lora_alpha to their alpha")
    if got["use_dora"] is not any(m["dora"] for m in modules.values()):
        problems.append(f"{component}.use_dora must be true exactly when one of its lora modules has a DoRA magnitude")
    return problems


def interop_problems(manifest: Mapping[str, Any], metadata: Mapping[str, str]) -> list[str]:
    """Spec 6: the metadata keys other tools read, against the (already checked) manifest."""
    expected = {"format": "pt", **MODELSPEC, "modelspec.architecture": f"{manifest['base_model']['architecture']}/lora"}
    problems = [f"metadata {k} is {metadata.get(k)!r}, must be {v!r}" for k, v in expected.items() if metadata.get(k) != v]
    if not metadata.get("modelspec.title"):
        problems.append("metadata modelspec.title is absent or empty")
    lora: dict[str, dict[str, dict]] = {}
    for name, entry in manifest["modules"].items():
        if entry["kind"] == "lora":
            component, path = name.split(".", 1)
            lora.setdefault(component, {})[path] = {"rank": entry["rank"], "alpha": entry["alpha"], "dora": "dora_axis" in entry}
    raw = metadata.get("lora_adapter_metadata")
    if raw is None:
        return problems + (["lora_adapter_metadata absent, the file has lora modules"] if lora else [])
    try:
        config = load_json(raw, "lora_adapter_metadata", None, strict=True)
    except LoraBridgeError as exc:
        return problems + [f"lora_adapter_metadata: {exc.message}"]
    if not isinstance(config, dict):
        return problems + ["lora_adapter_metadata is not a JSON object"]
    allowed = {f"{c}.{f}" for c in lora for f in PEFT_FIELDS}
    stray = sorted(k for k in config if k not in allowed)
    if stray:
        problems.append(f"lora_adapter_metadata has key(s) {', '.join(stray[:3])}: keys are flat '<component>.<field>' "
                        f"for components with lora modules, fields {', '.join(PEFT_FIELDS)}")
    for component, modules in lora.items():
        prefix = component + "."
        problems += peft_config_problems(component, modules, {k[len(prefix):]: v for k, v in config.items() if k.startswith(prefix)})
    return problems


def dora_limits(model: LoraModel) -> list[tuple[tuple[str, ...], str]]:
    """Why diffusers' or mindone.diffusers' ``load_lora_weights`` cannot load a valid file's DoRA:
    (consumers that cannot, why), the warnings of ``validate`` and ``inspect``.

    PEFT holds one DoRA magnitude per output row and turns DoRA on for all LoRA modules of a component
    (``use_dora`` in its LoraConfig): magnitudes per input column and components mixing DoRA and plain
    LoRA modules have no PEFT form, and diffusers fails on them ("Cannot copy out of meta tensor").
    """
    notes: list[tuple[tuple[str, ...], str]] = []
    dora = [m.name for m in model.modules.values() if m.dora_axis]
    if dora:
        notes.append((("mindone.diffusers",), f"{len(dora)} module(s) have DoRA magnitudes: mindone.diffusers (0.5.0) cannot "
                      f"load them, its PEFT port has no DoRA (dora_init raises NotImplementedError) ({listed(dora)})"))
    per_column = [m.name for m in model.modules.values() if m.dora_axis == "in"]
    if per_column:
        notes.append((("diffusers",), f"{len(per_column)} module(s) have DoRA magnitudes per input column (dora_axis in), "
                      f"which diffusers and PEFT cannot hold: load_lora_weights cannot load this file ({listed(per_column)}); "
                      "convert it with --to kohya or --to lycoris, which keep that axis"))
    for component in model.components:
        lora = [m for m in model.modules.values() if m.component == component and m.kind == "lora"]
        plain = [m.name for m in lora if not m.dora_axis]
        if plain and len(plain) < len(lora):
            notes.append((("diffusers",), f"{component}: {len(lora) - len(plain)} LoRA module(s) have DoRA magnitudes and "
                          f"{len(plain)} do not ({listed(plain)}); PEFT turns DoRA on for a whole component, so diffusers' "
                          "load_lora_weights cannot load this file"))
    return notes


def loaders(model: LoraModel) -> dict[str, str]:
    """Spec 1: which consumers load the file as it is ("yes", or "no: why"): :func:`dora_limits`, plus
    kinds PEFT has no form for (diffusers refuses the whole file: "Invalid LoRA checkpoint") and
    components the architecture's pipeline has not."""
    kinds = sorted({m.kind for m in model.modules.values()} - {"lora"})
    architecture = ARCHITECTURES.get(model.architecture, DEFAULT)
    foreign = sorted(set(model.components) - set(architecture.components))  # spec 1: what its pipelines load LoRA weights into
    common = ([f"{'/'.join(kinds)} modules (diffusers: 'Invalid LoRA checkpoint')"] if kinds else []) + (
        [f"component(s) {', '.join(foreign)} the {architecture.label} pipeline has not"] if foreign else [])
    verdicts = {"lorabridge": "yes"}
    for consumer in ("diffusers", "mindone.diffusers"):
        why = common + [what for who, what in dora_limits(model) if consumer in who]
        verdicts[consumer] = "yes" if not why else "no: " + "; ".join(why)
    return verdicts

