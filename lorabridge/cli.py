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


def _report(result) -> None:
    """Print a conversion's summary, then its warnings on stderr."""
    from .converters.mindspore import render_summary

    click.echo(render_summary(result))
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)


@cli.command("ms2neutral")
@click.argument("src", metavar="IN", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Neutral file to write [default: IN with .safetensors, beside it].")
@click.option("--alpha", type=float, default=None,
              help="LoRA alpha for every module. MindONE files carry no alpha: the default is alpha = rank "
                   "(MindONE's default), recorded in the manifest as 'assumed'; a value given here is recorded "
                   "as 'user'. Files that store alpha (kohya port) keep theirs.")
@click.option("--skip-unknown", is_flag=True, help="Drop LoRA tensors that name no SDXL module (with a warning) instead of failing.")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
def ms2neutral_command(src: str, output: str | None, alpha: float | None, skip_unknown: bool, force: bool) -> None:
    """Convert a MindONE SDXL LoRA (IN: .ckpt or MindSpore safetensors) to a neutral .safetensors file.

    The MindONE naming (SDXL trainer's SGM names, mindone.diffusers PEFT names, or the kohya port's
    lora_unet_ names) is detected; tensors are paired by name and checked against SDXL's shapes.

    Example: lorabridge ms2neutral sdxl_lora.ckpt -o sdxl_lora.safetensors
    """
    from .converters.mindspore import ms2neutral

    _report(ms2neutral(src, output, alpha=alpha, skip_unknown=skip_unknown, force=force))


@cli.command("neutral2ms")
@click.argument("src", metavar="IN", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="MindONE file to write [default: IN with .ckpt (or _ms.safetensors), beside it].")
@click.option("--naming", type=click.Choice(["mindone-sgm", "mindone-diffusers", "mindone-kohya"]), default="mindone-sgm",
              show_default=True, help="Key names: MindONE's SDXL trainer (SGM), mindone.diffusers (PEFT) or the kohya port.")
@click.option("--format", "container", type=click.Choice(["ckpt", "safetensors"]), default="ckpt", show_default=True,
              help="MindSpore container: protobuf .ckpt or MindSpore safetensors.")
@click.option("--crc", is_flag=True, help="Add MindSpore's CRC checksum (checked by load_checkpoint(crc_check=True)).")
@click.option("--fold-alpha/--no-fold-alpha", default=True, show_default=True,
              help="Where the file cannot store alpha and a module's alpha != rank, scale lora_B by alpha/rank so "
                   "MindONE's default alpha = rank gives the same delta W.")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
def neutral2ms_command(src: str, output: str | None, naming: str, container: str, crc: bool, fold_alpha: bool,
                       force: bool) -> None:
    """Convert a neutral LoRA file (IN) to a MindONE SDXL LoRA for MindSpore.

    Example: lorabridge neutral2ms lora.safetensors -o lora_ms.ckpt --crc
    """
    from .converters.mindspore import neutral2ms

    _report(neutral2ms(src, output, naming=naming, container=container, crc=crc, fold_alpha=fold_alpha, force=force))


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="lorabridge")
