"""The underscored key grammar of kohya sd-scripts, A1111, ComfyUI, LyCORIS and MindONE's kohya port.

Keys are ``<prefix>_<module path, dots as underscores>.<suffix>``:
``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight`` (SDXL's UNet, SGM path),
``lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight`` (CLIP-L; ``lora_te2_`` for
bigG), ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` (Flux's transformer, BFL path),
ComfyUI's generic ``diffusion_model.<dotted path>.<suffix>`` too. The prefixes are each architecture's
(``Architecture.kohya_prefixes``, ``comfyui_prefixes``): ``lora_unet`` is SDXL's UNet but Flux's
transformer, so a file's architecture is the registered one whose names resolve the most of its keys
(:func:`architecture_of`). Underscored names are resolved by lookup in that architecture's module tree, in
its original and in diffusers spelling (:meth:`~lorabridge.architectures.architecture.Architecture.resolve_underscored`),
never by guessing where the dots were; a name of a fused layer (Flux's ``qkv``, one matrix in the
original checkpoint) stands for its parts. A :class:`Grammar` is one family's suffixes; :data:`KOHYA`
is kohya's, which LyCORIS extends, and :data:`COMFYUI` with ComfyUI's second spelling of the pair
(``lora_A``/``lora_B``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterable, Literal, Mapping, NamedTuple, Sequence

from ..architectures import DEFAULT, architectures
from ..architectures.architecture import Architecture
from ..model import LoraModule
from . import PARSED_KEYS_KEPT

ALPHA = "alpha"  # the suffix whose tensor is the module's alpha, not one of its tensors


class Key(NamedTuple):
    """One tensor key taken apart: the file prefix it used, its component, underscored path and file suffix."""

    prefix: str
    component: str
    path: str
    suffix: str


@dataclass(frozen=True, eq=False)
class Grammar:
    """How a family of files spells tensor keys: ``<prefix>_<path with _>.<suffix>``.

    The prefixes are the architecture's kohya prefixes (:meth:`prefixes`); ``aliases`` maps another
    file prefix to the kohya prefix whose component it stands for (LyCORIS' ``lycoris`` for
    ``lora_unet``). ``suffixes`` maps a file suffix to the neutral role of its tensor (:data:`ALPHA`
    for the module's alpha). ``comfyui``: ComfyUI's generic names, ``<prefix>.<path with dots>.<suffix>``
    (what its LoraSave node writes; the architecture's ``comfyui_prefixes``), are read too. ``glued`` maps
    suffixes that follow the stem with ``_`` instead of ``.`` to the suffix they stand for: diffusers'
    ``convert_state_dict_to_kohya`` keeps only the last two dots, so an old-spelled ``to_k.lora.down.weight``
    becomes ``..._to_k_lora.down.weight``.
    """

    suffixes: Mapping[str, str]
    glued: Mapping[str, str] = field(default_factory=dict)
    aliases: Mapping[str, str] = field(default_factory=dict)
    comfyui: bool = False

    def prefixes(self, architecture: Architecture = DEFAULT) -> dict[str, str]:
        """File prefix -> component, in ``architecture``: its kohya prefixes and this grammar's aliases of them.

        Example:
            >>> KOHYA.prefixes()
            {'lora_unet': 'unet', 'lora_te1': 'text_encoder', 'lora_te2': 'text_encoder_2'}
        """
        return dict(_prefix_tables(self, architecture)[1])

    def parse(self, key: str, architecture: Architecture = DEFAULT) -> Key | None:
        """The parts of a key as ``architecture`` spells them, or None when no suffix is known.

        A prefix this grammar does not know becomes the component as is (``lora_te``, ``lora_te3``,
        ``lora_transformer``, ``text_encoders``...), so the checks can say which model such a file is for.

        Example:
            >>> KOHYA.parse("diffusion_model.input_blocks.4.1.proj_in.lora_up.weight")
            Key(prefix='diffusion_model', component='unet', path='input_blocks_4_1_proj_in', suffix='lora_up.weight')
            >>> KOHYA.parse("lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha")[1:]
            ('text_encoder_2', 'text_model_encoder_layers_0_mlp_fc1', 'alpha')
        """
        return _parsed(self, key, architecture)

    def _parse(self, key: str, architecture: Architecture) -> Key | None:
        stem, suffix = self._cut_suffix(key)
        if suffix is None:
            return None
        dotted, prefixes = _prefix_tables(self, architecture)
        for prefix, component in dotted:
            if stem.startswith(prefix + "."):
                return Key(prefix, component, stem[len(prefix) + 1:].replace(".", "_"), suffix)
        for prefix, component in prefixes:
            if stem.startswith(prefix + "_"):
                return Key(prefix, component, stem[len(prefix) + 1:], suffix)
        if "." in stem:  # generic names of a model that is not registered (text_encoders.t5xxl...)
            first, _, rest = stem.partition(".")
            return Key(first, first, rest.replace(".", "_"), suffix)
        words = stem.split("_")
        cut = 2 if words[0] == "lora" and len(words) > 2 else 1
        return Key("_".join(words[:cut]), "_".join(words[:cut]), "_".join(words[cut:]), suffix)

    def _cut_suffix(self, key: str) -> tuple[str, str | None]:
        """(stem, suffix) of a key, the suffix normalised from its glued spelling; (key, None) when none fits."""
        glued, dotted = _suffix_tables(self)
        for ending, suffix in glued:
            if key.endswith(ending):
                return key[: -len(ending)], suffix
        for ending, suffix in dotted:
            if key.endswith(ending):
                return key[: -len(ending)], suffix
        return key, None


@lru_cache(maxsize=PARSED_KEYS_KEPT)
def _parsed(grammar: Grammar, key: str, architecture: Architecture) -> Key | None:
    """:meth:`Grammar.parse`, remembered (a kohya SDXL LoRA's 1,680 keys were parsed ~5 times each per file)."""
    return grammar._parse(key, architecture)


@lru_cache(maxsize=32)
def _suffix_tables(grammar: Grammar) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(``_`` + glued suffix, suffix it stands for) and (``.`` + suffix, suffix), longest first: a longer
    ending wins over one it ends with."""
    return ([("_" + g, grammar.glued[g]) for g in sorted(grammar.glued, key=len, reverse=True)],
            [("." + s, s) for s in sorted(grammar.suffixes, key=len, reverse=True)])


Prefixes = list[tuple[str, str]]  # (file prefix, component), longest prefix first


@lru_cache(maxsize=32)
def _prefix_tables(grammar: Grammar, architecture: Architecture) -> tuple[Prefixes, Prefixes]:
    """(ComfyUI dotted prefixes, underscored prefixes) of ``grammar`` in ``architecture``, longest first."""
    underscored = {prefix: component for component, prefix in architecture.kohya_prefixes.items()}
    underscored.update({alias: underscored[target] for alias, target in grammar.aliases.items() if target in underscored})
    dotted = {prefix: component for component, prefix in architecture.comfyui_prefixes.items()} if grammar.comfyui else {}
    return ([(p, dotted[p]) for p in sorted(dotted, key=len, reverse=True)],
            [(p, underscored[p]) for p in sorted(underscored, key=len, reverse=True)])


# Full-weight deltas (kind "full"): ComfyUI's LoraSave and LyCORIS' full algorithm, read by ComfyUI and A1111.
DIFF, DIFF_B = "diff", "diff_b"
KOHYA = Grammar(
    suffixes={"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight", "dora_scale": "dora_scale",
              "alpha": ALPHA, DIFF: DIFF, DIFF_B: DIFF_B},
    glued={"lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight"},
    comfyui=True,  # comfy/lora.py model_lora_keys_unet/_clip; comfy_extras/nodes_lora_extract.py
)
# ComfyUI's own loader (comfy/weight_adapter/lora.py LoRAAdapter.load) takes the pair as lora_up/lora_down or as
# lora_A/lora_B (diffusers' spelling, what OneTrainer's COMFY_LORA writes), with the same ``.alpha`` beside either.
A_B = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}  # lora_A/B spelling -> kohya's
COMFYUI = Grammar(suffixes={**KOHYA.suffixes, **{s: KOHYA.suffixes[k] for s, k in A_B.items()}}, comfyui=True)


class ModuleProblem(ValueError):
    """One module's tensors do not form a module of its kind (collected, then raised as one error)."""


class Placed(NamedTuple):
    """Where an underscored key stem goes: its canonical module name, and the canonical names of the
    parts when the stem names a fused layer (``transformer.double_blocks.0.img_attn.qkv``), in row order."""

    name: str
    parts: tuple[str, ...] = ()


def place(component: str, underscored: str, architecture: Architecture = DEFAULT) -> Placed:
    """The module an underscored key stem names in ``architecture``, or the stem kept visibly unresolved.

    Example:
        >>> place("unet", "input_blocks_4_1_proj_in")
        Placed(name='unet.down_blocks.1.attentions.0.proj_in', parts=())
        >>> place("unet", "double_blocks_0_img_attn_qkv")   # no such SDXL layer: left for the checks
        Placed(name='unet.double_blocks_0_img_attn_qkv', parts=())
    """
    return _placement(component, underscored, architecture) or Placed(f"{component}.{underscored}")


@lru_cache(maxsize=PARSED_KEYS_KEPT)
def _placement(component: str, underscored: str, architecture: Architecture) -> Placed | None:
    """Where :func:`place` puts a stem that ``architecture`` knows, None for one it does not. Remembered, as key
    parses are (:func:`_parsed`): the architecture vote and the grouping ask for every key's stem, and a module's
    keys (its pair and alpha) share one; a kohya SDXL file's grouping took 11 ms, most of it here."""
    path = architecture.resolve_underscored(component, underscored)
    if path is not None:
        return Placed(f"{component}.{path}")
    fused = architecture.resolve_fused_underscored(component, underscored)
    if fused is not None:
        original, parts = fused
        return Placed(f"{component}.{original}", tuple(f"{component}.{p}" for p in parts))
    return None


def architecture_of(keys: Sequence[str], grammar: Grammar) -> Architecture:
    """The registered architecture whose prefixes and module tree place the most ``keys`` (the first
    registered of equals): ``lora_unet_`` names SDXL's UNet in one file and Flux's transformer in another."""
    candidates = list(architectures())
    if len(candidates) == 1:
        return candidates[0]

    def placed(architecture: Architecture) -> int:
        parsed = (grammar.parse(key, architecture) for key in keys)
        return sum(1 for p in parsed if p is not None and _placement(p.component, p.path, architecture) is not None)

    return max(candidates, key=placed)  # max keeps the first of equals


class Grouped(NamedTuple):
    """A file's keys grouped by module, in the architecture that places them."""

    architecture: Architecture
    modules: dict[str, dict[str, str]]  # module name -> file suffix -> key
    fused: dict[str, tuple[str, ...]]  # module name of a fused layer -> its parts' names
    unrecognized: list[str]  # keys of no module
    problems: list[str]


def group_keys(keys: Iterable[str], grammar: Grammar) -> Grouped:
    """Keys grouped by module, in the architecture that places most of them (:func:`architecture_of`)."""
    keys = list(keys)
    architecture = architecture_of(keys, grammar)
    groups: dict[str, dict[str, str]] = {}
    fused: dict[str, tuple[str, ...]] = {}
    unrecognized, problems = [], []
    for key in keys:
        parsed = grammar.parse(key, architecture)
        if parsed is None:
            unrecognized.append(key)
            continue
        name, parts = place(parsed.component, parsed.path, architecture)
        if parts:
            fused[name] = parts
        seen = groups.setdefault(name, {})
        if parsed.suffix in seen:
            problems.append(f"{name}: both {seen[parsed.suffix]!r} and {key!r} name its {parsed.suffix}")
        seen[parsed.suffix] = key
    return Grouped(architecture, groups, fused, unrecognized, problems)


Spelling = Literal["original", "diffusers"]  # how a key stem spells the module path


def stem(module: LoraModule, spelling: Spelling, own_prefix: bool = False,
         architecture: Architecture = DEFAULT, *, dotted: bool = False) -> tuple[str, tuple[str, int] | None]:
    """The key stem of a module: kohya prefix + its path with underscores, in ``spelling``: "original"
    (the architecture's original checkpoint, SGM for SDXL's UNet, BFL for Flux: what kohya and A1111
    write) or "diffusers"; and, for a part of a fused layer (which the original spelling names only as
    a whole: Flux's ``qkv``), that layer's original name and the part's row block, else None.

    ``own_prefix``: use the prefix the module was read with (``extra["key_prefix"]``, e.g. LyCORIS'
    ``lycoris``) where it has one. ``dotted``: ComfyUI's generic name instead, the architecture's ComfyUI
    prefix + the path with its dots (``comfyui_prefixes``; what ComfyUI's LoraSave writes).

    Example:
        >>> stem(LoraModule("unet.mid_block.attentions.0.proj_in", "lora", {}, 1.0), "original")
        ('lora_unet_middle_block_1_proj_in', None)
        >>> stem(LoraModule("unet.mid_block.attentions.0.proj_in", "lora", {}, 1.0), "original", dotted=True)
        ('diffusion_model.middle_block.1.proj_in', None)
    """
    if spelling not in ("original", "diffusers"):
        raise ValueError(f"unknown spelling {spelling!r}: 'original' or 'diffusers'")
    prefixes, family = (architecture.comfyui_prefixes, "ComfyUI") if dotted else (architecture.kohya_prefixes, "kohya")
    kohya_prefix = prefixes.get(module.component)
    if kohya_prefix is None:
        raise ModuleProblem(f"component {module.component!r} has no {family} prefix")
    path, fused = module.path, None
    if spelling == "original":
        original = architecture.original_spelling(module.component, module.path)
        if original is None:
            raise ModuleProblem(f"is no {architecture.reference} {module.component} layer, so it has no original name")
        path, block = original
        fused = None if block is None else (path, block)
    if dotted:
        return f"{kohya_prefix}.{path}", fused
    prefix = module.extra.get("key_prefix", kohya_prefix) if own_prefix else kohya_prefix
    return f"{prefix}_{path.replace('.', '_')}", fused
