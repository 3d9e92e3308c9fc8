"""PEFT adapters: ``adapter_config.json`` + ``adapter_model.safetensors`` directories, and PEFT key grammar.

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
The diffusers format (:mod:`.diffusers`) reuses this key grammar with a component prefix.
"""

from __future__ import annotations

import json
import math
import os
import re
import re._constants as _C
import re._parser as _parser
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import LoraBridgeError
from ..io.atomic import atomic_directory
from ..io.input_file import check_regular
from ..io.json_safe import load_json, load_json_file
from ..io.safetensors_file import write_safetensors
from ..io.torch_file import read_state_dict, state_dict_keys
from ..model import COMPONENTS, LoraModel, LoraModule
from ..tensor import Tensor
from .checks import check_model, known_modules, warn, writable_lora
from .contract import (FOREIGN_READ, PLAIN_LORA_WRITE, READ_DEFAULTS, WRITE_DEFAULTS, DeclaredFormat, Progress,
                       ReadOptions, WriteOptions)
from .neutral import adapter_metadata
from .training import FILE_METADATA_KEYS, training_from_metadata, training_metadata

PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
# PEFT key tail -> neutral role. The adapter name, when present, sits before ".weight".
_KEY = re.compile(r"^(?P<module>.+?)\.(?:(?P<factor>lora_[AB])(?:\.(?P<adapter>[^.]+))?\.weight"
                  r"|(?P<magnitude>lora_magnitude_vector)(?:\.(?P<adapter_m>(?!weight$)[^.]+))?(?:\.weight)?)$")
ROLES = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude_vector": "dora_scale"}
PEFT_ROLES = {role: peft for peft, role in ROLES.items()}
# Fields of the LoraConfig lorabridge writes beyond r/alpha/targets/patterns (PEFT's inference defaults).
CONFIG_DEFAULTS: dict[str, Any] = {
    "peft_type": "LORA", "task_type": None, "inference_mode": True, "base_model_name_or_path": None,
    "bias": "none", "lora_dropout": 0.0, "fan_in_fan_out": False, "init_lora_weights": True,
    "use_rslora": False, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
}
_SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
# rank_pattern/alpha_pattern keys are regexes PEFT runs with Python's backtracking re (no timeout): only
# those whose matching is bounded are run (see _pattern_matcher). SDXL module paths have < 80 characters.
PATTERN_MAX_CHARS = 500
PATH_MAX_CHARS = 128
PATTERN_MAX_WAYS = 50_000  # e.g. two unbounded repeats (129 ** 2) and a two-way branch: < 20 ms a path
_SINGLE = (_C.LITERAL, _C.NOT_LITERAL, _C.ANY, _C.IN, _C.CATEGORY)  # one character each


def parse_key(key: str) -> tuple[str, str, str | None] | None:
    """(module path, neutral role, adapter name or None) of a PEFT tensor key, or None if it is not one.

    Example:
        >>> parse_key("down_blocks.0.resnets.0.conv1.lora_A.default.weight")
        ('down_blocks.0.resnets.0.conv1', 'lora_A.weight', 'default')
    """
    match = _KEY.match(key)
    if not match:
        return None
    peft_role = match["factor"] or match["magnitude"]
    return match["module"], ROLES[peft_role], match["adapter"] or match["adapter_m"]


# A key parser's answer: (component, or None to infer it from the tree; module path; neutral role; adapter name).
Parsed = tuple[str | None, str, str, str | None]


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


def _ways(items: list, length: int) -> int:
    """An upper bound on the ways a backtracking matcher can match parsed ``items`` at one position of a
    ``length``-character string: each repeat picks a count, each branch an alternative, and these multiply.

    Exponential patterns are those whose count is unbounded by a product: a group repeated more than once
    (``(a+)+``, ``(a|a)*``) or a backreference. They raise :class:`ValueError`.
    """
    ways = 1
    for op, arg in items:
        if op in _SINGLE or op is _C.AT:
            continue
        if op is _C.SUBPATTERN:
            ways *= _ways(arg[-1], length)
        elif op is _C.BRANCH:
            ways *= sum(_ways(alternative, length) for alternative in arg[1])
        elif op in (_C.MAX_REPEAT, _C.MIN_REPEAT, _C.POSSESSIVE_REPEAT):
            low, high, body = arg
            if high > 1 and not (len(body) == 1 and body[0][0] in _SINGLE):
                raise ValueError("a group is repeated")
            ways *= (min(high, length) - low + 1) * (1 if high > 1 else _ways(body, length))
        elif op in (_C.ASSERT, _C.ASSERT_NOT, _C.ATOMIC_GROUP):
            ways *= _ways(arg[-1] if op is not _C.ATOMIC_GROUP else arg, length)
        else:
            raise ValueError(f"it uses {str(op).lower().replace('_', ' ')}")  # backreferences, conditionals
    return ways


