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
import json
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import numpy as np

from ..errors import LoraBridgeError
from ..model import COMPONENTS, SDXL_ARCHITECTURE, LoraModel, LoraModule
from ..tensor import Tensor

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
MODELSPEC_DEFAULTS = {
    "modelspec.sai_model_spec": "1.0.0",
    "modelspec.architecture": f"{SDXL_ARCHITECTURE}/lora",
    "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
}


@dataclass(frozen=True)
class Grammar:
    """How a family of files spells tensor keys: ``<prefix>_<path with _>.<suffix>``.

    ``prefixes`` maps a file prefix to the component it adapts; ``suffixes`` maps a file
    suffix to the neutral role of its tensor (:data:`ALPHA` for the module's alpha).
    """

    prefixes: Mapping[str, str]
    suffixes: Mapping[str, str]

    def split(self, key: str) -> tuple[str, str, str] | None:
        """(component, underscored path, file suffix) of a key, or None when no suffix is known.

        A prefix this grammar does not know becomes the component as is (``lora_te``, ``lora_te3``,
        ``lora_transformer``...), so the checks can say which model such a file is for.

        Example:
            >>> KOHYA.split("lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha")
            ('text_encoder_2', 'text_model_encoder_layers_0_mlp_fc1', 'alpha')
        """
        suffix = next((s for s in sorted(self.suffixes, key=len, reverse=True) if key.endswith("." + s)), None)
        if suffix is None:
            return None
        stem = key[: -len(suffix) - 1]
        for prefix in sorted(self.prefixes, key=len, reverse=True):
            if stem.startswith(prefix + "_"):
                return self.prefixes[prefix], stem[len(prefix) + 1:], suffix
        words = stem.split("_")
        cut = 2 if words[0] == "lora" and len(words) > 2 else 1
        return "_".join(words[:cut]), "_".join(words[cut:]), suffix


KOHYA = Grammar(
    prefixes={"lora_unet": "unet", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2"},
    suffixes={"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight", "dora_scale": "dora_scale", "alpha": ALPHA},
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


def alpha_of(parts: Mapping[str, Tensor], rank: int, user_alpha: float | None) -> tuple[float, str, dict]:
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


def dora_axis(scale: Tensor, weight_shape: tuple[int, ...]) -> str:
    """Which norms a DoRA magnitude holds, from its shape: ``"out"`` for (out, 1, ...), ``"in"`` for (1, in, ...).

    Example:
        >>> dora_axis(Tensor.from_numpy(np.ones((1, 8), "f4")), (16, 8))
        'in'
    """
    shape, (out, inp) = scale.shape, weight_shape[:2]
    if shape and shape[0] == out and all(d == 1 for d in shape[1:]):
        return "out"
    if len(shape) >= 2 and shape[0] == 1 and shape[1] == inp and all(d == 1 for d in shape[2:]):
        return "in"
    raise ModuleProblem(f"dora_scale {list(shape)} fits neither the output axis ({out}, 1) "
                        f"nor the input axis (1, {inp}) of a {list(weight_shape)} weight")


def with_dora(module: LoraModule) -> LoraModule:
    """``module`` with ``dora_axis`` set from its ``dora_scale`` shape (unchanged without one)."""
    scale = module.tensors.get("dora_scale")
    if scale is not None:
        module.dora_axis = dora_axis(scale, module.weight_shape)
    return module


def lora_module(name: str, parts: Mapping[str, Tensor], user_alpha: float | None = None) -> LoraModule:
    """A kind "lora" module from kohya parts (file suffix -> tensor); missing halves are left for the checks."""
    tensors = {KOHYA.suffixes[s]: t for s, t in parts.items() if s != ALPHA}
    a, b = tensors.get("lora_A.weight"), tensors.get("lora_B.weight")
    rank = a.shape[0] if a is not None and a.shape else (b.shape[1] if b is not None and len(b.shape) > 1 else 0)
    alpha, source, extra = alpha_of(parts, rank, user_alpha)
    module = LoraModule(name, "lora", tensors, alpha, source, extra=extra)
    return with_dora(module) if a is not None and b is not None and len(a.shape) >= 2 and len(b.shape) >= 2 else module


Builder = Callable[[str, Mapping[str, Tensor], float | None], LoraModule]


def read_underscored(path: str | os.PathLike, grammar: Grammar, build: Builder, *, alpha: float | None = None,
                     **options) -> LoraModel:
    """Read a file in an underscored grammar into a checked :class:`LoraModel`.

    ``build`` turns one module's parts (file suffix -> tensor) into a :class:`LoraModule`;
    ``options`` go to :func:`~lorabridge.formats.checks.check_model` (``skip_unknown``, ``strict``).
    """
    from ..io.torch_file import read_state_dict
    from .checks import check_model

    tensors, metadata = read_state_dict(path)
    groups, unrecognized, problems = group_keys(tensors, grammar)
    model = LoraModel(training=dict(metadata))
    for name, keys in groups.items():
        try:
            model.add(build(name, {suffix: tensors[key] for suffix, key in keys.items()}, alpha))
        except ModuleProblem as exc:
            problems.append(f"{name}: {exc}")
    if problems:
        more = f" (+{len(problems) - SHOWN} more)" if len(problems) > SHOWN else ""
        raise LoraBridgeError(f"broken LoRA module(s): {'; '.join(problems[:SHOWN])}{more}", path)
    return check_model(model, path, unrecognized=unrecognized, **options)


def stem(module: LoraModule, spelling: str) -> str:
    """The key stem of a module: kohya prefix + its path with underscores, UNet paths in ``spelling`` ("sgm"/"diffusers").

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
    return f"{KOHYA_PREFIX[module.component]}_{path.replace('.', '_')}"


def alpha_tensor(module: LoraModule) -> Tensor:
    """The module's alpha as a 0-d tensor, in the dtype the source stored it in (else the module's)."""
    return Tensor.from_numpy(np.array(module.alpha, np.float32), module.extra.get("alpha_dtype", module.dtype))


def kohya_tensors(module: LoraModule) -> dict[str, Tensor]:
    """A LoRA module's tensors under kohya suffixes; alpha omitted when it was only assumed (= rank)."""
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
    metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in model.training.items() if k not in STALE_KEYS}
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
    """``tensor`` in the --dtype asked for (fp32/fp16/bf16), or unchanged; alphas too, as kohya saves them."""
    from .checks import DTYPE_NAMES

    if dtype is None:
        return tensor
    if dtype not in DTYPE_NAMES:
        raise LoraBridgeError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPE_NAMES)}")
    return tensor.cast(DTYPE_NAMES[dtype])


