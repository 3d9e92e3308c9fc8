"""The underscored key grammar of kohya sd-scripts, A1111, ComfyUI, LyCORIS and MindONE's kohya port.

Keys are ``<prefix>_<module path, dots as underscores>.<suffix>``:
``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight`` (UNet, SGM path),
``lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight`` (CLIP-L; ``lora_te2_`` for
bigG), ComfyUI's generic ``diffusion_model.<dotted path>.<suffix>`` too. Underscored names are resolved
by lookup in the SDXL module tree, in SGM and in diffusers spelling
(:func:`~lorabridge.architectures.resolve_underscored`), never by guessing where the dots were.
A :class:`Grammar` is one family's prefixes and suffixes; :data:`KOHYA` is kohya's, which LyCORIS extends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Literal, Mapping, NamedTuple

from ..architectures import DEFAULT, resolve_underscored
from ..architectures.architecture import Architecture
from ..model import LoraModule

ALPHA = "alpha"  # the suffix whose tensor is the module's alpha, not one of its tensors


class Key(NamedTuple):
    """One tensor key taken apart: the file prefix it used, its component, underscored path and file suffix."""

    prefix: str
    component: str
    path: str
    suffix: str


@dataclass(frozen=True)
class Grammar:
    """How a family of files spells tensor keys: ``<prefix>_<path with _>.<suffix>``.

    ``prefixes`` maps a file prefix to the component it adapts; ``suffixes`` maps a file
    suffix to the neutral role of its tensor (:data:`ALPHA` for the module's alpha).
    ``dotted`` maps prefixes of ComfyUI's generic names, ``<prefix>.<path with dots>.<suffix>``
    (what its LoraSave node writes), to components. ``glued`` maps suffixes that follow the stem
    with ``_`` instead of ``.`` to the suffix they stand for: diffusers' ``convert_state_dict_to_kohya``
    keeps only the last two dots, so an old-spelled ``to_k.lora.down.weight`` becomes
    ``..._to_k_lora.down.weight``.
    """

    prefixes: Mapping[str, str]
    suffixes: Mapping[str, str]
    dotted: Mapping[str, str] = field(default_factory=dict)
    glued: Mapping[str, str] = field(default_factory=dict)

    def parse(self, key: str) -> Key | None:
        """The parts of a key, or None when no suffix is known.

        A prefix this grammar does not know becomes the component as is (``lora_te``, ``lora_te3``,
        ``lora_transformer``, ``text_encoders``...), so the checks can say which model such a file is for.

        Example:
            >>> KOHYA.parse("diffusion_model.input_blocks.4.1.proj_in.lora_up.weight")
            Key(prefix='diffusion_model', component='unet', path='input_blocks_4_1_proj_in', suffix='lora_up.weight')
        """
        stem, suffix = self._cut_suffix(key)
        if suffix is None:
            return None
        for prefix in sorted(self.dotted, key=len, reverse=True):
            if stem.startswith(prefix + "."):
                return Key(prefix, self.dotted[prefix], stem[len(prefix) + 1:].replace(".", "_"), suffix)
        for prefix in sorted(self.prefixes, key=len, reverse=True):
            if stem.startswith(prefix + "_"):
                return Key(prefix, self.prefixes[prefix], stem[len(prefix) + 1:], suffix)
        if "." in stem:  # generic names of a model that is not SDXL (text_encoders.t5xxl...)
            first, _, rest = stem.partition(".")
            return Key(first, first, rest.replace(".", "_"), suffix)
        words = stem.split("_")
        cut = 2 if words[0] == "lora" and len(words) > 2 else 1
        return Key("_".join(words[:cut]), "_".join(words[:cut]), "_".join(words[cut:]), suffix)

    def _cut_suffix(self, key: str) -> tuple[str, str | None]:
        """(stem, suffix) of a key, the suffix normalised from its glued spelling; (key, None) when none fits."""
        for glued in sorted(self.glued, key=len, reverse=True):
            if key.endswith("_" + glued):
                return key[: -len(glued) - 1], self.glued[glued]
        suffix = next((s for s in sorted(self.suffixes, key=len, reverse=True) if key.endswith("." + s)), None)
        return (key, None) if suffix is None else (key[: -len(suffix) - 1], suffix)

    def split(self, key: str) -> tuple[str, str, str] | None:
        """(component, underscored path, file suffix) of a key, or None when no suffix is known.

        Example:
            >>> KOHYA.split("lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha")
            ('text_encoder_2', 'text_model_encoder_layers_0_mlp_fc1', 'alpha')
        """
        parts = self.parse(key)
        return None if parts is None else parts[1:]


# Full-weight deltas (kind "full"): ComfyUI's LoraSave and LyCORIS' full algorithm, read by ComfyUI and A1111.
DIFF, DIFF_B = "diff", "diff_b"
KOHYA = Grammar(
    prefixes={"lora_unet": "unet", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2"},
    suffixes={"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight", "dora_scale": "dora_scale",
              "alpha": ALPHA, DIFF: DIFF, DIFF_B: DIFF_B},
    # ComfyUI's generic names (comfy/lora.py model_lora_keys_unet/_clip; comfy_extras/nodes_lora_extract.py).
    dotted={"diffusion_model": "unet", "text_encoders.clip_l.transformer": "text_encoder",
            "text_encoders.clip_g.transformer": "text_encoder_2"},
    glued={"lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight"},
)
# component -> kohya prefix, for writing
KOHYA_PREFIX = {component: prefix for prefix, component in KOHYA.prefixes.items()}


class ModuleProblem(ValueError):
    """One module's tensors do not form a module of its kind (collected, then raised as one error)."""


def module_name(component: str, underscored: str) -> str:
    """The canonical name of an underscored key stem, or the stem kept visibly unresolved.

    Example:
        >>> module_name("unet", "input_blocks_4_1_proj_in")
        'unet.down_blocks.1.attentions.0.proj_in'
        >>> module_name("unet", "double_blocks_0_img_attn_qkv")   # no such SDXL layer: left for the checks
        'unet.double_blocks_0_img_attn_qkv'
    """
    path = resolve_underscored(component, underscored)
    return f"{component}.{path or underscored}"


def group_keys(keys: Iterable[str], grammar: Grammar) -> tuple[dict[str, dict[str, str]], list[str], list[str]]:
    """Keys grouped by module: ({module name: {file suffix: key}}, keys of no module, problems)."""
    groups: dict[str, dict[str, str]] = {}
    unrecognized, problems = [], []
    for key in keys:
        parts = grammar.split(key)
        if parts is None:
            unrecognized.append(key)
            continue
        component, underscored, suffix = parts
        name = module_name(component, underscored)
        seen = groups.setdefault(name, {})
        if suffix in seen:
            problems.append(f"{name}: both {seen[suffix]!r} and {key!r} name its {suffix}")
        seen[suffix] = key
    return groups, unrecognized, problems


Spelling = Literal["original", "diffusers"]  # how a key stem spells the module path


def stem(module: LoraModule, spelling: Spelling, own_prefix: bool = False, architecture: Architecture = DEFAULT) -> str:
    """The key stem of a module: kohya prefix + its path with underscores, in ``spelling``: "original"
    (the architecture's original checkpoint, SGM for SDXL's UNet: what kohya and A1111 write) or "diffusers".

    ``own_prefix``: use the prefix the module was read with (``extra["key_prefix"]``, e.g. LyCORIS'
    ``lycoris``) where it has one.

    Example:
        >>> stem(LoraModule("unet.mid_block.attentions.0.proj_in", "lora", {}, 1.0), "original")
        'lora_unet_middle_block_1_proj_in'
    """
    if spelling not in ("original", "diffusers"):
        raise ValueError(f"unknown spelling {spelling!r}: 'original' or 'diffusers'")
    if module.component not in KOHYA_PREFIX:
        raise ModuleProblem(f"component {module.component!r} has no kohya prefix")
    path = module.path
    if spelling == "original":
        original = architecture.original_path(module.component, module.path)
        if original is None:
            raise ModuleProblem(f"is no {architecture.reference} {module.component} layer, so it has no original name")
        path = original
    prefix = module.extra.get("key_prefix", KOHYA_PREFIX[module.component]) if own_prefix else KOHYA_PREFIX[module.component]
    return f"{prefix}_{path.replace('.', '_')}"