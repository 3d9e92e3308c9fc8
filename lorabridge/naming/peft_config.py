"""PEFT's LoraConfig as lorabridge reads and writes it: rank/alpha patterns, ``use_rslora``, diffusers' prefixed form.

Alpha of a PEFT-keyed LoRA lives only in its config: ``lora_alpha``, overridden per module by
``alpha_pattern`` (regexes over module paths), scaled by sqrt(r) with ``use_rslora``. The config is an
``adapter_config.json`` (PEFT directories) or diffusers' ``lora_adapter_metadata`` safetensors metadata,
one LoraConfig per pipeline component with prefixed fields (``unet.r``, ``unet.lora_alpha``...), which
the diffusers, PEFT, neutral and mindone-diffusers formats read and write alike.
"""

from __future__ import annotations

import math
import re
import re._constants as _C
import re._parser as _parser
from collections import Counter
from functools import lru_cache
from typing import Any, Callable, Mapping

from ..errors import LoraBridgeError
from ..io.json_safe import load_json
from ..model import LoraModel

# rank_pattern/alpha_pattern keys are regexes PEFT runs with Python's backtracking re (no timeout): only
# those whose matching is bounded are run (see _pattern_matcher). SDXL module paths have < 80 characters.
PATTERN_MAX_CHARS = 500
PATH_MAX_CHARS = 128
PATTERN_MAX_WAYS = 50_000  # e.g. two unbounded repeats (129 ** 2) and a two-way branch: < 20 ms a path
_SINGLE = (_C.LITERAL, _C.NOT_LITERAL, _C.ANY, _C.IN, _C.CATEGORY)  # one character each


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


def adapter_metadata(model: LoraModel) -> dict[str, Any]:
    """diffusers' prefixed LoraConfig per component: the most common rank/alpha plus patterns for the rest."""
    out: dict[str, Any] = {}
    for component in model.components:
        modules = [m for m in model.modules.values() if m.component == component and m.kind == "lora"]
        if not modules:
            continue
        rank = Counter(m.rank for m in modules).most_common(1)[0][0]
        alpha = Counter(m.alpha for m in modules).most_common(1)[0][0]
        out.update({
            f"{component}.r": rank,
            f"{component}.lora_alpha": alpha,
            f"{component}.target_modules": [m.path for m in modules],
            f"{component}.rank_pattern": {m.path: m.rank for m in modules if m.rank != rank},
            f"{component}.alpha_pattern": {m.path: m.alpha for m in modules if m.alpha != alpha},
            f"{component}.use_dora": any(m.dora_axis for m in modules),
        })
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
