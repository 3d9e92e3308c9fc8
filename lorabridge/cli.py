"""The command line: parses arguments and calls library functions, nothing more.

Heavy imports (numpy math, torch, mindspore) happen inside the commands, so
``lorabridge --help`` stays fast. Expected failures (:class:`LoraBridgeError`)
print one line ``path: problem`` and exit 1; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import gc
import json
import math
import sys

import click

from . import __version__
from .adapters.options import BACKENDS, DTYPES, SCHEDULER_NAMES
from .errors import LoraBridgeError, shown, single_line


class LoraBridgeGroup(click.Group):
    """A group that turns expected errors into one line on stderr and a non-zero exit."""

    def invoke(self, ctx: click.Context):
        try:
            from .io.input_file import held_inputs  # (inside: Ctrl-C during its imports is Ctrl-C too)

            with held_inputs():  # no input can be truncated under a command reading it (see io/input_file.py)
                return super().invoke(ctx)
        except LoraBridgeError as exc:
            if ctx.params.get("debug"):
                raise
            click.echo(f"error: {exc.one_line()}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:  # after its cleanup (temporaries removed, a batch's report published)
            # The shell's code for Ctrl-C (128 + SIGINT), as SIGTERM's is 143, not click's 1 ("Aborted!"), which a
            # script could not tell from "some files failed".
            click.echo("error: interrupted (Ctrl-C)", err=True)
            sys.exit(130)


@click.group(cls=LoraBridgeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lorabridge")
@click.option("--debug", is_flag=True, help="Show tracebacks for expected errors too.")
def cli(debug: bool) -> None:
    """lorabridge: one LoRA file for MindSpore/MindONE and PyTorch/diffusers (SDXL, Flux.1)."""


class FiniteFloat(click.ParamType):
    """A float that is a number: ``nan``/``inf``, which Python's float() accepts, are usage errors."""

    name = "float"

    def convert(self, value, param, ctx) -> float:
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


# One --force for every command that writes: each refuses to replace an existing output without it.
_force = click.option("--force", is_flag=True, help="Replace an existing output instead of refusing.")


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


@cli.command()
@click.option("--reader", required=True, metavar="'CMD {file}'",
              help="Command that reads one file and prints the spec 8 verdict JSON; {file} is replaced by each vector's path.")
@click.option("--vectors", type=click.Path(file_okay=False), default=None,
              help="Directory with index.json and the vectors [default: spec/vectors of this checkout].")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
              help="Seconds the reader may take per vector.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def conformance(reader: str, vectors: str | None, timeout: float, as_json: bool) -> None:
    """Run another implementation's reader over every conformance vector and report agreement (exit 0 if all agree).

    Example: lorabridge conformance --reader 'python tests/independent_reader.py {file}'
    """
    from .conformance import conformance_report, render_conformance, run_conformance

    report = conformance_report(run_conformance(reader, vectors=vectors, timeout=timeout))
    _print(report, as_json, render_conformance)
    sys.exit(0 if report["agree"] == report["vectors"] else 1)


def _tiny_architectures() -> dict:
    """--arch name -> architecture record, for the records that have a tiny pipeline builder."""
    from .architectures import architectures

    return {a.short: a for a in architectures() if a.tiny is not None}


class RegistryChoice(click.Choice):
    """A choice among names the architecture registry gives, asked only when the option is used or shown
    (importing the registry would slow every command's start)."""

    def __init__(self, names):
        self._names = names
        super().__init__(())

    @property
    def choices(self):
        return tuple(sorted(self._names()))

    @choices.setter
    def choices(self, value) -> None:  # click.Choice.__init__ assigns it; the registry decides
        pass


@cli.command("make-tiny")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--arch", "arch", type=RegistryChoice(_tiny_architectures), default="sdxl", show_default=True,
              help="Architecture: sdxl (SDXL-base's names) or flux (Flux.1-dev's).")
@click.option("--seed", default=0, show_default=True, help="Weights are a pure function of the seed.")
@click.option("--make-lora", "lora", type=click.Path(dir_okay=False), default=None,
              help="Also write a random non-zero LoRA for it: .safetensors as a neutral file; for sdxl also .ckpt, "
                   "as MindONE's SDXL trainer saves it.")
