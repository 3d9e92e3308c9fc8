"""What ``validate`` and ``inspect`` print: reports as plain data, plus their text renderings."""

from __future__ import annotations

import os
from typing import Any

from .errors import LoraBridgeError
from .model import LoraModel
from .formats.neutral import examine, read_neutral
from .neutral_rules import dora_limits, loaders


def validation_report(path: str | os.PathLike) -> dict[str, Any]:
    """{"file", "valid", "reason", "modules", "problems": [{"reason", "where", "problem"}], "warnings"} for one file.

    ``valid``, ``reason`` (the spec 8 reason class of the first problem, null when valid) and ``modules``
    (the module count, null when invalid) are the conformance verdict of spec 8; container errors
    count as problems of class ``container``. Warnings say what a valid file cannot do (the tools it
    claims to load in that cannot).
    """
    try:
        model, _, findings = examine(path, verify_hash=True)
    except LoraBridgeError as exc:
        model, findings = None, [("container", "file", exc.message)]
    return {"file": os.fspath(path), "valid": not findings, "reason": findings[0][0] if findings else None,
            "modules": len(model.modules) if model is not None else None,
            "problems": [{"reason": reason, "where": where, "problem": what} for reason, where, what in findings],
            "warnings": warnings_of(model) if model is not None else []}


def warnings_of(model: LoraModel) -> list[str]:
    """What a valid file's DoRA magnitudes keep diffusers or mindone.diffusers from loading (see dora_limits)."""
    return [why for _, why in dora_limits(model)]


def _warning_lines(report: dict[str, Any]) -> list[str]:
    return [f"  warning: {w}" for w in report["warnings"]]


def render_validation(report: dict[str, Any]) -> str:
    if report["valid"]:
        return "\n".join([f"{report['file']}: valid neutral LoRA", *_warning_lines(report)])
    lines = [f"{report['file']}: INVALID, {report['reason']} ({len(report['problems'])} problem(s))"]
    lines += [f"  {p['where']}: {p['problem']}" for p in report["problems"]]
    return "\n".join(lines)


def inspection_report(path: str | os.PathLike) -> dict[str, Any]:
    """The summary ``inspect`` prints, as data."""
    model = read_neutral(path)
    return {
        "file": os.fspath(path),
        "file_bytes": os.path.getsize(path),
        "architecture": model.architecture,
        "components": model.components,
        **model.summary(),
        "targets": model.targets(),
        "provenance": model.provenance,
        "training": model.training,
        "loads_in": loaders(model),
        "warnings": warnings_of(model),
    }


def _counts(mapping: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in mapping.items()) or "-"


def render_inspection(r: dict[str, Any]) -> str:
    prov = r["provenance"]
    lines = [
        f"file          {r['file']} ({r['file_bytes']:,} bytes, tensors {r['bytes']:,} bytes)",
        f"architecture  {r['architecture']}",
        f"components    {_counts(r['per_component'])}",
        f"modules       {r['modules']} ({r['tensors']} tensors; kinds {_counts(r['kinds'])})",
        f"rank          {_counts(r['ranks'])}",
        f"alpha         {_counts(r['alphas'])} (source {_counts(r['alpha_sources'])})",
        f"dtypes        {_counts(r['dtypes'])}",
        f"provenance    {prov.get('source_format', '?')} from {prov.get('source_file') or '?'}, "
        f"by {prov.get('converter', '?')} at {prov.get('created', '?')}",
    ]
    lines += [f"loads in      {consumer}: {verdict}" for consumer, verdict in r["loads_in"].items()]
    for component, targets in r["targets"].items():
        lines.append(f"targets       {component}: {_counts(targets)}")
    if r["training"]:
        lines.append(f"training      {len(r['training'])} field(s): {', '.join(list(r['training'])[:8])}")
    lines += [f"warning       {w}" for w in r["warnings"]]
    return "\n".join(lines)
