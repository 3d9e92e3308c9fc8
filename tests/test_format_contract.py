"""What each format declares (formats/contract.py) is checked against what it does: a format declaring
``stores_alpha`` reads a non-default alpha back, the kinds and DoRA axes it declares are written as they
are and others are baked or refused, ``writes_directory`` matches what it writes, and facts written out
elsewhere (the DoRA refusal's "write --format ...") agree with the declarations."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import pytest

from lorabridge import converters
from lorabridge.converters import convert
from lorabridge.converters.registry import FORMATS, all_formats, get_format
from lorabridge.errors import LoraBridgeError
from lorabridge.formats.checks import DORA_FORMATS
from lorabridge.formats.contract import ReadOptions, WriteOptions
from lorabridge.architectures.sdxl import SDXL
from lorabridge.kinds import KINDS
from lorabridge.model import LoraModel, LoraModule
from lorabridge.tensor import Tensor
from tests.fixtures.core import make_lora_model, make_lora_module

# Formats lorabridge writes: the write-side declarations are checked on these; read-only formats (XLabs,
# OneTrainer) declare no writer and are checked by test_read_only_formats_declare_no_writing and their own tests.
WRITABLE = [name for name in FORMATS if get_format(name).writable]
READ_ONLY = [name for name in FORMATS if not get_format(name).writable]
LAYER = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # 640 -> 640
FACT = ("ss_learning_rate", "0.0001")


def output(name: str, tmp_path: Path, tag: str = "out") -> Path:
    """Where a test writes format ``name``: MindONE's default container (.ckpt), else .safetensors."""
    return tmp_path / f"{tag}{'.ckpt' if get_format(name).framework == 'mindspore' else '.safetensors'}"


