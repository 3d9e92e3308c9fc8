"""The rules every module must follow (spec sections 3.2, 3.3 and 4), in one place.

Readers, writers and ``validate`` all check a module with :func:`module_problems`, so a file
a reader accepts is one ``validate`` accepts, and no factor that cannot be multiplied reaches
the math (baking, fusing): a rule checked in one place and not the other is how a LoHa with
disagreeing factors got in, and then crashed ``--bake-to-lora``.

Shapes, and alpha: a NaN or infinite alpha makes every value of delta W NaN/Inf, and cannot be
written as JSON. Zero and negative alphas follow the rules (see :func:`alpha_problem`).
Only shapes and alpha are looked at, never tensor data, so the check costs nothing on large files.
Every problem carries its reason class of spec section 8 (``missing-tensor``, ``roles``, ``shape``,
``rank-mismatch``, ``dora``...), which ``validate`` reports (see :func:`module_findings`).
"""

from __future__ import annotations

import math
from typing import Callable

from .model import KIND_ROLES, LoraModule

Problem = tuple[str, str]  # (role the problem is about, what is wrong)
Finding = tuple[str, str, str]  # (reason class of spec section 8, role, what is wrong)
Shapes = dict[str, tuple[int, ...]]  # role -> shape
MISSING = "missing"
ALPHA_ORIGINS = {"stored": "stored in the file", "user": "given with --alpha", "assumed": "assumed"}  # by alpha_source


def _mismatch(t: Shapes, left: str, right: str) -> Finding:
    shown = {role: role.removesuffix(".weight") for role in (left, right)}
    return "rank-mismatch", right, f"rank mismatch, {shown[left]} is {list(t[left])} but {shown[right]} is {list(t[right])}"


def _ndim(t: Shapes, allowed: dict[str, tuple[int, ...]]) -> list[Finding]:
    """Roles whose number of axes is not one of those allowed for them."""
    return [("shape", role, f"{role} is {list(t[role])}, expected {' or '.join(f'{n}-d' for n in dims)}")
            for role, dims in allowed.items() if role in t and len(t[role]) not in dims]


def _same_rank(t: Shapes, pairs: list[tuple[str, int, str, int]]) -> list[Finding]:
    """The first pair (role, axis, role, axis) whose rank axes disagree, if any."""
    for left, i, right, j in pairs:
        if t[left][i] != t[right][j]:
            return [_mismatch(t, left, right)]
    return []


def _lora(t: Shapes) -> list[Finding]:
    a, b = t["lora_A.weight"], t["lora_B.weight"]
    if len(a) not in (2, 4) or len(b) != len(a) or b[2:] not in ((), (1, 1)):
        return [("shape", "lora_B.weight", f"shapes lora_A {list(a)} / lora_B {list(b)} are neither a linear LoRA "
                                  "nor a conv LoRA (conv lora_B is (out, rank, 1, 1))")]
    return _same_rank(t, [("lora_A.weight", 0, "lora_B.weight", 1)])


def _loha(t: Shapes) -> list[Finding]:
    """Plain: w_a (out, r), w_b (r, in[, kh, kw]); Tucker: w_a (r, out), w_b (r, in), t (r, r, kh, kw)."""
    if ("hada_t1" in t) != ("hada_t2" in t):
        return [("missing-tensor", "hada_t2" if "hada_t1" in t else "hada_t1", "a Tucker LoHa needs both hada_t1 and hada_t2")]
    if "hada_t1" in t:
        problems = _ndim(t, {"hada_w1_a": (2,), "hada_w2_a": (2,), "hada_w1_b": (2,), "hada_w2_b": (2,),
                             "hada_t1": (4,), "hada_t2": (4,)})
        rank_axes = [("hada_w1_b", 0, "hada_w1_a", 0), ("hada_w1_b", 0, "hada_t1", 0), ("hada_w1_b", 0, "hada_t1", 1),
                     ("hada_w1_b", 0, "hada_w2_a", 0), ("hada_w1_b", 0, "hada_w2_b", 0), ("hada_w1_b", 0, "hada_t2", 0),
                     ("hada_w1_b", 0, "hada_t2", 1)]
        w1 = (t["hada_w1_a"][1:], t["hada_w1_b"][1:], t["hada_t1"][2:])
        w2 = (t["hada_w2_a"][1:], t["hada_w2_b"][1:], t["hada_t2"][2:])
    else:
        problems = _ndim(t, {"hada_w1_a": (2,), "hada_w2_a": (2,), "hada_w1_b": (2, 4), "hada_w2_b": (2, 4)})
        rank_axes = [("hada_w1_a", 1, "hada_w1_b", 0), ("hada_w2_a", 1, "hada_w2_b", 0), ("hada_w1_b", 0, "hada_w2_b", 0)]
        w1 = (t["hada_w1_a"][:1], t["hada_w1_b"][1:])
        w2 = (t["hada_w2_a"][:1], t["hada_w2_b"][1:])
    problems = problems or _same_rank(t, rank_axes)
    if not problems and w1 != w2:
        problems = [("shape", "hada_w2_a", f"the Hadamard factors differ in shape: w1 is {[d for part in w1 for d in part]}, "
                                  f"w2 is {[d for part in w2 for d in part]}")]
    return problems


