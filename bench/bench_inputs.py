"""Benchmark inputs: LoRA files at a registered architecture's real shapes, written by lorabridge's own writers.

Each input is a :class:`InputSpec` (architecture, which modules, rank, dtype, the format a trainer
writes) turned into a file exactly as that trainer lays one out. SDXL: MindONE SGM ``.ckpt`` as
MindONE's SDXL trainer writes it (SGM names, bigG q/k/v as one fused ``attn.in_proj`` LoRA: one A,
the three B stacked; no alpha). Flux.1: kohya sd-scripts' ``networks/lora_flux.py`` default (every
Linear of the 19 double and 38 single blocks: fused ``qkv`` and ``linear1`` with one A, modulation
included, ``.alpha`` stored, text encoders not trained). Parts of a fused layer share one A, as the
fused layer's LoRA has. Values are slices of one seeded random pool, so a 2 GiB file is generated in
seconds; conversions never look at the values, only hash and copy them.

    spec = INPUTS["rank4-attn"]
    path = generate(spec, Path("/tmp/bench"))      # cached: regenerated only when missing
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lorabridge.converters.registry import get_format
from lorabridge.formats.contract import WriteOptions
from lorabridge.model import LoraModel, LoraModule
from lorabridge.architectures import get_architecture
from lorabridge.architectures.flux1 import FLUX1
from lorabridge.architectures.sdxl import SDXL
from lorabridge.architectures.tree import LORA_TARGET_TYPES
from lorabridge.tensor import DTYPES, Tensor

# Module selections (regular expressions over diffusers paths, per component).
UNET_ATTENTION = r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
UNET_ATTENTION_FF_PROJ = r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2|proj_in|proj_out)$"
UNET_ALL = r".*"  # every Linear and Conv2d (resnets, time embedding, convs, attention, ff)
TEXT_ATTENTION = r"self_attn\.(q_proj|k_proj|v_proj|out_proj)$"  # diffusers' default text encoder targets
# kohya lora_flux.py's default: every Linear of DoubleStreamBlock and SingleStreamBlock (train_blocks="all"):
# img/txt qkv, proj, mlp.0, mlp.2 and mod.lin; linear1, linear2 and modulation.lin (494 diffusers modules, 304 kohya ones).
FLUX_BLOCKS = r"^(single_)?transformer_blocks\."
POOL_BYTES = 64 << 20


@dataclass(frozen=True)
class InputSpec:
    name: str
    description: str
    rank: int
    dtype: str
    unet: str  # selection for the denoiser (SDXL's unet, Flux.1's transformer)
    text: str | None = None  # selection for both text encoders, None for a denoiser-only LoRA
    architecture: str = SDXL.name
    writer: str = "mindone-sgm"  # the format the input is written in (a trainer's)
    container: str | None = "ckpt"  # WriteOptions.container of that writer
    suffix: str = ".ckpt"
    alpha: float | None = None  # stored in the file; None: none stored (alpha = rank, as MindONE trains)

    def selection(self) -> dict[str, list[str]]:
        """component -> the diffusers paths of the Linear/Conv2d layers this input adapts."""
        architecture = get_architecture(self.architecture)
        denoiser, *texts = architecture.components
        chosen = {denoiser: self.unet, **({c: self.text for c in texts} if self.text else {})}
        return {component: [p for p, kind in architecture.module_types(component).items()
                            if kind in LORA_TARGET_TYPES and re.search(pattern, p)]
                for component, pattern in chosen.items()}

    @property
    def file_name(self) -> str:
        return f"{self.name}{self.suffix}"


INPUTS: dict[str, InputSpec] = {s.name: s for s in [
    InputSpec("rank4-attn", "rank 4, UNet attention only (to_q/k/v/to_out.0 of every attn1/attn2), F32",
              4, "F32", UNET_ATTENTION),
    InputSpec("rank4-attn-kohya", "rank 4, UNet attention only, F32, as kohya sd-scripts' networks/lora.py writes an "
              "SDXL LoRA (lora_unet_ names, lora_down/lora_up, .alpha stored)", 4, "F32", UNET_ATTENTION,
              writer="kohya", container=None, suffix=".safetensors", alpha=4.0),
    InputSpec("rank128-attn-ff-proj-te", "rank 128, UNet attention + ff + proj_in/proj_out, both text encoders' "
              "self-attention (bigG q/k/v fused as MindONE stores it), F16", 128, "F16", UNET_ATTENTION_FF_PROJ,
              TEXT_ATTENTION),
    InputSpec("rank160-all-2gib", "rank 160, every UNet Linear and Conv2d (794 layers) plus both text encoders' "
              "self-attention, F32 (synthetic, about 2 GiB)", 160, "F32", UNET_ALL, TEXT_ATTENTION),
    InputSpec("flux-rank32-kohya", "Flux.1-dev, rank 32, kohya lora_flux.py's default targets (every Linear of the 19 "
              "double and 38 single blocks: fused qkv and linear1, proj, MLP, modulation; no text encoder), BF16, alpha "
              "stored", 32, "BF16", FLUX_BLOCKS, architecture=FLUX1.name, writer="kohya", container=None,
              suffix=".safetensors", alpha=16.0),
]}


class _Pool:
    """Hands out byte slices of one random buffer: distinct-looking, cheap, reproducible."""

    def __init__(self, dtype: str, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        values = self.rng.standard_normal(POOL_BYTES // DTYPES[dtype][0], dtype=np.float32) * 0.01
        self.dtype, self.data = dtype, memoryview(Tensor.from_numpy(values, dtype).data)

    def tensor(self, shape: tuple[int, ...]) -> Tensor:
        nbytes = math.prod(shape) * DTYPES[self.dtype][0]
        if nbytes > len(self.data):
            raise ValueError(f"tensor of {nbytes} bytes is larger than the pool")
        start = int(self.rng.integers(0, (len(self.data) - nbytes) // 8 + 1)) * 8
        return Tensor(self.dtype, shape, self.data[start:start + nbytes])


def build_model(spec: InputSpec, seed: int = 0) -> LoraModel:
    """The LoRA of ``spec`` with random factors; the parts of a fused layer share one A (MindONE's bigG
    in_proj, kohya's Flux qkv and linear1: one LoRA on the fused matrix)."""
    architecture = get_architecture(spec.architecture)
    pool = _Pool(spec.dtype, seed)
    model = LoraModel(architecture=architecture.name, training={"note": f"lorabridge benchmark input {spec.name}"})
    shared_a: dict[tuple[str, str], Tensor] = {}
    for component, paths in spec.selection().items():
        shapes = architecture.modules(component)
        for path in paths:
            out, inp, *kernel = shapes[path]
            fused = architecture.fused_name(component, path)
            if fused:
                a = shared_a.setdefault((component, fused[0]), pool.tensor((spec.rank, inp)))
            else:
                a = pool.tensor((spec.rank, inp, *kernel))
            b = pool.tensor((out, spec.rank, *([1, 1] if kernel else [])))
            model.add(LoraModule(f"{component}.{path}", "lora", {"lora_A.weight": a, "lora_B.weight": b},
                                 alpha=float(spec.alpha or spec.rank),
                                 alpha_source="stored" if spec.alpha else "assumed"))
    return model


def generate(spec: InputSpec, directory: Path, regenerate: bool = False) -> Path:
    """Write ``spec`` in its trainer's format in ``directory`` (kept and reused unless ``regenerate``)."""
    path = directory / spec.file_name
    if path.exists() and not regenerate:
        return path
    path.unlink(missing_ok=True)
    get_format(spec.writer).write(build_model(spec), path, WriteOptions(container=spec.container))
    return path
