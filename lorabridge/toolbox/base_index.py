"""A base model's layers from its file headers alone: which module lives where, at which shape and dtype.

``check --base``, ``fuse`` and ``extract`` must know every layer of a base model without loading
it (an SDXL checkpoint is 7 GB, a Flux.1 one 24 GB). The three layouts users have are read through
their headers only (safetensors headers, the records of a MindSpore ``.ckpt``):

- a diffusers directory (``model_index.json`` and one folder per component, ``*.safetensors`` files
  with ``.fp16``-style variants and shards);
- a single-file checkpoint (SGM/BFL/ComfyUI names: ``model.diffusion_model.``, ``conditioner.embedders.N.``,
  bare ``double_blocks.``...), mapped to diffusers paths by each architecture's original<->diffusers
  tables, fused layers (bigG's ``in_proj``, Flux.1's ``qkv``/``linear1``) as row blocks of one tensor;
- a MindONE ``.ckpt`` (SGM names, read by :mod:`lorabridge.io.ms_ckpt` without unpickling).

Module paths are diffusers' (the canonical spelling), so a LoRA's modules are looked up directly.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

from ..architectures import architectures, get_architecture
from ..architectures.architecture import Architecture
from ..architectures.fused import part_rows
from ..architectures.sdxl import SDXL
from ..architectures.sdxl.text_encoders import OPENCLIP_PREFIX, sgm_text_to_diffusers
from ..errors import LoraBridgeError, listed
from ..io.json_safe import load_json
from ..io.ms_ckpt import MsCheckpointFile, is_ms_checkpoint
from ..io.safetensors_file import SafetensorsFile
from ..tensor import Tensor

# Parameter name endings that hold a module's weight: PyTorch's, OpenCLIP's bare fused parameter
# (``attn.in_proj_weight``), MindSpore's names for norm and embedding weights, and BFL's RMSNorm ``.scale``.
WEIGHT_SUFFIXES = (".weight", "_weight", ".gamma", ".embedding_table", ".scale")
# Per architecture, where the single-file layouts (SGM/BFL/ComfyUI) put each component: key prefix -> component.
# Paths after the prefix are in the original spelling (Architecture.from_original); ComfyUI's generic text
# encoder prefixes come from the record (comfyui_prefixes) and hold diffusers (transformers) paths.
SINGLE_FILE_PREFIXES: dict[str, tuple[tuple[str, str], ...]] = {
    SDXL.name: (("model.diffusion_model.", "unet"), ("conditioner.embedders.0.transformer.", "text_encoder"),
                (OPENCLIP_PREFIX, "text_encoder_2")),
    "flux-1-dev": (("model.diffusion_model.", "transformer"), ("", "transformer")),
}
SHARD = re.compile(r"-\d{5}-of-\d{5}$")  # shard suffix of a weights file stem (diffusers/transformers)
# Weights files of a diffusers component folder that are never read (pickled PyTorch, Flax, Keras): listed so that
# fuse can refuse a directory it would otherwise copy with these weights unfused beside the fused safetensors.
UNREAD_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")


class WeightFile(Protocol):
    """What :class:`SafetensorsFile` and :class:`MsCheckpointFile` both offer."""

    path: Path
    metadata: dict[str, str]

    def keys(self) -> list[str]: ...
    def header_entry(self, name: str) -> tuple[str, tuple[int, ...]]: ...
    def tensor(self, name: str) -> Tensor: ...


def open_weights(path: str | os.PathLike) -> WeightFile:
    """A weights file by its contents: a MindSpore ``.ckpt`` or a safetensors file (headers checked, data mapped)."""
    return MsCheckpointFile(path) if is_ms_checkpoint(path) else SafetensorsFile(path)


@dataclass(frozen=True)
class Layer:
    """Where one module's weight lives: ``key`` in ``file`` (``rows`` of it when the original layout fuses it)."""

    shape: tuple[int, ...]
    dtype: str
    file: Path
    key: str
    rows: tuple[int, int] | None = None