@_force
def make_tiny(out: str, arch: str, seed: int, lora: str | None, force: bool) -> None:
    """Build a tiny random-weight pipeline (diffusers layout) in OUT, offline and reproducibly.

    The architecture's block names and depths at small widths, so its LoRAs' module names fit;
    loads in diffusers and mindone.diffusers.

    Example: lorabridge make-tiny --arch flux tiny-flux --make-lora tiny-flux-lora.safetensors
    """
    architecture = _tiny_architectures()[arch]
    builder = architecture.tiny_builder()
    if lora:
        builder.lora_file_format(lora)
    path = builder.build_tiny(out, seed=seed, force=force)
    click.echo(f"tiny {architecture.label} pipeline: {shown(path)}")
    if lora:
        click.echo(f"LoRA: {shown(builder.write_tiny_lora(path, lora, seed=seed, force=force))}")


def _real_architectures() -> dict:
    """--arch name -> architecture record, for the records that know their reference model's real sizes."""
    from .architectures import architectures

    return {a.short: a for a in architectures() if a.real is not None}


@cli.command("make-base")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--arch", "arch", type=RegistryChoice(_real_architectures), default="sdxl", show_default=True,
              help="Architecture: sdxl (SDXL-base 1.0, 7 GB) or flux (Flux.1-dev, 34 GB).")
@click.option("--seed", default=0, show_default=True, help="Weights are a pure function of the seed.")
@click.option("--make-lora", "lora", type=click.Path(dir_okay=False), default=None,
              help="Also write a random non-zero LoRA for it, as make-tiny does.")
@_force
def make_base(out: str, arch: str, seed: int, lora: str | None, force: bool) -> None:
    """Build a real-size random-weight pipeline (every dimension of the reference model; diffusers layout, fp16) in OUT.

    For benchmarks and memory checks without a download: written tensor by tensor (memory holds one
    tensor, not the model), offline and reproducibly; loads in diffusers and mindone.diffusers.

    Example: lorabridge make-base --arch sdxl sdxl-base --make-lora sdxl-lora.safetensors
    """
    from .architectures.real_base import build_base

    architecture = _real_architectures()[arch]
    builder = architecture.tiny_builder()
    if lora:
        builder.lora_file_format(lora)
    path = build_base(architecture, out, seed=seed, force=force, log=lambda line: click.echo(line, err=True))
    click.echo(f"real-size {architecture.label} pipeline (random weights): {shown(path)}")
    if lora:
        click.echo(f"LoRA: {shown(builder.write_tiny_lora(path, lora, seed=seed, force=force))}")


def _base_check(base: str | None):
    """``--base``'s check (:func:`lorabridge.toolbox.check.base_fit`), or None without one: the toolbox
    (its base index, every format's layer tables) is imported only then, not on every conversion's path."""
    if base is None:
        return None
    from .toolbox.check import base_fit

    return base_fit(base)


def _report(result) -> None:
    """Print a conversion's summary, then its warnings on stderr."""
    from .converters.mindspore import render_summary

    click.echo(render_summary(result))
    for warning in result.warnings:
        click.echo(f"warning: {single_line(warning)}", err=True)


_verify_hash = click.option("--verify-hash", is_flag=True,
                            help="Check a neutral input's tensor_sha256 before converting (one extra pass over the data).")


@cli.command("ms2neutral")
@click.argument("src", metavar="IN", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Neutral file to write [default: IN with .safetensors, beside it].")
@click.option("--alpha", type=FiniteFloat(), default=None,
              help="LoRA alpha for every module. MindONE files carry no alpha: the default is alpha = rank "
                   "(MindONE's default), recorded in the manifest as 'assumed'; a value given here is recorded "
                   "as 'user'. Files that store alpha (kohya port) keep theirs.")
@click.option("--skip-unknown", is_flag=True, help="Drop LoRA tensors that name no SDXL module (with a warning) instead of failing.")
@_force
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
@_verify_hash
@_force
def neutral2ms_command(src: str, output: str | None, naming: str, container: str, crc: bool, fold_alpha: bool,
                       verify_hash: bool, force: bool) -> None:
    """Convert a neutral LoRA file (IN) to a MindONE SDXL LoRA for MindSpore.

    Example: lorabridge neutral2ms lora.safetensors -o lora_ms.ckpt --crc
    """
    from .converters.mindspore import neutral2ms

    _report(neutral2ms(src, output, naming=naming, container=container, crc=crc, fold_alpha=fold_alpha,
                       verify_hash=verify_hash, force=force))


_PT_WRITE_FORMATS = ["diffusers", "peft", "kohya", "comfyui", "legacy-diffusers", "lycoris"]
_strict = click.option("--strict", is_flag=True, help="Refuse tensors holding NaN/Inf instead of warning.")
_skip_unknown = click.option("--skip-unknown", is_flag=True,
                             help="Drop modules/keys that match no SDXL layer (with a warning) instead of failing.")
_dtype = click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
                      help="Cast the tensors [default: keep the input's dtype].")
