"""The command line: parses arguments and calls library functions, nothing more.

Heavy imports (numpy math, torch, mindspore) happen inside the commands, so
``lorabridge --help`` stays fast. Expected failures (:class:`LoraBridgeError`)
print one line ``path: problem`` and exit 1; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import json
import sys

import click

from . import __version__
from .errors import LoraBridgeError


class LoraBridgeGroup(click.Group):
    """A group that turns expected errors into one line on stderr and a non-zero exit."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LoraBridgeError as exc:
            if ctx.params.get("debug"):
                raise
            click.echo(f"error: {exc.one_line()}", err=True)
            sys.exit(1)


@click.group(cls=LoraBridgeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lorabridge")
@click.option("--debug", is_flag=True, help="Show tracebacks for expected errors too.")
def cli(debug: bool) -> None:
    """lorabridge: one LoRA file for MindSpore/MindONE and PyTorch/diffusers (SDXL)."""


def _print(data, as_json: bool, render) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False) if as_json else render(data))


@cli.command()
@click.argument("file", type=click.Path(dir_okay=True))
@click.option("--json", "as_json", is_flag=True, help="Print the verdict and problems as JSON.")
def validate(file: str, as_json: bool) -> None:
    """Check FILE against the neutral LoRA spec: schema, tensors vs manifest, shapes, ranks, hash.

    Every problem is listed with its JSON path or tensor name. Exit 0 when valid, 1 otherwise.
    """
    from .report import validation_report, render_validation

    report = validation_report(file)
    _print(report, as_json, render_validation)
    sys.exit(0 if report["valid"] else 1)


@cli.command()
@click.argument("file", type=click.Path(dir_okay=True))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect(file: str, as_json: bool) -> None:
    """Summarize a neutral LoRA FILE: architecture, components, modules, rank/alpha, dtypes, size, provenance."""
    from .report import inspection_report, render_inspection

    _print(inspection_report(file), as_json, render_inspection)


@cli.command("make-tiny-sdxl")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True, help="Weights are a pure function of the seed.")
@click.option("--make-lora", "lora", type=click.Path(dir_okay=False), default=None,
              help="Also write a random non-zero LoRA for it (neutral .safetensors) to this file.")
@click.option("--force", is_flag=True, help="Replace an existing OUT.")
def make_tiny_sdxl(out: str, seed: int, lora: str | None, force: bool) -> None:
    """Build a tiny random-weight SDXL pipeline (diffusers layout) in OUT, offline and reproducibly.

    Same block names and transformer depths as SDXL-base at small widths; loads in diffusers and mindone.diffusers.
    """
    from .tiny_sdxl import build_tiny_sdxl, write_tiny_lora

    path = build_tiny_sdxl(out, seed=seed, force=force)
    click.echo(f"tiny SDXL pipeline: {path}")
    if lora:
        click.echo(f"LoRA: {write_tiny_lora(path, lora, seed=seed, force=force)}")


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="lorabridge")
