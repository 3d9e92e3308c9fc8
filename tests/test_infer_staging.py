"""``infer`` loads the pipeline in halves never resident together, the denoiser streamed tensor by tensor
(issue 16, item 3: fp32 real-size SDXL under 14 GB; bench/RESULTS-infer-realsize.md has the real-size figures).

- :mod:`lorabridge.adapters.staging`: the encoders (the denoiser a weightless stand-in), then denoiser and VAE;
- :mod:`lorabridge.adapters.weights`: one tensor at a time from the memory-mapped files into a model built
  without weights, by each framework's own names; what the files lack, add or misshape is refused.

The streamed models are compared with what each library's own ``from_pretrained`` loads, the staged run's
images with those of the whole pipeline.
"""

from __future__ import annotations

import shutil
import tracemalloc

import numpy as np
import pytest

from lorabridge.adapters.base_model import describe_base
from lorabridge.adapters.latents import draw_latents
from lorabridge.adapters.options import InferOptions
from lorabridge.adapters.weights import files_to_stream, streamed_arrays
from lorabridge.errors import LoraBridgeError
from lorabridge.io.safetensors_file import read_safetensors, write_safetensors
from lorabridge.tensor import Tensor
from tests.fixtures.sdxl import TINY_PROMPT

DENOISER_CLASSES = {"sdxl": "UNet2DConditionModel", "flux": "FluxTransformer2DModel"}


@pytest.fixture
def bases(tiny_sdxl_dir, tiny_flux_dir):
    return {"sdxl": tiny_sdxl_dir, "flux": tiny_flux_dir}


@pytest.mark.torch
@pytest.mark.parametrize("arch", ["sdxl", "flux"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_streamed_denoiser_is_what_diffusers_from_pretrained_loads(arch, dtype, bases):
    import diffusers
    import torch

    from lorabridge.adapters.torch_backend import streamed_model

    base = describe_base(bases[arch])
    name = base.inference.denoiser
    streamed = streamed_model(base, name, getattr(torch, dtype))
    loaded = getattr(diffusers, DENOISER_CLASSES[arch]).from_pretrained(str(base.path / name), torch_dtype=getattr(torch, dtype))
    ours, theirs = streamed.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and len(ours) > 500
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours)
    assert not streamed.training


@pytest.mark.mindspore
@pytest.mark.slow
def test_streamed_denoiser_is_what_mindone_from_pretrained_loads(bases, mindspore_run):
    result = mindspore_run('''
        import json, sys
        import numpy as np
        import mindspore as ms
        from lorabridge.adapters.base_model import describe_base
        from lorabridge.adapters.mindspore_backend import setup, streamed_model
        setup("CPU")
        import mindone.diffusers
        report = {}
        for arch, path, cls in zip(("sdxl", "flux"), sys.argv[1:3], sys.argv[3:5]):
            base = describe_base(path)
            name = base.inference.denoiser
            ours = dict(streamed_model(base, name, ms.float32).parameters_and_names())
            theirs = dict(getattr(mindone.diffusers, cls).from_pretrained(f"{path}/{name}", mindspore_dtype=ms.float32)
                          .parameters_and_names())
            report[arch] = {"same_names": sorted(ours) == sorted(theirs), "count": len(ours),
                            "equal": all(np.array_equal(ours[k].asnumpy(), theirs[k].asnumpy()) for k in ours)}
        print(json.dumps(report))
    ''', bases["sdxl"], bases["flux"], DENOISER_CLASSES["sdxl"], DENOISER_CLASSES["flux"])
    for arch in ("sdxl", "flux"):
        assert result[arch]["same_names"] and result[arch]["equal"] and result[arch]["count"] > 500, result


def _edited_unet(tiny_sdxl_dir, tmp_path, edit) -> object:
    """A copy of the tiny SDXL whose UNet weight file went through ``edit(tensors) -> tensors``."""
    copy = tmp_path / "edited"
    shutil.copytree(tiny_sdxl_dir, copy)
    file = copy / "unet" / "diffusion_pytorch_model.safetensors"
    tensors, metadata = read_safetensors(file)
    tensors = edit({k: Tensor(t.dtype, t.shape, bytes(t.data)) for k, t in tensors.items()})
    file.unlink()
    write_safetensors(file, tensors, metadata)
    return describe_base(copy)


@pytest.mark.torch
@pytest.mark.parametrize("edit, message", [
    (lambda t: {k: v for k, v in t.items() if k != "conv_in.weight"},
     r"^.*/unet: unet's weight files lack 1 of its tensors: conv_in\.weight$"),
    (lambda t: {**t, "extra.weight": Tensor.from_numpy(np.zeros(2, np.float32))},
     r"^.*diffusion_pytorch_model\.safetensors: holds 'extra\.weight', which UNet2DConditionModel has not$"),
    (lambda t: {**t, "conv_in.bias": Tensor.from_numpy(np.zeros(3, np.float32))},
     r"^.*diffusion_pytorch_model\.safetensors: 'conv_in\.bias' is 3, UNet2DConditionModel expects \d+$"),
], ids=["missing", "unexpected", "misshapen"])
def test_streaming_refuses_weights_the_model_does_not_have_in_one_line_naming_the_file(edit, message, tiny_sdxl_dir, tmp_path):
    import torch

    from lorabridge.adapters.torch_backend import streamed_model

    base = _edited_unet(tiny_sdxl_dir, tmp_path, edit)
    with pytest.raises(LoraBridgeError, match=message):
        streamed_model(base, "unet", torch.float32)


def test_streaming_holds_one_tensor_at_a_time(tmp_path):
    """What the loaders avoid: the whole file's tensors resident at once. numpy's allocations are traced."""
    arrays = {f"w{i}": np.full((256, 1024), i, np.float32) for i in range(16)}  # 16 tensors of 1 MiB
    path = tmp_path / "weights.safetensors"
    write_safetensors(path, {k: Tensor.from_numpy(v) for k, v in arrays.items()})
    tracemalloc.start()
    seen = {}
    for name, array in streamed_arrays([path]):
        seen[name] = float(array[0, 0])  # the caller copies each into its model; here it keeps a number
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert seen == {name: float(i) for i, name in enumerate(arrays)}
    assert peak < 2.5 * 2**20  # one tensor (1 MiB) and the one before it, not 16 MiB


def test_a_pickled_or_fp8_component_is_left_to_its_loader(tiny_sdxl_dir, tmp_path):
    assert [p.name for p in files_to_stream(describe_base(tiny_sdxl_dir), "unet")] == ["diffusion_pytorch_model.safetensors"]
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_sdxl_dir, pickled)
    (pickled / "unet" / "diffusion_pytorch_model.safetensors").rename(pickled / "unet" / "diffusion_pytorch_model.bin")
    assert files_to_stream(describe_base(pickled, allow_pickle=True), "unet") is None
    quantized = _edited_unet(tiny_sdxl_dir, tmp_path / "fp8", lambda t: {**t, "conv_in.weight": Tensor("F8_E4M3", (2,), b"\0\0")})
    assert files_to_stream(quantized, "unet") is None  # numpy holds no FP8: diffusers' loader reads it, or refuses it