_base = click.option("--base", type=click.Path(), default=None,
                     help="Refuse a LoRA that does not fit this base model (as `check --base` checks it) before writing.")
_bake = click.option("--bake-to-lora", type=click.IntRange(min=1), default=None, metavar="RANK",
                     help="Turn LoHa/LoKr modules into plain LoRA of this rank (truncated SVD; the error is reported).")
_factor_names = click.option("--factor-names", type=click.Choice(["lora_up", "lora_A"]), default=None,
                             help="comfyui: spell the pair lora_up/lora_down [default] or lora_A/lora_B (both load in ComfyUI).")


def _neutral_reader_writer_options(command):
    """The options shared by commands that read any input and write a PyTorch-world file (neutral2pt, convert)."""
    for option in (_force, _verify_hash, _strict, _factor_names, _bake, _dtype):  # applied bottom-up
        command = option(command)
    return command


@cli.command("pt2neutral")
@click.argument("src", metavar="IN", type=click.Path())
@click.option("-o", "--output", type=click.Path(), default=None,
              help="Neutral file to write [default: IN's stem + _neutral.safetensors, beside it].")
@click.option("--alpha", type=FiniteFloat(), default=None,
              help="Alpha for modules whose file stores none (recorded as 'user'); without it alpha = rank "
                   "(recorded as 'assumed'). Alphas the file stores (lora_adapter_metadata, .alpha) are kept.")
@click.option("--from", "from_format", default=None, metavar="FORMAT",
              help="Input format instead of auto-detection: diffusers, peft, legacy-diffusers, kohya...")
@_skip_unknown
@_strict
@_base
@_force
def pt2neutral_command(src: str, output: str | None, alpha: float | None, from_format: str | None,
                       skip_unknown: bool, strict: bool, base: str | None, force: bool) -> None:
    """Convert a PyTorch-world SDXL LoRA (IN) to a neutral .safetensors file.

    IN may be a diffusers/PEFT .safetensors, a PEFT adapter directory (or one with unet/,
    text_encoder/, text_encoder_2/ adapters), an old diffusers attention-processor file such as
    the *_pt.ckpt of MindONE's convert_lora_ms2pt.py, or a kohya/A1111/ComfyUI or LyCORIS file. Torch pickles (.bin/.pt/.ckpt)
    are read only with torch.load(weights_only=True): a pickle that could run code is refused.

    Example: lorabridge pt2neutral pytorch_lora_weights.safetensors -o lora.safetensors
    """
    from .converters.torch import pt2neutral

    _report(pt2neutral(src, output, from_format=from_format, alpha=alpha, skip_unknown=skip_unknown,
                       strict=strict, force=force, check=_base_check(base)))


@cli.command("neutral2pt")
@click.argument("src", metavar="IN", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(), default=None,
              help="File (directory for peft) to write [default: IN's stem + _<format>, beside it].")
@click.option("--format", "format_name", type=click.Choice(_PT_WRITE_FORMATS), default="diffusers", show_default=True,
              help="diffusers: load_lora_weights; peft: PeftModel adapter directories; kohya: ComfyUI/A1111; "
                   "comfyui: ComfyUI's generic diffusion_model./text_encoders. names; "
                   "legacy-diffusers: old attention processors (.ckpt/.bin output = torch pickle, as MindONE's convert_lora_ms2pt.py writes); "
                   "lycoris: lycoris-lora (LoHa/LoKr/full kept, lycoris_ prefix kept).")
