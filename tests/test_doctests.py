"""The examples in lorabridge's docstrings run and print what they show (those marked +SKIP need files or
frameworks; all may use ``np``, as numpy's own examples do: modules import numpy where they use it, not at
the top); importing any lorabridge module is cheap and needs neither MindSpore nor torch."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import subprocess
import sys

import numpy as np
import pytest

import lorabridge

# __main__ runs the command line when imported as a script; importing it as a module is harmless but pointless.
MODULES = [m.name for m in pkgutil.walk_packages(lorabridge.__path__, "lorabridge.") if m.name != "lorabridge.__main__"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), extraglobs={"np": np}, verbose=False,
                             optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring example(s) of {name} failed (output above)"


def test_importing_every_module_loads_no_framework():
    code = ("import importlib, sys\n"
            f"for name in {MODULES!r}:\n    importlib.import_module(name)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'mindspore', 'diffusers', 'mindone', 'transformers'}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-2000:]
