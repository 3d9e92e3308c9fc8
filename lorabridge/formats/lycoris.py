"""LyCORIS files (lycoris-lora): LoRA/LoCon, LoHa, LoKr, full and their DoRA variants.

Keys follow the kohya grammar (:mod:`lorabridge.naming.underscored`): the architecture's kohya prefixes
(SDXL: ``lora_unet_`` / ``lora_te1_`` / ``lora_te2_``) from LyCORIS' kohya network, ``lycoris_`` (the
denoiser: SDXL's UNet) from ``create_lycoris``, each followed by the diffusers module path with dots
as underscores (the original spelling, SGM for SDXL's UNet, is accepted too).
Every module has a 0-d ``alpha``. The kinds stay what they are in the neutral model:

- LoRA/LoCon ``lora_down.weight`` / ``lora_up.weight`` -> kind ``lora``. A Tucker LoCon's
  ``lora_mid.weight`` is folded into lora_A (exact in float32, not bit-exact; warned).
- LoHa ``hada_w1_a`` ... ``hada_t2`` -> kind ``loha``, LoKr ``lokr_w1`` ... ``lokr_t2`` -> kind ``lokr``.
  LyCORIS' modules store the ``*_b`` factor of a non-Tucker conv flattened, (rank, in*kh*kw);
  the neutral model keeps the kernel axes, (rank, in, kh, kw), as lora_A does. The kernel comes
  from the SDXL module tree; the writer flattens again, so a round trip is bit-exact.
- full ``diff`` / ``diff_b`` (delta W and bias delta) -> kind ``full``.
- A module read from ``lycoris_`` keys keeps that prefix in ``extra["key_prefix"]`` (the manifest's
  ``key_prefix``) and is written under it again: ``create_lycoris_from_weights`` finds only those.
- ``dora_scale`` (DoRA, ``dora_wd``) is kept with its axis: (out, 1, ...) is ``"out"``
  (``wd_on_output=True``, the default), (1, in, ...) is ``"in"``.

lycoris-lora 4.1.3 applies the LoHa/LoKr scale alpha/rank twice in ``get_diff_weight`` (and so in
``merge_to``), but once in its forward pass, which is what training optimised; the neutral
delta W (spec/neutral-lora-v1.md, section 4, implementers' note) is the forward pass's.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import replace
from typing import Mapping

import numpy as np

from ..errors import LoraBridgeWarning
from ..kinds import MISSING, KindName, kinds_of
from ..model import LoraModel, LoraModule
from ..naming.underscored import ALPHA, KOHYA, Grammar, ModuleProblem
from ..rules import module_problems
from ..tensor import Tensor, math_refusal
from .contract import FOREIGN_READ, READ_DEFAULTS, WRITE_DEFAULTS, DeclaredFormat, Progress, ReadOptions, WriteOptions
from .underscored_files import (alpha_of, alpha_tensor, full_module, full_tensors, lora_module, read_underscored, with_dora,
                                write_underscored)

# LyCORIS tensor suffixes of the kinds lorabridge keeps (same names as the neutral roles).
LOHA_SUFFIXES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_SUFFIXES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
LORA_MID = "lora_mid.weight"
# Suffixes of LyCORIS algorithms without a neutral kind -> the algorithm, for the refusal.
UNSUPPORTED = {"oft_blocks": "OFT/BOFT", "oft_diag": "OFT", "rescale": "BOFT", "on_input": "IA3",
               "a1.weight": "GLoRA", "a2.weight": "GLoRA", "b1.weight": "GLoRA", "b2.weight": "GLoRA",
               "w_norm": "norm", "b_norm": "norm"}

LYCORIS = Grammar(
    aliases={"lycoris": "lora_unet"},  # create_lycoris' prefix for the denoiser (SDXL's UNet, Flux's transformer)
    suffixes={**KOHYA.suffixes, LORA_MID: LORA_MID, **{s: s for s in LOHA_SUFFIXES + LOKR_SUFFIXES},
              **{s: s for s in UNSUPPORTED}},
)
# kind -> (the neutral roles of it LyCORIS stores flattened for a non-Tucker conv, the role marking Tucker)
FLATTENED = {"loha": (("hada_w1_b", "hada_w2_b"), "hada_t1"), "lokr": (("lokr_w2_b",), "lokr_t2")}


def kind_of(roles: list[str]) -> KindName:
    """The kind a module's roles belong to (dora_scale belongs to all); mixed kinds are a problem."""
    kinds = kinds_of(roles)
    if len(kinds) != 1:
        raise ModuleProblem(f"tensors {', '.join(sorted(roles))} mix LyCORIS kinds" if kinds else "has no LoRA factors")
    return kinds.pop()