@_neutral_reader_writer_options
@_base
def neutral2pt_command(src: str, output: str | None, format_name: str, dtype: str | None, bake_to_lora: int | None,
                       factor_names: str | None, strict: bool, verify_hash: bool, force: bool, base: str | None) -> None:
    """Convert a neutral LoRA file (IN) to a PyTorch-world format.

    Example: lorabridge neutral2pt lora.safetensors --format kohya -o lora_comfyui.safetensors
    """
    from .converters.torch import neutral2pt

    _report(neutral2pt(src, output, format=format_name, dtype=dtype, bake_to_lora=bake_to_lora,
                       factor_names=factor_names, strict=strict, verify_hash=verify_hash, force=force,
                       check=_base_check(base)))


@cli.command("convert")
@click.argument("src", metavar="IN", type=click.Path())
@click.option("-o", "--output", type=click.Path(), required=True, help="File (directory for peft) to write.")
@click.option("--to", "to_format", required=True, metavar="FORMAT",
              help="Output format: neutral, diffusers, peft, kohya, comfyui, legacy-diffusers, mindone-sgm... "
                   "(an unknown name lists all).")
@click.option("--from", "from_format", default=None, metavar="FORMAT", help="Input format instead of auto-detection.")
@click.option("--alpha", type=FiniteFloat(), default=None, help="Alpha for modules whose input stores none (see pt2neutral).")
@_skip_unknown
@_neutral_reader_writer_options
def convert_command(src: str, output: str, to_format: str, from_format: str | None, alpha: float | None,
                    dtype: str | None, bake_to_lora: int | None, factor_names: str | None, skip_unknown: bool,
                    strict: bool, verify_hash: bool, force: bool) -> None:
    """Convert IN from any supported format to any other, through the neutral model.

    Example: lorabridge convert lora_kohya.safetensors --to peft -o lora_peft
    """
    from .converters.torch import convert_any

    _report(convert_any(src, output, to=to_format, from_format=from_format, alpha=alpha, dtype=dtype,
                        bake_to_lora=bake_to_lora, factor_names=factor_names, skip_unknown=skip_unknown, strict=strict,
                        verify_hash=verify_hash, force=force))


