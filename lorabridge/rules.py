"""The rules every module must follow (spec sections 3.2, 3.3 and 4), in one place.

Readers, writers and ``validate`` all check a module with :func:`module_problems`, so a file
a reader accepts is one ``validate`` accepts, and no factor that cannot be multiplied reaches
the math (baking, fusing): a rule checked in one place and not the other is how a LoHa with
disagreeing factors got in, and then crashed ``--bake-to-lora``.

Shapes, dtypes (a factor holds floating-point values; integers would be multiplied in by no loader), and
alpha: a NaN or infinite alpha makes every value of delta W NaN/Inf, and cannot be
written as JSON. Zero and negative alphas follow the rules (see :func:`alpha_problem`).
Only shapes, dtypes and alpha are looked at, never tensor data, so the check costs nothing on large files.
Every problem carries its reason class of spec section 8 (``missing-tensor``, ``roles``, ``shape``,
``rank-mismatch``, ``dora``...), which ``validate`` reports (see :func:`module_findings`).
The shape rules of each kind live with the kind (:data:`lorabridge.kinds.KINDS`), the DoRA
magnitude's in :mod:`lorabridge.kinds.dora`; this module applies them all, in one order.
"""

from __future__ import annotations

import math

from .kinds import DORA_ROLE, KINDS, MISSING, Finding, dora_findings
from .model import LoraModule
from .tensor import FLOAT_DTYPES

Problem = tuple[str, str]  # (role the problem is about, what is wrong)
ALPHA_ORIGINS = {"stored": "stored in the file", "user": "given with --alpha", "assumed": "assumed"}  # by alpha_source


def alpha_problem(alpha: float) -> str | None:
    """Why ``alpha`` cannot be a module's alpha, or None.

    NaN and +-Inf are refused. Negative alphas are allowed: delta W = alpha/r * B A is well defined,
    and sign-flipped LoRAs and kohya merges with negative ratios store them. Zero is allowed too (the
    module adds nothing); readers warn about it, because kohya sd-scripts reads alpha 0 as alpha = rank.
    """
    return None if math.isfinite(alpha) else f"alpha {alpha} is not a finite number"


_MEMO_SIZE = 4096  # distinct module signatures remembered (a LoRA has a few dozen; a merge of many, more)
_findings_by_signature: dict[tuple, tuple[Finding, ...]] = {}


def module_findings(module: LoraModule) -> list[Finding]:
    """What is wrong with a module's tensors for its kind, as (reason class, role, message); empty when nothing is.

    Missing roles come as ("missing-tensor", role, :data:`MISSING`); then roles foreign to the kind, then
    empty axes, integer or boolean tensors ("dtype"), ranks that disagree, factors whose product has no single
    shape, a misshapen DoRA magnitude (or a ``dora_axis`` without one); a non-finite alpha comes as ("schema", "alpha", why).

    The findings depend on the module's kind, roles, shapes and dtypes (in order), DoRA axis and alpha only, never
    on its name or data, and a LoRA's hundreds of modules share a few dozen such signatures: each is worked
    out once and remembered (a reader, ``check_model`` and a writer each ask about every module).
    """
    signature = (module.kind, tuple((role, tuple(tensor.shape), tensor.dtype) for role, tensor in module.tensors.items()),
                 module.dora_axis, module.alpha, module.alpha_source)
    found = _findings_by_signature.get(signature)
    if found is None:
        if len(_findings_by_signature) >= _MEMO_SIZE:
            _findings_by_signature.clear()
        found = _findings_by_signature[signature] = tuple(_worked_out_findings(module))
    return list(found)


def _worked_out_findings(module: LoraModule) -> list[Finding]:
    kind = KINDS[module.kind]
    required, optional = kind.required, kind.optional
    t = {role: tensor.shape for role, tensor in module.tensors.items()}
    problems: list[Finding] = [("missing-tensor", role, MISSING) for role in required if role not in t]
    problems += [("roles", role, f"{role} is not part of a {module.kind} module") for role in t if role not in required + optional]
    problems += [("shape", role, f"{role} has an empty axis: {list(shape)}") for role, shape in t.items() if 0 in shape]
    problems += [("dtype", role, f"{role} holds {tensor.dtype} values, not floating-point ones") for role, tensor in module.tensors.items()
                 if tensor.dtype not in FLOAT_DTYPES]
    problems = problems or kind.shape_findings(t)
    if not problems and DORA_ROLE in t:
        problems = dora_findings(module.dora_axis, module.tensors[DORA_ROLE], module.weight_shape)
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
