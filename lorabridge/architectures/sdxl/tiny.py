"""A tiny random-weight SDXL pipeline, built offline, for tests, demos and benchmarks.

Real SDXL weights are 7 GB and cannot be downloaded here, yet LoRA loading must be
checked against real diffusers and mindone.diffusers pipelines. This builder keeps
everything a LoRA touches the same as SDXL-base (block types and names, transformer
depths 1/2/10 with a 10-deep mid block, two CLIP text encoders, ``text_time``
conditioning) and shrinks only the widths, so every SDXL LoRA module name exists here
(560 UNet attention modules, as in the real model) and a 64x64 image takes seconds on CPU.

Example:
    >>> build_tiny_sdxl("tiny-sdxl")   # doctest: +SKIP
    PosixPath('tiny-sdxl')
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ...errors import LoraBridgeError
from ...io.atomic import atomic_directory

# SDXL-base's UNet layout at small widths (320/640/1280 -> 32/64/64), 32-dim attention heads.
UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [1, 2, 2],  # diffusers' name for the head count (SDXL-base: 5/10/20)
    "cross_attention_dim": 80,  # text_encoder hidden + text_encoder_2 hidden (32 + 48), as 768 + 1280 = 2048
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 48,  # 6 time ids * embed dim + pooled text_encoder_2
    "norm_num_groups": 32,
}

# CLIP ViT-L (text_encoder) and OpenCLIP bigG (text_encoder_2) shrunk to 2 layers of widths 32 and 48.
# Different widths, as in SDXL (768 / 1280): a LoRA for one encoder cannot silently fit the other, and
# single-file loaders tell the two apart by width.
TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
    "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 32,
}
TEXT_ENCODER_2_CONFIG: dict[str, Any] = {**TEXT_ENCODER_CONFIG, "hidden_size": 48, "intermediate_size": 96,
                                         "projection_dim": 48, "hidden_act": "gelu"}

# SDXL's VAE: four levels (so the latent is 1/8 of the image, as in SDXL), 4 latent channels.
VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 64,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 8,
    "scaling_factor": 0.13025, "force_upcast": False,
}

# SDXL-base's scheduler configuration (scheduler/scheduler_config.json).
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 1,
    "interpolation_type": "linear", "use_karras_sigmas": False, "sample_max_value": 1.0,
    "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True,
}

# A byte-level BPE vocabulary in CLIP's layout: 256 byte symbols, the same with "</w>", merges, specials.
TOKENIZER_MERGES = ["t h", "th e</w>", "a n", "i n", "e r", "o n", "a r", "e n", "o r", "a </w>",
                    "s </w>", "e </w>", "t </w>", "d </w>", "o f</w>", "p h", "ph o", "pho t", "phot o</w>",
                    "c a", "ca t</w>", "d o", "do g</w>", "b l", "bl u", "blu e</w>", "r e", "re d</w>"]
VOCAB_SIZE = 1000


def _bytes_to_unicode() -> list[str]:
    """CLIP's printable stand-ins for the 256 byte values, in CLIP's vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def tokenizer_vocab() -> list[str]:
    """The tokens by id; the last two are ``<|startoftext|>`` and ``<|endoftext|>``, as in CLIP."""
    symbols = _bytes_to_unicode()
    return [*symbols, *(s + "</w>" for s in symbols), *("".join(m.split()) for m in TOKENIZER_MERGES),
            "<|startoftext|>", "<|endoftext|>"]


def write_tokenizer_files(directory: Path) -> None:
    """Write ``vocab.json`` and ``merges.txt`` of a tiny CLIP BPE tokenizer (every byte is covered)."""
    vocab = tokenizer_vocab()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False), "utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(TOKENIZER_MERGES) + "\n", "utf-8")


def _components(seed: int, configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The seeded torch modules and tokenizers of the pipeline (random init); ``configs`` override the tiny sizes."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    bos, eos = len(tokenizer_vocab()) - 2, len(tokenizer_vocab()) - 1

    def text_config(config: dict[str, Any]) -> CLIPTextConfig:
        # The pooled output is read at eos_token_id, so it must be the tokenizer's real id.
        return CLIPTextConfig(vocab_size=VOCAB_SIZE, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, **config)

    sizes = {name: {**default, **configs.get(name, {})} for name, default in (
        ("unet", UNET_CONFIG), ("vae", VAE_CONFIG), ("text_encoder", TEXT_ENCODER_CONFIG), ("text_encoder_2", TEXT_ENCODER_2_CONFIG))}
    torch.manual_seed(seed)
    parts: dict[str, Any] = {
        "unet": UNet2DConditionModel(**sizes["unet"]),
        "vae": AutoencoderKL(**sizes["vae"]),
        "text_encoder": CLIPTextModel(text_config(sizes["text_encoder"])),
        "text_encoder_2": CLIPTextModelWithProjection(text_config(sizes["text_encoder_2"])),
        "scheduler": EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG),
    }
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(Path(tmp))
        tokenizer = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77)
    parts["tokenizer"] = tokenizer
    parts["tokenizer_2"] = tokenizer
    return parts