@cli.command("batch")
@click.argument("sources", metavar="SRC...", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Directory to write into; the source tree is mirrored under it.")
@click.option("--to", "to_format", required=True, metavar="FORMAT", help="Output format, as for convert.")
@click.option("--from", "from_format", default=None, metavar="FORMAT", help="Input format instead of auto-detection.")
@click.option("--alpha", type=FiniteFloat(), default=None, help="Alpha for modules whose input stores none (see pt2neutral).")
@click.option("--jobs", type=click.IntRange(min=1), default=None, help="Worker processes [default: the CPUs this process may run on].")
@click.option("--dask", "dask_address", default=None, metavar="tcp://HOST:PORT",
              help="Run each file as a task on this Dask scheduler (pip install 'lorabridge[cluster]'); "
                   "every worker must see SRC and OUT_DIR at the same paths.")
@click.option("--report", type=click.Path(dir_okay=False), default=None,
              help="JSON Lines report, one line per file [default: OUT_DIR/lorabridge-report.jsonl].")
@click.option("--keep-going/--fail-fast", default=True, show_default=True,
              help="After a file fails, go on with the others, or start no new file (those not started are "
                   "reported as not converted). Either way the exit code is 1 if any file failed.")
@click.option("--rehash", is_flag=True, default=False,
              help="Hash every source to tell whether its output is up to date, even one whose inode, size and "
                   "modification and change times are those recorded when it was last hashed.")
@_force
@_skip_unknown
@_strict
@_verify_hash
@_factor_names
@_bake
@_dtype
def batch_command(sources: tuple[str, ...], out_dir: str, to_format: str, from_format: str | None,
                  alpha: float | None, jobs: int | None, dask_address: str | None, report: str | None,
                  keep_going: bool, rehash: bool, force: bool, **options) -> None:
    """Convert every LoRA in SRC... (files, directories walked recursively, globs) to FORMAT under OUT_DIR.

    Each file converts as `convert` would convert it, in parallel worker processes, with one progress
    bar, a summary and a per-file JSON Lines report. A rerun resumes: outputs whose recorded source
    sha256 and settings match are skipped (a source is hashed again only if its inode, size or times
    changed, or with --rehash), failed and changed files are redone; --force converts every
    file again, replacing outputs. Exit 0 only if every file converted or was up to date. A command of its own, not `convert` with several inputs: a
    directory is both one input (a PEFT adapter) and a library, and -o names a file there, a tree here.

    Example: lorabridge batch loras/ --to neutral -o converted --jobs 4
    """
    if dask_address is None:  # this machine's workers: their server's start runs beside the imports below
        from .batch.workers import start_server

        start_server()
    from .batch import run_batch

    result = run_batch(sources, out_dir, to_format, from_format=from_format, jobs=jobs, dask=dask_address,
                       report=report, fail_fast=not keep_going, force=force, rehash=rehash, alpha=alpha, **options)
    click.echo(result.render())
    sys.exit(0 if result.ok else 1)


@cli.command("infer")
@click.option("--backend", required=True, type=click.Choice(BACKENDS),
              help="The framework: torch runs diffusers, mindspore runs mindone.diffusers.")
@click.option("--base", required=True, type=click.Path(),
              help="SDXL or Flux.1 base: a diffusers directory (its model_index.json names the architecture), "
                   "or (torch, SDXL) a single-file .safetensors.")
@click.option("--lora", type=click.Path(), default=None, help="Neutral LoRA file (.safetensors); omit for the base model alone.")
@click.option("--prompt", required=True)
@click.option("--negative-prompt", default=None, help="SDXL only: Flux.1 takes none (its guidance is distilled).")
@click.option("--steps", type=int, default=30, show_default=True)
@click.option("--guidance-scale", type=float, default=None,
              help="Classifier-free guidance (SDXL, default 5); Flux.1: the distilled guidance its transformer embeds "
                   "(default 3.5).")
@click.option("--width", type=int, default=None, help="Image width [default: the base's native size].")
@click.option("--height", type=int, default=None, help="Image height [default: the base's native size].")
@click.option("--seed", type=int, default=0, show_default=True, help="Initial noise (numpy, same on both backends); image i uses seed+i.")
@click.option("--num-images", type=int, default=1, show_default=True)
@click.option("--lora-scale", type=float, default=1.0, show_default=True, help="Multiplier on the LoRA's alpha/rank.")
@click.option("--fuse/--no-fuse", default=False, show_default=True, help="Merge the LoRA into the base weights before sampling.")
@click.option("--scheduler", type=click.Choice(list(SCHEDULER_NAMES)), default="euler", show_default=True,
              help="euler on SDXL's config is the DDPM discretization that MindONE's SDXL LoRA consistency check "
                   "(convert_lora_ms2pt.py, infer_lora.py) used; on Flux.1 it is flow-matching Euler "
                   "(FlowMatchEulerDiscreteScheduler), the only one Flux.1 takes.")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True,
              help="auto: fp32 on CPU, fp16 on accelerators.")
@click.option("--device", default=None, help="torch: cuda, cpu, mps; mindspore: Ascend, CPU [default: the best present].")
@click.option("--init-latents", type=click.Path(), default=None, help="Start from this .npy noise (num images, latent channels: SDXL 4, Flux.1 16, H/8, W/8).")
@click.option("--save-latents", type=click.Path(), default=None, help="Save the initial noise to this .npy file.")
@click.option("--config", type=click.Path(), default=None, help="torch single-file base: diffusers directory with the component configs.")
@click.option("--variant", default=None, help="Load the base's weight files of this variant (fp16: *.fp16.safetensors) "
                                          "[default: the one the file names show].")
@click.option("--allow-pickle", is_flag=True, help="torch: load base weights only a pickle (.bin) holds, with "
                                                   "torch.load(weights_only=True); mindone.diffusers reads safetensors only.")
@click.option("-o", "--output", type=click.Path(), default=None, help="Image directory [default: <lora file>-gen-images].")
@_force
def infer_command(backend: str, base: str, lora: str | None, output: str | None, config: str | None,
                  init_latents: str | None, save_latents: str | None, **options) -> None:
    """Generate images from an SDXL or Flux.1 base plus one neutral LoRA file, with diffusers or mindone.diffusers.

    Example: lorabridge infer --backend mindspore --base sdxl --lora lora.safetensors --prompt "a cat"
    """
    from pathlib import Path

    from .adapters.infer import infer
    from .adapters.options import InferOptions

    def path(value: str | None) -> Path | None:
        return None if value is None else Path(value)

    request = InferOptions(backend=backend, base=Path(base), lora=path(lora), output=path(output), config=path(config),
                           init_latents=path(init_latents), save_latents=path(save_latents), **options)
    result = infer(request, log=lambda line: click.echo(line, err=True))
    click.echo("\n".join(shown(p) for p in result.images))


