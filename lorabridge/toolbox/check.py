"""Will a LoRA load, and do what it says, in each tool users load LoRAs with; and does it fit a real base model?

Per target (a loader: diffusers, PEFT, ComfyUI, A1111, kohya sd-scripts, MindONE's SDXL trainer, mindone.diffusers)
the report says which modules the target names and which it drops, and the problems its loader is known to
have. Facts about what a file can hold (kinds, DoRA axes, architectures, stored alpha) are read from the format
declarations (:mod:`lorabridge.formats.contract`); facts about loaders are the data in :data:`TARGETS`, each
with its source. With a base model, every module is compared with the base's real layer names and shapes
(:mod:`.base_index`, headers only).

diffusers' loader (0.35, ``lora_conversion_utils._convert_non_diffusers_lora_to_diffusers`` and
``utils/peft_utils.get_peft_kwargs``): a kohya file's ``.alpha`` tensors become ``network_alphas``, one per
module; per component, the most common alpha becomes ``lora_alpha`` and the others go into ``alpha_pattern``,
so stored alphas are honoured, but a module whose file stores no alpha gets the component's most common alpha
(kohya, ComfyUI and A1111 use alpha = rank). Without any alpha (no ``.alpha``, no ``lora_adapter_metadata``),
``lora_alpha`` is the rank of the first module in the state dict, for every module: a module of another rank
is scaled by first rank / its rank instead of 1. Its kohya converter maps UNet layers of the down/mid/up blocks
only (``formats.kohya.UNET_BLOCKS``).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from ..architectures import get_architecture
from ..errors import LoraBridgeError, listed
from ..formats.contract import Format
from ..formats.kohya import OUT_AXIS_READERS, UNET_BLOCKS
from ..formats.mindone import MINDONE_SDXL_LORA_LAYERS
from ..model import LoraModel, LoraModule, fold_refusal
from .base_index import BaseIndex, index_base

UNDERSCORED_INPUTS = ("kohya", "lycoris", "mindone-kohya")  # inputs whose alphas diffusers' kohya converter reads
PEFT_KEY_INPUTS = ("diffusers", "peft", "mindone-diffusers")  # inputs diffusers/PEFT read without conversion


@dataclass(frozen=True)
class Target:
    """A tool that loads LoRA files: the registered format lorabridge writes for it, and its loader's facts."""

    name: str
    format: str  # the registry format of the files it loads
    reads_dora_axes: tuple[str, ...] | None = None  # DoRA axes its loader computes right; None: the format's
    layers: Mapping[str, tuple[str, ...]] | None = None  # per component, module path endings it wraps (None: all)
    zero_alpha_is_rank: bool = False  # reads alpha 0 as alpha = rank (kohya sd-scripts' LoRAModule)
    diffusers_loader: bool = False  # diffusers' load_lora_weights: its alpha rules for files read as they are


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("diffusers", "diffusers", diffusers_loader=True),
    Target("peft", "peft"),
    Target("comfyui", "kohya", reads_dora_axes=("in",)),  # formats.kohya.OUT_AXIS_READERS: older ComfyUI
    Target("a1111", "kohya", reads_dora_axes=("in",)),
    Target("kohya", "kohya", zero_alpha_is_rank=True),
    # MindONE's SDXL LoRA layers; its load_param_into_net(strict_load=False) drops the rest (formats.mindone).
    Target("mindone-sgm", "mindone-sgm", layers=MINDONE_SDXL_LORA_LAYERS),
    Target("mindone-diffusers", "mindone-diffusers"),
)}


def _declared(target: Target) -> Format:
    from ..converters.registry import get_format

    return get_format(target.format)


def _names(modules: list[LoraModule]) -> list[str]:
    return [m.name for m in modules]