@lru_cache(maxsize=4096)
def _pattern_matcher(key: str) -> Callable[[str], bool]:
    r"""``path -> bool``: does ``key`` match the end of a module path as PEFT matches it, ``(.*\.)?(key)$``?

    The same regex PEFT runs, for the patterns real tools write (module paths, ``attn2.to_[kv]``,
    ``down_blocks.*to_q``), which match in bounded time; others are refused with :class:`ValueError`
    rather than run, since Python's ``re`` cannot be stopped. A key that is no regex at all (PEFT
    would fail) is taken literally.
    """
    try:
        compiled = re.compile(rf"(.*\.)?({key})$")
        parsed = _parser.parse(key)
    except re.error:
        return lambda path: path == key or path.endswith("." + key)
    try:
        why = (f"longer than {PATTERN_MAX_CHARS} characters" if len(key) > PATTERN_MAX_CHARS else
               "too many ways to match" if _ways(list(parsed), PATH_MAX_CHARS) > PATTERN_MAX_WAYS else None)
    except ValueError as exc:
        why = str(exc)
    if why:
        raise ValueError(f"pattern {key[:60]!r} is a regex lorabridge does not run ({why}; a backtracking match "
                         "such as PEFT's can take exponential time); name the modules instead")

    def matches(path: str) -> bool:
        if len(path) > PATH_MAX_CHARS:
            raise ValueError(f"a module path of {len(path)} characters is too long to match against patterns")
        return compiled.match(path) is not None

    return matches


