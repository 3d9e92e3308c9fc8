"""PEFT adapters: ``adapter_config.json`` + ``adapter_model.safetensors`` directories, and bare PEFT state dicts.

PEFT names a LoRA tensor after the module it wraps, inside ``base_model.model.``
when saved from a ``PeftModel`` (``base_model.model.down_blocks.0.conv1.lora_A.weight``),
with the adapter name inside the key when taken from a live model's
``state_dict()`` (``lora_A.default.weight``). Alpha lives only in the config
(``lora_alpha``, ``alpha_pattern``, ``use_rslora``). An SDXL pipeline has one
adapter per component, so lorabridge writes one directory per component::

    OUT/unet/{adapter_config.json, adapter_model.safetensors}
    OUT/text_encoder/...   OUT/text_encoder_2/...

and reads such a directory, a single adapter directory, or a bare PEFT state-dict file.
Training facts (kohya ``ss_*``, ``modelspec.*``...) go into the metadata of every component's
``adapter_model.safetensors`` (PEFT's loader ignores safetensors metadata; ``adapter_config.json``
is PEFT's ``LoraConfig``, no place for them) and are read back from there.
The key grammar and the LoraConfig rules are shared with the diffusers format
(:mod:`lorabridge.naming.peft_keys`, :mod:`lorabridge.naming.peft_config`, :mod:`.peft_modules`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..architectures import registered_components
from ..errors import LoraBridgeError
from ..io.atomic import atomic_directory
from ..io.input_file import check_regular
from ..io.json_safe import load_json_file
from ..io.safetensors_file import write_safetensors
from ..io.torch_file import read_state_dict, state_dict_keys
from ..model import LoraModel
from ..naming.diffusers_keys import PIPELINE_COMPONENTS
from ..naming.peft_config import component_configs, config_alpha, metadata_configs
from ..naming.peft_keys import PEFT_PREFIX, Parsed, parse_key
from ..tensor import Tensor
from .checks import check_model, warn, writable_lora
from .contract import (FOREIGN_READ, PLAIN_LORA_WRITE, READ_DEFAULTS, WRITE_DEFAULTS, DeclaredFormat, Progress,
                       ReadOptions, WriteOptions)
from .peft_modules import build_model, group_keys, peft_tensors
from .training import FILE_METADATA_KEYS, training_from_metadata, training_metadata

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
# Fields of the LoraConfig lorabridge writes beyond r/alpha/targets/patterns (PEFT's inference defaults).
CONFIG_DEFAULTS: dict[str, Any] = {
    "peft_type": "LORA", "task_type": None, "inference_mode": True, "base_model_name_or_path": None,
    "bias": "none", "lora_dropout": 0.0, "fan_in_fan_out": False, "init_lora_weights": True,
    "use_rslora": False, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
}
_SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def _peft_parser(component: str | None) -> Callable[[str], Parsed | None]:
    """A key parser for one adapter's PEFT keys (``base_model.model.`` optional), all in ``component``."""

    def parse(key: str) -> Parsed | None:
        found = parse_key(key.removeprefix(PEFT_PREFIX))
        return (component, *found) if found else None

    return parse


def _adapter_dirs(path: Path) -> dict[str | None, Path]:
    """component (None = infer) -> adapter directory, for a single adapter or a per-component layout."""
    if (path / CONFIG_NAME).exists():  # not is_file(): a FIFO or directory by that name gets refused, not skipped
        return {path.name if path.name in registered_components() else None: path}
    return {c: path / c for c in registered_components() if (path / c / CONFIG_NAME).exists()}


def _left_out(path: Path, directories: Mapping[str | None, Path]) -> list[str]:
    """Subdirectories of a per-component layout that hold adapter files but would not be read, and why.

    Reading only ``unet/``, ``text_encoder/``, ``text_encoder_2/`` with an adapter config silently lost
    whole components before: a ``unet/`` without its config, or an adapter under another name.
    """
    if (path / CONFIG_NAME).is_file():
        return []  # a single adapter directory: its subdirectories are not components
    left_out, components = [], registered_components()
    for child in sorted(p for p in path.iterdir() if p.is_dir() and p not in directories.values()):
        weights = [name for name in WEIGHT_NAMES if (child / name).is_file()]
        if child.name in components and weights:
            left_out.append(f"{child.name}/ has {weights[0]} but no {CONFIG_NAME}")
        elif weights or (child / CONFIG_NAME).is_file():
            left_out.append(f"{child.name}/ is no pipeline component ({', '.join(components)})")
    return left_out


def _load_config(directory: Path) -> dict[str, Any]:
    config = load_json_file(directory / CONFIG_NAME, "adapter config")
    if not isinstance(config, dict):
        raise LoraBridgeError("adapter config is not a JSON object", directory / CONFIG_NAME)
    if config.get("peft_type", "LORA") != "LORA":
        raise LoraBridgeError(f"a {config.get('peft_type')} adapter, not LoRA", directory / CONFIG_NAME)
    return config


def _weights_file(directory: Path) -> Path:
    for name in WEIGHT_NAMES:
        if (directory / name).exists():
            return check_regular(directory / name)
    raise LoraBridgeError(f"no {' or '.join(WEIGHT_NAMES)} beside {CONFIG_NAME}", directory)


def _is_peft_state_dict(keys: list[str], metadata: Mapping[str, str]) -> bool:
    """PEFT keys that carry no pipeline component prefix (those are the diffusers format)."""
    if "lorabridge.manifest" in metadata:
        return False
    parsed = [parse_key(k) for k in keys]
    return any(p is not None for p in parsed) and all(
        k.startswith(PEFT_PREFIX) or k.split(".", 1)[0] not in PIPELINE_COMPONENTS for k, p in zip(keys, parsed) if p)