def _lokr_factor(t: Shapes, name: str) -> list[Finding]:
    """A Kronecker factor stored whole (``name``) or decomposed (``name_a``, ``name_b``), not both, not neither."""
    whole, parts = name in t, [p for p in (f"{name}_a", f"{name}_b") if p in t]
    if whole and parts:
        return [("roles", parts[0], f"{name} is stored both whole and decomposed")]
    if not whole and len(parts) < 2:
        return [("missing-tensor", f"{name}_a" if not parts or parts[0] != f"{name}_a" else f"{name}_b", MISSING)]
    return []


def _lokr(t: Shapes) -> list[Finding]:
    """w1 (o1, i1) or w1_a (o1, r) @ w1_b (r, i1); w2 (o2, i2[, kh, kw]) or w2_a @ w2_b, or Tucker around t2."""
    problems = _lokr_factor(t, "lokr_w1") + _lokr_factor(t, "lokr_w2")
    if problems:
        return problems
    tucker = "lokr_t2" in t
    if tucker and "lokr_w2" in t:
        return [("roles", "lokr_t2", "a Tucker lokr_t2 needs a decomposed w2 (lokr_w2_a, lokr_w2_b), not lokr_w2")]
    problems = _ndim(t, {"lokr_w1": (2,), "lokr_w1_a": (2,), "lokr_w1_b": (2,), "lokr_w2": (2, 4), "lokr_w2_a": (2,),
                         "lokr_w2_b": (2,) if tucker else (2, 4), "lokr_t2": (4,)})
    pairs = [("lokr_w1_a", 1, "lokr_w1_b", 0)] if "lokr_w1_a" in t else []
    if tucker:
        pairs += [("lokr_w2_b", 0, "lokr_w2_a", 0), ("lokr_w2_b", 0, "lokr_t2", 0), ("lokr_w2_b", 0, "lokr_t2", 1)]
    elif "lokr_w2_a" in t:
        pairs += [("lokr_w2_a", 1, "lokr_w2_b", 0)]
    if "lokr_w1_b" in t and "lokr_w2_b" in t:
        pairs += [("lokr_w1_b", 0, "lokr_w2_b", 0)]
    return problems or _same_rank(t, pairs)


def _full(t: Shapes) -> list[Finding]:
    """``diff`` is a Linear (out, in) or Conv2d (out, in, kh, kw) weight delta: a 1-D delta (a norm
    layer's scale) has no in/out features to describe it by. ``diff_b``, the bias delta, is (out,)."""
    diff, bias = t["diff"], t.get("diff_b")
    if len(diff) not in (2, 4):
        return [("shape", "diff", f"diff is {list(diff)}: a full delta is kept for a Linear (out, in) or Conv2d (out, in, kh, kw) weight only")]
    if bias is not None and tuple(bias) != (diff[0],):
        return [("shape", "diff_b", f"diff_b is {list(bias)}, the bias of a {list(diff)} weight is [{diff[0]}]")]
    return []


KIND_RULES: dict[str, Callable[[Shapes], list[Finding]]] = {"lora": _lora, "loha": _loha, "lokr": _lokr, "full": _full}


