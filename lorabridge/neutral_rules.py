"""The neutral spec's rules on a module's tensors and on the interoperability keys, each with its reason class.

spec/neutral-lora-v1.md section 8 names a reason class for every way a file can be invalid and the
order in which a validator checks them; ``validate --json`` reports the first class found, and a
third-party reader's verdict is compared against it by ``lorabridge conformance``. The rules work
on shapes, dtypes and the manifest only (no tensor data), so checking a file costs one header read.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, Callable, Mapping

from .model import KIND_ROLES

# Spec 8: the reason classes, in the order a reader checks (and reports) them.
REASONS = ("container", "not-neutral", "version", "dtype", "schema", "undeclared-tensor", "missing-tensor", "roles",
           "shape", "rank-mismatch", "dora", "manifest-mismatch", "interop", "hash")
# Spec 2: the tensor dtypes a neutral file may hold.
ALLOWED_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
# Spec 6: the values a writer stores beside the manifest for diffusers, mindone.diffusers and ModelSpec readers.
MODELSPEC = {"modelspec.sai_model_spec": "1.0.0", "modelspec.implementation": "https://github.com/huggingface/diffusers"}
PEFT_FIELDS = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_dora")
# Spec 1: what the SDXL pipelines of diffusers and mindone.diffusers load LoRA weights into.
PIPELINE_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

Shapes = Mapping[str, tuple[int, ...]]


class RuleBroken(Exception):
    """One broken rule: its reason class (one of :data:`REASONS`) and what is wrong."""

    def __init__(self, reason: str, message: str):
        assert reason in REASONS, reason
        self.reason, self.message = reason, message
        super().__init__(f"{reason}: {message}")


def check_roles(kind: str, roles: set[str]) -> None:
    """Spec 3.2: a module holds its kind's required roles, one form of each LoKr factor, both or no Tucker cores."""
    required, optional = KIND_ROLES[kind]
    missing = [r for r in required if r not in roles]
    if kind == "loha" and ("hada_t1" in roles) != ("hada_t2" in roles):
        missing.append("hada_t2" if "hada_t1" in roles else "hada_t1")
    if kind == "lokr":
        for whole, halves in (("lokr_w1", ("lokr_w1_a", "lokr_w1_b")), ("lokr_w2", ("lokr_w2_a", "lokr_w2_b"))):
            if whole not in roles:
                absent = [h for h in halves if h not in roles]
                missing += [f"{whole} or {' + '.join(halves)}"] if len(absent) == 2 else absent
    if missing:
        raise RuleBroken("missing-tensor", f"no {', '.join(missing)}")
    foreign = sorted(roles - set(required) - set(optional))
    if foreign:
        raise RuleBroken("roles", f"role(s) {', '.join(foreign)} are not part of kind {kind!r}")
    if kind == "lokr":
        both = [w for w in ("lokr_w1", "lokr_w2") if w in roles and f"{w}_a" in roles]
        if both:
            raise RuleBroken("roles", f"{both[0]} is stored both whole and as {both[0]}_a/{both[0]}_b")
        if "lokr_t2" in roles and "lokr_w2" in roles:
            raise RuleBroken("roles", "lokr_t2 belongs to a decomposed w2 (lokr_w2_a/lokr_w2_b), not to lokr_w2")


def _ndim(shapes: Shapes, role: str, allowed: tuple[int, ...]) -> tuple[int, ...]:
    shape = shapes[role]
    if len(shape) not in allowed:
        raise RuleBroken("shape", f"{role} {list(shape)} must have {' or '.join(map(str, allowed))} dimensions")
    return shape


def _same_rank(*pairs: tuple[str, int]) -> int:
    """The rank all (what, value) pairs agree on; rank-mismatch naming them otherwise."""
    if len({value for _, value in pairs}) > 1:
        raise RuleBroken("rank-mismatch", "factors disagree on the rank: " + ", ".join(f"{w} {v}" for w, v in pairs))
    return pairs[0][1]


def _lora_geometry(s: Shapes) -> tuple[int, tuple[int, ...]]:
    a, b = _ndim(s, "lora_A.weight", (2, 4)), _ndim(s, "lora_B.weight", (2, 4))
    if len(b) != len(a) or b[2:] not in ((), (1, 1)):
        raise RuleBroken("shape", f"lora_A {list(a)} / lora_B {list(b)} are neither linear nor conv LoRA")
    rank = _same_rank(("lora_A.weight rows", a[0]), ("lora_B.weight columns", b[1]))
    return rank, (b[0], a[1], *a[2:])


def _loha_geometry(s: Shapes) -> tuple[int, tuple[int, ...]]:
    if "hada_t1" in s:  # Tucker: w_a (r, out), w_b (r, in), t (r, r, kh, kw)
        t1, t2 = _ndim(s, "hada_t1", (4,)), _ndim(s, "hada_t2", (4,))
        a1, a2, b1, b2 = (_ndim(s, r, (2,)) for r in ("hada_w1_a", "hada_w2_a", "hada_w1_b", "hada_w2_b"))
        rank = _same_rank(("hada_w1_a rows", a1[0]), ("hada_w2_a rows", a2[0]), ("hada_w1_b rows", b1[0]),
                          ("hada_w2_b rows", b2[0]), *((f"{n} axis {i}", t[i]) for n, t in (("hada_t1", t1), ("hada_t2", t2)) for i in (0, 1)))
        if t1[2:] != t2[2:] or a1[1] != a2[1] or b1[1] != b2[1]:
            raise RuleBroken("shape", "the two Tucker factors describe weights of different shapes")
        return rank, (a1[1], b1[1], *t1[2:])
    a1, a2 = _ndim(s, "hada_w1_a", (2,)), _ndim(s, "hada_w2_a", (2,))
    b1, b2 = _ndim(s, "hada_w1_b", (2, 4)), _ndim(s, "hada_w2_b", (2, 4))
    rank = _same_rank(("hada_w1_a columns", a1[1]), ("hada_w1_b rows", b1[0]),
                      ("hada_w2_a columns", a2[1]), ("hada_w2_b rows", b2[0]))
    if a1[0] != a2[0] or b1[1:] != b2[1:]:
        raise RuleBroken("shape", f"w1 ({a1[0]}, {list(b1[1:])}) and w2 ({a2[0]}, {list(b2[1:])}) have different shapes")
    return rank, (a1[0], *b1[1:])


