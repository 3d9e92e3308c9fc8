"""No code path in the package unpickles untrusted data: every torch.load says weights_only=True."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lorabridge"
UNSAFE_CALLS = {("pickle", "load"), ("pickle", "loads"), ("numpy", "load"), ("np", "load")}


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name):
            yield node, (node.func.value.id, node.func.attr)


def keyword(node: ast.Call, name: str):
    return next((k.value for k in node.keywords if k.arg == name), None)


def test_torch_load_always_weights_only_and_no_raw_pickle():
    offenders = []
    for source in PACKAGE.rglob("*.py"):
        for node, (owner, attr) in calls(ast.parse(source.read_text(), str(source))):
            where = f"{source.relative_to(PACKAGE.parent)}:{node.lineno}"
            if (owner, attr) == ("torch", "load"):
                flag = keyword(node, "weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    offenders.append(f"{where}: torch.load without weights_only=True")
            elif (owner, attr) in UNSAFE_CALLS:
                allow = keyword(node, "allow_pickle")
                if (owner, attr) in {("numpy", "load"), ("np", "load")} and isinstance(allow, ast.Constant) and allow.value is False:
                    continue
                offenders.append(f"{where}: {owner}.{attr} can unpickle")
    assert offenders == []
