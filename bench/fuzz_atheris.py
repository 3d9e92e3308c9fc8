"""Long fuzzing run of lorabridge's parsers under atheris (coverage-guided).

Usage: python bench/fuzz_atheris.py TARGET [-atheris_runs=N] [-max_total_time=SECONDS]
TARGET is one of the names in TARGETS (neutral, ms-ckpt, kohya, flux-kohya, diffusers, torch-pickle, peft-dir). A run passes when every input either parses or raises
LoraBridgeError; anything else (another exception, a hang, a huge allocation) is a finding.
The bounded, always-on version of these runs is tests/test_fuzz_*.py (hypothesis).
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from lorabridge.errors import LoraBridgeError

ROOT = Path(__file__).resolve().parent.parent
SCRATCH = Path(tempfile.mkdtemp(prefix="lorabridge-fuzz-"))

def vector_seeds() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((ROOT / "spec" / "vectors").glob("*.safetensors"))}


def torch_seeds() -> dict[str, bytes]:
    """Small state dicts as torch.save writes them: zip archive (stored and deflated) and legacy pickle."""
    import io
    import zipfile

    import torch

    state = {"x.lora_A.weight": torch.ones(2, 3), "x.lora_B.weight": torch.zeros(3, 2, dtype=torch.bfloat16),
             "x.alpha": torch.tensor(2.0), "epoch": 3, "note": "seed"}
    seeds = {}
    for name, zipped in (("zip.pt", True), ("legacy.pt", False)):
        buffer = io.BytesIO()
        torch.save(state, buffer, _use_new_zipfile_serialization=zipped)
        seeds[name] = buffer.getvalue()
    deflated = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(seeds["zip.pt"])) as stored, zipfile.ZipFile(deflated, "w") as out:
        for info in stored.infolist():
            out.writestr(info.filename, stored.read(info), compress_type=zipfile.ZIP_DEFLATED)
    seeds["deflated.pt"] = deflated.getvalue()
    return seeds


def peft_seeds() -> dict[str, bytes]:
    """An adapter directory (config and weights joined by PEFT_SPLIT) for one SDXL attention module."""
    import json

    import numpy as np

    from lorabridge.io.safetensors_file import write_safetensors
    from lorabridge.tensor import Tensor

    module = "base_model.model.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    tensors = {f"{module}.lora_A.weight": Tensor.from_numpy(np.ones((2, 640), np.float32)),
               f"{module}.lora_B.weight": Tensor.from_numpy(np.ones((640, 2), np.float32))}
    weights = SCRATCH / "seed.safetensors"
    write_safetensors(weights, tensors, {"format": "pt"})
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["to_q"],
              "alpha_pattern": {"attn1.to_q": 3}, "rank_pattern": {}, "use_rslora": False}
    return {"adapter": json.dumps(config).encode() + PEFT_SPLIT + weights.read_bytes()}


def _safetensors_seed(tensors: dict, metadata: dict) -> bytes:
    from lorabridge.io.safetensors_file import write_safetensors

    path = SCRATCH / "seed.safetensors"
    write_safetensors(path, tensors, metadata)
    return path.read_bytes()


def _lora_pair(prefix: str, down: str, up: str) -> dict:
    """One SDXL attention LoRA (rank 2) under ``prefix``, with the given down/up suffixes."""
    import numpy as np

    from lorabridge.tensor import Tensor

    return {f"{prefix}.{down}": Tensor.from_numpy(np.ones((2, 640), np.float32)),
            f"{prefix}.{up}": Tensor.from_numpy(np.ones((640, 2), np.float16))}


def kohya_seeds() -> dict[str, bytes]:
    """A kohya file (SGM name, .alpha) and a LoHa module, so mutations start inside the key grammar."""
    import numpy as np

    from lorabridge.tensor import Tensor

    stem = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    tensors = {**_lora_pair(stem, "lora_down.weight", "lora_up.weight"),
               f"{stem}.alpha": Tensor.from_numpy(np.array(1.0, np.float32))}
    return {"kohya": _safetensors_seed(tensors, {"ss_network_dim": "2"})}


def flux_kohya_seeds() -> dict[str, bytes]:
    """kohya sd-scripts' Flux.1 layout at Flux.1-dev widths, rank 1: fused qkv (also as split_qkv: A stacked,
    B block-diagonal) and linear1, modulation, ``.alpha``; so mutations start inside the fused-layer split."""
    import numpy as np

    from lorabridge.tensor import Tensor

    shapes = {"lora_unet_double_blocks_0_img_attn_qkv": (9216, 3072, 1), "lora_unet_double_blocks_1_txt_attn_qkv": (9216, 3072, 3),
              "lora_unet_single_blocks_0_linear1": (21504, 3072, 1), "lora_unet_double_blocks_0_img_mod_lin": (18432, 3072, 1)}
    tensors = {}
    for stem, (out, inp, rank) in shapes.items():
        up = np.zeros((out, rank), np.float16)
        for part in range(rank):  # rank 3: one column per q, k, v block (split_qkv)
            up[part * out // rank:(part + 1) * out // rank, part] = 1
        tensors.update({f"{stem}.lora_down.weight": Tensor.from_numpy(np.ones((rank, inp), np.float16)),
                        f"{stem}.lora_up.weight": Tensor.from_numpy(up),
                        f"{stem}.alpha": Tensor.from_numpy(np.array(rank, np.float16))})
    return {"flux-kohya": _safetensors_seed(tensors, {"ss_network_module": "networks.lora_flux"})}


def diffusers_seeds() -> dict[str, bytes]:
    import json

    module = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.lora_alpha": 4,
                "unet.target_modules": ["to_q"], "unet.alpha_pattern": {}, "unet.rank_pattern": {}, "unet.use_dora": False})}
    return {"diffusers": _safetensors_seed(_lora_pair(module, "lora_A.weight", "lora_B.weight"), metadata)}


def ms_ckpt_seeds() -> dict[str, bytes]:
    """A MindSpore checkpoint as MindONE's SDXL trainer saves a LoRA (our writer is byte-identical to MindSpore's)."""
    from lorabridge.io.ms_ckpt import write_ms_checkpoint

    path = SCRATCH / "seed.ckpt"
    write_ms_checkpoint(path, _lora_pair("model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q",
                                         "lora_A.weight", "lora_B.weight"))
    return {"ckpt": path.read_bytes()}


# name -> (module, function taking a path, seed maker, how the fuzz input becomes that path)
TARGETS = {
    "neutral": ("lorabridge.formats.neutral", "inspect_file", vector_seeds, "file"),
    "ms-ckpt": ("lorabridge.io.ms_ckpt", "read_ms_checkpoint", ms_ckpt_seeds, "file"),
    "kohya": ("lorabridge.formats.kohya", "read", kohya_seeds, "file"),
    "flux-kohya": ("lorabridge.formats.kohya", "read", flux_kohya_seeds, "file"),
    "diffusers": ("lorabridge.formats.diffusers", "read", diffusers_seeds, "file"),
    "torch-pickle": ("lorabridge.io.torch_file", "read_torch_file", torch_seeds, "file"),
    "peft-dir": ("lorabridge.formats.peft", "read", peft_seeds, "peft-dir"),
}
PEFT_SPLIT = b"\n--adapter_model--\n"
# The library modules a read goes through (lorabridge imports them inside functions, to keep start-up fast).
INSTRUMENTED = ("lorabridge.io.safetensors_file", "lorabridge.io.json_safe", "lorabridge.io.input_file",
                "lorabridge.io.torch_file", "lorabridge.io.ms_ckpt", "lorabridge.io.protobuf_wire",
                "lorabridge.formats.checks", "lorabridge.rules", "lorabridge.manifest", "lorabridge.neutral_rules",
                "lorabridge.architectures.sdxl.sgm", "lorabridge.architectures.sdxl.text_encoders",
                "lorabridge.formats.training", "lorabridge.model", "lorabridge.tensor",
                "lorabridge.naming.underscored", "lorabridge.formats.underscored_files", "lorabridge.architectures.fused",
                "lorabridge.architectures.architecture", "lorabridge.architectures.flux1.bfl")  # a peft-dir input is adapter_config.json, this, adapter_model.safetensors


def write_input(data: bytes, kind: str, scratch: Path) -> Path:
    """The path the target reads: the bytes as one file, or split into a PEFT adapter directory."""
    if kind == "file":
        path = scratch / "input.bin"
        path.unlink(missing_ok=True)  # a new file each time: maps of the last input must not see this one
        path.write_bytes(data)
        return path
    config, _, weights = data.partition(PEFT_SPLIT)
    directory = scratch / "adapter"
    directory.mkdir(exist_ok=True)
    (directory / "adapter_config.json").write_bytes(config)
    (directory / "adapter_model.safetensors").write_bytes(weights)
    return directory


def main() -> None:
    name = sys.argv.pop(1) if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else "neutral"
    module_name, function_name, make_seeds, kind = TARGETS[name]
    with atheris.instrument_imports():
        target = getattr(importlib.import_module(module_name), function_name)
        for module in INSTRUMENTED:  # imported lazily inside functions: uninstrumented if first imported later
            importlib.import_module(module)
    corpus = SCRATCH / "corpus"
    corpus.mkdir()
    for seed_name, seed in make_seeds().items():
        (corpus / seed_name).write_bytes(seed)
    counter = {"inputs": 0}

    def one_input(data: bytes) -> None:
        counter["inputs"] += 1
        path = write_input(data, kind, SCRATCH)
        try:
            target(path)
        except LoraBridgeError:
            pass

    atheris.Setup([sys.argv[0], str(corpus), "-rss_limit_mb=2048", "-timeout=10", *sys.argv[1:]], one_input)
    try:
        atheris.Fuzz()
    finally:
        print(f"{name}: {counter['inputs']} inputs tried", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
