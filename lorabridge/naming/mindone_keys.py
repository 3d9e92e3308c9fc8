"""How MindONE's tools spell LoRA tensor keys: one :class:`Naming` per tool, in :data:`NAMINGS`.

- ``sgm``: the SDXL trainer (``examples/stable_diffusion_xl``), SGM module paths
  (``model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.lora_A.weight``,
  ``conditioner.embedders.0/1...`` for the text encoders, bigG's q/k/v fused in ``attn.in_proj``);
- ``diffusers``: ``mindone.diffusers`` / PEFT (``unet.<diffusers path>.lora_A.weight``);
- ``kohya``: MindONE's port of kohya sd-scripts (``lora_unet_<SGM path, dots as _>.lora_down.weight``
  with a 0-d ``.alpha``), the underscored grammar of :mod:`.underscored`.

A naming maps module keys to canonical module names (only Linear/Conv2d layers of a tree: SDXL's for SGM and kohya, any registered one for diffusers)
and back; the MindONE formats (:mod:`lorabridge.formats.mindone`) put it in a MindSpore container.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from ..architectures import architectures, registered_components
from ..architectures.architecture import underscored
from ..architectures.sdxl import SDXL, diffusers_to_sgm, sgm_to_diffusers
from ..architectures.sdxl.text_encoders import OPENCLIP_PREFIX, diffusers_text_to_sgm, sgm_text_to_diffusers
from ..architectures.tree import LORA_TARGET_TYPES
from .underscored import ALPHA, KOHYA as KOHYA_GRAMMAR

A, B = "lora_A.weight", "lora_B.weight"
# Key endings of LoRA factors in any naming: a key ending so that our naming cannot place is "unknown", not "ignored".
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_down.weight", ".lora_up.weight")


@dataclass(frozen=True)
class Naming:
    """How one MindONE tool spells LoRA tensor keys: ``<module key>.<role suffix>``.

    ``parse`` maps a module key to the canonical module names it holds (three for a fused
    q/k/v projection) or None; ``spell`` maps a canonical name to (module key, row block of a
    fused projection or None), or None when this naming cannot express the module.
    """

    name: str
    prefixes: tuple[str, ...]  # every module key of this naming starts with one of these
    roles: Mapping[str, str]  # key suffix in the file -> neutral role (or ALPHA)
    parse: Callable[[str], tuple[str, ...] | None]
    spell: Callable[[str], tuple[str, int | None] | None]

    @property
    def stores_alpha(self) -> bool:
        return ALPHA in self.roles.values()

    def suffix(self, role: str) -> str:
        return next(s for s, r in self.roles.items() if r == role)

    def split_key(self, key: str) -> tuple[str, str] | None:
        """(module key, neutral role) of a tensor key of this naming, or None (not a LoRA tensor of ours)."""
        if not key.startswith(self.prefixes):
            return None
        for suffix, role in self.roles.items():
            if key.endswith("." + suffix):
                return key[: -len(suffix) - 1], role
        return None


def _targetable(component: str, path: str | None) -> str | None:
    """``component.path`` when the SDXL tree has a Linear/Conv2d there (what a LoRA can adapt), else None."""
    if path is None or SDXL.module_types(component).get(path) not in LORA_TARGET_TYPES:
        return None
    return f"{component}.{path}"


# --- SGM (MindONE SDXL trainer) ---------------------------------------------------------------
SGM_UNET = "model.diffusion_model."


def _sgm_parse(key: str) -> tuple[str, ...] | None:
    if key.startswith(SGM_UNET):
        name = _targetable("unet", sgm_to_diffusers(key[len(SGM_UNET):]))
        return (name,) if name else None
    fused = SDXL.fused_parts(key[len(OPENCLIP_PREFIX):]) if key.startswith(OPENCLIP_PREFIX) else None
    if fused:
        component, paths = fused
        return tuple(f"{component}.{p}" for p in paths)
    text = sgm_text_to_diffusers(key)
    name = _targetable(*text) if text else None
    return (name,) if name else None


def _sgm_spell(name: str) -> tuple[str, int | None] | None:
    component, path = name.split(".", 1)
    if component == "unet":
        sgm = diffusers_to_sgm(path)
        return (SGM_UNET + sgm, None) if sgm else None
    fused = SDXL.fused_name(component, path)
    if fused:
        return OPENCLIP_PREFIX + fused[0], fused[1]
    sgm = diffusers_text_to_sgm(component, path)
    return (sgm, None) if sgm else None


# --- mindone.diffusers / PEFT: diffusers paths, so any registered architecture (SDXL; Flux.1, as MindONE's
# examples/diffusers/dreambooth/train_dreambooth_lora_flux.py saves it) ---------------------------------
def _diffusers_parse(key: str) -> tuple[str, ...] | None:
    component, _, path = key.partition(".")
    targetable = any(component in a.components and a.is_lora_target(component, path) for a in architectures())
    return (f"{component}.{path}",) if targetable else None


def _diffusers_spell(name: str) -> tuple[str, int | None] | None:
    return name, None


# --- MindONE's kohya sd-scripts port: kohya's grammar (lorabridge.naming.underscored) in a MindSpore file
KOHYA_PREFIXES = {component: f"{prefix}_" for component, prefix in SDXL.kohya_prefixes.items()}


def _kohya_parse(key: str) -> tuple[str, ...] | None:
    for component, prefix in KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            name = _targetable(component, SDXL.resolve_underscored(component, key[len(prefix):]))
            return (name,) if name else None
    return None


def _kohya_spell(name: str) -> tuple[str, int | None] | None:
    component, path = name.split(".", 1)
    spelled = diffusers_to_sgm(path) if component == "unet" else path  # kohya spells SDXL's UNet the SGM way
    return (KOHYA_PREFIXES[component] + underscored(spelled), None) if spelled and component in KOHYA_PREFIXES else None


LORA_ROLES = {A: A, B: B}
NAMINGS: dict[str, Naming] = {n.name: n for n in [
    Naming("sgm", (SGM_UNET, "conditioner.embedders."), LORA_ROLES, _sgm_parse, _sgm_spell),
    Naming("diffusers", tuple(f"{c}." for c in registered_components()), LORA_ROLES, _diffusers_parse, _diffusers_spell),
    Naming("kohya", tuple(KOHYA_PREFIXES.values()),  # MindONE's port has no DoRA
           {suffix: role for suffix, role in KOHYA_GRAMMAR.suffixes.items() if role in (A, B, ALPHA)}, _kohya_parse, _kohya_spell),
]}
