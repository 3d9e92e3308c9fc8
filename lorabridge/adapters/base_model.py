"""Recognise an SDXL base model from its files alone, before any framework is loaded.

A wrong ``--base`` should fail in a second with one line, not after minutes of loading
weights: a diffusers directory is checked through ``model_index.json`` and the UNet
config, a single-file checkpoint through its safetensors header.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import LoraBridgeError

SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
# A tensor only SDXL-base single-file checkpoints (SGM naming) hold: the OpenCLIP bigG text encoder.
SDXL_SINGLE_FILE_KEY = "conditioner.embedders.1.model.positional_embedding"
SDXL_NATIVE = (128, 8)  # latent sample size, VAE scale factor of SDXL-base (1024 px)


@dataclass(frozen=True)
class BaseModel:
    """Where the base lives and the sizes that fix the latent shape."""

    path: Path
    single_file: bool
    sample_size: int  # the UNet's native latent size
    vae_scale_factor: int

    @property
    def native_size(self) -> int:
        return self.sample_size * self.vae_scale_factor

    def latent_shape(self, num_images: int, width: int, height: int) -> tuple[int, int, int, int]:
        return (num_images, 4, height // self.vae_scale_factor, width // self.vae_scale_factor)


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
        if kind not in SDXL_PIPELINES:
            raise LoraBridgeError(f"not an SDXL base model: model_index.json says {kind!r}", path)
        unet = _json(path / "unet" / "config.json")
        if unet.get("addition_embed_type") != "text_time":
            raise LoraBridgeError("not an SDXL base model: its UNet has no text_time conditioning", path)
        vae = _json(path / "vae" / "config.json")
        return BaseModel(path, False, int(unet.get("sample_size", SDXL_NATIVE[0])),
                         2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1))
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
