"""The MindSpore backend: mindone.diffusers' pipeline of the base's architecture (StableDiffusionXLPipeline,
FluxPipeline), the same neutral file, no conversion.

The neutral file carries PEFT keys and a prefixed ``lora_adapter_metadata``, which
mindone.diffusers' ``load_lora_weights`` reads exactly as diffusers does. On Ascend
MindSpore's own kernels run; elsewhere :mod:`.ms_cpu_ops` first reroutes the few ``mint``
ops that have no CPU kernel.

Example:
    >>> pipe, fw = load_pipeline("tiny-sdxl", device="CPU", dtype="fp32")   # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import LoraBridgeError
from .base_model import BaseModel, component_class, describe_base
from .noise import printed_to_stderr
from .options import FRAMEWORK_DTYPES
from .pipeline import denoiser
from .staging import left_out, stand_in
from .weights import check_complete, files_to_stream, kept_in_fp32, named_arrays

EXTRA = "mindspore"
REQUIRED = ("mindspore", "mindone")
DEVICES = ("Ascend", "CPU")


class MindSporeFramework:
    """Module walking, tensors and generators for mindone.diffusers (see :class:`~.pipeline.Framework`)."""

    name = "mindspore"

    def __init__(self):
        import mindone.diffusers

        self.schedulers = mindone.diffusers

    def modules(self, model: Any) -> Iterator[tuple[str, Any]]:
        return model.cells_and_names()

    def weight_shape(self, module: Any) -> tuple[int, ...] | None:
        from mindspore import Parameter

        weight = getattr(module, "weight", None)
        if not isinstance(weight, Parameter) or len(weight.shape) not in (2, 4):
            return None
        return tuple(weight.shape)

    def latents(self, array: np.ndarray, pipe: Any) -> Any:
        import mindspore as ms

        return ms.Tensor(np.ascontiguousarray(array)).to(denoiser(pipe).dtype)

    def generator(self, seed: int) -> Any:
        return np.random.Generator(np.random.PCG64(seed))


def ascend_present() -> bool:
    """Whether this MindSpore build has a usable Ascend (NPU) plugin."""
    from mindspore._c_expression import MSContext

    return bool(MSContext.get_instance().is_pkg_support_device("Ascend"))


def resolve_device(name: str | None) -> str:
    """``Ascend`` or ``CPU`` (any case), checked against this machine; default Ascend when present."""
    if name is None:
        return "Ascend" if ascend_present() else "CPU"
    canonical = {d.lower(): d for d in DEVICES}.get(name.lower())
    if canonical is None:
        raise LoraBridgeError(f"unknown mindspore device {name!r}; choose one of: {', '.join(DEVICES)}")
    if canonical == "Ascend" and not ascend_present():
        raise LoraBridgeError("mindspore device 'Ascend' is not available on this machine (no Ascend plugin)")
    return canonical


def resolve_dtype(dtype: str, device: str) -> str:
    """``auto`` is fp16 on Ascend, fp32 on CPU; bf16 is refused on CPU, where MindSpore has no bf16 Conv2D kernel
    (bench/RESULTS-ms-conv.md)."""
    if dtype == "auto":
        return "fp16" if device == "Ascend" else "fp32"
    if dtype == "bf16" and device == "CPU":
        raise LoraBridgeError("--dtype bf16 does not run on MindSpore's CPU backend (it has no bf16 Conv2D kernel); "
                              "use --dtype fp16 or fp32")
    return dtype


def dtype_note(dtype: str, device: str) -> str | None:
    """Nothing to note: what MindSpore cannot run, :func:`resolve_dtype` refuses (the torch backend notes slow dtypes)."""
    return None


def setup(device: str) -> list[str]:
    """Select ``device`` in PyNative mode; off Ascend, reroute the ops that lack CPU kernels (returned)."""
    import mindspore as ms

    ms.set_device(device)
    if device == "Ascend":
        ms.set_context(mode=ms.PYNATIVE_MODE)
        return []
    # Asynchronous op launch makes the CPU backend ~20x slower on SDXL's many small ops.
    ms.set_context(mode=ms.PYNATIVE_MODE, pynative_synchronize=True)
    from . import ms_cpu_ops

    return ms_cpu_ops.apply()


# A one-line conversion with diffusers (torch) to a safetensors pipeline directory mindone.diffusers loads.
_CONVERT = "python -c \"from diffusers import {cls}; {cls}.{load}('{src}').save_pretrained('{dst}')\""


def single_file_refusal(path: Path) -> str:
    """Why a single-file checkpoint does not load here, and the command that converts it to a directory that does.

    mindone.diffusers 0.5's ``from_single_file`` fails on SDXL's text encoders (it reads
    ``position_embedding.weight``, which MindSpore's ``Embedding`` calls ``embedding_table``).
    """
    convert = _CONVERT.format(cls="StableDiffusionXLPipeline", load="from_single_file", src=path,
                              dst=path.with_suffix(""))
    return (f"the mindspore backend needs a diffusers pipeline directory, not a single file (mindone.diffusers' "
            f"from_single_file cannot load SDXL's text encoders); convert it once with diffusers: {convert}")


def empty_model(base: BaseModel, component: str) -> Any:
    """``component``'s mindone.diffusers model built from its config with its parameters' initialisation deferred
    (MindSpore's ``no_init_parameters``, as mindone's own ``from_pretrained`` does): no memory for weights yet."""
    import mindone.diffusers
    from mindspore.nn.utils import no_init_parameters

    model_class = getattr(mindone.diffusers, component_class(base, component))
    with no_init_parameters():
        return model_class.from_config(model_class.load_config(str(base.path / component)))


def streamed_model(base: BaseModel, component: str, ms_dtype: Any) -> Any | None:
    """``component`` filled one tensor at a time (:mod:`.weights`) into :func:`empty_model`: resident, the model
    plus one tensor. None where the component has no safetensors files to stream (its loader then reads it).

    Names go from diffusers' to MindSpore's as mindone's loader maps them (``_get_pt2ms_mappings``: norms'
    ``weight`` is ``gamma``, embeddings' ``embedding_table``...).
    """
    import mindspore as ms
    from mindone.diffusers.models.modeling_utils import _get_pt2ms_mappings

    files = files_to_stream(base, component)
    if files is None:
        return None
    model = empty_model(base, component)
    params = dict(model.parameters_and_names())
    mappings = _get_pt2ms_mappings(model)
    to_ms = {name: mappings.get(name, (name, None)) for name in set(params) | set(mappings)}
    numpy_dtypes = {ms.float32: np.float32, ms.float16: np.float16}
    loaded = set()
    for name, array in named_arrays(model, files, {name: None for name in to_ms}):
        ms_name, convert = to_ms[name]
        if ms_name is None:  # a tensor MindSpore's layer does not keep (BatchNorm's num_batches_tracked)
            continue
        dtype = ms.float32 if kept_in_fp32(model, name) else ms_dtype
        if array.dtype.kind == "f" and dtype in numpy_dtypes:
            # cast by numpy: a MindSpore cast's output comes from its memory pool, which keeps the memory once the
            # model is freed (measured: the real-size UNet's 10 GB stayed resident through the VAE decode)
            array = array.astype(numpy_dtypes[dtype], copy=False)
        value = ms.Parameter(ms.Tensor(array), name=ms_name)
        value = convert(value) if convert is not None else value
        param = params[ms_name]
        if tuple(value.shape) != tuple(param.shape):
            raise LoraBridgeError(f"{component} weight {name!r} is {'x'.join(map(str, value.shape))}, "
                                  f"{type(model).__name__} expects {'x'.join(map(str, param.shape))}", files[0])
        if value.is_floating_point() and value.dtype != dtype:
            value = value.astype(dtype)
        param.set_data(value)
        loaded.add(ms_name)
    check_complete(base, component, sorted(set(params) - loaded))
    model.set_train(False)
    return model


def load_pipeline(base: BaseModel | str, dtype: str = "fp32", device: str | None = None,
                  config: str | None = None, part: str = "all") -> tuple[Any, MindSporeFramework]:
    """mindone.diffusers' pipeline of the base's architecture from a diffusers directory (after :func:`setup`) and its framework.

    ``part`` (:data:`~.staging.PARTS`) loads it in halves never resident together: ``encoders`` or ``denoising``
    (the denoiser streamed: :func:`streamed_model`). ``config`` exists for the torch backend's single-file
    loading and is not used here.
    """
    base = describe_base(base) if not isinstance(base, BaseModel) else base
    if base.single_file:
        raise LoraBridgeError(single_file_refusal(base.path), base.path)
    if base.pickled:
        raise LoraBridgeError(f"mindone.diffusers reads safetensors only and {base.pickled[0].relative_to(base.path)} is a "
                              "torch pickle; convert the base once with diffusers: "
                              f"{_CONVERT.format(cls='DiffusionPipeline', load='from_pretrained', src=base.path, dst=f'{base.path}-safetensors')}",
                              base.pickled[0])
    import mindspore as ms

    setup(resolve_device(device))
    with printed_to_stderr():  # mindone prints import-time notices; stdout is for results
        pipeline_class = base.architecture.pipeline_class("mindspore")

    ms_dtype = getattr(ms, FRAMEWORK_DTYPES[dtype])
    denoiser_name = base.inference.denoiser
    try:
        given = left_out(base.inference, part)
        if part == "denoising" and (streamed := streamed_model(base, denoiser_name, ms_dtype)) is not None:
            given[denoiser_name] = streamed
        # use_safetensors: never mindone's "Defaulting to unsafe serialization" look for a pickle
        pipe = pipeline_class.from_pretrained(str(base.path), mindspore_dtype=ms_dtype, variant=base.variant,
                                              use_safetensors=True, **given)
    except (OSError, ValueError, KeyError) as exc:
        raise LoraBridgeError(f"mindone.diffusers cannot load this base model: {str(exc).splitlines()[0]}", base.path) from None
    if part == "encoders":
        stand_in(pipe, denoiser_name, empty_model(base, denoiser_name))
    return pipe, MindSporeFramework()