@dataclass
class BaseIndex:
    """A base model's weight-bearing modules per component (diffusers paths), from headers only.

    ``files`` lists every weights file a fuse rewrites (all variants of a diffusers directory; the index
    itself holds one variant's), ``unread`` a directory's weights files in other formats (pickled ``.bin``...). ``architecture`` is the registered architecture whose names place the
    most modules (None when none places any), ``variant`` how the base differs from its reference.
    """

    path: Path
    layout: str  # "diffusers", "single-file" or "mindone-ckpt"
    modules: dict[str, dict[str, Layer]] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    architecture: str | None = None
    variant: str = ""
    unread: list[Path] = field(default_factory=list)

    def layer(self, component: str, path: str) -> Layer | None:
        return self.modules.get(component, {}).get(path)

    def tree(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """component -> path -> weight shape, as :mod:`lorabridge.formats.checks` compares trees."""
        return {c: {p: layer.shape for p, layer in mods.items()} for c, mods in self.modules.items()}

    def summary(self) -> dict:
        return {"path": str(self.path), "layout": self.layout, "architecture": self.architecture, "variant": self.variant,
                "modules": {c: len(m) for c, m in self.modules.items()}, "files": len(self.files)}


def module_of(key: str) -> str | None:
    """The module a weight parameter belongs to, or None for other parameters (biases, buffers).

    Example:
        >>> module_of("attn.to_q.weight"), module_of("attn.in_proj_weight"), module_of("norm.bias")
        ('attn.to_q', 'attn.in_proj', None)
    """
    for suffix in WEIGHT_SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)]
    return None


def _variant_of(file: Path) -> str:
    """The variant of a diffusers weights file: ``fp16`` for ``model.fp16.safetensors`` (shards too), "" for none."""
    stem = SHARD.sub("", file.name[: -len(".safetensors")])
    return stem.partition(".")[2]


def _component_files(directory: Path) -> dict[str, list[Path]]:
    """A component folder's safetensors weights by variant."""
    groups: dict[str, list[Path]] = {}
    for file in sorted(directory.glob("*.safetensors")):
        groups.setdefault(_variant_of(file), []).append(file)
    return groups


def _components(root: Path) -> list[str]:
    index = root / "model_index.json"
    try:
        data = load_json(index.read_bytes(), "model_index.json", index)
    except OSError as exc:
        raise LoraBridgeError(f"unreadable ({exc.strerror})", index) from None
    if not isinstance(data, dict):
        raise LoraBridgeError("model_index.json is not a JSON object", index)
    return [name for name, value in data.items() if not name.startswith("_") and isinstance(value, list)
            and len(value) == 2 and value[0] is not None and (root / name).is_dir()]


def _index_directory(root: Path, variant: str | None) -> BaseIndex:
    index = BaseIndex(root, "diffusers")
    for component in _components(root):
        index.unread += sorted(f for f in (root / component).iterdir() if f.suffix in UNREAD_WEIGHTS and f.is_file())
        groups = _component_files(root / component)
        if not groups:
            continue
        index.files += [f for files in groups.values() for f in files]
        chosen = variant if variant in groups else "" if "" in groups else sorted(groups)[0]
        if variant is not None and variant not in groups:
            raise LoraBridgeError(f"{component} has no {variant!r} weights (has: {', '.join(v or 'default' for v in groups)})", root)
        modules = index.modules.setdefault(component, {})
        for file in groups[chosen]:
            weights = open_weights(file)
            for key in weights.keys():
                path = module_of(key)
                if path is not None:
                    dtype, shape = weights.header_entry(key)
                    modules[path] = Layer(shape, dtype, file, key)
    if not index.modules:
        raise LoraBridgeError("no component folder holds *.safetensors weights (pickled .bin weights are never read)", root)
    return index


def single_file_modules(name: str, shape: tuple[int, ...]) -> Iterator[tuple[str, str, str, tuple[int, int] | None]]:
    """(architecture, component, diffusers path, rows) of each module an original-layout weight ``name`` holds:
    one, or the parts of a fused layer with their row blocks; nothing when no registered architecture has it.

    Example:
        >>> list(single_file_modules("model.diffusion_model.input_blocks.4.1.proj_in", (640, 640)))
        [('stable-diffusion-xl-v1-base', 'unet', 'down_blocks.1.attentions.0.proj_in', None)]
    """
    for architecture in architectures():
        prefixes = [*SINGLE_FILE_PREFIXES.get(architecture.name, ()),
                    *((f"{prefix}.", component) for component, prefix in architecture.comfyui_prefixes.items())]
        for prefix, component in prefixes:
            if not name.startswith(prefix) or component not in architecture.components:
                continue
            rest = name[len(prefix):]
            path = _diffusers_path(architecture, component, rest, name)
            if path is not None:
                yield architecture.name, component, path, None
                return
            fused = architecture.fused_parts(rest)
            if fused is not None and fused[0] == component and shape:
                rows = part_rows(shape[0], architecture.part_sizes(component, fused[1]))
                if rows is not None:
                    start = 0
                    for part, count in zip(fused[1], rows):
                        yield architecture.name, component, part, (start, start + count)
                        start += count
                    return


