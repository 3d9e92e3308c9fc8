"""The PyTorch backend: diffusers' pipeline of the base's architecture (StableDiffusionXLPipeline, FluxPipeline)
from a directory, or SDXL's from a single file.

Example:
    >>> pipe, fw = load_pipeline(describe_base("tiny-sdxl"), "fp32", "cpu")   # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from ..errors import LoraBridgeError
from .base_model import BaseModel, describe_base
from .options import FRAMEWORK_DTYPES
from .pipeline import denoiser

EXTRA = "torch"
REQUIRED = ("torch", "diffusers", "transformers", "peft")
DEVICES = ("cuda", "cpu", "mps")


class TorchFramework:
    """Module walking, tensors and generators for diffusers (see :class:`~.pipeline.Framework`)."""

    name = "torch"

    def __init__(self, device: str):
        import diffusers

        self.device = device
        self.schedulers = diffusers

    def modules(self, model: Any) -> Iterator[tuple[str, Any]]:
        return model.named_modules()

    def weight_shape(self, module: Any) -> tuple[int, ...] | None:
        import torch

        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim not in (2, 4):
            return None
        return tuple(weight.shape)

    def latents(self, array: np.ndarray, pipe: Any) -> Any:
        import torch

        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, denoiser(pipe).dtype)

    def generator(self, seed: int) -> Any:
        import torch

        return torch.Generator("cpu").manual_seed(seed)


def default_device() -> str:
    """The best device present: cuda, then mps, then cpu."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_device(name: str | None) -> str:
    """``name`` checked against what this machine has (``cuda:1`` style indices allowed), or the default."""
    import torch

    if name is None:
        return default_device()
    kind = name.split(":", 1)[0].lower()
    if kind not in DEVICES:
        raise LoraBridgeError(f"unknown torch device {name!r}; choose one of: {', '.join(DEVICES)}")
    present = {"cpu": True, "cuda": torch.cuda.is_available(),
               "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
    if not present[kind]:
        raise LoraBridgeError(f"torch device {name!r} is not available on this machine")
    return name.lower()


# Why half precision is not the CPU default: torch's CPU kernels run it far slower than fp32 on CPUs without
# native fp16/bf16 arithmetic (measured one thread, 320-channel 3x3 conv and 1024x1280x1280 matmul: fp16
# 22x, bf16 55x slower; bench/RESULTS-infer-realsize.md). It halves the weights' memory.
CPU_HALF_NOTE = "note: torch on CPU runs {dtype} far slower than fp32 (20-55x measured where the CPU has no native {dtype})"


def resolve_dtype(dtype: str, device: str) -> str:
    """``auto`` is fp16 on an accelerator, fp32 on CPU (half precision on CPU is slow: :data:`CPU_HALF_NOTE`)."""
    if dtype == "auto":
        return "fp32" if device == "cpu" else "fp16"
    return dtype


def dtype_note(dtype: str, device: str) -> str | None:
    """One line to log when ``dtype`` on ``device`` runs but slowly, else None."""
    return CPU_HALF_NOTE.format(dtype=dtype) if device == "cpu" and dtype in ("fp16", "bf16") else None


def load_pipeline(base: BaseModel | str, dtype: str = "fp32", device: str | None = None,
                  config: str | None = None) -> tuple[Any, TorchFramework]:
    """diffusers' pipeline of the base's architecture on ``device`` in ``dtype`` and its framework; a single file uses ``config``
    (a diffusers directory holding the component configs) when given, else diffusers' defaults."""
    import torch

    base = describe_base(base) if not isinstance(base, BaseModel) else base
    pipeline_class = base.architecture.pipeline_class("torch")
    device = resolve_device(device)

    torch_dtype = getattr(torch, FRAMEWORK_DTYPES[dtype])
    try:
        if base.single_file:
            pipe = pipeline_class.from_single_file(str(base.path), torch_dtype=torch_dtype,
                                                   config=str(config) if config else None)
        else:
            # use_safetensors: never fall back to a pickle describe_base did not list (and the user allow)
            pipe = pipeline_class.from_pretrained(str(base.path), torch_dtype=torch_dtype, local_files_only=True,
                                                  variant=base.variant, use_safetensors=not base.pickled)
    except (OSError, ValueError, KeyError) as exc:
        raise LoraBridgeError(f"diffusers cannot load this base model: {str(exc).splitlines()[0]}", base.path) from None
    return pipe.to(device), TorchFramework(device)