def write_underscored(model: LoraModel, path: str | os.PathLike, spelling: str,
                      tensors_of: Callable[[LoraModule], Mapping[str, Tensor]], *, dtype: str | None = None,
                      progress: Callable[[int], None] | None = None) -> None:
    """Write every module's ``tensors_of`` under ``<stem>.<suffix>`` keys, safetensors-ordered, with metadata."""
    from ..io.torch_file import write_state_dict

    tensors, problems = {}, []
    for module in model.modules.values():
        try:
            key_stem = stem(module, spelling)
        except ModuleProblem as exc:
            problems.append(f"{module.name}: {exc}")
            continue
        tensors.update({f"{key_stem}.{suffix}": cast_to(t, dtype) for suffix, t in tensors_of(module).items()})
    if problems:
        more = f" (+{len(problems) - SHOWN} more)" if len(problems) > SHOWN else ""
        raise LoraBridgeError(f"cannot name {len(problems)} module(s) in this format: {'; '.join(problems[:SHOWN])}{more}", path)
    tensors = safetensors_order(tensors)
    write_state_dict(path, tensors, file_metadata(model, tensors), progress=progress)


# The reader/writer pair as the converter registry calls it.
def detect(path: str | os.PathLike) -> bool:
    """A state-dict file whose keys are kohya LoRA keys (any architecture: the reader says if it is not SDXL)."""
    from ..io.torch_file import state_dict_keys

    found = state_dict_keys(path)
    if not found:
        return False
    keys = found[0]
    lora = [k for k in keys if k.startswith("lora_") and k.endswith((".lora_down.weight", ".lora_up.weight"))]
    return bool(lora) and all(KOHYA.split(k) is not None for k in keys if k.startswith("lora_"))


def read(path: str | os.PathLike, **options) -> LoraModel:
    """Read a kohya/A1111 LoRA (SGM or diffusers spelling) and check it against SDXL.

    Example:
        >>> model = read("sdxl_lora.safetensors")   # doctest: +SKIP
    """
    return read_underscored(path, KOHYA, lora_module, **options)


def write(model: LoraModel, path: str | os.PathLike, *, progress: Callable[[int], None] | None = None,
          bake_to_lora: int | None = None, dtype: str | None = None, strict: bool = False, **_options) -> list[str]:
    """Write ``model`` as a kohya LoRA (SGM names, 0-d alphas, ModelSpec).

    LoHa/LoKr modules are refused with the modules listed unless ``bake_to_lora`` gives a
    rank; then they are baked by truncated SVD and the error per module is reported as
    :class:`~lorabridge.errors.LoraBridgeWarning`. DoRA magnitudes are written as ``dora_scale``
    when they are per output row (what ComfyUI and A1111 read); others are refused.

    Example:
        >>> write(model, "sdxl_lora_kohya.safetensors")   # doctest: +SKIP
        []
    """
    from .checks import warn, writable_lora

    model = writable_lora(model, path, target="kohya", bake_to_lora=bake_to_lora, strict=strict, dtype=dtype)
    write_underscored(model, path, "sgm", kohya_tensors, dtype=dtype, progress=progress)
    outside = [m.name for m in model.modules.values() if m.component == "unet" and not m.path.startswith(UNET_BLOCKS)]
    if outside:
        warn(f"{path}: {len(outside)} UNet layer(s) outside the down/mid/up blocks ({', '.join(outside[:SHOWN])}"
             f"{' ...' if len(outside) > SHOWN else ''}): ComfyUI and A1111 load them, diffusers' kohya loader "
             "cannot; for diffusers write --format diffusers")
    return []
