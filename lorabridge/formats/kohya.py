"""kohya sd-scripts / A1111 / ComfyUI LoRA files for SDXL, and the underscored key grammar LyCORIS shares.

Keys are ``<prefix>_<module path, dots as underscores>.<suffix>``:
``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight`` (UNet, SGM path),
``lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight`` (CLIP-L; ``lora_te2_`` for
bigG). Suffixes: ``lora_down.weight`` is lora_A, ``lora_up.weight`` lora_B, a 0-d ``alpha`` (often
fp16; absent means alpha = rank) and, for DoRA, ``dora_scale``. Safetensors metadata (``ss_*``
training facts, ``modelspec.*``) travels in :attr:`LoraModel.training` and is written back verbatim.

Reading resolves underscored names by lookup in the SDXL module tree, in SGM and in diffusers
spelling (:func:`~lorabridge.naming.sdxl_tree.resolve_underscored`), never by guessing where the
dots were. A name that resolves to nothing keeps its underscores (``unet.down_blocks_0_attentions_0_...``)
so that :func:`~lorabridge.formats.checks.check_model` can list it, or name the architecture it
belongs to ("not an SDXL LoRA"). Writing uses SGM spelling, what kohya and A1111 write and what
ComfyUI and diffusers' kohya converter load.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, NamedTuple

import numpy as np

from ..errors import LoraBridgeError, listed
from ..kinds import AlphaSource, dora_axis_of, dora_shape
from ..model import COMPONENTS, SDXL_ARCHITECTURE, LoraModel, LoraModule
from ..tensor import Tensor
from .training import lost_training, training_metadata

ALPHA = "alpha"  # the suffix whose tensor is the module's alpha, not one of its tensors
SHOWN = 3  # modules named in a message

# The order safetensors' own writer lays tensors out in: dtype (in this order), then name. Writing the
# same order makes the data section, and so kohya's ``sshs_model_hash``, identical to the source's.
SAFETENSORS_DTYPE_ORDER = ("U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16",
                           "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL")
# Metadata keys holding sha256 of the data section (A1111's "addnet" hash, kohya's
# ``precalculate_safetensors_hashes``): recomputed for the file written, keeping the value's "0x" style.
# The legacy hash covers header bytes too, so it cannot survive a rewrite and is dropped.
DATA_HASH_KEYS = ("sshs_model_hash", "modelspec.hash_sha256")
STALE_KEYS = ("sshs_legacy_hash",)
# Where diffusers' kohya loader can place UNet layers: it maps only SGM input_blocks 1+, middle_block and
# output_blocks, so conv_in (input_blocks.0), time/label embeddings and conv_out make it fail.
UNET_BLOCKS = ("down_blocks.", "mid_block.", "up_blocks.")
# What the tools that read kohya files make of a dora_scale per output row (out, 1[, 1, 1]); per input
# column both compute DoRA as trained. Rules restated in tests/test_dora_axes.py, with their sources.
OUT_AXIS_READERS = ("A1111 and older ComfyUI read dora_scale per input column only and compute a wrong weight "
                    "from it, newer ComfyUI divides by the norm of W instead of W + delta W; LyCORIS computes it "
                    "as trained, and --format diffusers or peft keeps it for diffusers/PEFT")
MODELSPEC_DEFAULTS = {
    "modelspec.sai_model_spec": "1.0.0",
    "modelspec.architecture": f"{SDXL_ARCHITECTURE}/lora",
    "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
}


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
# How the keys of a kohya-grammar file begin (detection): kohya's prefixes and ComfyUI's generic ones.
KEY_STARTS = ("lora_", *(f"{prefix}." for prefix in KOHYA.dotted), "text_encoders.")


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
    from ..naming.sdxl_tree import resolve_underscored

    path = resolve_underscored(component, underscored) if component in COMPONENTS else None
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


def alpha_of(parts: Mapping[str, Tensor], rank: int, user_alpha: float | None) -> tuple[float, AlphaSource, dict]:
    """(alpha, alpha_source, extra) of a module: its stored alpha, else the user's, else rank.

    The stored alpha's dtype is kept in ``extra["alpha_dtype"]`` so that a writer can store it
    back bit-exactly (kohya files often hold an fp16 alpha beside fp32 weights, or the reverse).
    """
    tensor = parts.get(ALPHA)
    if tensor is None:
        return (float(user_alpha), "user", {}) if user_alpha is not None else (float(rank), "assumed", {})
    if tensor.numel != 1:
        raise ModuleProblem(f"alpha must be a single number, it has shape {list(tensor.shape)}")
    return float(tensor.to_float32().reshape(-1)[0]), "stored", {"alpha_dtype": tensor.dtype}


def with_dora(module: LoraModule) -> LoraModule:
    """``module`` with ``dora_axis`` set from its ``dora_scale`` shape (unchanged without one), and the
    magnitude reshaped (same bytes) to the one shape the model holds for that axis: a LyCORIS or
    kohya file may store an (out,) magnitude, which the neutral rules refuse (spec 3.3)."""
    scale = module.tensors.get("dora_scale")
    if scale is not None:
        shape, weight = scale.shape, module.weight_shape
        axis = dora_axis_of(shape, weight)
        if axis is None:
            raise ModuleProblem(f"dora_scale {list(shape)} fits neither the output axis ({weight[0]}, 1) "
                                f"nor the input axis (1, {weight[1]}) of a {list(weight)} weight")
        module.dora_axis, module.tensors["dora_scale"] = axis, scale.reshaped(dora_shape(axis, weight))
    return module


def lora_module(name: str, parts: Mapping[str, Tensor], user_alpha: float | None = None) -> LoraModule:
    """A kind "lora" module from kohya parts (file suffix -> tensor); missing halves are left for the checks."""
    tensors = {KOHYA.suffixes[s]: t for s, t in parts.items() if s != ALPHA}
    a, b = tensors.get("lora_A.weight"), tensors.get("lora_B.weight")
    rank = a.shape[0] if a is not None and a.shape else (b.shape[1] if b is not None and len(b.shape) > 1 else 0)
    alpha, source, extra = alpha_of(parts, rank, user_alpha)
    module = LoraModule(name, "lora", tensors, alpha, source, extra=extra)
    return with_dora(module) if a is not None and b is not None and len(a.shape) >= 2 and len(b.shape) >= 2 else module


def full_module(name: str, parts: Mapping[str, Tensor], user_alpha: float | None = None) -> LoraModule:
    """A kind "full" module from ``diff`` (and ``diff_b``) parts: delta W itself, no rank; alpha has no effect."""
    tensors = {KOHYA.suffixes[s]: t for s, t in parts.items() if s != ALPHA}
    alpha, source, extra = alpha_of(parts, 0, user_alpha)
    return LoraModule(name, "full", tensors, alpha, source, extra=extra)


def kohya_module(name: str, parts: Mapping[str, Tensor], user_alpha: float | None = None) -> LoraModule:
    """A module from kohya/A1111/ComfyUI parts: a full delta when it has ``diff``, else a LoRA."""
    return (full_module if DIFF in parts else lora_module)(name, parts, user_alpha)


Builder = Callable[[str, Mapping[str, Tensor], float | None], LoraModule]


def stray_deltas(groups: dict[str, dict[str, str]], tensors: Mapping[str, Tensor]) -> list[str]:
    """Take out of ``groups`` the full-weight deltas the neutral model cannot hold and return their keys.

    ComfyUI's LoraSave (``bias_diff``, on by default) writes a bias delta ``diff_b`` beside the LoRA
    pair of every layer with a bias, and a ``diff`` for every 1-D weight (norm layers); a neutral
    module holds a bias delta only with its weight delta (kind ``full``), and a full delta only for a
    Linear or Conv2d weight.
    """
    stray = []
    for name, keys in list(groups.items()):
        if DIFF in keys and len(tensors[keys[DIFF]].shape) < 2:
            stray += [keys.pop(s) for s in (DIFF, DIFF_B, ALPHA) if s in keys]
        elif DIFF_B in keys and DIFF not in keys:
            stray.append(keys.pop(DIFF_B))
        if not keys:
            del groups[name]
    return stray


def drop_stray(stray: list[str], path, skip_unknown: bool) -> None:
    """Refuse stray deltas with a message saying what they are, or (``skip_unknown``) warn that they are dropped."""
    from .checks import warn

    if not stray:
        return
    what = (f"{len(stray)} bias or norm-layer delta(s) that the neutral format cannot hold (a bias delta is kept only "
            f"with its layer's full weight delta, a full delta only for a Linear/Conv2d weight): {listed(stray, SHOWN, ', ')}")
    if not skip_unknown:
        raise LoraBridgeError(f"{what} (--skip-unknown drops them with a warning)", path)
    warn(f"{path}: dropped {what}")


def read_underscored(path: str | os.PathLike, grammar: Grammar, build: Builder, *, alpha: float | None = None,
                     skip_unknown: bool = False, **options) -> LoraModel:
    """Read a file in an underscored grammar into a checked :class:`LoraModel`.

    ``build`` turns one module's parts (file suffix -> tensor) into a :class:`LoraModule`;
    ``skip_unknown`` and ``options`` go to :func:`~lorabridge.formats.checks.check_model` (``strict``).
    A module whose keys use a prefix other than kohya's for its component (LyCORIS' ``lycoris_``)
    keeps it in ``extra["key_prefix"]``, for writers of the same format.
    """
    from ..io.torch_file import read_state_dict
    from .checks import check_model

    tensors, metadata = read_state_dict(path)
    groups, unrecognized, problems = group_keys(tensors, grammar)
    drop_stray(stray_deltas(groups, tensors), path, skip_unknown)
    model = LoraModel(training=dict(metadata))
    for name, keys in groups.items():
        try:
            module = build(name, {suffix: tensors[key] for suffix, key in keys.items()}, alpha)
        except ModuleProblem as exc:
            problems.append(f"{name}: {exc}")
            continue
        prefix = grammar.parse(next(iter(keys.values()))).prefix
        if prefix in grammar.prefixes and KOHYA_PREFIX.get(module.component) != prefix:
            module.extra["key_prefix"] = prefix
        model.add(module)
    if problems:
        raise LoraBridgeError(f"broken LoRA module(s): {listed(problems, SHOWN)}", path)
    return check_model(model, path, unrecognized=unrecognized, skip_unknown=skip_unknown, **options)


def stem(module: LoraModule, spelling: str, own_prefix: bool = False) -> str:
    """The key stem of a module: kohya prefix + its path with underscores, UNet paths in ``spelling`` ("sgm"/"diffusers").

    ``own_prefix``: use the prefix the module was read with (``extra["key_prefix"]``, e.g. LyCORIS'
    ``lycoris``) where it has one.

    Example:
        >>> stem(LoraModule("unet.mid_block.attentions.0.proj_in", "lora", {}, 1.0), "sgm")
        'lora_unet_middle_block_1_proj_in'
    """
    from ..naming.sgm import diffusers_to_sgm

    if module.component not in KOHYA_PREFIX:
        raise ModuleProblem(f"component {module.component!r} has no kohya prefix")
    path = module.path
    if module.component == "unet" and spelling == "sgm":
        path = diffusers_to_sgm(module.path)
        if path is None:
            raise ModuleProblem("is no SDXL-base UNet layer, so it has no SGM name")
    prefix = module.extra.get("key_prefix", KOHYA_PREFIX[module.component]) if own_prefix else KOHYA_PREFIX[module.component]
    return f"{prefix}_{path.replace('.', '_')}"


def alpha_tensor(module: LoraModule) -> Tensor:
    """The module's alpha as a 0-d tensor, in the dtype the source stored it in (else the module's).

    An alpha that dtype cannot hold (above fp16's 65504) is stored as F32 instead of turning into Inf.
    """
    return fitting_cast(Tensor.from_numpy(np.array(module.alpha, np.float32)), module.extra.get("alpha_dtype", module.dtype))


def full_tensors(module: LoraModule) -> dict[str, Tensor]:
    """A full module's tensors under their own suffixes (``diff``, ``diff_b``): no alpha, which would mean nothing."""
    return dict(module.tensors)


def kohya_tensors(module: LoraModule) -> dict[str, Tensor]:
    """A LoRA module's tensors under kohya suffixes; alpha omitted when it was only assumed (= rank)."""
    if module.kind == "full":
        return full_tensors(module)
    t = module.tensors
    out = {"lora_down.weight": t["lora_A.weight"], "lora_up.weight": t["lora_B.weight"]}
    if module.alpha_source != "assumed":
        out[ALPHA] = alpha_tensor(module)
    if "dora_scale" in t:
        out["dora_scale"] = t["dora_scale"]
    return out


def safetensors_order(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``tensors`` in the order safetensors' writer uses (dtype, then name)."""
    rank = {dtype: i for i, dtype in enumerate(SAFETENSORS_DTYPE_ORDER)}
    return {k: tensors[k] for k in sorted(tensors, key=lambda k: (rank[tensors[k].dtype], k))}


def file_metadata(model: LoraModel, tensors: Mapping[str, Tensor]) -> dict[str, str]:
    """The model's training facts as safetensors metadata, ModelSpec keys filled in, data hashes recomputed."""
    metadata = training_metadata(model, STALE_KEYS)
    title = model.provenance.get("source_file") or "lorabridge LoRA"
    for key, value in {**MODELSPEC_DEFAULTS, "modelspec.title": str(title)}.items():
        metadata.setdefault(key, value)
    if any(key in metadata for key in DATA_HASH_KEYS):
        digest = hashlib.sha256()
        for t in tensors.values():
            digest.update(t.data)
        for key in (k for k in DATA_HASH_KEYS if k in metadata):
            metadata[key] = ("0x" if metadata[key].startswith("0x") else "") + digest.hexdigest()
    return metadata


def cast_to(tensor: Tensor, dtype: str | None) -> Tensor:
    """``tensor`` in the --dtype asked for (fp32/fp16/bf16), or unchanged; alphas too, as kohya saves them.

    Weights reach here already cast (and overflow reported) by ``checks.cast_model``: what is left to
    cast is the 0-d alphas, which :func:`fitting_cast` keeps finite."""
    from .checks import DTYPE_NAMES

    if dtype is None:
        return tensor
    if dtype not in DTYPE_NAMES:
        raise LoraBridgeError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPE_NAMES)}")
    return fitting_cast(tensor, DTYPE_NAMES[dtype])