def dora_shape(axis: str, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The one shape a ``dora_scale`` has for ``axis`` on a weight of ``weight_shape`` (spec 3.3):
    (out, 1[, 1, 1]) per output row, (1, in[, 1, 1]) per input column. Readers of files that spell
    it otherwise (PEFT's (out,), kohya/LyCORIS files) reshape to it: same bytes.

    Example:
        >>> dora_shape("out", (320, 640, 3, 3)), dora_shape("in", (16, 8))
        ((320, 1, 1, 1), (1, 8))
    """
    ones = (1,) * (len(weight_shape) - 2)
    return (weight_shape[0], 1, *ones) if axis == "out" else (1, weight_shape[1], *ones)


def _dora(module: LoraModule) -> list[Finding]:
    """A DoRA magnitude: one value per output row (axis "out") or input column (axis "in"), in :func:`dora_shape`."""
    axis, shape = module.dora_axis, tuple(module.tensors["dora_scale"].shape)
    if axis not in ("out", "in"):
        return [("dora", "dora_scale", "a DoRA magnitude needs dora_axis 'out' or 'in'")]
    weight, numel = module.weight_shape, module.tensors["dora_scale"].numel
    size, expected = (weight[0] if axis == "out" else weight[1]), dora_shape(axis, weight)
    if shape == expected:
        return []
    other = "in" if axis == "out" else "out"
    hint = f" (that is the {other} axis' shape)" if shape == dora_shape(other, weight) else ""
    if numel != size and not hint:
        return [("dora", "dora_scale", f"DoRA magnitude has {numel} values, expected {size} (axis {axis})")]
    return [("dora", "dora_scale", f"DoRA magnitude is {list(shape)}, dora_axis {axis!r} on a {list(weight)} "
                                   f"weight needs {list(expected)}{hint}")]


def alpha_problem(alpha: float) -> str | None:
    """Why ``alpha`` cannot be a module's alpha, or None.

    NaN and +-Inf are refused. Negative alphas are allowed: delta W = alpha/r * B A is well defined,
    and sign-flipped LoRAs and kohya merges with negative ratios store them. Zero is allowed too (the
    module adds nothing); readers warn about it, because kohya sd-scripts reads alpha 0 as alpha = rank.
    """
    return None if math.isfinite(alpha) else f"alpha {alpha} is not a finite number"


def module_findings(module: LoraModule) -> list[Finding]:
    """What is wrong with a module's tensors for its kind, as (reason class, role, message); empty when nothing is.

    Missing roles come as ("missing-tensor", role, :data:`MISSING`); then roles foreign to the kind,
    then empty axes, ranks that disagree, factors whose product has no single shape, a misshapen DoRA
    magnitude (or a ``dora_axis`` without one); a non-finite alpha comes as ("schema", "alpha", why).
    """
    required, optional = KIND_ROLES[module.kind]
    t = {role: tensor.shape for role, tensor in module.tensors.items()}
    problems: list[Finding] = [("missing-tensor", role, MISSING) for role in required if role not in t]
    problems += [("roles", role, f"{role} is not part of a {module.kind} module") for role in t if role not in required + optional]
    problems += [("shape", role, f"{role} has an empty axis: {list(shape)}") for role, shape in t.items() if 0 in shape]
    problems = problems or KIND_RULES[module.kind](t)
    if not problems and "dora_scale" in t:
        problems = _dora(module)
    elif not problems and module.dora_axis:
        problems = [("dora", "dora_axis", "set, but the module has no DoRA magnitude")]
    bad_alpha = alpha_problem(module.alpha)
    return problems + ([("schema", "alpha", f"{bad_alpha} ({ALPHA_ORIGINS.get(module.alpha_source, module.alpha_source)})")]
                       if bad_alpha else [])


def module_problems(module: LoraModule) -> list[Problem]:
    """:func:`module_findings` as (role, message), for readers and writers, which need no reason class.

    Example:
        >>> from lorabridge.tensor import Tensor; import numpy as np
        >>> a = Tensor.from_numpy(np.ones((4, 8), "f4")); b = Tensor.from_numpy(np.ones((16, 3), "f4"))
        >>> module_problems(LoraModule("unet.conv_in", "lora", {"lora_A.weight": a, "lora_B.weight": b}, 4.0))
        [('lora_B.weight', 'rank mismatch, lora_A is [4, 8] but lora_B is [16, 3]')]
    """
    return [(role, what) for _, role, what in module_findings(module)]