@cli.command("compare")
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path())
@click.option("-o", "--output", type=click.Path(), default=None,
              help="Side-by-side image A | B | heat map (a directory when comparing directories).")
@click.option("--max-mae", type=float, default=5.0, show_default=True, help="Fail (exit 1) when any pair's MAE is above this.")
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as JSON.")
@_force
def compare_command(a: str, b: str, output: str | None, max_mae: float, as_json: bool, force: bool) -> None:
    """Compare images A and B (or two directories, pairing files by name): MAE (0..255), max error, PSNR.

    Example: lorabridge compare torch-images mindspore-images -o diff
    """
    from .compare import compare_paths, render_comparison

    report = compare_paths(a, b, output=output, max_mae=max_mae, force=force)
    _print(report, as_json, render_comparison)
    sys.exit(0 if report["passed"] else 1)


_to = click.option("--to", "to_format", default="neutral", show_default=True, metavar="FORMAT",
                   help="Output format, as for convert: neutral, diffusers, peft, kohya, lycoris, mindone-sgm...")
_report_json = click.option("--json", "as_json", is_flag=True, help="Print the report (every module's error) as JSON.")


def _tool_report(report, as_json: bool) -> None:
    """Print a toolbox command's report (a table, or JSON), then its warnings on stderr."""
    _print(report.to_dict(), as_json, lambda _: report.render())
    for warning in report.warnings:
        click.echo(f"warning: {single_line(warning)}", err=True)


@cli.command("resize")
@click.argument("src", metavar="IN", type=click.Path())
@click.option("-o", "--output", type=click.Path(), required=True, help="File (directory for peft) to write.")
@click.option("--rank", type=int, default=None, help="Keep this rank per module (never more than a module holds).")
@click.option("--max-error", type=FiniteFloat(), default=None,
              help="Keep the lowest rank per module whose relative Frobenius error is at most this (0..1).")
@click.option("--energy", type=FiniteFloat(), default=None,
              help="Keep the lowest rank per module holding this share (0..1] of the squared singular values.")
@_to
@_report_json
@_force
def resize_command(src: str, output: str, rank: int | None, max_error: float | None, energy: float | None,
                   to_format: str, as_json: bool, force: bool) -> None:
    """Resize a LoRA (IN, any supported format): per-module truncated SVD, error reported, alpha = new rank.

    Example: lorabridge resize lora_r128.safetensors --rank 32 -o lora_r32.safetensors
    """
    from .toolbox.resize import resize_file
    from .toolbox.svd import RankTarget

    _tool_report(resize_file(src, output, RankTarget(rank, max_error, energy), to=to_format, force=force), as_json)