def fitting_cast(alpha: Tensor, dtype: str) -> Tensor:
    """A 0-d ``alpha`` in ``dtype``, or kept as it is where ``dtype`` cannot hold it (an alpha above fp16's
    65504 would be Inf, making delta W Inf in every loader)."""
    cast = alpha.cast(dtype)
    return cast if np.isfinite(cast.to_float32()).all() else alpha


def write_underscored(model: LoraModel, path: str | os.PathLike, spelling: str,
                      tensors_of: Callable[[LoraModule], Mapping[str, Tensor]], *, dtype: str | None = None,
                      progress: Callable[[int], None] | None = None, own_prefix: bool = False) -> None:
    """Write every module's ``tensors_of`` under ``<stem>.<suffix>`` keys, safetensors-ordered, with metadata.

    ``own_prefix``: stems keep the prefix each module was read with (see :func:`stem`)."""
    from ..io.torch_file import TORCH_SUFFIXES, write_state_dict
    from .checks import warn

    tensors, problems = {}, []
    for module in model.modules.values():
        try:
            key_stem = stem(module, spelling, own_prefix)
        except ModuleProblem as exc:
            problems.append(f"{module.name}: {exc}")
            continue
        tensors.update({f"{key_stem}.{suffix}": cast_to(t, dtype) for suffix, t in tensors_of(module).items()})
    if problems:
        raise LoraBridgeError(f"cannot name {len(problems)} module(s) in this format: {listed(problems, SHOWN)}", path)
    tensors = safetensors_order(tensors)
    if Path(path).suffix.lower() in TORCH_SUFFIXES:
        lost = lost_training(model, path, "a torch pickle", "write a .safetensors file to keep them")
        if lost:
            warn(lost)
    write_state_dict(path, tensors, file_metadata(model, tensors), progress=progress)


