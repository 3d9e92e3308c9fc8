"""diffusers' own path for a LoRA file, with no model instance: ``lora_state_dict`` then ``save_lora_weights``.

``<Pipeline>.lora_state_dict(directory, weight_name=file name)`` loads the file's tensors into torch (the same
call ``load_lora_weights`` starts with; for Flux it also converts kohya, XLabs and other trainers' layouts
to diffusers names); the state dict is split by its component prefixes (``unet.``/``text_encoder.``/
``text_encoder_2.`` for SDXL, ``transformer.``/``text_encoder.`` for Flux) and written back with
``<Pipeline>.save_lora_weights`` (safetensors, ``pytorch_lora_weights.safetensors`` in the output
directory), as a training script does. diffusers' kohya-to-diffusers conversion gives q, k and v of a fused
Flux layer one shared ``lora_A`` tensor, which ``save_lora_weights`` (safetensors) refuses ("Some tensors
share memory"): each tensor seen before is cloned first, as a user of diffusers has to.

    python bench/contenders/diffusers_resave.py StableDiffusionXLPipeline lora.safetensors out_dir
    python bench/contenders/diffusers_resave.py FluxPipeline kohya_flux_lora.safetensors out_dir
"""

import sys
from pathlib import Path

import diffusers


def main(pipeline: str, src: str, out_dir: str) -> None:
    cls = getattr(diffusers, pipeline)
    src_path = Path(src)  # offline, diffusers wants the directory and the weight name apart
    loaded = cls.lora_state_dict(str(src_path.parent), weight_name=src_path.name)
    state_dict = loaded[0] if isinstance(loaded, tuple) else loaded  # SDXL's returns (state dict, alphas)
    seen: set[int] = set()
    for key, tensor in state_dict.items():
        if tensor.data_ptr() in seen:
            state_dict[key] = tensor.clone()
        seen.add(tensor.data_ptr())
    components = dict.fromkeys(key.split(".", 1)[0] for key in state_dict)
    layers = {f"{c}_lora_layers": {k[len(c) + 1:]: v for k, v in state_dict.items() if k.startswith(c + ".")}
              for c in components}
    cls.save_lora_weights(out_dir, **layers, weight_name="pytorch_lora_weights.safetensors")


if __name__ == "__main__":
    main(*sys.argv[1:4])
