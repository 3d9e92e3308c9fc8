"""What resize and merge report: per module the rank before and after and the relative Frobenius
error left, and the same over the whole LoRA, as a table or JSON."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import shown

SHOWN = 10  # modules a table lists, the worst first; --json lists all


@dataclass(frozen=True)
class ModuleError:
    """One module: its kind before, ranks before (0 for a full delta) and after, ||delta W||_F and the residual's norm."""

    name: str
    kind: str
    rank_before: int
    rank_after: int
    delta_norm: float
    residual_norm: float

    @property
    def relative_error(self) -> float:
        """||delta W - delta W'||_F / ||delta W||_F (0 for a module that adds nothing)."""
        return self.residual_norm / self.delta_norm if self.delta_norm else 0.0


@dataclass
class ToolReport:
    """What one toolbox command did: the operation, its inputs and output, one :class:`ModuleError` per module.

    Example:
        >>> r = ToolReport("resize", ["a.safetensors"], modules=[ModuleError("unet.x", "lora", 8, 2, 4.0, 1.0),
        ...                                                      ModuleError("unet.y", "lora", 8, 8, 3.0, 0.0)])
        >>> r.overall_error, r.to_dict()["modules"][0]["relative_error"]
        (0.2, 0.25)
    """

    operation: str
    inputs: list[str]
    output: Path | None = None
    target_format: str = "neutral"
    modules: list[ModuleError] = field(default_factory=list)
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)  # what was asked: target rank, weights...
    warnings: list[str] = field(default_factory=list)

    @property
    def overall_error(self) -> float:
        """The relative Frobenius error over all modules together: sqrt(sum residual^2 / sum ||delta W||^2)."""
        total = math.fsum(m.delta_norm ** 2 for m in self.modules)
        return math.sqrt(math.fsum(m.residual_norm ** 2 for m in self.modules) / total) if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"operation": self.operation, "inputs": self.inputs, "output": None if self.output is None else str(self.output),
                "format": self.target_format, **self.settings, "seconds": round(self.seconds, 3),
                "modules_total": len(self.modules),
                "rank_before": sum(m.rank_before for m in self.modules), "rank_after": sum(m.rank_after for m in self.modules),
                "overall_relative_error": self.overall_error,
                "max_relative_error": max((m.relative_error for m in self.modules), default=0.0),
                "modules": [{"name": m.name, "kind": m.kind, "rank_before": m.rank_before, "rank_after": m.rank_after,
                             "relative_error": m.relative_error} for m in self.modules],
                "warnings": self.warnings}

    def render(self) -> str:
        """A table of the modules with the largest errors, then the totals."""
        worst = sorted(self.modules, key=lambda m: -m.relative_error)[:SHOWN]
        width = max((len(m.name) for m in worst), default=6)
        lines = [f"{'module':<{width}}  kind  rank before -> after  rel. error"]
        lines += [f"{m.name:<{width}}  {m.kind:<4}  {m.rank_before:>11} -> {m.rank_after:<5}  {m.relative_error:.3e}" for m in worst]
        if len(self.modules) > len(worst):
            lines.append(f"... {len(self.modules) - len(worst)} more module(s) with smaller errors (--json lists all)")
        data = self.to_dict()
        lines.append(f"{self.operation}: {len(self.modules)} module(s), total rank {data['rank_before']} -> {data['rank_after']}, "
                     f"overall relative error {self.overall_error:.3e}, max {data['max_relative_error']:.3e}, "
                     f"{self.seconds:.2f} s")
        if self.output is not None:
            lines.append(f"wrote {shown(self.output)} ({self.target_format})")
        return "\n".join(lines)