# The reader/writer pair as the converter registry calls it.
def detect(path: str | os.PathLike) -> bool:
    """A state-dict file whose keys are kohya LoRA keys or full deltas, in kohya's or ComfyUI's generic
    names (any architecture: the reader says if it is not SDXL)."""
    from ..io.torch_file import state_dict_keys

    found = state_dict_keys(path)
    if not found:
        return False
    ours = [KOHYA.parse(k) for k in found[0] if k.startswith(KEY_STARTS)]
    weights = ("lora_down.weight", "lora_up.weight", DIFF)
    return any(p is not None and p.suffix in weights for p in ours) and all(p is not None for p in ours)


def read(path: str | os.PathLike, **options) -> LoraModel:
    """Read a kohya/A1111/ComfyUI LoRA (SGM or diffusers spelling, or ComfyUI's generic names) and check it against SDXL.

    ``diff``/``diff_b`` full-weight deltas become kind ``full`` modules; bias deltas beside LoRA
    pairs and deltas of norm layers are refused, or dropped with ``skip_unknown`` (see :func:`stray_deltas`).

    Example:
        >>> model = read("sdxl_lora.safetensors")   # doctest: +SKIP
    """
    return read_underscored(path, KOHYA, kohya_module, **options)


def write(model: LoraModel, path: str | os.PathLike, *, progress: Callable[[int], None] | None = None,
          bake_to_lora: int | None = None, dtype: str | None = None, strict: bool = False, **_options) -> list[str]:
    """Write ``model`` as a kohya LoRA (SGM names, 0-d alphas, ModelSpec); full modules as ``diff``/``diff_b``.

    LoHa/LoKr modules are refused with the modules listed unless ``bake_to_lora`` gives a
    rank; then they are baked by truncated SVD and the error per module is reported as
    :class:`~lorabridge.errors.LoraBridgeWarning`. DoRA magnitudes are written as ``dora_scale`` on
    the axis they have. Per input column (OneTrainer's and LyCORIS' ``wd_on_output=False``) is what
    A1111 and ComfyUI compute right; per output row is warned about (see :data:`OUT_AXIS_READERS`).

    Example:
        >>> write(model, "sdxl_lora_kohya.safetensors")   # doctest: +SKIP
        []
    """
    from .checks import warn, writable_lora

    model = writable_lora(model, path, target="kohya", bake_to_lora=bake_to_lora, dora_axes=("out", "in"), strict=strict,
                          kinds=("lora", "full"), dtype=dtype)
    write_underscored(model, path, "sgm", kohya_tensors, dtype=dtype, progress=progress)
    per_row = [m.name for m in model.modules.values() if m.dora_axis == "out"]
    if per_row:
        warn(f"{path}: {len(per_row)} module(s) have DoRA magnitudes per output row ({', '.join(per_row[:SHOWN])}"
             f"{' ...' if len(per_row) > SHOWN else ''}): {OUT_AXIS_READERS}")
    outside = [m.name for m in model.modules.values() if m.component == "unet" and not m.path.startswith(UNET_BLOCKS)]
    if outside:
        warn(f"{path}: {len(outside)} UNet layer(s) outside the down/mid/up blocks ({', '.join(outside[:SHOWN])}"
             f"{' ...' if len(outside) > SHOWN else ''}): ComfyUI and A1111 load them, diffusers' kohya loader "
             "cannot; for diffusers write --format diffusers")
    return []
