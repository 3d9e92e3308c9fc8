"""``infer``: one neutral LoRA file, images from diffusers (torch) or mindone.diffusers (mindspore).

Everything that can be checked without a framework is checked first (backend installed,
base model, LoRA file, latents, output path), so bad input fails in a second with one
line. Images are written to a hidden directory beside the output and renamed into place
at the end: a failed run leaves no partial output directory.

Example:
    >>> infer(InferOptions("torch", Path("tiny-sdxl"), "a cat", lora=Path("lora.safetensors")))   # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Callable

from .. import __version__
from ..architectures import ARCHITECTURES
from ..converters import file_sha256
from ..errors import LoraBridgeError
from ..formats.neutral import read_neutral
from ..io.atomic import atomic_directory, check_output_path, replacing
from ..model import LoraModel
from .base_model import BaseModel, describe_base
from .latents import draw_latents, load_latents, pack_latents, save_latents
from .options import BACKEND_MODULES, BACKENDS, SCHEDULER_TABLES, InferOptions
from .pipeline import apply_lora, denoiser, encode_prompt, free_text_encoders, sample, set_scheduler
from .staging import give_back_memory, is_stand_in
from .png import write_png


@dataclass
class InferResult:
    images: list[Path]
    output_dir: Path
    backend: str
    device: str
    dtype: str
    applied: dict[str, int] = field(default_factory=dict)
    latents: Path | None = None
    seconds: float = 0.0


def load_backend(name: str) -> ModuleType:
    """The backend module, after checking its framework packages are installed (naming the extra if not)."""
    if name not in BACKENDS:
        raise LoraBridgeError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    module = importlib.import_module(BACKEND_MODULES[name])
    missing = [package for package in module.REQUIRED if importlib.util.find_spec(package) is None]
    if missing:
        raise LoraBridgeError(f"the {name} backend needs {', '.join(missing)}, not installed: "
                              f"pip install 'lorabridge[{module.EXTRA}]'")
    return module


def _read_lora(path: Path, base: BaseModel) -> LoraModel:
    """The neutral file, refused in one line when it is for another architecture than the base."""
    model = read_neutral(path, verify_hash=True)
    architecture = base.architecture
    if model.architecture != architecture.name:
        known = ARCHITECTURES.get(model.architecture)
        what = f"{known.a_label} LoRA ({known.name})" if known else f"a LoRA for {model.architecture!r}"
        raise LoraBridgeError(f"this is {what}; the base model is {architecture.a_label} pipeline ({architecture.name})", path)
    unloadable = [c for c in model.components if c not in base.inference.lora_components]
    if unloadable:
        raise LoraBridgeError(f"this LoRA adapts {', '.join(unloadable)}, which {architecture.a_label} pipeline's "
                              f"load_lora_weights does not load (it loads {', '.join(base.inference.lora_components)})", path)
    return model


def for_base(options: InferOptions, base: BaseModel) -> InferOptions:
    """``options`` with the base architecture's defaults filled in, after refusing what it cannot run."""
    inference, label = base.inference, base.architecture.a_label
    schedulers = SCHEDULER_TABLES[inference.schedulers]
    if options.scheduler not in schedulers:
        raise LoraBridgeError(f"--scheduler {options.scheduler} does not sample {label} base ({inference.schedulers} "
                              f"model); choose one of: {', '.join(schedulers)}")
    if options.negative_prompt is not None and not inference.negative_prompt:
        raise LoraBridgeError(f"{label} pipeline takes no negative prompt (its guidance is distilled into the model: "
                              "--guidance-scale); drop --negative-prompt")
    guidance = inference.guidance_scale if options.guidance_scale is None else options.guidance_scale
    return dataclasses.replace(options, guidance_scale=guidance)


def _check_output_dir(out: Path, force: bool) -> None:
    """Refuse an existing output unless ``force``; even then replace only a directory of images."""
    if not out.parent.is_dir():
        raise LoraBridgeError("output's parent directory does not exist", out.parent)
    if not out.exists():
        return
    if not force:
        raise LoraBridgeError("output exists; pass --force to replace it", out)
    if not out.is_dir() or any(not (p.is_file() and p.suffix == ".png") for p in out.iterdir()):
        raise LoraBridgeError("output exists and is not a directory of .png images; not replacing it", out)


