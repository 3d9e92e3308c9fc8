"""What an ``infer`` run is asked to do, and the names it accepts, as data shared by both backends.

diffusers and mindone.diffusers have the same scheduler classes and the same pipeline
call, so one table of scheduler names and one options object serve both frameworks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LoraBridgeError

# --scheduler name -> (scheduler class in diffusers and mindone.diffusers, config overrides, deterministic:
# False when each step draws noise from the framework's own generator, so backends cannot match)
# "euler" on SDXL's scheduler config is the DDPM-trained sigma discretization with the Euler sampler:
# what MindONE's sampler calls DiffusersDDPMDiscretization, the seed's setting for cross-framework parity.
SCHEDULERS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "euler": ("EulerDiscreteScheduler", {}, True),
    "euler-karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, True),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}, False),
    "ddim": ("DDIMScheduler", {}, True),
    "ddpm": ("DDPMScheduler", {}, False),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}, True),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}, True),
    "dpm++2m-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, False),
    "unipc": ("UniPCMultistepScheduler", {}, True),
}

# Flow-matching models (Flux.1) sample with the Euler step of their own scheduler class, configured as the base's:
# "euler" names it too, so the default --scheduler suits both kinds of models.
FLOW_SCHEDULERS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "euler": ("FlowMatchEulerDiscreteScheduler", {}, True),
}
# Inference.schedulers -> its table; --scheduler accepts any name of any table (infer checks it against the base's).
SCHEDULER_TABLES = {"diffusion": SCHEDULERS, "flow": FLOW_SCHEDULERS}
SCHEDULER_NAMES = tuple(dict.fromkeys(name for table in SCHEDULER_TABLES.values() for name in table))

# --dtype name -> the dtype's attribute name in torch and in mindspore (both spell them alike); "auto" lets the
# backend's resolve_dtype choose by device.
FRAMEWORK_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
DTYPES = ("auto", *FRAMEWORK_DTYPES)

# --backend name -> the module that runs it (imported only when chosen: it imports its framework).
BACKEND_MODULES = {"torch": "lorabridge.adapters.torch_backend", "mindspore": "lorabridge.adapters.mindspore_backend"}
BACKENDS = tuple(BACKEND_MODULES)


@dataclass
class InferOptions:
    """One ``infer`` run. ``width``/``height`` None means the base model's native size.

    Example:
        >>> InferOptions(backend="torch", base=Path("sdxl"), prompt="a cat", lora=Path("lora.safetensors")).output_dir
        PosixPath('lora.safetensors-gen-images')
    """

    backend: str
    base: Path
    prompt: str
    lora: Path | None = None
    negative_prompt: str | None = None
    steps: int = 30
    guidance_scale: float | None = None  # None: the architecture's default (Inference.guidance_scale)
    width: int | None = None
    height: int | None = None
    seed: int = 0
    num_images: int = 1
    lora_scale: float = 1.0
    fuse: bool = False
    scheduler: str = "euler"
    dtype: str = "auto"
    device: str | None = None
    init_latents: Path | None = None
    save_latents: Path | None = None
    output: Path | None = None
    config: Path | None = None  # diffusers config directory for a single-file base (torch)
    variant: str | None = None  # weight files' variant ("fp16"); None: the one their names show
    allow_pickle: bool = False  # load base weights only a pickle (.bin) holds (torch.load(weights_only=True))
    force: bool = False

    @property
    def output_dir(self) -> Path:
        """``-o``, else ``<lora file>-gen-images`` beside the LoRA (the seed's convention)."""
        if self.output is not None:
            return Path(self.output)
        if self.lora is None:
            raise LoraBridgeError("without --lora, give the output directory with -o")
        return Path(f"{self.lora}-gen-images")

    def check(self) -> None:
        """Refuse values no backend can run, before anything heavy is loaded (the backend: :func:`.infer.load_backend`)."""
        if self.scheduler not in SCHEDULER_NAMES:
            raise LoraBridgeError(f"unknown scheduler {self.scheduler!r}; choose one of: {', '.join(SCHEDULER_NAMES)}")
        if self.dtype not in DTYPES:
            raise LoraBridgeError(f"unknown dtype {self.dtype!r}; choose one of: {', '.join(DTYPES)}")
        for name in ("steps", "num_images"):
            if getattr(self, name) < 1:
                raise LoraBridgeError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                raise LoraBridgeError(f"--{name} must be a positive multiple of 8, got {value}")
