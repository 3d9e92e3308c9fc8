"""What ``validate`` and ``inspect`` print: reports as plain data, plus their text renderings."""

from __future__ import annotations

import os
from typing import Any

from .errors import LoraBridgeError
from .formats.neutral import diffusers_limits, inspect_file, read_neutral


def validation_report(path: str | os.PathLike) -> dict[str, Any]:
    """{"file", "valid", "problems": [{"where", "problem"}], "warnings"} for one file; container errors
    count as problems. Warnings say what a valid file cannot do (the tools it claims to load in that cannot)."""
    try:
        model, _, problems = inspect_file(path, verify_hash=True)
    except LoraBridgeError as exc:
        model, problems = None, [("file", exc.message)]
    return {"file": os.fspath(path), "valid": not problems,
            "problems": [{"where": where, "problem": what} for where, what in problems],
            "warnings": diffusers_limits(model) if model is not None else []}


def _warning_lines(report: dict[str, Any]) -> list[str]:
    return [f"  warning: {w}" for w in report["warnings"]]


def render_validation(report: dict[str, Any]) -> str:
    if report["valid"]:
        return "\n".join([f"{report['file']}: valid neutral LoRA", *_warning_lines(report)])
    lines = [f"{report['file']}: INVALID ({len(report['problems'])} problem(s))"]
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
        "warnings": diffusers_limits(model),
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
    for component, targets in r["targets"].items():
        lines.append(f"targets       {component}: {_counts(targets)}")
    if r["training"]:
        lines.append(f"training      {len(r['training'])} field(s): {', '.join(list(r['training'])[:8])}")
    lines += [f"warning       {w}" for w in r["warnings"]]
    return "\n".join(lines)
