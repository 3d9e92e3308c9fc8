"""A real-size random-weight base pipeline (every dimension of the reference model), fp16 on disk, offline.

Benchmarks and memory checks need the real model's sizes, whose weights cannot be downloaded here.
Each weight-bearing component is built on torch's ``meta`` device (its names and shapes, no storage)
by the architecture's ``real`` module (:meth:`Architecture.real_parts`), and its weights are generated
tensor by tensor while the safetensors file is written: memory holds one tensor at a time, never a
model, so a 12 G-parameter Flux.1 transformer is written on a machine with less memory than its size.

Values are seeded per tensor (``seed``, tensor index): weights uniform in +-1/sqrt(fan in) (torch's
default Linear/Conv init bound), norm scales 1, biases 0. The directory is a diffusers pipeline
(``model_index.json`` and each component's config written by diffusers/transformers themselves).

Example:
    >>> build_base(SDXL, "sdxl-base", log=print)   # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import LoraBridgeError
from ..io.atomic import atomic_directory
from ..io.safetensors_file import write_safetensors
from ..tensor import LateTensor
from .architecture import Architecture

# The weights file of a component, by the library that loads it (diffusers ModelMixin or transformers).
WEIGHTS_FILES = {"diffusers": "diffusion_pytorch_model.safetensors", "transformers": "model.safetensors"}


def random_tensor(name: str, shape: tuple[int, ...], seed: tuple[int, int]) -> LateTensor:
    """An fp16 tensor whose values (:func:`random_values`) are made when written.

    Example:
        >>> t = random_tensor("w", (2, 3), seed=(0, 1))
        >>> t.nbytes, len(t.data), t.data == t.data
        (12, 12, True)
    """
    return LateTensor("F16", shape, partial(_random_bytes, name, shape, seed))


def _random_bytes(name: str, shape: tuple[int, ...], seed: tuple[int, int]) -> bytes:
    return random_values(name, shape, seed).tobytes()


def random_values(name: str, shape: tuple[int, ...], seed: tuple[int, int]) -> np.ndarray:
    """fp16 values of the parameter ``name``: 1-D weights (norm scales) 1, 1-D biases 0, others uniform in
    +-1/sqrt(fan in), from ``np.random.default_rng(seed)``.

    Example:
        >>> random_values("norm.weight", (3,), (0, 0)).tolist(), random_values("proj.bias", (2,), (0, 1)).tolist()
        ([1.0, 1.0, 1.0], [0.0, 0.0])
    """
    if len(shape) == 1:
        return np.full(shape, 1.0 if name.endswith("weight") else 0.0, np.float16)
    bound = 1.0 / math.sqrt(math.prod(shape[1:]))
    values = np.random.default_rng(seed).random(shape, dtype=np.float32)
    values *= 2 * bound
    values -= bound
    return values.astype(np.float16)


def random_state(module: Any, seed: int) -> dict[str, LateTensor]:
    """The state dict of a meta-device torch module, as :func:`random_tensor` s (tied parameters share values).

    Refuses a module with persistent buffers: their values come from code, not from a random draw.
    """
    parameters = {id(p) for p in module.parameters()}
    tensors: dict[str, LateTensor] = {}
    first: dict[int, LateTensor] = {}
    for index, (name, tensor) in enumerate(module.state_dict(keep_vars=True).items()):
        if id(tensor) not in parameters:
            raise LoraBridgeError(f"{type(module).__name__} has a persistent buffer {name!r}; make-base writes parameters only")
        tensors[name] = first.setdefault(id(tensor), random_tensor(name, tuple(tensor.shape), (seed, index)))
    return tensors


def _library(part: Any) -> str | None:
    """``diffusers`` or ``transformers`` for a weight-bearing component, None for a scheduler or tokenizer."""
    if hasattr(part, "state_dict"):
        return "diffusers" if hasattr(part, "save_config") else "transformers"
    return None


def _write_component(directory: Path, part: Any, seed: int) -> int:
    """Write a weight-bearing component's ``config.json`` and random fp16 weights; its byte count."""
    library = _library(part)
    directory.mkdir()
    if library == "diffusers":
        part.save_config(directory)
    else:
        part.config.save_pretrained(directory)
    tensors = random_state(part, seed)
    write_safetensors(directory / WEIGHTS_FILES[str(library)], tensors, metadata={"format": "pt"})
    return sum(t.nbytes for t in tensors.values())


def build_base(architecture: Architecture, out: str | os.PathLike, seed: int = 0, force: bool = False,
               log: Callable[[str], None] = lambda line: None) -> Path:
    """Write ``architecture``'s real-size random pipeline (diffusers layout, fp16 safetensors) to ``out``.

    The same ``seed`` gives the same weights bit for bit; the directory appears whole or not at all.
    ``log`` gets a line per component (its size and the seconds it took).
    """
    out = Path(out)
    if out.exists() and not force:
        raise LoraBridgeError("output exists; pass --force to replace it", out)
    if not out.parent.exists():
        raise LoraBridgeError("output directory does not exist", out.parent)
    parts = architecture.real_parts()
    pipeline = architecture.pipeline_class("torch")(**parts)  # meta modules: only to write model_index.json
    weighted = [name for name, part in parts.items() if _library(part)]
    with atomic_directory(out, force) as tmp:
        pipeline.save_config(tmp)
        for name, part in parts.items():
            if not _library(part):
                part.save_pretrained(tmp / name)
        for i, name in enumerate(weighted, 1):
            started = time.perf_counter()
            count = sum(p.numel() for p in parts[name].parameters())
            log(f"[{i}/{len(weighted)}] {name}: {count / 1e9:.2f} G parameters ...")
            size = _write_component(tmp / name, parts[name], seed)
            log(f"[{i}/{len(weighted)}] {name}: {size / 1e9:.2f} GB fp16 in {time.perf_counter() - started:.0f} s")
    return out