def base_kernel(name: str) -> tuple[int, ...] | None:
    """The kernel size of the SDXL layer ``name`` adapts, None for a linear layer or an unknown name."""
    from ..architectures import module_shape

    component, _, path = name.partition(".")
    shape = module_shape(component, path)
    return tuple(shape[2:]) if shape is not None and len(shape) > 2 else None


def unflattened(tensors: dict[str, Tensor], kind: str, kernel: tuple[int, ...] | None) -> dict[str, Tensor]:
    """LoHa/LoKr tensors with a flattened (rank, in*kh*kw) conv factor given back its kernel axes."""
    roles, tucker = FLATTENED[kind]
    if kernel is None or tucker in tensors:
        return tensors
    out = dict(tensors)
    for role in roles:
        t = tensors.get(role)
        if t is not None and len(t.shape) == 2 and t.shape[1] % math.prod(kernel) == 0:
            out[role] = t.reshaped((t.shape[0], t.shape[1] // math.prod(kernel), *kernel))
    return out


def fold_mid(down: Tensor, mid: Tensor) -> Tensor:
    """A Tucker LoCon's lora_mid (r, r, kh, kw) folded into its lora_down (r, in, 1, 1): (r, in, kh, kw).

    A 1x1 conv (down) followed by the k x k conv (mid) is one k x k conv whose weight is
    ``mid`` contracted with ``down`` over the inner rank, so delta W is unchanged; in numpy, so not in FP8 (refused).
    """
    if len(down.shape) != 4 or len(mid.shape) != 4 or down.shape[2:] != (1, 1) or mid.shape[1] != down.shape[0]:
        raise ModuleProblem(f"lora_mid {list(mid.shape)} does not fit lora_down {list(down.shape)}")
    refusal = math_refusal({"lora_down.weight": down, LORA_MID: mid}, "folding the Tucker lora_mid into lora_down")
    if refusal:
        raise ModuleProblem(refusal)
    folded = np.einsum("pjhw,ji->pihw", mid.to_float32(), down.to_float32().reshape(down.shape[:2]))
    return Tensor.from_numpy(folded.astype(np.float32), down.dtype)


def check_factors(module: LoraModule) -> None:
    """LoHa/LoKr factors that are missing or do not fit together (the shared shape rules), found before any math runs.

    The DoRA magnitude is left to :func:`~lorabridge.formats.checks.check_model`: its axis is read after this.
    """
    factors = replace(module, tensors={role: t for role, t in module.tensors.items() if role != "dora_scale"})
    problems = module_problems(factors)
    if problems:
        role, what = problems[0]
        raise ModuleProblem(f"{module.kind} module without {role}" if what == MISSING else what)


def lycoris_module(name: str, parts: Mapping[str, Tensor], user_alpha: float | None, folded: list[str]) -> LoraModule:
    """One neutral module from a LyCORIS module's parts (file suffix -> tensor)."""
    unsupported = sorted({UNSUPPORTED[s] for s in parts if s in UNSUPPORTED})
    if unsupported:
        raise ModuleProblem(f"LyCORIS {'/'.join(unsupported)} modules have no neutral kind (lorabridge keeps LoRA, LoHa, LoKr, full)")
    roles = {LYCORIS.suffixes[s]: t for s, t in parts.items() if s != ALPHA}
    kind = kind_of([r for r in roles if r != "dora_scale"])
    if kind == "full":
        return full_module(name, parts, user_alpha)
    if kind == "lora":
        if LORA_MID in parts:
            if "lora_down.weight" not in parts:
                raise ModuleProblem("has lora_mid.weight but no lora_down.weight")
            folded.append(name)
            parts = {s: t for s, t in parts.items() if s != LORA_MID}
            parts["lora_down.weight"] = fold_mid(parts["lora_down.weight"], roles[LORA_MID])
        return lora_module(name, parts, user_alpha)
    module = LoraModule(name, kind, unflattened(roles, kind, base_kernel(name)), 0.0)
    check_factors(module)
    module.alpha, module.alpha_source, module.extra = alpha_of(parts, module.rank, user_alpha)
    return with_dora(module)


def lycoris_tensors(module: LoraModule) -> dict[str, Tensor]:
    """A module's tensors under LyCORIS suffixes, conv factors flattened as LyCORIS' modules hold them."""
    if module.kind == "full":  # LyCORIS' full module stores diff and diff_b only
        return full_tensors(module)
    if module.kind == "lora":
        tensors = {s: module.tensors[r] for s, r in KOHYA.suffixes.items() if r in module.tensors}
    else:
        tensors = dict(module.tensors)
        roles, tucker = FLATTENED[module.kind]
        for role in roles:
            t = tensors.get(role)
            if t is not None and len(t.shape) > 2 and tucker not in tensors:
                tensors[role] = t.reshaped((t.shape[0], math.prod(t.shape[1:])))
    tensors[ALPHA] = alpha_tensor(module)  # LyCORIS' loaders need it: float(alpha) on a missing one fails
    return tensors


# The reader/writer pair as the converter registry calls it.
def detect(path: str | os.PathLike) -> bool:
    """A state-dict file with LyCORIS-only keys: a ``lycoris_`` prefix, LoHa/LoKr factors, a Tucker mid,
    or an algorithm lorabridge has no kind for (so that the reader can say so)."""
    from ..io.torch_file import state_dict_keys

    found = state_dict_keys(path)
    if not found:
        return False
    only_lycoris = tuple("." + s for s in (*LOHA_SUFFIXES, *LOKR_SUFFIXES, LORA_MID, *UNSUPPORTED))
    return any(k.startswith("lycoris_") or k.endswith(only_lycoris) for k in found[0])


def read(path: str | os.PathLike, options: ReadOptions = READ_DEFAULTS) -> LoraModel:
    """Read a LyCORIS file into a checked :class:`LoraModel`, kinds kept.

    Example:
        >>> model = read("sdxl_loha.safetensors")   # doctest: +SKIP
        >>> model.summary()["kinds"]   # doctest: +SKIP
        {'loha': 722}
    """
    folded: list[str] = []
    model = read_underscored(path, LYCORIS, lambda name, parts, alpha: lycoris_module(name, parts, alpha, folded),
                             alpha=options.alpha, skip_unknown=options.skip_unknown, strict=options.strict)
    if folded:
        warnings.warn(f"{path}: folded the Tucker lora_mid of {len(folded)} LoCon module(s) into lora_down "
                      f"(same delta W, float32 rounding): {', '.join(folded[:3])}{' ...' if len(folded) > 3 else ''}",
                      LoraBridgeWarning, stacklevel=2)
    return model


def write(model: LoraModel, path: str | os.PathLike, options: WriteOptions = WRITE_DEFAULTS, *,
          progress: Progress | None = None, force: bool = False) -> None:
    """Write ``model`` as a LyCORIS file (``lora_unet_``/``lora_te1_``/``lora_te2_``, diffusers spelling).

    LoRA, LoHa, LoKr and full modules keep their kind, DoRA magnitudes their axis: what lycoris-lora's
    ``create_network_from_weights`` and ComfyUI load. Modules read from ``lycoris_`` keys (``create_lycoris``)
    are written under that prefix again, which ``create_lycoris_from_weights`` needs. Nothing is
    baked: every neutral kind fits.

    Example:
        >>> write(model, "sdxl_lokr.safetensors")   # doctest: +SKIP
    """
    from .checks import cast_model, check_finite

    check_finite(model, path, strict=options.strict)
    model = cast_model(model, options.dtype, path, strict=options.strict)
    write_underscored(model, path, "diffusers", lycoris_tensors, dtype=options.dtype, progress=progress, own_prefix=True)


FORMAT = DeclaredFormat(
    name="lycoris", framework="torch",
    description="LyCORIS (lycoris-lora): LoRA/LoCon, LoHa, LoKr, DoRA; lora_unet_/lora_te1_/lora_te2_/lycoris_ + diffusers path",
    detect=detect, read=read, write=write, stores_metadata=True, stores_alpha=True,
    kinds=("lora", "loha", "lokr", "full"), dora_axes=("out", "in"),  # every kind fits: nothing to bake
    read_options=FOREIGN_READ, write_options=frozenset({"dtype", "strict"}))