# ---- the registry interface ----------------------------------------------------------------


def detect(path: str | os.PathLike) -> bool:
    """An adapter directory (or per-component directories), or a bare PEFT state-dict file."""
    path = Path(path)
    if path.is_dir():
        return bool(_adapter_dirs(path))
    found = state_dict_keys(path)
    return found is not None and _is_peft_state_dict(*found)


def read(path: str | os.PathLike, options: ReadOptions = READ_DEFAULTS) -> LoraModel:
    """Read a PEFT adapter directory, a per-component directory of them, or a PEFT state-dict file.

    Example:
        >>> model = read("my_adapter/")   # doctest: +SKIP
    """
    path = Path(path)
    groups: dict[str, dict[str, Tensor]] = {}
    configs: dict[str, dict[str, Any]] = {}
    unrecognized: list[str] = []
    if path.is_dir():
        directories = _adapter_dirs(path)
        left_out = _left_out(path, directories)
        if not directories:
            why = f": {'; '.join(left_out)}" if left_out else ""
            raise LoraBridgeError(f"no {CONFIG_NAME} here or in unet/, text_encoder/, text_encoder_2/{why}", path)
        if left_out and not options.skip_unknown:
            raise LoraBridgeError(f"{len(left_out)} adapter folder(s) would be left out: {'; '.join(left_out)} "
                                  "(--skip-unknown converts the rest, with a warning)", path)
        if left_out:
            warn(f"{path}: left out {len(left_out)} adapter folder(s): {'; '.join(left_out)}")
        sources, metadatas = [], []
        for component, directory in directories.items():
            tensors, metadata = read_state_dict(_weights_file(directory))
            sources.append((component, tensors, _load_config(directory)))
            metadatas.append(metadata)
    else:
        tensors, metadata = read_state_dict(path)
        from_metadata = metadata_configs(metadata, path)
        sources, metadatas = [(None, tensors, from_metadata.get("", {}))], [metadata]
        configs.update({c: v for c, v in from_metadata.items() if c})
    for component, tensors, config in sources:
        found, skipped = group_keys(tensors, _peft_parser(component), path)
        unrecognized += skipped
        for name, module_tensors in found.items():
            if name in groups:
                raise LoraBridgeError(f"module {name} appears in more than one adapter", path)
            groups[name] = module_tensors
            configs.setdefault(name.split(".", 1)[0], config)

    def alpha_of(name: str, rank: int) -> float | None:
        component, module_path = name.split(".", 1)
        return config_alpha(configs.get(component, {}), module_path, rank)

    model = build_model(groups, alpha_of, options.alpha, path)
    model.training = _training(metadatas, path)
    return check_model(model, path, unrecognized=unrecognized, skip_unknown=options.skip_unknown, strict=options.strict)


def _training(metadatas: Sequence[Mapping[str, str]], path) -> dict[str, str]:
    """The training facts of all adapter files (the writer puts the same in each); the first file wins a conflict."""
    training: dict[str, str] = {}
    conflicting = set()
    for metadata in metadatas:
        for key, value in training_from_metadata(metadata, FILE_METADATA_KEYS).items():
            if training.setdefault(key, value) != value:
                conflicting.add(key)
    if conflicting:
        warn(f"{path}: the adapter files disagree on training metadata {', '.join(sorted(conflicting))}; "
             "kept the first component's values")
    return training


def _safe_subdir(root: Path, component: str) -> Path:
    """``root/component``, refusing names that would leave ``root`` (``..``, absolute, separators)."""
    target = (root / component).resolve()
    if not _SAFE_COMPONENT.match(component) or component in (".", "..") or target.parent != root.resolve():
        raise LoraBridgeError(f"component name {component!r} is not a plain directory name; refusing to write it", root)
    return target


def write(model: LoraModel, path: str | os.PathLike, options: WriteOptions = WRITE_DEFAULTS, *,
          progress: Progress | None = None, force: bool = False) -> None:
    """Write one PEFT adapter directory per component under ``path`` (a new directory), atomically.

    The directory is assembled beside ``path`` and renamed into place; an existing ``path``
    is replaced only with ``force``. Loads with ``PeftModel.from_pretrained(unet, path/"unet")``.

    Example:
        >>> write(model, "lora_peft")   # doctest: +SKIP
    """
    path = Path(path)
    model = writable_lora(model, path, options, target=FORMAT.name, kinds=FORMAT.kinds, dora_axes=FORMAT.dora_axes)
    configs = component_configs(model)
    metadata = {**training_metadata(model, FILE_METADATA_KEYS), "format": "pt"}
    with atomic_directory(path, force) as staging:
        for component in model.components:
            directory = _safe_subdir(staging, component)
            directory.mkdir()
            modules = [m for m in model.modules.values() if m.component == component]
            tensors = {f"{PEFT_PREFIX}{m.path}.{role}": t for m in modules for role, t in peft_tensors(m).items()}
            config = {**CONFIG_DEFAULTS, **configs[component]}
            (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2), "utf-8")
            write_safetensors(directory / WEIGHT_NAMES[0], tensors, metadata, progress=progress)


FORMAT = DeclaredFormat(
    name="peft", framework="torch",
    description="PEFT adapter directory per component (adapter_config.json + adapter_model.safetensors), "
                "or a base_model.model.* state dict",
    detect=detect, read=read, write=write, stores_metadata=True, stores_alpha=True, kinds=("lora",), dora_axes=("out",),
    writes_directory=True,  # one adapter directory per component
    read_options=FOREIGN_READ, write_options=PLAIN_LORA_WRITE)
