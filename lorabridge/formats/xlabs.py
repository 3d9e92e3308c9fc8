"""XLabs (x-flux) Flux.1 LoRA files: read-only.

Keys are x-flux's attention-processor LoRAs (:mod:`lorabridge.naming.xlabs_keys`):
``double_blocks.0.processor.qkv_lora1.down.weight``... A LoRA on a fused BFL output (``qkv_lora1``: image
q, k and v) is split exactly into one LoRA per diffusers layer (:func:`~lorabridge.architectures.fused.split_fused`:
shared A, B's row blocks). The files store no alpha and no metadata: x-flux's trainer builds
``LoRALinearLayer(..., network_alpha=None)``, which applies ``up(down(x))`` unscaled, so alpha = rank
(recorded as "assumed"; ``--alpha`` overrides it, as for any file without alpha), which is also what
diffusers' ``_convert_xlabs_flux_lora_to_diffusers`` assumes (no alphas: PEFT's alpha = r).

lorabridge does not write XLabs files: x-flux loads only its own layout, and every other Flux tool
(diffusers, ComfyUI, kohya) loads the layouts lorabridge writes.
"""

from __future__ import annotations

import os

from ..architectures.flux1 import FLUX1
from ..architectures.fused import split_fused
from ..errors import LoraBridgeError, listed
from ..io.torch_file import read_state_dict, state_dict_keys
from ..model import LoraModel, LoraModule
from ..naming.xlabs_keys import COMPONENT, parse
from ..rules import module_problems
from ..tensor import Tensor
from .checks import check_model
from .contract import FOREIGN_READ, READ_DEFAULTS, DeclaredFormat, ReadOptions

SHOWN = 3  # modules named in a message


def detect(path: str | os.PathLike) -> bool:
    """A state-dict file with an x-flux processor LoRA key and no key of another layout beside them."""
    found = state_dict_keys(path)
    if found is None or not found[0]:
        return False
    return all(parse(key) is not None for key in found[0])


def _module(name: str, parts: dict[str, Tensor], user_alpha: float | None) -> LoraModule:
    """One x-flux processor LoRA: alpha = rank (x-flux scales by nothing) unless the user gives one."""
    a = parts.get("lora_A.weight")
    rank = a.shape[0] if a is not None and a.shape else 0
    if user_alpha is not None:
        return LoraModule(name, "lora", parts, float(user_alpha), "user")
    return LoraModule(name, "lora", parts, float(rank), "assumed")


def read(path: str | os.PathLike, options: ReadOptions = READ_DEFAULTS) -> LoraModel:
    """Read an x-flux LoRA into a checked Flux.1 model, its fused qkv LoRAs split into q, k and v.

    Example:
        >>> model = read("lora.safetensors")   # doctest: +SKIP
    """
    tensors, metadata = read_state_dict(path)
    groups: dict[str, dict[str, Tensor]] = {}
    targets: dict[str, tuple[str, ...]] = {}
    unrecognized, problems = [], []
    for key, tensor in tensors.items():
        parsed = parse(key)
        if parsed is None:
            unrecognized.append(key)
            continue
        parts = groups.setdefault(parsed.stem, {})
        if parsed.role in parts:
            problems.append(f"{parsed.stem}: its {parsed.role} is named twice (with and without diffusion_model.)")
        parts[parsed.role] = tensor
        targets[parsed.stem] = parsed.targets
    model = LoraModel(architecture=FLUX1.name, training=dict(metadata))
    for stem, parts in groups.items():
        names = targets[stem]  # a fused one is named by its key stem until it is split
        module = _module(names[0] if len(names) == 1 else f"{COMPONENT}.{stem}", parts, options.alpha)
        if len(names) == 1 or module_problems(module):  # a broken one is left whole for the checks to name
            split = [module]
        else:
            sizes = FLUX1.part_sizes(COMPONENT, tuple(name.partition(".")[2] for name in names))
            try:
                split = split_fused(module, names, sizes)
            except LoraBridgeError as exc:
                problems.append(exc.message)
                continue
        for part in split:
            model.add(part)
    if problems:
        raise LoraBridgeError(f"broken LoRA module(s): {listed(problems, SHOWN)}", path)
    return check_model(model, path, unrecognized=unrecognized, skip_unknown=options.skip_unknown, strict=options.strict)


FORMAT = DeclaredFormat(
    name="xlabs", framework="torch",
    description="XLabs x-flux (read-only): double_blocks.N.processor.qkv_lora1/proj_lora1/qkv_lora2/proj_lora2, "
                "single_blocks.N.processor.qkv_lora/proj_lora .down/.up.weight, no alpha",
    detect=detect, read=read, write=None, stores_metadata=False, stores_alpha=False, kinds=("lora",), dora_axes=(),
    read_options=FOREIGN_READ, write_options=frozenset())
