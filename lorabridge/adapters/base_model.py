"""Recognise a base model and its architecture from its files alone, before any framework is loaded.

A wrong ``--base`` should fail in a second with one line, not after minutes of loading
weights: a diffusers directory is checked through ``model_index.json`` (its ``_class_name`` names
the architecture: :attr:`Architecture.inference`) and the denoiser's config, a single-file (SDXL)
checkpoint through its safetensors header.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..architectures import architectures
from ..architectures.architecture import Architecture, Inference
from ..architectures.sdxl import SDXL
from ..errors import LoraBridgeError

# A tensor only SDXL-base single-file checkpoints (SGM naming) hold: the OpenCLIP bigG text encoder.
SDXL_SINGLE_FILE_KEY = "conditioner.embedders.1.model.positional_embedding"
SDXL_NATIVE = (128, 8)  # latent sample size, VAE scale factor of SDXL-base (1024 px)


@dataclass(frozen=True)
class BaseModel:
    """Where the base lives and the sizes that fix the latent shape."""

    path: Path
    single_file: bool
    sample_size: int  # the denoiser's native latent size
    vae_scale_factor: int
    architecture: Architecture = SDXL
    latent_channels: int = 4

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


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise LoraBridgeError(f"unreadable config ({exc})", path) from None
    if not isinstance(data, dict):
        raise LoraBridgeError("config is not a JSON object", path)
    return data


def describe_base(path: str | os.PathLike, config: str | os.PathLike | None = None) -> BaseModel:
    """Check that ``path`` is an SDXL diffusers directory or single-file ``.safetensors`` and describe it.

    A single file's sizes are SDXL-base's, or those of ``config`` (the diffusers directory whose
    component configs it is loaded with).

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
        kind = _json(index).get("_class_name")
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
        return BaseModel(path, False, sample_size, scale, architecture, int(vae.get("latent_channels", 4)))
    if path.suffix != ".safetensors":
        raise LoraBridgeError("a single-file base must be .safetensors (pickled checkpoints are never loaded)", path)
    from ..io.safetensors_file import SafetensorsFile

    if SDXL_SINGLE_FILE_KEY not in SafetensorsFile(path):
        raise LoraBridgeError(f"not an SDXL base checkpoint (no {SDXL_SINGLE_FILE_KEY})", path)
    if config is None:
        return BaseModel(path, True, *SDXL_NATIVE)
    if not Path(config).is_dir():
        raise LoraBridgeError("--config must be a diffusers SDXL pipeline directory", config)
    sizes = describe_base(config)
    return BaseModel(path, True, sizes.sample_size, sizes.vae_scale_factor)
