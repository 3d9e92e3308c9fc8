"""LoRA modules from PEFT-keyed tensors and back: shared by the PEFT, diffusers and legacy-diffusers formats.

A key parser (:mod:`lorabridge.naming.peft_keys`, :mod:`lorabridge.naming.diffusers_keys`) names each tensor's
module and role; :func:`group_keys` gathers them per module (placing component-less PEFT keys by the SDXL
tree), :func:`build_model` turns the groups into a :class:`LoraModel` with each module's alpha from the
LoraConfig, the user or the rank. :func:`read_diffusers_file` is the diffusers reader, which reads the
old diffusers spelling too, so the legacy-diffusers format reads through it.
"""

from __future__ import annotations

import os
from typing import Callable, Mapping

from ..errors import LoraBridgeError
from ..io.torch_file import read_state_dict
from ..model import LoraModel, LoraModule
from ..naming import diffusers_keys
from ..naming.peft_config import metadata_alpha
from ..naming.peft_keys import PEFT_ROLES, Parsed
from ..tensor import Tensor
from .checks import check_model, known_modules, warn, warn_user_alpha
from .contract import ReadOptions
from .training import FILE_METADATA_KEYS, training_from_metadata


def group_keys(tensors: Mapping[str, Tensor], parse: Callable[[str], Parsed | None],
               path) -> tuple[dict[str, dict[str, Tensor]], list[str]]:
    """Tensors grouped by canonical module name (role -> tensor), plus the keys ``parse`` rejects.

    Modules whose component ``parse`` leaves open are placed by :func:`infer_component`. A role
    given twice for one module (two spellings of the same factor), or more than one adapter name
    in a file, is refused: lorabridge converts one adapter at a time.
    """
    parsed: dict[tuple[str | None, str], dict[str, Tensor]] = {}
    seen: dict[tuple[str | None, str, str], str] = {}
    unrecognized: list[str] = []
    adapters: set[str] = set()
    for key, tensor in tensors.items():
        found = parse(key)
        if found is None:
            unrecognized.append(key)
            continue
        component, module_path, role, adapter = found
        if (component, module_path, role) in seen:
            raise LoraBridgeError(f"two tensors for {role} of {module_path}: {seen[component, module_path, role]!r} "
                                  f"and {key!r}", path)
        seen[component, module_path, role] = key
        adapters.add(adapter or "")
        parsed.setdefault((component, module_path), {})[role] = tensor
    if len(adapters) > 1:
        raise LoraBridgeError(f"holds {len(adapters)} adapters ({', '.join(sorted(a or '<unnamed>' for a in adapters))}); "
                              "save one adapter per file", path)
    tree = known_modules() if any(component is None for component, _ in parsed) else {}
    groups = {f"{component or infer_component(module_path, roles, tree)}.{module_path}": roles
              for (component, module_path), roles in parsed.items()}
    if len(groups) != len(parsed):
        raise LoraBridgeError("the same module appears with and without a component prefix", path)
    return groups, unrecognized


def infer_component(module_path: str, tensors: Mapping[str, Tensor], tree) -> str:
    """The component whose tree (:func:`~lorabridge.formats.checks.known_modules`, registration order) holds
    ``module_path`` with the shapes the tensors imply.

    CLIP-L and bigG share module names, so shapes decide; when they cannot (a model whose two
    text encoders have equal widths) the first candidate is taken and the checks report any misfit.
    """
    candidates = [c for c, modules in tree.items() if module_path in modules]
    a, b = tensors.get("lora_A.weight"), tensors.get("lora_B.weight")
    if a is not None and b is not None:
        fitting = [c for c in candidates if tuple(tree[c][module_path][:2]) == (b.shape[0], a.shape[1])]
        candidates = fitting or candidates
    if candidates:
        return candidates[0]
    return "text_encoder" if module_path.startswith("text_model.") else "unet"


def _declared_rank(tensors: Mapping[str, Tensor]) -> int:
    """Rows of lora_A, or 0 when it is missing or 0-d (check_model then reports the broken module)."""
    a = tensors.get("lora_A.weight")
    return a.shape[0] if a is not None and a.shape else 0


