"""Reading and writing files in the underscored grammar (:mod:`lorabridge.naming.underscored`): shared by the
kohya and LyCORIS formats; MindONE's kohya port follows the same alpha rule (:func:`alpha_of`, :func:`alpha_tensor`).

Reading builds one module per key stem from its parts (file suffix -> tensor), the DoRA axis read from the
``dora_scale`` shape, and refuses (or drops) the bias and norm deltas the neutral model cannot hold.
Writing keeps safetensors' own tensor order and alpha dtypes, so a round trip reproduces the source's
data section and kohya's ``sshs_model_hash``; ModelSpec keys are filled in and data hashes recomputed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Mapping

from ..architectures import get_architecture
from ..architectures.fused import merge_present, split_fused
from ..errors import LoraBridgeError, listed
from ..io.torch_file import TORCH_SUFFIXES, read_state_dict, write_state_dict
from ..io.zero_copy import small_tensor_bytes
from ..kinds import AlphaSource, dora_axis_of, dora_shape
from ..model import LoraModel, LoraModule
from ..rules import module_problems
from ..naming.underscored import ALPHA, DIFF, DIFF_B, KOHYA, Grammar, ModuleProblem, Spelling, group_keys, stem
from ..tensor import NO_MATH_DTYPES, Tensor, made_late, scalar_value
from .checks import DTYPE_NAMES, check_model, warn
from .training import lost_training, training_metadata

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
# Alpha dtypes holding values float32 cannot (an F64 0.1, an I64 16,777,217): stored from the float64 value.
WIDER_THAN_FLOAT32 = ("F64", "I64", "I32", "U64", "U32")
MODELSPEC_DEFAULTS = {"modelspec.sai_model_spec": "1.0.0"}  # and the architecture's own modelspec fields


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
    try:
        value = scalar_value(tensor.dtype, small_tensor_bytes(tensor))  # not through the map
    except TypeError as exc:  # an FP8 alpha
        raise ModuleProblem(f"alpha: {exc}") from None
    return value, "stored", {"alpha_dtype": tensor.dtype}


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
    if not stray:
        return
    what = (f"{len(stray)} bias or norm-layer delta(s) that the neutral format cannot hold (a bias delta is kept only "
            f"with its layer's full weight delta, a full delta only for a Linear/Conv2d weight): {listed(stray, SHOWN, ', ')}")
    if not skip_unknown:
        raise LoraBridgeError(f"{what} (--skip-unknown drops them with a warning)", path)
    warn(f"{path}: dropped {what}")


def read_underscored(path: str | os.PathLike, grammar: Grammar, build: Builder, *, alpha: float | None = None,
                     skip_unknown: bool = False, strict: bool = False) -> LoraModel:
    """Read a file in an underscored grammar into a checked :class:`LoraModel`.

    ``build`` turns one module's parts (file suffix -> tensor) into a :class:`LoraModule`;
    ``skip_unknown`` and ``strict`` go to :func:`~lorabridge.formats.checks.check_model`.
    Names are those of the architecture that places most keys (:func:`~lorabridge.naming.underscored.group_keys`);
    a module on a fused layer of its original spelling (Flux's ``qkv``) is split exactly into its parts
    (:func:`~lorabridge.architectures.fused.split_fused`, rows in the ratio of the parts' output sizes);
    a LoKr whose Kronecker factor does not divide at the parts' rows becomes full deltas, with a warning.
    A module whose keys use a prefix other than kohya's for its component (LyCORIS' ``lycoris_``)
    keeps it in ``extra["key_prefix"]``, for writers of the same format.
    """
    tensors, metadata = read_state_dict(path)
    architecture, groups, fused, unrecognized, problems = group_keys(tensors, grammar)
    drop_stray(stray_deltas(groups, tensors), path, skip_unknown)
    prefixes = grammar.prefixes(architecture)
    model, densified = LoraModel(training=dict(metadata)), []
    for name, keys in groups.items():
        try:
            module = build(name, {suffix: tensors[key] for suffix, key in keys.items()}, alpha)
        except ModuleProblem as exc:
            problems.append(f"{name}: {exc}")
            continue
        parsed = grammar.parse(next(iter(keys.values())), architecture)  # every grouped key parsed
        prefix = parsed.prefix if parsed else ""
        if prefix in prefixes and architecture.kohya_prefixes.get(module.component) != prefix:
            module.extra["key_prefix"] = prefix
        parts = fused.get(name)
        if parts and not module_problems(module):  # a broken one is left whole for the checks to name
            try:
                split = split_fused(module, parts, architecture.fused_sizes(module.path))
            except LoraBridgeError as exc:
                problems.append(exc.message)
                continue
            if split[0].kind != module.kind:
                densified.append(f"{module.name} ({module.kind})")
        else:
            split = [module]
        for part in split:
            if part.name in model.modules:
                problems.append(f"{part.name}: named twice, as a fused layer and on its own")
            else:
                model.add(part)
    if problems:
        raise LoraBridgeError(f"broken LoRA module(s): {listed(problems, SHOWN)}", path)
    if densified:
        warn(f"{path}: {len(densified)} fused layer(s) whose factors do not divide at their parts' rows became full "
             f"delta W per part (rounded once to the module's dtype; a much larger file): {listed(densified, SHOWN, ', ')}")
    return check_model(model, path, unrecognized=unrecognized, skip_unknown=skip_unknown, strict=strict)


def alpha_tensor(module: LoraModule) -> Tensor:
    """The module's alpha as a 0-d tensor, in the dtype the source stored it in (else the module's).

    An alpha that dtype cannot hold (above fp16's 65504) is stored as F32 instead of turning into Inf, and so is an
    FP8 module's alpha. An F64 or
    integer alpha is made from the value itself, not through float32, which would change 0.1 or 16,777,217.
    """
    import numpy as np  # here: a conversion's main thread reaches its first copy while the NaN/Inf scan imports it

    dtype = module.extra.get("alpha_dtype", module.dtype)
    if dtype in NO_MATH_DTYPES:  # an FP8 module's alpha is stored as F32: numpy makes no FP8, and FP8 holds few values
        dtype = "F32"
    if dtype in WIDER_THAN_FLOAT32:
        return Tensor.from_numpy(np.array(module.alpha, np.float64), dtype)
    return fitting_cast(Tensor.from_numpy(np.array(module.alpha, np.float32)), dtype)


def full_tensors(module: LoraModule) -> dict[str, Tensor]:
    """A full module's tensors under their own suffixes (``diff``, ``diff_b``): no alpha, which would mean nothing."""
    return dict(module.tensors)


KOHYA_FACTORS = ("lora_down.weight", "lora_up.weight")  # the file suffixes of lora_A and lora_B


def kohya_tensors(module: LoraModule, factors: tuple[str, str] = KOHYA_FACTORS) -> dict[str, Tensor]:
    """A LoRA module's tensors under kohya suffixes (``factors``: those of lora_A and lora_B); alpha omitted when
    it was only assumed (= rank)."""
    if module.kind == "full":
        return full_tensors(module)
    t = module.tensors
    out = {factors[0]: t["lora_A.weight"], factors[1]: t["lora_B.weight"]}
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
    modelspec = {**MODELSPEC_DEFAULTS, **get_architecture(model.architecture).modelspec, "modelspec.title": str(title)}
    for key, value in modelspec.items():
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
    if dtype is None:
        return tensor
    if dtype not in DTYPE_NAMES:
        raise LoraBridgeError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPE_NAMES)}")
    return fitting_cast(tensor, DTYPE_NAMES[dtype])


