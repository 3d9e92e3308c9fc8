"""Recognise a base model and its architecture from its files alone, before any framework is loaded.

A wrong ``--base`` should fail in a second with one line, not after minutes of loading
weights: a diffusers directory is checked through ``model_index.json`` (its ``_class_name`` names
the architecture: :attr:`Architecture.inference`) and the denoiser's config, a single-file (SDXL)
checkpoint through its safetensors header. The weight files' names tell which variant (``fp16``, ``bf16``:
diffusers' ``save_pretrained(variant=...)``, what ``variant="fp16"`` downloads give) to load, and which
components would be unpickled (``.bin``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..architectures import architectures
from ..architectures.architecture import Architecture, Inference
from ..architectures.sdxl import SDXL
from ..errors import LoraBridgeError

# A tensor only SDXL-base single-file checkpoints (SGM naming) hold: the OpenCLIP bigG text encoder.
SDXL_SINGLE_FILE_KEY = "conditioner.embedders.1.model.positional_embedding"
SDXL_NATIVE = (128, 8)  # latent sample size, VAE scale factor of SDXL-base (1024 px)
# A tensor of every Flux.1 single-file checkpoint (BFL naming, alone or under ComfyUI's model.diffusion_model.).
FLUX_SINGLE_FILE_KEY = "double_blocks.0.img_attn.qkv.weight"
FLUX_SINGLE_FILE_ERROR = ("a Flux.1 single-file checkpoint (the transformer alone, BFL names) is not a base infer loads; "
                          "make a diffusers FluxPipeline directory: copy one and replace its transformer with diffusers' "
                          "FluxTransformer2DModel.from_single_file(FILE, config=FLUX_DIR, subfolder='transformer')"
                          ".save_pretrained(COPY + '/transformer')")

# A component's weight file as diffusers and transformers name it: stem, variant ("model.fp16.safetensors"),
# shard ("...fp16-00001-of-00002.safetensors", or the legacy "...-00001-of-00002.fp16.safetensors"), format.
WEIGHT_FILE = re.compile(r"(?:diffusion_pytorch_model|model|pytorch_model)(?:\.(?P<variant>\w+))?(?:-\d{5}-of-\d{5})?"
                         r"(?:\.(?P<legacy>\w+))?\.(?P<format>safetensors|bin)")
PICKLE_FORMATS = {"bin"}  # torch.load files; safetensors are plain data


@dataclass(frozen=True)
class BaseModel:
    """Where the base lives and the sizes that fix the latent shape."""

    path: Path
    single_file: bool
    sample_size: int  # the denoiser's native latent size
    vae_scale_factor: int
    architecture: Architecture = SDXL
    latent_channels: int = 4
    variant: str | None = None  # the weight files' variant to load (None: the plain ones)
    pickled: tuple[Path, ...] = ()  # weight files only a pickle holds (loaded only when the user allows it)

    @property
    def inference(self) -> Inference:
        assert self.architecture.inference is not None  # describe_base finds only architectures that have one
        return self.architecture.inference

    @property
    def native_size(self) -> int:
        return self.sample_size * self.vae_scale_factor

    def latent_shape(self, num_images: int, width: int, height: int) -> tuple[int, int, int, int]:
        """The initial noise's shape, unpacked: (images, latent channels, height / VAE scale, width / VAE scale)."""
        return (num_images, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def check_size(self, width: int, height: int) -> None:
        """Refuse an image side the latents cannot tile: a multiple of the VAE scale times the patch side."""
        step = self.vae_scale_factor * self.inference.patch
        for name, value in (("width", width), ("height", height)):
            if value % step:
                raise LoraBridgeError(f"--{name} must be a multiple of {step} for {self.architecture.a_label} base "
                                      f"(VAE scale {self.vae_scale_factor} x {self.inference.patch}x{self.inference.patch} "
                                      f"patches), got {value}")


def pipeline_architecture(class_name: str) -> Architecture | None:
    """The architecture whose ``infer`` pipeline is ``class_name`` (``model_index.json``'s ``_class_name``), or None.

    Example:
        >>> pipeline_architecture("FluxPipeline").label
        'Flux.1'
    """
    for architecture in architectures():
        if architecture.inference is not None and class_name in architecture.inference.pipeline_classes:
            return architecture
    return None


def component_class(base: BaseModel, component: str) -> str:
    """The class ``model_index.json`` names for ``component`` (``UNet2DConditionModel``), looked up in diffusers or
    mindone.diffusers by the backend."""
    entry = _json(base.path / "model_index.json").get(component)
    if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str)):
        raise LoraBridgeError(f"model_index.json names no class for {component!r}", base.path)
    return entry[1]


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise LoraBridgeError(f"unreadable config ({exc})", path) from None
    if not isinstance(data, dict):
        raise LoraBridgeError("config is not a JSON object", path)
    return data


Weights = dict[str, dict[str | None, list[Path]]]  # component -> variant (None: plain) -> its weight files


def weight_files(path: Path, index: dict) -> Weights:
    """The weight files of each component of a pipeline directory that has any, by variant.

    Example:
        >>> WEIGHT_FILE.fullmatch("diffusion_pytorch_model.fp16-00001-of-00002.safetensors")["variant"]
        'fp16'
    """
    weights: Weights = {}
    for component in sorted(index):
        folder = path / component
        if component.startswith("_") or not folder.is_dir():
            continue
        for file in sorted(folder.iterdir()):
            match = WEIGHT_FILE.fullmatch(file.name)
            if match:
                weights.setdefault(component, {}).setdefault(match["variant"] or match["legacy"], []).append(file)
    return weights


