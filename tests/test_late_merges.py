"""Fused layers (Flux's qkv/linear1 in kohya files, SDXL bigG's in_proj in MindONE files) are merged as they
are written (``made_late``), not all before the first write: same bytes as merging them all first."""

from __future__ import annotations

import numpy as np
import pytest

import lorabridge.formats.mindone as mindone
import lorabridge.formats.underscored_files as underscored_files
import lorabridge.io.ms_ckpt as ms_ckpt
import lorabridge.io.zero_copy as zero_copy
from lorabridge.architectures.flux1 import FLUX1
from lorabridge.architectures.sdxl import SDXL
from lorabridge.converters.registry import get_writer
from lorabridge.formats.contract import WriteOptions
from lorabridge.model import LoraModel, LoraModule
from lorabridge.tensor import Tensor

pytestmark = pytest.mark.filterwarnings("ignore::lorabridge.errors.LoraBridgeWarning")
RNG = np.random.default_rng(7)
D, S = "transformer.transformer_blocks", "transformer.single_transformer_blocks"


def t(*shape: int) -> Tensor:
    return Tensor.from_numpy((RNG.standard_normal(shape) * 0.1).astype(np.float32))


def flux_model() -> LoraModel:
    """q/k/v of two double blocks and linear1's four parts of a single block (one part left out), plus a plain module."""
    model, shapes = LoraModel(architecture=FLUX1.name), FLUX1.modules("transformer")
    parts = [f"{D}.{i}.attn.to_{p}" for i in (0, 1) for p in "qkv"] + [f"{S}.0.attn.to_{p}" for p in "qk"] + [f"{S}.0.proj_mlp"]
    for name in [*parts, f"{D}.0.attn.to_out.0"]:
        out, inp = shapes[name.removeprefix("transformer.")]
        model.add(LoraModule(name, "lora", {"lora_A.weight": t(2, inp), "lora_B.weight": t(out, 2)}, 1.0))
    return model


def sdxl_model() -> LoraModel:
    """bigG q/k/v of two layers (the MindONE SGM naming fuses them into in_proj), alpha != rank (folded)."""
    model, shapes = LoraModel(), SDXL.modules("text_encoder_2")
    for layer in (0, 5):
        for p in "qkv":
            path = f"text_model.encoder.layers.{layer}.self_attn.{p}_proj"
            out, inp = shapes[path]
            model.add(LoraModule(f"text_encoder_2.{path}", "lora", {"lora_A.weight": t(4, inp), "lora_B.weight": t(out, 4)}, 2.0))
    return model


def eager(make, made, specs=None):
    return dict(make())


@pytest.mark.parametrize("case", [("kohya", flux_model, "out.safetensors", {}),
                                  ("mindone-sgm", sdxl_model, "out.ckpt", {"crc": True}),
                                  ("mindone-sgm", sdxl_model, "out.safetensors", {"crc": True})],
                         ids=["flux-kohya", "sdxl-mindone-ckpt", "sdxl-mindone-safetensors"])
def test_merged_as_written_gives_the_bytes_of_merged_first(tmp_path, monkeypatch, case):
    target, build, name, options = case
    model, writer = build(), get_writer(target)
    (tmp_path / "late").mkdir(), (tmp_path / "first").mkdir()
    writer.write(model, tmp_path / "late" / name, WriteOptions(**options))
    with monkeypatch.context() as patch:
        patch.setattr(underscored_files, "made_late", eager)
        patch.setattr(mindone, "made_late", eager)
        writer.write(model, tmp_path / "first" / name, WriteOptions(**options))
    assert (tmp_path / "late" / name).read_bytes() == (tmp_path / "first" / name).read_bytes()


def test_kohya_merges_each_fused_layer_after_the_first_write(tmp_path, monkeypatch):
    events = []
    merge, write = underscored_files.merge_present, zero_copy.write_tensor
    monkeypatch.setattr(underscored_files, "merge_present", lambda *a: events.append("merge") or merge(*a))
    monkeypatch.setattr(zero_copy, "write_tensor", lambda *a: events.append("write") or write(*a))  # tensors in memory
    get_writer("kohya").write(flux_model(), tmp_path / "out.safetensors", WriteOptions())
    first_write = events.index("write")
    assert events[:first_write] == ["merge"] * 3  # once each, for the header's shapes
    assert events[first_write:].count("merge") == 3  # again just before its tensors are written


def test_mindone_merges_each_fused_layer_once_before_writing_and_once_as_it_is_written(tmp_path, monkeypatch):
    """The merge made for a fused layer's alpha also gives its tensors' dtypes and shapes for the header: each
    merge costs a copy of its B blocks and a comparison of its A matrices, so it is made once before the first write,
    and once more just before its tensors are written (not held meanwhile)."""
    events = []
    merge, write = mindone.merge_present, ms_ckpt.write_tensor
    monkeypatch.setattr(mindone, "merge_present", lambda *a: events.append("merge") or merge(*a))
    monkeypatch.setattr(ms_ckpt, "write_tensor", lambda *a: events.append("write") or write(*a))
    get_writer("mindone-sgm").write(sdxl_model(), tmp_path / "out.ckpt", WriteOptions())
    first_write = events.index("write")
    assert events[:first_write] == ["merge"] * 3  # bigG in_proj of layers 0 and 5 for the header, then layer 0's to write
    assert events[first_write:].count("merge") == 1  # layer 5's, as it is written