@pytest.mark.torch
@pytest.mark.parametrize("arch", ["sdxl", "flux"])
def test_staged_run_gives_the_whole_pipelines_images_loading_the_denoiser_after_the_encoders_are_freed(
        arch, bases, tiny_lora_file, tiny_flux_lora_file, tmp_path):
    from lorabridge.adapters import torch_backend
    from lorabridge.adapters.infer import InferResult, _read_lora, _run
    from lorabridge.adapters.pipeline import apply_lora, sample

    base = describe_base(bases[arch])
    lora_file = {"sdxl": tiny_lora_file, "flux": tiny_flux_lora_file}[arch]
    options = InferOptions("torch", base.path, TINY_PROMPT, lora=lora_file, steps=2, output=tmp_path, guidance_scale=3.0)
    size = (64, 64) if arch == "sdxl" else (32, 32)
    latents = draw_latents(0, (1, base.latent_channels, size[1] // base.vae_scale_factor, size[0] // base.vae_scale_factor))
    if arch == "flux":
        from lorabridge.adapters.latents import pack_latents
        latents = pack_latents(latents, base.inference.patch)
    lora = _read_lora(lora_file, base)

    whole, fw = torch_backend.load_pipeline(base, "fp32", "cpu")
    apply_lora(whole, fw, lora, lora_file, 1.0, False, lambda line: None)
    expected = sample(whole, fw, options, latents, size)
    del whole

    lines: list[str] = []
    result = InferResult([], tmp_path, "torch", "cpu", "fp32")
    images = _run(torch_backend, base, options, lora, "fp32", "cpu", latents, size, result, lines.append)
    np.testing.assert_array_equal(images, expected)
    assert sum(result.applied.values()) == len(lora.modules)
    order = [line.split(":")[0] if line.startswith("LoRA applied") else line.split(";")[0]
             for line in lines if not line.startswith("step ")]
    assert order == ["LoRA applied (torch)", "prompt encoded", "LoRA applied (torch)", "denoising done"]
    assert lines[2].startswith("LoRA applied (torch): ") and base.inference.denoiser in lines[2]