def fitting_cast(alpha: Tensor, dtype: str) -> Tensor:
    """A 0-d ``alpha`` in ``dtype``, or kept as it is where ``dtype`` cannot hold it (an alpha above fp16's
    65504 would be Inf, making delta W Inf in every loader)."""
    import numpy as np

    cast = alpha.cast(dtype)
    return cast if np.isfinite(cast.to_float32()).all() else alpha


def write_underscored(model: LoraModel, path: str | os.PathLike, spelling: Spelling,
                      tensors_of: Callable[[LoraModule], Mapping[str, Tensor]], *, dtype: str | None = None,
                      progress: Callable[[int], None] | None = None, own_prefix: bool = False,
                      dotted: bool = False) -> None:
    """Write every module's ``tensors_of`` under ``<stem>.<suffix>`` keys, safetensors-ordered, with metadata.

    ``own_prefix``: stems keep the prefix each module was read with; ``dotted``: stems are ComfyUI's generic
    dotted names (see :func:`stem`). In the original
    spelling the parts of a fused layer (Flux's q, k, v) are merged into one LoRA on it
    (:func:`~lorabridge.architectures.fused.merge_present`: exact; a missing part's delta W is 0)."""
    tensors, problems, architecture = {}, [], get_architecture(model.architecture)
    fused: dict[tuple[str, str], dict[int, LoraModule]] = {}  # (stem, fused module name) -> row block -> part
    for module in model.modules.values():
        try:
            key_stem, fused_at = stem(module, spelling, own_prefix, architecture, dotted=dotted)
        except ModuleProblem as exc:
            problems.append(f"{module.name}: {exc}")
            continue
        if fused_at is None:
            tensors.update({f"{key_stem}.{suffix}": cast_to(t, dtype) for suffix, t in tensors_of(module).items()})
        else:
            fused.setdefault((key_stem, f"{module.component}.{fused_at[0]}"), {})[fused_at[1]] = module
    made: dict = {}  # merged layers are made again as they are written, one at a time (made_late)
    unmerged = []  # fused layers whose parts do not merge (kinds, shapes, FP8 where the merge computes)
    for (key_stem, name), parts in fused.items():
        def merged(key_stem=key_stem, name=name, parts=parts) -> dict[str, Tensor]:
            module = merge_present(parts, name, architecture.fused_sizes(name.partition(".")[2]))
            return {f"{key_stem}.{suffix}": cast_to(t, dtype) for suffix, t in tensors_of(module).items()}
        try:
            tensors.update(made_late(merged, made))
        except LoraBridgeError as exc:
            unmerged.append(exc.message)
    if problems:
        raise LoraBridgeError(f"cannot name {len(problems)} module(s) in this format: {listed(problems, SHOWN)}", path)
    if unmerged:
        raise LoraBridgeError(f"cannot merge {len(unmerged)} fused layer(s) from their parts: {listed(unmerged, SHOWN)}", path)
    tensors = safetensors_order(tensors)
    if Path(path).suffix.lower() in TORCH_SUFFIXES:
        lost = lost_training(model, path, "a torch pickle", "write a .safetensors file to keep them")
        if lost:
            warn(lost)
    write_state_dict(path, tensors, file_metadata(model, tensors), progress=progress)