def _lokr_geometry(s: Shapes) -> tuple[int, tuple[int, ...]]:
    ranks = []
    if "lokr_w1" in s:
        w1 = _ndim(s, "lokr_w1", (2,))
    else:
        a, b = _ndim(s, "lokr_w1_a", (2,)), _ndim(s, "lokr_w1_b", (2,))
        ranks.append(("w1", _same_rank(("lokr_w1_a columns", a[1]), ("lokr_w1_b rows", b[0]))))
        w1 = (a[0], b[1])
    if "lokr_w2" in s:
        w2 = _ndim(s, "lokr_w2", (2, 4))
    elif "lokr_t2" in s:  # Tucker: w2_a (r, o2), w2_b (r, i2), t2 (r, r, kh, kw)
        t2, a, b = _ndim(s, "lokr_t2", (4,)), _ndim(s, "lokr_w2_a", (2,)), _ndim(s, "lokr_w2_b", (2,))
        ranks.append(("w2", _same_rank(("lokr_w2_a rows", a[0]), ("lokr_w2_b rows", b[0]),
                                       ("lokr_t2 axis 0", t2[0]), ("lokr_t2 axis 1", t2[1]))))
        w2 = (a[1], b[1], *t2[2:])
    else:
        a, b = _ndim(s, "lokr_w2_a", (2,)), _ndim(s, "lokr_w2_b", (2, 4))
        ranks.append(("w2", _same_rank(("lokr_w2_a columns", a[1]), ("lokr_w2_b rows", b[0]))))
        w2 = (a[0], *b[1:])
    rank = _same_rank(*ranks) if ranks else 0  # both factors whole: no rank, scale 1
    return rank, (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])


GEOMETRY: dict[str, Callable[[Shapes], tuple[int, tuple[int, ...]]]] = {
    "lora": _lora_geometry, "loha": _loha_geometry, "lokr": _lokr_geometry}


def module_geometry(kind: str, shapes: Shapes) -> tuple[int, tuple[int, ...]]:
    """Spec 3.2-3.3: (rank, shape of the adapted weight) from a module's factor shapes (``dora_scale`` aside).

    Example:
        >>> module_geometry("lora", {"lora_A.weight": (4, 8), "lora_B.weight": (16, 4)})
        (4, (16, 8))
    """
    return GEOMETRY[kind]({role: shape for role, shape in shapes.items() if role != "dora_scale"})


def dora_shape(axis: str, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Spec 3.3: the one shape ``dora_scale`` has for ``axis`` on a weight of ``weight_shape``.

    Example:
        >>> dora_shape("out", (320, 640, 3, 3)), dora_shape("in", (16, 8))
        ((320, 1, 1, 1), (1, 8))
    """
    ones = (1,) * (len(weight_shape) - 2)
    return (weight_shape[0], 1, *ones) if axis == "out" else (1, weight_shape[1], *ones)


def check_dora(axis: Any, scale_shape: tuple[int, ...] | None, weight_shape: tuple[int, ...]) -> None:
    """Spec 3.3: ``dora_axis`` is present exactly when ``dora_scale`` is, and the shape is the one its axis gives."""
    if scale_shape is None:
        if axis is not None:
            raise RuleBroken("dora", f"dora_axis {axis!r} but no dora_scale tensor")
        return
    if axis is None:
        raise RuleBroken("dora", f"dora_scale {list(scale_shape)} but no dora_axis in the manifest")
    expected = dora_shape(axis, weight_shape)
    if tuple(scale_shape) != expected:
        other = dora_shape("in" if axis == "out" else "out", weight_shape)
        hint = f" (that is the {'in' if axis == 'out' else 'out'} axis' shape)" if tuple(scale_shape) == other else ""
        raise RuleBroken("dora", f"dora_scale is {list(scale_shape)}, dora_axis {axis!r} on a {list(weight_shape)} "
                                 f"weight needs {list(expected)}{hint}")


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
        problems.append(f"{component}.use_dora must be true exactly when one of its lora modules has dora_scale")
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
        config = json.loads(raw)
    except ValueError:
        return problems + ["lora_adapter_metadata is not JSON"]
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


def loaders(kinds: set[str], has_dora: bool, components: set[str]) -> dict[str, str]:
    """Spec 1: which consumers load the file as it is ("yes", or "no: why")."""
    why = []
    if kinds - {"lora"}:
        why.append(f"{'/'.join(sorted(kinds - {'lora'}))} modules (diffusers: 'Invalid LoRA checkpoint')")
    if has_dora:
        why.append("DoRA magnitudes (diffusers drops dora_scale keys with a warning)")
    if components - set(PIPELINE_COMPONENTS):
        why.append(f"component(s) {', '.join(sorted(components - set(PIPELINE_COMPONENTS)))} the SDXL pipeline has not")
    pipeline = "yes" if not why else "no: " + "; ".join(why)
    return {"lorabridge": "yes", "diffusers": pipeline, "mindone.diffusers": pipeline}