def _diffusers_path(architecture: Architecture, component: str, rest: str, name: str) -> str | None:
    if component in architecture.original_paths:
        return architecture.from_original(component, rest)
    if architecture is SDXL and name.startswith("conditioner."):
        found = sgm_text_to_diffusers(name)
        return found[1] if found and found[0] == component else None
    return rest if rest in architecture.modules(component) else None


def _index_single_file(path: Path, layout: str) -> BaseIndex:
    weights = open_weights(path)
    found: dict[str, dict[str, dict[str, Layer]]] = {}  # architecture -> component -> path -> layer
    for key in weights.keys():
        module = module_of(key)
        if module is None:
            continue
        dtype, shape = weights.header_entry(key)
        for name, component, diffusers_path, rows in single_file_modules(module, shape):
            part_shape = shape if rows is None else (rows[1] - rows[0], *shape[1:])
            found.setdefault(name, {}).setdefault(component, {})[diffusers_path] = Layer(part_shape, dtype, path, key, rows)
    if not found:
        raise LoraBridgeError(f"no layer of a registered architecture ({', '.join(a.label for a in architectures())}) "
                              f"in this checkpoint: {listed(weights.keys())}", path)
    best = max(found, key=lambda n: sum(len(m) for m in found[n].values()))  # max keeps the first registered of equals
    return BaseIndex(path, layout, found[best], [path], best)


def _placed(index: BaseIndex, architecture: Architecture) -> int:
    tree = architecture.tree.all_modules()
    return sum(p in tree.get(c, {}) for c, mods in index.modules.items() for p in mods)


def describe_variant(index: BaseIndex, architecture: Architecture) -> str:
    """How the base differs from the architecture's reference model, in a short phrase: its name when it has every
    layer at the reference's shapes, else the shapes that differ (a variant's, or other widths) and the layers missing."""
    tree = architecture.tree.all_modules()
    missing = [f"{c}.{p}" for c in index.modules if c in tree for p in tree[c] if p not in index.modules[c]]
    reshaped: list[str] = []
    variant_shapes: list[tuple[str, tuple[int, ...]]] = []
    for c, mods in index.modules.items():
        for p, layer in mods.items():
            reference = tree.get(c, {}).get(p)
            if reference is not None and tuple(layer.shape) != tuple(reference):
                if layer.shape in architecture.variant_shapes(c, p):
                    variant_shapes.append((f"{c}.{p}", layer.shape))
                else:
                    reshaped.append(f"{c}.{p}")
    parts = []
    if variant_shapes:
        parts.append(f"a variant of {architecture.reference} ({', '.join(f'{n} {list(shape)}' for n, shape in variant_shapes[:3])})")
    if reshaped:  # a test pipeline or a pruned model: one phrase, counts only (check --json lists no layers either)
        counts = [f"{len(reshaped)} layers differ"] + ([f"{len(missing)} missing"] if missing else [])
        parts.append(f"other widths than {architecture.reference} ({', '.join(counts)})")
    elif missing:
        parts.append(f"{architecture.reference} without {len(missing)} of its layers")
    absent = [c for c in architecture.components if c not in index.modules]
    if absent:
        parts.append(f"no {', '.join(absent)}")
    return "; ".join(parts) or architecture.reference or architecture.label


def index_base(path: str | os.PathLike, variant: str | None = None) -> BaseIndex:
    """Index a base model (diffusers directory, single-file checkpoint or MindONE ``.ckpt``) from headers only.

    ``variant`` picks a diffusers directory's weights variant (``fp16``); by default the plain files, or
    the only variant there is.

    Example:
        >>> index = index_base("tiny-sdxl")   # doctest: +SKIP
        >>> index.architecture, index.layer("unet", "conv_in").shape   # doctest: +SKIP
        ('stable-diffusion-xl-v1-base', (32, 4, 3, 3))
    """
    path = Path(path)
    if not path.exists():
        raise LoraBridgeError("base model not found", path)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise LoraBridgeError("not a diffusers pipeline directory (no model_index.json)", path)
        index = _index_directory(path, variant)
        placed = Counter({a.name: _placed(index, a) for a in architectures()})
        name, count = max(placed.items(), key=lambda item: item[1]) if placed else (None, 0)
        index.architecture = name if count else None
    else:
        if variant is not None:
            raise LoraBridgeError("--variant applies to diffusers directories only", path)
        index = _index_single_file(path, "mindone-ckpt" if is_ms_checkpoint(path) else "single-file")
    if index.architecture is not None:
        index.variant = describe_variant(index, get_architecture(index.architecture))
    return index
