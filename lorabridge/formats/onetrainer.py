"""OneTrainer's Flux.1 LoRA files, in the two layouts only it writes: read-only.

Its legacy layout (``lora_transformer_transformer_blocks_0_attn_to_q.lora_down.weight``, ``lora_te1_``,
``lora_te2_`` for T5) and its OMI layout (``transformer.double_blocks.0.img_attn.qkv.0.lora_down.weight``,
``clip_l.``, ``t5.``), both with a 0-d ``.alpha`` per module (:mod:`lorabridge.naming.onetrainer_keys`,
with sources). OneTrainer trains q, k and v as separate LoRAs, so nothing is split: OMI numbers them as
parts of BFL's fused name. The OMI ``final_layer.adaLN_modulation.1`` lora_B has its (shift, scale) row
halves swapped, as OneTrainer saves it; they are swapped back for diffusers' ``norm_out.linear`` (exact).
Its newer outputs (diffusers, kohya, ComfyUI) are read by those formats' readers.

lorabridge does not write these layouts: OneTrainer and every Flux loader also load the diffusers and kohya
files lorabridge writes.
"""

from __future__ import annotations

import os

from ..errors import LoraBridgeError, listed
from ..io.torch_file import read_state_dict, state_dict_keys
from ..model import LoraModel
from ..naming.onetrainer_keys import LEGACY, LEGACY_PREFIXES, parse_omi
from ..naming.underscored import ModuleProblem
from ..tensor import Tensor
from .checks import check_model
from .contract import FOREIGN_READ, READ_DEFAULTS, DeclaredFormat, ReadOptions
from .underscored_files import SHOWN, lora_module, read_underscored

LORA_SUFFIXES = (".lora_down.weight", ".lora_up.weight")


def _layout(keys: list[str]) -> str | None:
    """"legacy" or "omi" by the keys' prefixes, None when they are neither layout's LoRA keys."""
    if any(k.startswith(LEGACY_PREFIXES[0]) and k.endswith(LORA_SUFFIXES) for k in keys):
        return "legacy"  # lora_transformer_: only OneTrainer's Flux files (kohya names Flux's transformer lora_unet_)
    parsed = [parse_omi(k) for k in keys]
    if any(p is not None and p.suffix in ("lora_down.weight", "lora_up.weight") for p in parsed):
        return "omi"
    return None


def detect(path: str | os.PathLike) -> bool:
    """A state-dict file holding OneTrainer's legacy ``lora_transformer_`` or OMI ``transformer.<BFL name>`` LoRA keys."""
    found = state_dict_keys(path)
    return found is not None and _layout(found[0]) is not None


def _swap_halves(b: Tensor) -> Tensor:
    """lora_B with its two row halves exchanged, byte for byte."""
    half = len(b.data) // 2
    data = memoryview(b.data)
    return Tensor(b.dtype, b.shape, bytes(data[half:]) + bytes(data[:half]))


def _read_omi(path: str | os.PathLike, options: ReadOptions) -> LoraModel:
    """An OMI file into a checked model (modules by their canonical names, alphas as stored)."""
    tensors, metadata = read_state_dict(path)
    groups: dict[str, dict[str, Tensor]] = {}
    swapped, unrecognized, problems = set(), [], []
    for key, tensor in tensors.items():
        parsed = parse_omi(key)
        if parsed is None:
            unrecognized.append(key)  # bundled embeddings (bundle_emb.*) too
            continue
        parts = groups.setdefault(parsed.name, {})
        if parsed.suffix in parts:
            problems.append(f"{parsed.name}: its {parsed.suffix} is named twice")
        parts[parsed.suffix] = tensor
        if parsed.swapped:
            swapped.add(parsed.name)
    model = LoraModel(training=dict(metadata))
    for name, parts in groups.items():
        if name in swapped and "lora_up.weight" in parts and len(parts["lora_up.weight"].shape) == 2 \
                and parts["lora_up.weight"].shape[0] % 2 == 0:
            parts["lora_up.weight"] = _swap_halves(parts["lora_up.weight"])
        try:
            model.add(lora_module(name, parts, options.alpha))
        except ModuleProblem as exc:  # a bad alpha or dora_scale
            problems.append(f"{name}: {exc}")
    if problems:
        raise LoraBridgeError(f"broken LoRA module(s): {listed(problems, SHOWN)}", path)
    return check_model(model, path, unrecognized=unrecognized, skip_unknown=options.skip_unknown, strict=options.strict)


def read(path: str | os.PathLike, options: ReadOptions = READ_DEFAULTS) -> LoraModel:
    """Read a OneTrainer Flux.1 LoRA (legacy or OMI layout) into a checked model.

    Example:
        >>> model = read("onetrainer_flux.safetensors")   # doctest: +SKIP
    """
    found = state_dict_keys(path)
    if found is not None and _layout(found[0]) == "omi":
        return _read_omi(path, options)
    model = read_underscored(path, LEGACY, lora_module, alpha=options.alpha, skip_unknown=options.skip_unknown,
                             strict=options.strict)
    for module in model.modules.values():
        module.extra.pop("key_prefix", None)  # OneTrainer's prefixes are not kept: no writer spells them
    return model


FORMAT = DeclaredFormat(
    name="onetrainer", framework="torch",
    description="OneTrainer Flux (read-only): legacy lora_transformer_<diffusers path>/lora_te1_/lora_te2_, "
                "OMI transformer.<BFL name, qkv.0/1/2>/clip_l./t5.; .lora_down/.lora_up.weight, .alpha",
    detect=detect, read=read, write=None, stores_metadata=True, stores_alpha=True, kinds=("lora",), dora_axes=("in",),
    read_options=FOREIGN_READ, write_options=frozenset())
