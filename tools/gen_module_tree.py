"""Regenerate an architecture's ``modules.json``: every weight-bearing module, with its shape.

Converters resolve names against the real module tree (never by regex or list position), and
they must do it without importing torch. So this script builds the architecture's components with
diffusers/transformers on torch's ``meta`` device (no weights, no downloads: each architecture's
``reference.py`` writes its configs out and builds them) and records, per component,
``path -> [layer type, weight shape]`` for every module that owns a ``weight`` parameter, into
``lorabridge/architectures/<name>/modules.json``.

Usage:
    .venv/bin/python tools/gen_module_tree.py sdxl            # rewrite the JSON
    .venv/bin/python tools/gen_module_tree.py sdxl --check    # exit 1 if the JSON is stale
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

ARCHITECTURES = Path(__file__).resolve().parent.parent / "lorabridge" / "architectures"


def output(architecture: str) -> Path:
    return ARCHITECTURES / architecture / "modules.json"


def build_models(architecture: str) -> dict:
    """component -> model built on the meta device by ``lorabridge.architectures.<architecture>.reference``."""
    return importlib.import_module(f"lorabridge.architectures.{architecture}.reference").build_models()


def weight_modules(model) -> dict[str, list]:
    """path -> [type name, weight shape] for every module that directly owns a ``weight`` parameter."""
    out = {}
    for path, module in model.named_modules():
        weight = module._parameters.get("weight")
        if path and weight is not None:
            out[path] = [type(module).__name__, list(weight.shape)]
    return out


def build_tree(models: dict) -> dict[str, dict[str, list]]:
    """component -> {path: [type, shape]} of the given components."""
    return {component: weight_modules(model) for component, model in models.items()}


def render(tree: dict[str, dict[str, list]]) -> str:
    """One module per line, so diffs of the committed file stay readable."""
    lines = ["{"]
    for ci, (component, modules) in enumerate(tree.items()):
        lines.append(f"  {json.dumps(component)}: {{")
        items = list(modules.items())
        for i, (path, entry) in enumerate(items):
            comma = "," if i < len(items) - 1 else ""
            lines.append(f"    {json.dumps(path)}: {json.dumps(entry)}{comma}")
        lines.append("  }" + ("," if ci < len(tree) - 1 else ""))
    lines.append("}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("architecture", help="package name under lorabridge/architectures/, e.g. sdxl")
    parser.add_argument("--check", action="store_true", help="compare with the committed JSON instead of writing")
    args = parser.parse_args(argv)
    text = render(build_tree(build_models(args.architecture)))
    target = output(args.architecture)
    if args.check:
        if target.read_text() != text:
            print(f"{target} is stale: run tools/gen_module_tree.py {args.architecture}", file=sys.stderr)
            return 1
        return 0
    target.write_text(text)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