def png_text(options: InferOptions, result: InferResult, lora_sha256: str | None, seed: int,
             size: tuple[int, int]) -> dict[str, str]:
    """The text chunks of one image: enough to reproduce it and to tell which run made it."""
    text = {
        "prompt": options.prompt,
        "negative_prompt": options.negative_prompt or "",
        "seed": str(seed),
        "steps": str(options.steps),
        "guidance_scale": f"{options.guidance_scale:g}",
        "scheduler": options.scheduler,
        "size": f"{size[0]}x{size[1]}",
        "init_latents": options.init_latents.name if options.init_latents else f"seed {options.seed}",
        "backend": result.backend,
        "device": result.device,
        "dtype": result.dtype,
        "base": options.base.name,
        "software": f"lorabridge {__version__}",
    }
    if options.lora is not None:
        text.update({"lora": options.lora.name, "lora_sha256": lora_sha256 or "", "lora_scale": f"{options.lora_scale:g}",
                     "lora_fused": str(options.fuse).lower()})
    return text


def infer(options: InferOptions, log: Callable[[str], None] = lambda line: None) -> InferResult:
    """Generate ``options.num_images`` images with ``options.backend`` and write them as PNGs; see the module doc."""
    started = time.perf_counter()
    options.check()
    backend = load_backend(options.backend)
    base: BaseModel = describe_base(options.base, options.config, options.variant, options.allow_pickle)
    options = for_base(options, base)
    lora = _read_lora(options.lora, base) if options.lora is not None else None
    out = options.output_dir
    _check_output_dir(out, options.force)
    if options.save_latents is not None:
        check_output_path(options.save_latents, options.force, inputs=(options.init_latents, options.lora))
    size = (options.width or base.native_size, options.height or base.native_size)
    base.check_size(*size)
    shape = base.latent_shape(options.num_images, *size)
    latents = load_latents(options.init_latents, shape) if options.init_latents else draw_latents(options.seed, shape)
    device = backend.resolve_device(options.device)
    dtype = backend.resolve_dtype(options.dtype, device)
    result = InferResult([], out, options.backend, device, dtype)
    log(f"{options.backend} on {device} ({dtype}): {base.path} {'(single file)' if base.single_file else ''}".rstrip())
    if base.variant is not None:
        log(f"loading the {base.variant} variant weights (the plain ones where a component has no {base.variant} files)")
    note = backend.dtype_note(dtype, device)
    if note:
        log(note)
    if not SCHEDULER_TABLES[base.inference.schedulers][options.scheduler][2]:
        log(f"note: {options.scheduler} adds fresh noise at every step from {options.backend}'s own generator, "
            "so the same seed gives different images on the two backends")

    images = _run(backend, base, options, lora, dtype, device, pack_latents(latents, base.inference.patch), size, result, log)

    lora_sha256 = file_sha256(options.lora) if options.lora is not None else None
    with atomic_directory(out, force=True) as tmp:  # _check_output_dir checked --force before sampling
        for i, pixels in enumerate(images):
            seed = options.seed + i
            name = f"{i:03d}-seed{seed}.png"
            write_png(tmp / name, pixels, png_text(options, result, lora_sha256, seed, size))
            result.images.append(out / name)
        if options.save_latents is not None:
            with replacing(options.force):  # without --force, a racing run's file is never replaced
                result.latents = save_latents(options.save_latents, latents)
    result.seconds = time.perf_counter() - started
    for path in result.images:
        log(f"wrote {path}")
    log(f"peak memory {peak_memory_gb():.1f} GB (resident, this process)")
    return result


def _run(backend: ModuleType, base: BaseModel, options: InferOptions, lora: LoraModel | None, dtype: str, device: str,
         latents, size: tuple[int, int], result: InferResult, log: Callable[[str], None]):
    """Encode the prompt, then denoise and decode, with the pipeline loaded in halves never resident together
    (:mod:`.staging`; a single file loads whole): each half takes its part of the LoRA."""
    pipe, fw = backend.load_pipeline(base, dtype, device, options.config, part="encoders")
    whole = not is_stand_in(denoiser(pipe))
    if lora is not None:
        result.applied.update(apply_lora(pipe, fw, lora, options.lora, options.lora_scale, options.fuse, log))
    encoded = encode_prompt(pipe, fw, options, latents, size)
    free_text_encoders(pipe, log)
    if not whole:
        del pipe
        give_back_memory()  # the rest of the encoders' half, before the larger half loads
        pipe, fw = backend.load_pipeline(base, dtype, device, options.config, part="denoising")
        if lora is not None:
            result.applied.update(apply_lora(pipe, fw, lora, options.lora, options.lora_scale, options.fuse, log,
                                             components=(base.inference.denoiser,)))
    set_scheduler(pipe, fw, options.scheduler)
    return sample(pipe, fw, options, latents, size, free_memory=True, log=log, encoded=encoded)


def peak_memory_gb() -> float:
    """The most resident memory this process has held so far (``ru_maxrss``), in GB (10^9 bytes).

    Example:
        >>> peak_memory_gb() > 0
        True
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * (1 if sys.platform == "darwin" else 1024) / 1e9  # bytes on macOS, KiB on Linux