def quietly(call, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return call(*args, **kwargs)


def written_and_read(name: str, model: LoraModel, tmp_path: Path, options: WriteOptions | None = None) -> LoraModel:
    fmt, path = get_format(name), output(name, tmp_path)
    quietly(fmt.write, model, path, options or WriteOptions())
    return quietly(fmt.read, path, ReadOptions())


def one_module(kind: str, dora_axis: str | None = None) -> LoraModel:
    """A model of one SDXL module of ``kind`` (a LoRA with DoRA magnitudes on ``dora_axis``)."""
    rng = np.random.default_rng(0)

    def t(*shape: int) -> Tensor:
        return Tensor.from_numpy(rng.standard_normal(shape).astype("f4"))

    model = LoraModel()
    if kind == "lora":
        module = make_lora_module(LAYER, (640, 640), 4, 4.0, rng)
        if dora_axis:
            magnitude = np.abs(rng.standard_normal((640, 1) if dora_axis == "out" else (1, 640))).astype("f4")
            module.tensors["dora_scale"] = Tensor.from_numpy(magnitude)
            module.dora_axis = dora_axis
    elif kind == "loha":
        module = LoraModule(LAYER, kind, {"hada_w1_a": t(640, 2), "hada_w1_b": t(2, 640),
                                          "hada_w2_a": t(640, 2), "hada_w2_b": t(2, 640)}, 2.0)
    elif kind == "lokr":
        module = LoraModule(LAYER, kind, {"lokr_w1": t(8, 8), "lokr_w2": t(80, 80)}, 2.0)
    else:
        module = LoraModule(LAYER, kind, {"diff": t(640, 640)}, 2.0)
    model.add(module)
    return model


@pytest.mark.parametrize("name", list(FORMATS))
def test_the_registry_finds_each_format_under_its_declared_name(name):
    fmt = get_format(name)
    assert fmt.name == name and fmt.framework in ("neutral", "mindspore", "torch") and fmt.description
    # MindONE's SGM and kohya namings are SDXL tables; the others' keys are diffusers paths, good for any registered architecture.
    assert fmt.architectures == ((SDXL.name,) if name in ("mindone-sgm", "mindone-kohya") else None)
    assert set(fmt.kinds) <= set(KINDS) and "lora" in fmt.kinds and set(fmt.dora_axes) <= {"out", "in"}


@pytest.mark.parametrize("name", WRITABLE)
def test_writes_directory_matches_what_the_writer_writes(name, tmp_path):
    path = output(name, tmp_path)
    quietly(get_format(name).write, make_lora_model(), path)
    assert path.is_dir() == get_format(name).writes_directory


@pytest.mark.parametrize("name", WRITABLE)
def test_stores_alpha_matches_whether_a_non_default_alpha_is_read_back(name, tmp_path):
    back = written_and_read(name, make_lora_model(rank=4, alpha=8.0), tmp_path)
    assert all(m.alpha == 8.0 for m in back.modules.values()) == get_format(name).stores_alpha
    assert len({m.alpha for m in back.modules.values()}) == 1  # else: folded into B, alpha = rank


@pytest.mark.parametrize("name", WRITABLE)
def test_stores_metadata_matches_whether_training_facts_are_read_back(name, tmp_path):
    model = make_lora_model()
    model.training = dict([FACT])
    back = written_and_read(name, model, tmp_path)
    assert (back.training.get(FACT[0]) == FACT[1]) == get_format(name).stores_metadata


@pytest.mark.parametrize("name", WRITABLE)
def test_records_source_hash_matches_whether_the_converter_hashes_the_source(name, tmp_path, monkeypatch):
    source = tmp_path / "src_kohya.safetensors"
    quietly(get_format("kohya").write, make_lora_model(), source)
    hashed = []
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    monkeypatch.setattr(converters, "_sha256_of_file", lambda path, held=None: hashed.append(path) or digest)
    result = quietly(convert, source, output(name, tmp_path), to=name, progress=False)
    assert bool(hashed) == get_format(name).records_source_hash
    if hashed:
        assert get_format(name).read(result.output).provenance["source_sha256"] == digest


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("name", WRITABLE)
def test_declared_kinds_are_written_as_is_and_others_baked_or_refused(name, kind, tmp_path):
    fmt = get_format(name)
    if kind in fmt.kinds:
        assert [m.kind for m in written_and_read(name, one_module(kind), tmp_path).modules.values()] == [kind]
        return
    with pytest.raises(LoraBridgeError, match=f"holds only plain LoRA.* 1 module\\(s\\) are {kind}"):
        quietly(fmt.write, one_module(kind), output(name, tmp_path))
    assert "bake_to_lora" in fmt.write_options  # a format that cannot hold every kind bakes on request
    baked = written_and_read(name, one_module(kind), tmp_path, WriteOptions(bake_to_lora=2))
    assert [m.kind for m in baked.modules.values()] == ["lora"]


@pytest.mark.parametrize("name", READ_ONLY)
def test_read_only_formats_declare_no_writing(name, tmp_path):
    """A read-only format has no writer and declares nothing about writing; a conversion to it is refused
    with one line before anything is read or written."""
    fmt = get_format(name)
    assert fmt.write is None and fmt.write_options == frozenset() and not fmt.writes_directory
    assert not fmt.records_source_hash and fmt.framework == "torch"
    source = tmp_path / "src_kohya.safetensors"
    quietly(get_format("kohya").write, make_lora_model(), source)
    with pytest.raises(LoraBridgeError, match=f"^{name} is read-only: .* write comfyui, diffusers, peft, legacy-diffusers, kohya or lycoris instead$"):
        convert(source, tmp_path / "out.safetensors", to=name, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src_kohya.safetensors"]


def test_only_formats_that_hold_every_kind_take_no_bake_rank():
    for fmt in (f for f in all_formats() if f.writable):
        assert ("bake_to_lora" in fmt.write_options) == (set(fmt.kinds) != set(KINDS)), fmt.name


@pytest.mark.parametrize("axis", ["out", "in"])
@pytest.mark.parametrize("name", WRITABLE)
def test_declared_dora_axes_are_written_as_they_are_and_others_refused(name, axis, tmp_path):
    fmt = get_format(name)
    if axis in fmt.dora_axes:
        (module,) = written_and_read(name, one_module("lora", axis), tmp_path).modules.values()
        assert module.dora_axis == axis and "dora_scale" in module.tensors
    else:
        with pytest.raises(LoraBridgeError, match="stores (no DoRA magnitudes|DoRA magnitudes per output row only)"):
            quietly(fmt.write, one_module("lora", axis), output(name, tmp_path))


@pytest.mark.parametrize("axis", ["out", "in"])
def test_the_dora_refusal_names_the_formats_that_declare_the_axis(axis):
    """checks.DORA_FORMATS is text the writers put in refusals (formats cannot import the registry): it must
    name exactly the PyTorch-world formats whose declarations keep ``axis``, in registry order."""
    names = [f.name for f in all_formats() if f.framework == "torch" and f.writable and axis in f.dora_axes]
    assert DORA_FORMATS[axis] == f"--format {', '.join(names[:-1])} or {names[-1]}"