def _weights(ctx, param, value: str) -> list[float]:
    try:
        weights = [float(w) for w in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers") from None
    if not all(math.isfinite(w) for w in weights):
        raise click.BadParameter(f"{value!r}: every weight must be a finite number")
    return weights


@cli.command("merge")
@click.argument("srcs", metavar="A B [C ...]", nargs=-1, required=True, type=click.Path())
@click.option("--weights", required=True, callback=_weights, metavar="WA,WB,...",
              help="One weight per input, comma-separated; negative weights subtract.")
@click.option("--rank", type=int, default=None,
              help="Resize every merged module to this rank (truncated SVD, error reported) [default: exact, ranks add up].")
@click.option("-o", "--output", type=click.Path(), required=True, help="File (directory for peft) to write.")
@_to
@_report_json
@_force
def merge_command(srcs: tuple[str, ...], weights: list[float], rank: int | None, output: str, to_format: str,
                  as_json: bool, force: bool) -> None:
    """Merge LoRAs (A B ..., any supported formats) into one whose delta W is the weighted sum of theirs.

    Memory: the inputs and the whole merged LoRA are held until it is written, about twice the inputs'
    total size for an exact merge.

    Example: lorabridge merge style.safetensors subject.safetensors --weights 0.8,1 -o both.safetensors
    """
    from .toolbox.merge import merge_files

    if len(srcs) < 2:
        raise LoraBridgeError("merge needs at least two inputs")
    _tool_report(merge_files(list(srcs), output, weights, rank=rank, to=to_format, force=force), as_json)


@cli.command("check")
@click.argument("lora", type=click.Path())
@click.option("--base", type=click.Path(), default=None,
              help="Base model (diffusers directory, single-file checkpoint or MindONE .ckpt): every module is checked "
                   "against its layer names and shapes, read from its headers only.")
@click.option("--target", "targets", default=None, metavar="T1,T2",
              help="Loaders to check for [default: all]: diffusers, peft, comfyui, a1111, kohya, mindone-sgm, mindone-diffusers.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def check_command(lora: str, base: str | None, targets: str | None, as_json: bool) -> None:
    """Will LORA load in each target, and do what it says? Exit 1 when it will not load (or does not fit --base).

    Example: lorabridge check lora.safetensors --base sdxl-base --target diffusers,comfyui
    """
    from .toolbox.check import TARGETS, check_lora, render_check

    chosen = tuple(t.strip() for t in targets.split(",") if t.strip()) if targets else tuple(TARGETS)
    report = check_lora(lora, base=base, targets=chosen)
    _print(report, as_json, render_check)
    sys.exit(0 if report["loads"] else 1)


@cli.command("fuse")
@click.argument("lora", type=click.Path())
@click.option("--base", required=True, type=click.Path(), help="Base model: diffusers directory, single-file checkpoint or MindONE .ckpt.")
@click.option("-o", "--output", required=True, type=click.Path(), help="The fused model, in the base's layout.")
@click.option("--scale", type=FiniteFloat(), default=1.0, show_default=True, help="Multiplier on the LoRA's delta W.")
@_force
def fuse_command(lora: str, base: str, output: str, scale: float, force: bool) -> None:
    """Write the base with LORA merged into its weights (W + scale * delta W), streamed tensor by tensor, dtype kept.

    Example: lorabridge fuse lora.safetensors --base sdxl-base -o sdxl-fused
    """
    from .toolbox.fuse import fuse

    result = fuse(lora, base, output, scale=scale, force=force)
    click.echo(f"fused {result.fused_modules} module(s) into {result.fused_tensors} tensor(s) "
               f"({result.copied_files} file(s) copied as they were): {shown(result.output)}")


@cli.command("extract")
@click.option("--base", required=True, type=click.Path(), help="The model before tuning (diffusers directory, single file or MindONE .ckpt).")
@click.option("--tuned", required=True, type=click.Path(), help="The tuned model, in any of the same layouts.")
@click.option("--rank", required=True, type=click.IntRange(min=1), help="Rank of each module (at most what the difference has).")
@click.option("--min-diff", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Skip layers whose difference is at most this everywhere (0: only unchanged layers).")
@click.option("--conv", is_flag=True, help="Extract Conv2d layers too (default: Linear layers only).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Neutral LoRA file to write.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_force
def extract_command(base: str, tuned: str, rank: int, min_diff: float, conv: bool, output: str, as_json: bool,
                    force: bool) -> None:
    """Extract a LoRA approximating TUNED - BASE (truncated SVD per layer, streamed), reporting each module's error.

    Example: lorabridge extract --base sdxl-base --tuned sdxl-tuned --rank 32 -o extracted.safetensors
    """
    from .toolbox.extract import extract

    summary = extract(base, tuned, output, rank=rank, min_diff=min_diff, conv=conv, force=force).summary()
    _print(summary, as_json, lambda s: (
        f"{s['modules']} module(s) extracted, {s['skipped_unchanged']} unchanged layer(s) skipped; relative error "
        f"mean {s['mean_relative_error']:.3g}, max {s['max_relative_error']:.3g}: {shown(s['output'])}"))


def main() -> None:
    """Console-script entry point: runs one command, after which the process exits. SIGTERM or SIGHUP stop it
    as Ctrl-C does, leaving no temporary behind (:mod:`lorabridge.stopping`), with the shell's exit code."""
    from .stopping import Stopped, stop_on_signals

    stop_on_signals()
    try:
        cli(prog_name="lorabridge")
    except Stopped as stop:
        click.echo(f"error: stopped by {stop.signal_name}", err=True)
        raise
    finally:
        # Outputs are published and synced by now. Frozen objects are left out of the collector's last pass
        # at exit, which would otherwise walk everything the command built: ~55 ms after a 1,796-tensor
        # conversion, a fifth of an `inspect`.
        gc.freeze()


if __name__ == "__main__":  # python -m lorabridge.cli
    main()
