"""Long fuzzing run of lorabridge's parsers under atheris (coverage-guided).

Usage: python bench/fuzz_atheris.py TARGET [-atheris_runs=N] [-max_total_time=SECONDS]
TARGET is one of the names in TARGETS. A run passes when every input either parses or raises
LoraBridgeError; anything else (another exception, a hang, a huge allocation) is a finding.
The bounded, always-on version of these runs is tests/test_fuzz_*.py (hypothesis).
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from lorabridge.errors import LoraBridgeError

ROOT = Path(__file__).resolve().parent.parent
SCRATCH = Path(tempfile.mkdtemp(prefix="lorabridge-fuzz-"))

# name -> (module, function taking a path, seed files)
TARGETS = {
    "neutral": ("lorabridge.formats.neutral", "inspect_file", sorted((ROOT / "spec" / "vectors").glob("*.safetensors"))),
    "ms-ckpt": ("lorabridge.io.ms_ckpt", "read_ms_checkpoint", []),
    "kohya": ("lorabridge.formats.kohya", "read", []),
    "diffusers": ("lorabridge.formats.diffusers", "read", []),
}


def main() -> None:
    name = sys.argv.pop(1) if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else "neutral"
    module_name, function_name, seeds = TARGETS[name]
    with atheris.instrument_imports():
        target = getattr(importlib.import_module(module_name), function_name)
    corpus = SCRATCH / "corpus"
    corpus.mkdir()
    for seed in seeds:
        (corpus / seed.name).write_bytes(seed.read_bytes())
    path = SCRATCH / "input.bin"
    counter = {"inputs": 0}

    def one_input(data: bytes) -> None:
        counter["inputs"] += 1
        path.write_bytes(data)
        try:
            target(path)
        except LoraBridgeError:
            pass

    atheris.Setup([sys.argv[0], str(corpus), "-rss_limit_mb=2048", "-timeout=10", *sys.argv[1:]], one_input)
    try:
        atheris.Fuzz()
    finally:
        print(f"{name}: {counter['inputs']} inputs tried", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