def _variants(by_variant: dict) -> str:
    return ", ".join(v or "plain" for v in sorted(by_variant, key=lambda v: v or ""))


def choose_variant(weights: Weights, requested: str | None, path: Path) -> str | None:
    """The variant to load: ``requested`` if every component has it or plain files, else the one variant the
    components without plain files share (diffusers loads one variant per pipeline, plain files where it is absent).

    Refuses, in one line, a variant no component has, and components whose variants are ambiguous or mixed.

    Example:
        >>> choose_variant({"unet": {"fp16": []}, "vae": {None: [], "fp16": []}}, None, Path("sdxl"))
        'fp16'
    """
    if requested is not None:
        if not any(requested in by for by in weights.values()):
            raise LoraBridgeError(f"no component has {requested} weights (found: "
                                  f"{'; '.join(f'{c} {_variants(by)}' for c, by in weights.items())})", path)
        for component, by in weights.items():
            if requested not in by and None not in by:
                raise LoraBridgeError(f"{component} has no {requested} weights nor plain ones (it has {_variants(by)})", path)
        return requested
    needy = {c: sorted(v for v in by if v is not None) for c, by in weights.items() if None not in by}
    for component, variants in needy.items():
        if len(variants) > 1:
            raise LoraBridgeError(f"{component} holds {' and '.join(variants)} weights and no plain ones: "
                                  "choose one with --variant", path)
    found = sorted({variants[0] for variants in needy.values()})
    if len(found) > 1:
        raise LoraBridgeError("components hold different variants (" + ", ".join(f"{c} {v[0]}" for c, v in needy.items())
                              + "); diffusers loads one variant per pipeline", path)
    return found[0] if found else None


def pickled_files(weights: Weights, variant: str | None) -> tuple[Path, ...]:
    """The files the loaders would unpickle: a component's files of ``variant`` (else plain) with no safetensors."""
    pickled: list[Path] = []
    for by in weights.values():
        files = by[variant] if variant in by else by.get(None, [])
        formats = [match["format"] if (match := WEIGHT_FILE.fullmatch(f.name)) else None for f in files]
        if files and all(fmt in PICKLE_FORMATS for fmt in formats):
            pickled += files
    return tuple(pickled)


def describe_base(path: str | os.PathLike, config: str | os.PathLike | None = None, variant: str | None = None,
                  allow_pickle: bool = False) -> BaseModel:
    """Check that ``path`` is an SDXL diffusers directory or single-file ``.safetensors`` and describe it.

    A single file's sizes are SDXL-base's, or those of ``config`` (the diffusers directory whose
    component configs it is loaded with). In a directory, the weights' variant is ``variant`` or the one
    their names show (:func:`choose_variant`); weights only a pickle holds are refused unless ``allow_pickle``.

    Example:
        >>> describe_base("tiny-sdxl").native_size   # doctest: +SKIP
        64
    """
    path = Path(path)
    if not path.exists():
        raise LoraBridgeError("base model not found", path)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise LoraBridgeError("not a diffusers pipeline directory (no model_index.json)", path)
        model_index = _json(index)
        kind = model_index.get("_class_name")
        architecture = pipeline_architecture(str(kind))
        if architecture is None or architecture.inference is None:
            labels = [a.a_label for a in architectures() if a.inference is not None]
            raise LoraBridgeError(f"not {labels[0]} base model{''.join(f' nor {x} one' for x in labels[1:])}: "
                                  f"model_index.json says {kind!r}", path)
        inference = architecture.inference
        denoiser = _json(path / inference.denoiser / "config.json")
        for key, value in inference.required.items():
            if denoiser.get(key) != value:
                raise LoraBridgeError(f"not {architecture.a_label} base model: its {inference.denoiser} config has "
                                      f"{key} {denoiser.get(key)!r}, not {value!r}", path)
        vae = _json(path / "vae" / "config.json")
        scale = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
        sample_size = inference.native_size // scale if inference.native_size else int(denoiser.get("sample_size", SDXL_NATIVE[0]))
        weights = weight_files(path, model_index)
        chosen = choose_variant(weights, variant, path)
        pickled = pickled_files(weights, chosen)
        if pickled and not allow_pickle:
            raise LoraBridgeError(f"{pickled[0].relative_to(path)} is a pickle (.bin){f' (and {len(pickled) - 1} more)' if len(pickled) > 1 else ''}"
                                  "; lorabridge loads base weights from safetensors only unless you pass --allow-pickle "
                                  "(torch then reads it with torch.load(weights_only=True))", pickled[0])
        return BaseModel(path, False, sample_size, scale, architecture, int(vae.get("latent_channels", 4)), chosen, pickled)
    if variant is not None:
        raise LoraBridgeError("--variant selects weight files in a diffusers directory; this base is a single file", path)
    if path.suffix != ".safetensors":
        raise LoraBridgeError("a single-file base must be .safetensors (pickled checkpoints are never loaded)", path)
    from ..io.safetensors_file import SafetensorsFile

    checkpoint = SafetensorsFile(path)
    if any(key.endswith(FLUX_SINGLE_FILE_KEY) for key in checkpoint.keys()):
        raise LoraBridgeError(FLUX_SINGLE_FILE_ERROR, path)
    if SDXL_SINGLE_FILE_KEY not in checkpoint:
        raise LoraBridgeError(f"not an SDXL base checkpoint (no {SDXL_SINGLE_FILE_KEY})", path)
    if config is None:
        return BaseModel(path, True, *SDXL_NATIVE)
    if not Path(config).is_dir():
        raise LoraBridgeError("--config must be a diffusers SDXL pipeline directory", config)
    sizes = describe_base(config)
    return BaseModel(path, True, sizes.sample_size, sizes.vae_scale_factor)
