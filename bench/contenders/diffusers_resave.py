"""diffusers' own path for a LoRA file, with no model instance: ``lora_state_dict`` then ``save_lora_weights``.

``StableDiffusionXLPipeline.lora_state_dict(directory, weight_name=file name)`` loads the file's tensors into torch (the same
call ``load_lora_weights`` starts with); the state dict is split by its ``unet.``/``text_encoder.``/
``text_encoder_2.`` prefixes and written back with ``StableDiffusionXLPipeline.save_lora_weights``
(safetensors, ``pytorch_lora_weights.safetensors`` in the output directory), as a training script does.

    python bench/contenders/diffusers_resave.py lora.safetensors out_dir
"""

import sys
from pathlib import Path

from diffusers import StableDiffusionXLPipeline

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def main(src: str, out_dir: str) -> None:
    src_path = Path(src)  # offline, diffusers wants the directory and the weight name apart
    state_dict, _network_alphas = StableDiffusionXLPipeline.lora_state_dict(str(src_path.parent),
                                                                             weight_name=src_path.name)
    layers = {c: {k[len(c) + 1:]: v for k, v in state_dict.items() if k.startswith(c + ".")} for c in COMPONENTS}
    StableDiffusionXLPipeline.save_lora_weights(
        out_dir, unet_lora_layers=layers["unet"] or None, text_encoder_lora_layers=layers["text_encoder"] or None,
        text_encoder_2_lora_layers=layers["text_encoder_2"] or None, weight_name="pytorch_lora_weights.safetensors")


if __name__ == "__main__":
    main(*sys.argv[1:3])