def pattern_value(pattern: Mapping[str, Any], path: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: the first key that matches the end of ``path`` as a regex.

    Patterns that could take exponential time are refused (:class:`ValueError`), see :func:`_pattern_matcher`.

    Example:
        >>> pattern_value({"attn2.to_k": 8}, "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", 4)
        8
    """
    for key in pattern:
        if _pattern_matcher(str(key))(path):
            return pattern[key]
    return default


def config_alpha(config: Mapping[str, Any], path: str, rank: int) -> float | None:
    """The neutral alpha (scale = alpha / rank) a LoraConfig gives module ``path``; None if it has none.

    With ``use_rslora`` PEFT scales by alpha / sqrt(r), so the neutral alpha is alpha * sqrt(r).
    """
    if config.get("lora_alpha") is None and not config.get("alpha_pattern"):
        return None
    alpha = float(pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", rank)))
    return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha


def _declared_rank(tensors: Mapping[str, Tensor]) -> int:
    """Rows of lora_A, or 0 when it is missing or 0-d (check_model then reports the broken module)."""
    a = tensors.get("lora_A.weight")
    return a.shape[0] if a is not None and a.shape else 0


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
        try:
            stored = alpha_of(name, rank) if rank else None
        except (TypeError, ValueError, AttributeError) as exc:
            raise LoraBridgeError(f"unusable alpha for {name} in the LoRA config ({exc})", path) from None
        if stored is not None:
            module.alpha, module.alpha_source = stored, "stored"
        elif user_alpha is not None:
            module.alpha, module.alpha_source = float(user_alpha), "user"
        else:
            module.alpha, module.alpha_source = float(rank), "assumed"
        model.add(module)
    stored = sum(m.alpha_source == "stored" for m in model.modules.values())
    if user_alpha is not None and stored:
        warn(f"{path}: the file stores alpha for {stored} module(s); --alpha {user_alpha:g} applies only to the others")
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


def component_configs(model: LoraModel) -> dict[str, dict[str, Any]]:
    """One PEFT LoraConfig (as a dict) per component: diffusers' prefixed metadata, split by component."""
    prefixed = adapter_metadata(model)
    configs: dict[str, dict[str, Any]] = {}
    for key, value in prefixed.items():
        component, field = key.rsplit(".", 1)
        configs.setdefault(component, {})[field] = value
    return configs


def metadata_configs(metadata: Mapping[str, str], path) -> dict[str, dict[str, Any]]:
    """LoraConfigs from a file's ``lora_adapter_metadata``: by component prefix, or under "" when unprefixed."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    data = load_json(raw, "lora_adapter_metadata", path)
    if not isinstance(data, dict):
        raise LoraBridgeError("lora_adapter_metadata is not a JSON object", path)
    configs: dict[str, dict[str, Any]] = {}
    for key, value in data.items():
        component, dot, field = key.partition(".")
        if dot and field and "." not in field:
            configs.setdefault(component, {})[field] = value
        else:
            configs.setdefault("", {})[key] = value
    return configs


def metadata_alpha(metadata: Mapping[str, str], path) -> Callable[[str, int], float | None]:
    """``alpha_of(module name, rank)`` from a file's ``lora_adapter_metadata`` (None where it says nothing).

    diffusers' ``save_lora_weights`` writes that metadata whatever the key spelling (PEFT keys, or the
    old ``lora.down`` spelling its training scripts still produce), so every such format reads it.
    """
    configs = metadata_configs(metadata, path)

    def alpha_of(name: str, rank: int) -> float | None:
        component, module_path = name.split(".", 1)
        return config_alpha(configs.get(component) or configs.get("", {}), module_path, rank)

    return alpha_of


# ---- component inference for keys without a component prefix --------------------------------


def infer_component(module_path: str, tensors: Mapping[str, Tensor], tree) -> str:
    """The SDXL component whose tree holds ``module_path`` with the shapes the tensors imply.

    CLIP-L and bigG share module names, so shapes decide; when they cannot (a model whose two
    text encoders have equal widths) the first candidate is taken and the checks report any misfit.
    """
    candidates = [c for c in COMPONENTS if module_path in tree.get(c, {})]
    a, b = tensors.get("lora_A.weight"), tensors.get("lora_B.weight")
    if a is not None and b is not None:
        fitting = [c for c in candidates if tuple(tree[c][module_path][:2]) == (b.shape[0], a.shape[1])]
        candidates = fitting or candidates
    if candidates:
        return candidates[0]
    return "text_encoder" if module_path.startswith("text_model.") else "unet"


def _peft_parser(component: str | None) -> Callable[[str], Parsed | None]:
    """A key parser for one adapter's PEFT keys (``base_model.model.`` optional), all in ``component``."""

    def parse(key: str) -> Parsed | None:
        found = parse_key(key.removeprefix(PEFT_PREFIX))
        return (component, *found) if found else None

    return parse


def _adapter_dirs(path: Path) -> dict[str | None, Path]:
    """component (None = infer) -> adapter directory, for a single adapter or a per-component layout."""
    if (path / CONFIG_NAME).exists():  # not is_file(): a FIFO or directory by that name gets refused, not skipped
        return {path.name if path.name in COMPONENTS else None: path}
    return {c: path / c for c in COMPONENTS if (path / c / CONFIG_NAME).exists()}


def _left_out(path: Path, directories: Mapping[str | None, Path]) -> list[str]:
    """Subdirectories of a per-component layout that hold adapter files but would not be read, and why.

    Reading only ``unet/``, ``text_encoder/``, ``text_encoder_2/`` with an adapter config silently lost
    whole components before: a ``unet/`` without its config, or an adapter under another name.
    """
    if (path / CONFIG_NAME).is_file():
        return []  # a single adapter directory: its subdirectories are not components
    left_out = []
    for child in sorted(p for p in path.iterdir() if p.is_dir() and p not in directories.values()):
        weights = [name for name in WEIGHT_NAMES if (child / name).is_file()]
        if child.name in COMPONENTS and weights:
            left_out.append(f"{child.name}/ has {weights[0]} but no {CONFIG_NAME}")
        elif weights or (child / CONFIG_NAME).is_file():
            left_out.append(f"{child.name}/ is no pipeline component ({', '.join(COMPONENTS)})")
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
    from .diffusers import PIPELINE_COMPONENTS

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


def _training(metadatas: list[Mapping[str, str]], path) -> dict[str, str]:
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
