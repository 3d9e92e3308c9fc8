"""Training metadata (kohya ``ss_*``, ``modelspec.*``, trigger words) survives every writer that has a
place for it, the outputs still load in their real consumers, and writers without one say it is lost."""

from __future__ import annotations

import json
import warnings

import pytest

from lorabridge.converters import convert
from lorabridge.errors import LoraBridgeWarning
from lorabridge.formats import peft
from lorabridge.formats.neutral import read_neutral
from lorabridge.io.safetensors_file import read_safetensors, write_safetensors
from tests.fixtures.kohya_file import KOHYA_TRAINING_METADATA, kohya_sdxl_lora, write_kohya
from tests.fixtures.mindone import tiny_text, tiny_widths
from tests.fixtures.torch_lora import COMPONENTS, diffusers_messages

# format -> output name: every writer whose container has string metadata (MindONE's: tests/test_mindone.py).
WRITERS = {"neutral": "n.safetensors", "diffusers": "d.safetensors", "peft": "p_peft", "kohya": "k.safetensors",
           "legacy-diffusers": "l.safetensors", "lycoris": "ly.safetensors",
           "mindone-sgm": "sgm.safetensors", "mindone-diffusers": "md.safetensors", "mindone-kohya": "mk.safetensors"}


@pytest.fixture
def kohya_neutral(tmp_path):
    """A kohya SDXL LoRA for the tiny pipeline with kohya's 38 training fields, as a neutral file."""
    src = write_kohya(kohya_sdxl_lora(tiny_widths(), tiny_text()), tmp_path / "kohya.safetensors")
    neutral = convert(src, tmp_path / "kohya_neutral.safetensors", to="neutral", progress=False).output
    assert read_neutral(neutral).training == KOHYA_TRAINING_METADATA
    return neutral


@pytest.mark.parametrize("target", list(WRITERS))
def test_training_metadata_survives_a_round_trip_through_every_writer_that_can_store_it(kohya_neutral, tmp_path, target):
    written = convert(kohya_neutral, tmp_path / WRITERS[target], to=target, progress=False)
    assert not any("training metadata" in w for w in written.warnings)
    back = convert(written.output, tmp_path / "back.safetensors", to="neutral", progress=False).output
    assert read_neutral(back).training == KOHYA_TRAINING_METADATA


def test_peft_keeps_it_in_every_adapter_file_and_not_in_the_config(kohya_neutral, tmp_path):
    out = convert(kohya_neutral, tmp_path / "p", to="peft", progress=False).output
    for component in COMPONENTS:
        _, metadata = read_safetensors(out / component / "adapter_model.safetensors")
        assert metadata == {**KOHYA_TRAINING_METADATA, "format": "pt"}
        config = json.loads((out / component / "adapter_config.json").read_text())
        assert not any(key.startswith(("ss_", "modelspec")) for key in config)
    single = convert(out / "text_encoder", tmp_path / "te.safetensors", to="neutral", progress=False).output
    assert read_neutral(single).training == KOHYA_TRAINING_METADATA  # one component's directory alone has it all


def test_peft_adapter_files_that_disagree_are_warned_about(kohya_neutral, tmp_path):
    out = convert(kohya_neutral, tmp_path / "p", to="peft", progress=False).output
    weights = out / "text_encoder_2" / "adapter_model.safetensors"
    tensors, metadata = read_safetensors(weights)
    write_safetensors(weights, {k: t for k, t in tensors.items()}, {**metadata, "ss_output_name": "renamed"})
    with pytest.warns(LoraBridgeWarning, match="disagree on training metadata ss_output_name; kept the first"):
        model = peft.read(out)
    assert model.training["ss_output_name"] == KOHYA_TRAINING_METADATA["ss_output_name"]


@pytest.mark.parametrize("target,name", [("legacy-diffusers", "lora_pt.ckpt"), ("kohya", "lora.pt")])
def test_torch_pickle_outputs_say_the_training_metadata_is_lost(kohya_neutral, tmp_path, target, name):
    written = convert(kohya_neutral, tmp_path / name, to=target, progress=False)
    (note,) = [w for w in written.warnings if "training metadata" in w]
    assert f"{len(KOHYA_TRAINING_METADATA)} training metadata field(s)" in note
    assert "a torch pickle has no place for them; write a .safetensors file to keep them" in note


# ---- the outputs still load in the real consumers ---------------------------------------------

@pytest.mark.torch
def test_peft_output_with_training_metadata_loads_with_peftmodel_from_pretrained(kohya_neutral, tiny_pipe_factory, tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel

    out = convert(kohya_neutral, tmp_path / "p", to="peft", progress=False).output
    modules = read_neutral(kohya_neutral).modules
    pipe = tiny_pipe_factory()
    for component in COMPONENTS:
        with diffusers_messages() as messages:
            wrapped = PeftModel.from_pretrained(getattr(pipe, component), str(out / component))
        assert not [m for m in messages if "keys" in m.lower()], messages
        for name in (n for n in modules if n.startswith(component + ".")):
            layer = wrapped.base_model.model.get_submodule(name.split(".", 1)[1])
            assert layer.r["default"] == modules[name].rank, name


@pytest.mark.torch
@pytest.mark.parametrize("target", ["diffusers", "legacy-diffusers", "kohya"])
def test_safetensors_outputs_with_training_metadata_load_in_diffusers(kohya_neutral, tiny_pipe_factory, tmp_path, target):
    out = convert(kohya_neutral, tmp_path / f"out_{target}.safetensors", to=target, progress=False).output
    pipe = tiny_pipe_factory()
    with diffusers_messages() as messages, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        pipe.load_lora_weights(str(out.parent), weight_name=out.name)
    assert not [m for m in messages if "missing keys" in m.lower() or "unexpected keys" in m.lower()], messages
    for name, module in read_neutral(kohya_neutral).modules.items():
        component, path = name.split(".", 1)
        layer = getattr(pipe, component).get_submodule(path)
        assert layer.r["default_0"] == module.rank, (target, name)