def _alpha_problems(model: LoraModel, target: Target, source_format: str, fmt: Format) -> list[str]:
    """Scale problems: what the target's loader makes of the alphas, as the input file is or as lorabridge writes it."""
    problems = []
    modules = list(model.modules.values())
    assumed = [m for m in modules if m.alpha_source == "assumed" and m.rank]
    if target.diffusers_loader and source_format in UNDERSCORED_INPUTS and assumed and len(assumed) < len(modules):
        common = Counter(m.alpha for m in modules if m.alpha_source != "assumed").most_common(1)[0][0]
        wrong = [m for m in assumed if m.rank != common]
        if wrong:
            problems.append(f"this file as it is: diffusers gives the {len(wrong)} module(s) without .alpha the component's "
                            f"most common alpha ({common:g}) instead of their rank: {listed(_names(wrong))} "
                            f"(convert --to diffusers stores every alpha)")
    if target.diffusers_loader and source_format in PEFT_KEY_INPUTS and len(assumed) == len(modules) > 0:
        first = modules[0].rank
        wrong = [m for m in modules if m.rank != first]
        if wrong:
            problems.append(f"this file as it is stores no alpha: diffusers uses the first module's rank ({first}) as "
                            f"alpha for all, scaling {len(wrong)} module(s) of other ranks by {first}/rank instead of 1: "
                            f"{listed(_names(wrong))}")
    if target.zero_alpha_is_rank:
        zero = [m for m in modules if m.alpha == 0 and m.rank]
        if zero:
            problems.append(f"{len(zero)} module(s) have alpha 0, which kohya sd-scripts reads as alpha = rank "
                            f"(others: scale 0): {listed(_names(zero))}")
    if not fmt.stores_alpha:
        folded = [m for m in modules if m.rank and m.alpha != m.rank]
        if folded:
            problems.append(f"{fmt.name} stores no alpha: alpha/rank is folded into lora_B for {len(folded)} module(s) "
                            "(same delta W; training on from it starts at another scale)")
    return problems


def _fold_refusal(model: LoraModel, fmt: Format) -> str | None:
    """Why ``convert`` refuses to write ``model`` in ``fmt``, a format storing no alpha: alpha/rank folded into an
    FP8 lora_B (numpy, which folds, has no FP8 type); None where it writes it."""
    return None if fmt.stores_alpha else fold_refusal(model.modules.values(), f"folding alpha/rank into lora_B for {fmt.name}")


def check_target(model: LoraModel, target: Target, source_format: str) -> dict[str, Any]:
    """One target's verdict: modules it names and drops, and the problems its loader has with this LoRA."""
    fmt = _declared(target)
    modules = list(model.modules.values())
    report: dict[str, Any] = {"format": fmt.name, "loads": True, "matched": 0, "unmatched": [], "problems": []}
    if fmt.architectures is not None and model.architecture not in fmt.architectures:
        labels = ", ".join(get_architecture(a).label for a in fmt.architectures)
        report.update(loads=False, unmatched=_names(modules),
                      problems=[f"names only {labels} layers; this LoRA is for {get_architecture(model.architecture).label}"])
        return report
    unmatched = []
    if target.layers is not None:
        unmatched += [m for m in modules if not m.path.endswith(target.layers.get(m.component, ()))]
    if target.diffusers_loader and source_format in UNDERSCORED_INPUTS:
        unmatched += [m for m in modules if m.component == "unet" and not m.path.startswith(UNET_BLOCKS)]
    report["unmatched"] = _names(unmatched)
    report["matched"] = len(modules) - len(unmatched)
    problems = report["problems"]
    if unmatched:
        why = "its loader drops them without effect" if target.layers is not None else "diffusers' kohya loader fails on them"
        problems.append(f"{len(unmatched)} module(s) it does not name ({why}): {listed(report['unmatched'])}")
    other_kinds = [m for m in modules if m.kind not in fmt.kinds]
    if other_kinds:
        kinds = ", ".join(sorted({m.kind for m in other_kinds}))
        problems.append(f"{len(other_kinds)} {kinds} module(s) it cannot hold: --bake-to-lora RANK turns them into LoRA "
                        f"(truncated SVD, error reported): {listed(_names(other_kinds))}")
    axes = target.reads_dora_axes if target.reads_dora_axes is not None else fmt.dora_axes
    dora = [m for m in modules if m.dora_axis is not None and m.dora_axis not in axes]
    if dora:
        where = OUT_AXIS_READERS if fmt.name == "kohya" else f"{fmt.name} stores DoRA magnitudes on {', '.join(fmt.dora_axes) or 'no'} axis"
        problems.append(f"{len(dora)} DoRA module(s) per {dora[0].dora_axis} axis: {where}: {listed(_names(dora))}")
    problems += _alpha_problems(model, target, source_format, fmt)
    unfoldable = _fold_refusal(model, fmt)
    if unfoldable:
        problems.append(unfoldable)
    report["loads"] = not unmatched or target.layers is not None and len(unmatched) < len(modules)
    if other_kinds or (dora and fmt.name != "kohya") or unfoldable:
        report["loads"] = False
    return report


