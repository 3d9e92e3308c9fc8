"""The PyTorch backend: diffusers' pipeline of the base's architecture (StableDiffusionXLPipeline, FluxPipeline)
from a directory, or SDXL's from a single file.

Example:
    >>> pipe, fw = load_pipeline(describe_base("tiny-sdxl"), "fp32", "cpu")   # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from ..errors import LoraBridgeError
from .base_model import BaseModel, component_class, describe_base
from .options import FRAMEWORK_DTYPES
from .pipeline import denoiser
from .staging import left_out, stand_in
from .weights import check_complete, files_to_stream, kept_in_fp32, named_arrays

EXTRA = "torch"
REQUIRED = ("torch", "diffusers", "transformers", "peft", "accelerate")
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


def empty_model(base: BaseModel, component: str) -> Any:
    """``component``'s diffusers model built from its config without weights (accelerate's ``init_empty_weights``,
    as diffusers' own low-memory loading does): no memory, the parameters on the ``meta`` device."""
    import diffusers
    from accelerate import init_empty_weights

    model_class = getattr(diffusers, component_class(base, component))
    with init_empty_weights():
        return model_class.from_config(model_class.load_config(str(base.path / component)))


def streamed_model(base: BaseModel, component: str, torch_dtype: Any) -> Any | None:
    """``component`` filled one tensor at a time (:mod:`.weights`) into :func:`empty_model`: resident, the model
    plus one tensor. None where the component has no safetensors files to stream (its loader then reads it)."""
    import torch
    from accelerate.utils import set_module_tensor_to_device

    files = files_to_stream(base, component)
    if files is None:
        return None
    model = empty_model(base, component)
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    for name, array in named_arrays(model, files, shapes):
        value = torch.from_numpy(array)
        if value.is_floating_point():
            value = value.to(torch.float32 if kept_in_fp32(model, name) else torch_dtype)
        set_module_tensor_to_device(model, name, "cpu", value=value, dtype=value.dtype)  # else: the meta tensor's dtype
    missing = [name for name, tensor in model.state_dict().items() if tensor.is_meta]
    check_complete(base, component, missing)
    return model.eval()


def load_pipeline(base: BaseModel | str, dtype: str = "fp32", device: str | None = None,
                  config: str | None = None, part: str = "all") -> tuple[Any, TorchFramework]:
    """diffusers' pipeline of the base's architecture on ``device`` in ``dtype`` and its framework; a single file uses ``config``
    (a diffusers directory holding the component configs) when given, else diffusers' defaults.

    ``part`` (:data:`~.staging.PARTS`) loads a base directory in halves never resident together: ``encoders``
    or ``denoising`` (the denoiser streamed: :func:`streamed_model`). A single file always loads whole.
    """
    import torch

    base = describe_base(base) if not isinstance(base, BaseModel) else base
    pipeline_class = base.architecture.pipeline_class("torch")
    device = resolve_device(device)

    torch_dtype = getattr(torch, FRAMEWORK_DTYPES[dtype])
    denoiser_name = base.inference.denoiser
    try:
        if base.single_file:
            pipe = pipeline_class.from_single_file(str(base.path), torch_dtype=torch_dtype,
                                                   config=str(config) if config else None)
        else:
            given = left_out(base.inference, part)
            if part == "denoising" and (streamed := streamed_model(base, denoiser_name, torch_dtype)) is not None:
                given[denoiser_name] = streamed
            # use_safetensors: never fall back to a pickle describe_base did not list (and the user allow)
            pipe = pipeline_class.from_pretrained(str(base.path), torch_dtype=torch_dtype, local_files_only=True,
                                                  variant=base.variant, use_safetensors=not base.pickled, **given)
    except (OSError, ValueError, KeyError) as exc:
        raise LoraBridgeError(f"diffusers cannot load this base model: {str(exc).splitlines()[0]}", base.path) from None
    pipe = pipe.to(device)
    if part == "encoders" and not base.single_file:
        stand_in(pipe, denoiser_name, empty_model(base, denoiser_name))
    return pipe, TorchFramework(device)
