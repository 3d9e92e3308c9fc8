"""Run a third-party neutral-LoRA reader over the conformance vectors and report where it agrees (spec 8).

The reader is any command with ``{file}`` in it; for each vector it must print one JSON verdict
``{"valid": bool, "reason": class or null, "modules": count or null}`` on stdout. A reader that
hangs, crashes or prints something else costs its vector one failing line, never the run.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import LoraBridgeError

CHECKOUT_VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors"
SHOWN_CHARS = 80  # how much of a reader's unparseable output a line quotes


@dataclass
class Outcome:
    """One vector: what the index expects, what the reader said (or why it said nothing), agreement."""

    file: str
    expected: dict[str, Any]
    said: dict[str, Any] | None
    problem: str | None  # why there is no verdict (timeout, crash, garbage), or what disagrees

    @property
    def agrees(self) -> bool:
        return self.problem is None


def expected_verdict(vector: dict[str, Any]) -> dict[str, Any]:
    valid = vector["verdict"] == "valid"
    return {"valid": valid, "reason": None if valid else vector["reason"], "modules": vector.get("modules") if valid else None}


def _show(verdict: dict[str, Any]) -> str:
    return f"valid, {verdict['modules']} modules" if verdict["valid"] else f"invalid ({verdict['reason']})"


def _kill(process: subprocess.Popen) -> None:
    """Stop the reader and anything it started (it runs in its own process group)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        process.kill()


def run_reader(argv: list[str], timeout: float) -> tuple[dict[str, Any] | None, str | None]:
    """(verdict, None) when the reader printed a verdict object and exited 0 or 1, else (None, why not)."""
    try:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    except OSError as exc:
        return None, f"cannot start the reader: {exc.strerror or exc}"
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(process)
        process.communicate()
        return None, f"reader timed out after {timeout:g} s"
    text = out.decode("utf-8", "replace").strip()
    if process.returncode not in (0, 1):
        last = (err.decode("utf-8", "replace").strip().splitlines() or ["no message"])[-1]
        return None, f"reader crashed (exit {process.returncode}): {last[:SHOWN_CHARS]}"
    try:
        verdict = json.loads(text)
    except ValueError:
        return None, f"reader printed no JSON verdict: {text[:SHOWN_CHARS]!r}"
    if not isinstance(verdict, dict) or not isinstance(verdict.get("valid"), bool):
        return None, f"reader's verdict has no boolean 'valid': {text[:SHOWN_CHARS]!r}"
    return verdict, None


def judge(expected: dict[str, Any], said: dict[str, Any]) -> str | None:
    """What disagrees between the index and a reader's verdict, None when they agree."""
    if said["valid"] != expected["valid"]:
        return f"expected {_show(expected)}, reader says {'valid' if said['valid'] else 'invalid'} ({said.get('reason')})"
    key = "modules" if expected["valid"] else "reason"
    if said.get(key) != expected[key]:
        return f"expected {_show(expected)}, reader says {key} {said.get(key)!r}"
    return None


def load_index(vectors: str | os.PathLike | None) -> tuple[Path, list[dict[str, Any]]]:
    directory = Path(vectors) if vectors is not None else CHECKOUT_VECTORS
    index = directory / "index.json"
    if not index.is_file():
        raise LoraBridgeError("no index.json of conformance vectors here; pass --vectors DIR (spec/vectors of a checkout)", directory)
    return directory, json.loads(index.read_text("utf-8"))["vectors"]


def run_conformance(reader: str, vectors: str | os.PathLike | None = None, timeout: float = 30.0) -> list[Outcome]:
    """Run ``reader`` (a command with ``{file}``) over every vector of the index; one :class:`Outcome` each."""
    template = shlex.split(reader)
    if not any("{file}" in word for word in template):
        raise LoraBridgeError(f"the reader command must contain {{file}}: {reader!r}")
    directory, index = load_index(vectors)
    outcomes = []
    for vector in index:
        path = str(directory / vector["file"])
        argv = [word.replace("{file}", path) for word in template]
        expected = expected_verdict(vector)
        said, problem = run_reader(argv, timeout)
        outcomes.append(Outcome(vector["file"], expected, said, problem if said is None else judge(expected, said)))
    return outcomes


def conformance_report(outcomes: list[Outcome]) -> dict[str, Any]:
    """As data, for ``--json``."""
    return {"vectors": len(outcomes), "agree": sum(o.agrees for o in outcomes),
            "results": [{"file": o.file, "agrees": o.agrees, "expected": o.expected, "reader": o.said, "problem": o.problem}
                        for o in outcomes]}


def render_conformance(report: dict[str, Any]) -> str:
    lines = [f"{'ok  ' if r['agrees'] else 'FAIL'} {r['file']}: "
             + (_show(r["expected"]) if r["agrees"] else r["problem"]) for r in report["results"]]
    lines.append(f"{report['agree']}/{report['vectors']} vectors agree")
    return "\n".join(lines)
