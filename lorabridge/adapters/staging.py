"""Load a pipeline in two halves that are never resident together: what encodes the prompt, then what denoises.

At real size SDXL's fp32 weights are 13.9 GB (UNet 10.3, text encoders 3.3, VAE 0.3): whole, a pipeline
fills a 16 GB machine before it runs. ``infer`` therefore loads the ``encoders`` part (text encoders and
tokenizers), encodes the prompt, frees it, then loads the ``denoising`` part (denoiser and VAE). Both
halves come from the pipeline class's own ``from_pretrained`` with the other half's components given as
None, which diffusers and mindone.diffusers both accept; the pipeline's own ``__call__`` then runs each
half (:mod:`.pipeline`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from typing import Any, TypeGuard

from ..architectures.architecture import Inference

PARTS = ("all", "encoders", "denoising")


def left_out(inference: Inference, part: str) -> dict[str, Any]:
    """The components ``part`` loads without, as ``from_pretrained`` keyword arguments (None: not loaded).

    Example:
        >>> from lorabridge.architectures.sdxl import SDXL
        >>> left_out(SDXL.inference, "encoders")
        {'unet': None, 'vae': None}
    """
    if part not in PARTS:
        raise ValueError(f"part {part!r} is not one of {PARTS}")
    if part == "encoders":
        return {inference.denoiser: None, "vae": None}
    if part == "denoising":
        return {name: None for name in inference.text_encoders}
    return {}


class StandIn:
    """The denoiser while only the encoders are loaded: its ``model`` built without weights (its modules' shapes,
    against which the whole LoRA is checked before anything loads) and its ``config``, all that SDXL's and
    Flux.1's ``__call__`` (both frameworks) read of it until ``encode_prompt`` returns (``time_cond_proj_dim``...).
    Not a module of the framework, so the pipeline's device moves and LoRA loaders pass it by."""

    def __init__(self, model: Any):
        self.model = model
        self.config = model.config


def stand_in(pipe: Any, name: str, model: Any) -> None:
    """Give ``pipe`` a :class:`StandIn` for ``name`` holding ``model`` (built without weights), past the pipeline's
    ``__setattr__`` (which would record it in the pipeline's config as a component)."""
    object.__setattr__(pipe, name, StandIn(model))


def is_stand_in(model: Any) -> TypeGuard[StandIn]:
    return isinstance(model, StandIn)


def give_back_memory() -> None:
    """Collect what was just dropped (pipelines hold reference cycles) and hand glibc's freed heap back to the system.

    glibc keeps freed heap memory for reuse: after the encoders' half is freed, MindSpore's process stayed 3.2 GB
    larger than what it used (measured at real size: 4.5 GB resident, 1.3 GB after ``malloc_trim``), and the
    denoiser's half did not reuse all of it. No-op where the C library has no ``malloc_trim`` (macOS, musl).
    """
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc_name), "malloc_trim", None) if libc_name else None
    if trim is not None:
        trim(0)