def fit_problems(model: LoraModel, index: BaseIndex) -> list[str]:
    """Every module of ``model`` against the base's real layers: components and layers it has not, other shapes."""
    problems = []
    for m in model.modules.values():
        if m.component not in index.modules:
            problems.append(f"{m.name}: the base has no {m.component} (it has {', '.join(index.modules)})")
            continue
        layer = index.layer(m.component, m.path)
        if layer is None:
            problems.append(f"{m.name}: no such layer in the base")
        elif tuple(layer.shape) != tuple(m.weight_shape):
            problems.append(f"{m.name} adapts a {list(m.weight_shape)} weight, the base's is {list(layer.shape)}")
    return problems


def check_base(model: LoraModel, index: BaseIndex) -> dict[str, Any]:
    """The fit of a LoRA to a base model: problems, and the architecture the LoRA was made for when it is not the base's."""
    problems = fit_problems(model, index)
    report: dict[str, Any] = {**index.summary(), "fits": not problems, "misfits": len(problems), "problems": problems[:20]}
    if model.architecture != index.architecture:
        made_for = get_architecture(model.architecture)
        base = get_architecture(index.architecture).label if index.architecture else "no registered architecture"
        report["made_for"] = f"{made_for.label} ({made_for.reference}); the base is {base}"
    return report


def refuse_misfit(model: LoraModel, base: str | os.PathLike, path: str | os.PathLike,
                  index: BaseIndex | None = None) -> BaseIndex:
    """Raise a one-line error when ``model`` does not fit the base model at ``base``; return the base's index.

    Example:
        >>> refuse_misfit(model, "sdxl-base", "lora.safetensors")   # doctest: +SKIP
    """
    index = index or index_base(base)
    report = check_base(model, index)
    if not report["fits"]:
        made_for = f" (made for {report['made_for']})" if "made_for" in report else ""
        raise LoraBridgeError(f"does not fit the base {os.fspath(base)}{made_for}: {report['misfits']} module(s) do not: "
                              f"{listed(report['problems'])}", path)
    return index


def base_fit(base: str | os.PathLike | None) -> Callable[[LoraModel, Path], None] | None:
    """The check a conversion runs on the model it read when ``--base`` is given (None without one).

    Example:
        >>> base_fit(None) is None
        True
    """
    if base is None:
        return None
    index = index_base(base)  # once, before anything is read: a bad --base fails first

    def check(model: LoraModel, src: Path) -> None:
        refuse_misfit(model, base, src, index)
    return check


def read_lora(path: str | os.PathLike) -> tuple[LoraModel, str]:
    """Any supported LoRA file, read into the model (checked as the converters check it), and its format's name."""
    from ..converters import detect_format

    source = detect_format(path)
    return source.read(path), source.name


def check_lora(path: str | os.PathLike, base: str | os.PathLike | None = None,
               targets: tuple[str, ...] = tuple(TARGETS)) -> dict[str, Any]:
    """The full report ``lorabridge check`` prints: per target, and against ``base`` when given.

    ``loads`` is False when the LoRA does not fit the base, or loads in none of the targets asked about.

    Example:
        >>> check_lora("lora.safetensors", targets=("diffusers", "comfyui"))["loads"]   # doctest: +SKIP
        True
    """
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise LoraBridgeError(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    model, source_format = read_lora(path)
    report: dict[str, Any] = {"lora": os.fspath(path), "format": source_format, "architecture": model.architecture,
                              "modules": len(model.modules), "kinds": dict(Counter(m.kind for m in model.modules.values())),
                              "targets": {t: check_target(model, TARGETS[t], source_format) for t in targets}}
    loads = any(t["loads"] for t in report["targets"].values())
    if base is not None:
        report["base"] = check_base(model, index_base(base))
        loads = loads and report["base"]["fits"]
    report["loads"] = loads
    return report


def render_check(report: Mapping[str, Any]) -> str:
    """The report as lines for a terminal."""
    lines = [f"{report['lora']}: {report['format']}, {report['modules']} modules, "
             f"{get_architecture(report['architecture']).label}"]
    if "base" in report:
        base = report["base"]
        lines.append(f"base {base['path']} ({base['layout']}, {base['variant'] or base['architecture']}): "
                     + ("fits" if base["fits"] else f"does NOT fit ({base['misfits']} module(s))"))
        if "made_for" in base:
            lines.append(f"  made for {base['made_for']}")
        lines += [f"  - {p}" for p in base["problems"]]
    for name, target in report["targets"].items():
        verdict = "loads" if target["loads"] else "does NOT load"
        lines.append(f"{name} ({target['format']}): {verdict}; {target['matched']} matched, {len(target['unmatched'])} unmatched")
        lines += [f"  - {p}" for p in target["problems"]]
    lines.append("verdict: " + ("loads" if report["loads"] else "will not load"))
    return "\n".join(lines)