def stored_alpha(alpha_of: Callable[[str, int], float | None], name: str, rank: int, path) -> float | None:
    """``alpha_of(name, rank)``, the alpha a LoraConfig gives module ``name`` (None without a rank or a value);
    a config value or pattern that yields no number is refused, naming the module.

    Example:
        >>> stored_alpha(lambda name, rank: rank / 2, "unet.conv_in", 8, "lora.safetensors")
        4.0
    """
    try:
        return alpha_of(name, rank) if rank else None
    except (TypeError, ValueError, AttributeError) as exc:
        raise LoraBridgeError(f"unusable alpha for {name} in the LoRA config ({exc})", path) from None


def build_model(groups: Mapping[str, Mapping[str, Tensor]], alpha_of: Callable[[str, int], float | None],
                user_alpha: float | None, path) -> LoraModel:
    """A :class:`LoraModel` from grouped PEFT tensors (canonical module name -> role -> tensor).

    Alpha per module: ``alpha_of(name, rank)`` (stored in the file), else ``user_alpha``, else the rank (assumed).

    DoRA magnitudes (PEFT: ``(out,)`` for linear, ``(1, out, 1, 1)`` for conv) become neutral
    ``dora_scale`` ``(out, 1[, 1, 1])`` with ``dora_axis`` "out": same bytes, new shape.
    """
    model = LoraModel()
    for name, tensors in groups.items():
        tensors = dict(tensors)
        module = LoraModule(name, "lora", tensors, alpha=0.0)
        if "dora_scale" in tensors and "lora_A.weight" in tensors:
            kernel = tensors["lora_A.weight"].shape[2:]
            magnitude = tensors["dora_scale"]
            tensors["dora_scale"] = magnitude.reshaped((magnitude.numel, 1, *(1 for _ in kernel)))
            module.dora_axis = "out"
        rank = _declared_rank(tensors)
        stored = stored_alpha(alpha_of, name, rank, path)
        if stored is not None:
            module.alpha, module.alpha_source = stored, "stored"
        elif user_alpha is not None:
            module.alpha, module.alpha_source = float(user_alpha), "user"
        else:
            module.alpha, module.alpha_source = float(rank), "assumed"
        model.add(module)
    warn_user_alpha(model, user_alpha, path)
    assumed: dict[str, set[int]] = {}
    for m in model.modules.values():
        if m.alpha_source == "assumed":
            assumed.setdefault(m.component, set()).add(_declared_rank(m.tensors))
    mixed = [component for component, ranks in assumed.items() if len(ranks) > 1]
    if mixed:
        warn(f"{path}: no alpha stored and ranks differ within {', '.join(mixed)}: alpha = each module's rank "
             "assumed (diffusers would apply one module's rank as alpha to all); give --alpha if you know it")
    return model


def peft_tensors(module: LoraModule) -> dict[str, Tensor]:
    """A lora module's tensors under PEFT roles (``lora_A.weight``, ``lora_B.weight``, ``lora_magnitude_vector``)."""
    out = {}
    for role, tensor in module.tensors.items():
        if role == "dora_scale":
            tensor = tensor.reshaped(module.peft_magnitude_shape)
        out[PEFT_ROLES[role] if role == "dora_scale" else role] = tensor
    return out


def read_diffusers_file(path: str | os.PathLike, options: ReadOptions) -> LoraModel:
    """Read a diffusers LoRA (safetensors, or a torch pickle read with weights_only=True), in either
    key spelling (see :func:`~lorabridge.naming.diffusers_keys.parse`).

    Alpha per module from ``lora_adapter_metadata`` (``alpha_pattern``, ``use_rslora`` honoured),
    else ``alpha`` (recorded as given by the user), else the rank (recorded as assumed).
    """
    tensors, metadata = read_state_dict(path)
    groups, unrecognized = group_keys(tensors, diffusers_keys.parse, path)
    model = build_model(groups, metadata_alpha(metadata, path), options.alpha, path)
    model.training = training_from_metadata(metadata, FILE_METADATA_KEYS)
    return check_model(model, path, unrecognized=unrecognized, skip_unknown=options.skip_unknown, strict=options.strict)