def build_tiny_sdxl(out: str | os.PathLike, seed: int = 0, force: bool = False,
                    configs: dict[str, dict[str, Any]] | None = None, half: bool = False) -> Path:
    """Write a tiny random SDXL pipeline (diffusers layout, safetensors) to ``out`` and return its path.

    The same ``seed`` gives the same weights bit for bit. The directory is assembled beside
    ``out`` and renamed into place at the end, so a failure leaves nothing behind. ``configs``
    overrides component configs (``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``), e.g. with
    SDXL-base's real widths for a benchmark; ``half`` saves fp16 weights.
    """
    import torch
    from diffusers import StableDiffusionXLPipeline

    out = Path(out)
    if out.exists() and not force:
        raise LoraBridgeError("output exists; pass --force to replace it", out)
    if not out.parent.exists():
        raise LoraBridgeError("output directory does not exist", out.parent)
    pipe = StableDiffusionXLPipeline(**_components(seed, configs or {}))
    if half:
        pipe.to(torch.float16)
    with atomic_directory(out, force) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return out


# Layers a LoRA adapts by default, per component: the leaf names PEFT's target_modules match.
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "unet": ("to_q", "to_k", "to_v", "to_out.0"),
    "text_encoder": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "text_encoder_2": ("q_proj", "k_proj", "v_proj", "out_proj"),
}
# component -> weights file of a diffusers pipeline directory
WEIGHT_FILES = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
    "text_encoder_2": "text_encoder_2/model.safetensors",
}


def lora_shapes(pipeline_dir: str | os.PathLike, components: tuple[str, ...] = ("unet",),
                targets: dict[str, tuple[str, ...]] = LORA_TARGETS) -> dict[str, tuple[int, ...]]:
    """Canonical module name -> weight shape (out, in[, kh, kw]) of every targeted layer of a pipeline.

    Read from the safetensors headers only, so it needs no framework and works on a real SDXL too.
    """
    from ...io.safetensors_file import SafetensorsFile

    shapes: dict[str, tuple[int, ...]] = {}
    for component in components:
        weights = SafetensorsFile(Path(pipeline_dir) / WEIGHT_FILES[component])
        for key in weights.keys():
            path = key[: -len(".weight")] if key.endswith(".weight") else None
            if path and any(path == t or path.endswith("." + t) for t in targets[component]):
                shapes[f"{component}.{path}"] = weights.header_entry(key)[1]
    return shapes


def make_tiny_lora(pipeline_dir: str | os.PathLike, rank: int = 4, alpha: float = 8.0, seed: int = 0,
                   components: tuple[str, ...] = ("unet", "text_encoder", "text_encoder_2"), strength: float = 0.5):
    """A seeded LoRA (:class:`LoraModel`) for every attention projection of ``pipeline_dir``, with non-zero A and B.

    Both factors are random (a freshly initialised LoRA has B = 0 and changes nothing), scaled so
    the update is about ``strength`` times the typical weight: strong enough to change images visibly.

    Example:
        >>> model = make_tiny_lora("tiny-sdxl")   # doctest: +SKIP
        >>> len(model.modules)   # doctest: +SKIP
        576
    """
    import numpy as np

    from ...model import LoraModel, LoraModule
    from ...tensor import Tensor

    rng = np.random.default_rng(seed)
    model = LoraModel(provenance={"source_format": "lorabridge.tiny_sdxl"},
                      training={"note": f"random LoRA for a tiny SDXL, seed {seed}", "ss_network_dim": str(rank)})
    for name, (out_features, in_features, *kernel) in lora_shapes(pipeline_dir, components).items():
        # B @ A has entries of std sqrt(rank) * sa * sb; aim at strength / sqrt(in_features) (the init scale).
        sa = sb = (strength / (np.sqrt(rank) * np.sqrt(in_features)) * rank / alpha) ** 0.5
        a = rng.normal(0.0, sa, (rank, in_features, *kernel)).astype(np.float32)
        b = rng.normal(0.0, sb, (out_features, rank, *([1, 1] if kernel else []))).astype(np.float32)
        model.add(LoraModule(name, "lora", {"lora_A.weight": Tensor.from_numpy(a), "lora_B.weight": Tensor.from_numpy(b)},
                             alpha=alpha))
    return model


# --make-lora output suffix -> registry format written: a neutral file, or what MindONE's SDXL trainer saves.
LORA_FILE_FORMATS = {".safetensors": "neutral", ".ckpt": "mindone-sgm"}


def write_tiny_lora(pipeline_dir: str | os.PathLike, out: str | os.PathLike, seed: int = 0, force: bool = False) -> Path:
    """Write :func:`make_tiny_lora` for ``pipeline_dir`` at ``out``: ``.safetensors`` as a neutral file,
    ``.ckpt`` as a MindONE SDXL trainer checkpoint (SGM names, alpha folded into lora_B)."""
    import warnings

    from ...converters.registry import get_writer
    from ...errors import LoraBridgeWarning
    from ...io.atomic import check_output_path, replacing

    out = check_output_path(out, force)
    lora = make_tiny_lora(pipeline_dir, seed=seed)
    # The MindONE writer warns that alpha is folded and that a .ckpt keeps no training facts: for this
    # made-up LoRA that is the design (see the docstring), not news to print.
    with replacing(force), warnings.catch_warnings():  # without --force, a racing run gets "output exists"
        warnings.simplefilter("ignore", LoraBridgeWarning)
        get_writer(lora_file_format(out)).write(lora, out)
    return out


def lora_file_format(path: str | os.PathLike) -> str:
    """The format :func:`write_tiny_lora` writes to ``path``, by suffix (checked before any work)."""
    suffix = Path(path).suffix
    if suffix not in LORA_FILE_FORMATS:
        raise LoraBridgeError(f"LoRA file must end in {' or '.join(LORA_FILE_FORMATS)}", path)
    return LORA_FILE_FORMATS[suffix]
