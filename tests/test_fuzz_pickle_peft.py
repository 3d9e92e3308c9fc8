"""Mutated torch pickles and PEFT adapter directories never crash their readers: they parse or give
the project's own error. Bounded hypothesis runs; ``bench/fuzz_atheris.py torch-pickle|peft-dir``
runs the same targets for longer under atheris."""

from __future__ import annotations

import io
import json
import tempfile
import warnings
import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorabridge.errors import LoraBridgeError
from lorabridge.formats import peft
from lorabridge.io.safetensors_file import write_safetensors
from lorabridge.io.torch_file import read_torch_file
from lorabridge.tensor import Tensor
from tests.test_fuzz_neutral import JSON

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
MODULE = "base_model.model.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


@lru_cache(maxsize=1)
def torch_seeds() -> tuple[bytes, ...]:
    """A small state dict as torch.save writes it: zip archive, the same deflated, legacy pickle."""
    torch = pytest.importorskip("torch")
    state = {"x.lora_A.weight": torch.ones(2, 3), "x.lora_B.weight": torch.zeros(3, 2, dtype=torch.bfloat16),
             "x.alpha": torch.tensor(2.0), "epoch": 3, "note": "seed"}
    seeds = []
    for zipped in (True, False):
        buffer = io.BytesIO()
        torch.save(state, buffer, _use_new_zipfile_serialization=zipped)
        seeds.append(buffer.getvalue())
    deflated = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(seeds[0])) as stored, zipfile.ZipFile(deflated, "w") as out:
        for info in stored.infolist():
            out.writestr(info.filename, stored.read(info), compress_type=zipfile.ZIP_DEFLATED)
    return (*seeds, deflated.getvalue())


@st.composite
def mutated(draw, seeds: tuple[bytes, ...]):
    blob = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 6))):
        action = draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = draw(st.integers(0, max(len(blob) - 1, 0)))
        if action == "flip" and blob:
            blob[pos] ^= 1 << draw(st.integers(0, 7))
        elif action == "cut":
            del blob[pos:]
        else:
            blob[pos:pos] = draw(st.binary(min_size=1, max_size=16))
    return bytes(blob)


def reads_or_refuses(read, path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            read(path)
        except LoraBridgeError:
            pass  # the only acceptable failure


@pytest.mark.torch
@FUZZ
@given(data=st.data())
def test_mutated_torch_files_give_our_error_or_parse(data, tmp_path):
    path = tmp_path / "fuzz.pt"
    path.unlink(missing_ok=True)  # a new file each time: nothing mapped from the last example sees this one
    path.write_bytes(data.draw(mutated(torch_seeds())))
    reads_or_refuses(read_torch_file, path)


@lru_cache(maxsize=1)
def adapter_weights() -> bytes:
    """adapter_model.safetensors of one SDXL attention module, as bytes."""
    tensors = {f"{MODULE}.lora_A.weight": Tensor.from_numpy(np.ones((2, 640), np.float32)),
               f"{MODULE}.lora_B.weight": Tensor.from_numpy(np.ones((640, 2), np.float32))}
    with tempfile.TemporaryDirectory() as scratch:
        write_safetensors(Path(scratch) / "seed.safetensors", tensors, {"format": "pt"})
        return (Path(scratch) / "seed.safetensors").read_bytes()


CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["to_q"], "use_rslora": False,
          "alpha_pattern": {"attn1.to_q": 3}, "rank_pattern": {}}
CONFIG_FIELDS = ["peft_type", "r", "lora_alpha", "alpha_pattern", "rank_pattern", "use_rslora", "target_modules"]


@FUZZ
@given(field=st.sampled_from(CONFIG_FIELDS), value=JSON, weights=st.data())
def test_peft_directories_with_arbitrary_configs_and_damaged_weights_give_our_error_or_a_model(
        field, value, weights, tmp_path):
    directory = tmp_path / "adapter"
    directory.mkdir(exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps({**CONFIG, field: value}), "utf-8")
    blob = weights.draw(st.just(adapter_weights()) | mutated((adapter_weights(),)))
    (directory / "adapter_model.safetensors").unlink(missing_ok=True)
    (directory / "adapter_model.safetensors").write_bytes(blob)
    reads_or_refuses(peft.read, directory)


def test_the_fuzz_seeds_parse(tmp_path):
    """The unmutated seeds read, so the mutations start from inputs that reach deep into the readers."""
    directory = tmp_path / "adapter"
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps(CONFIG), "utf-8")
    (directory / "adapter_model.safetensors").write_bytes(adapter_weights())
    model = peft.read(directory)
    assert [m.alpha for m in model.modules.values()] == [3.0]


@pytest.mark.torch
def test_the_torch_seeds_parse(tmp_path):
    for number, seed in enumerate(torch_seeds()):
        (tmp_path / f"{number}.pt").write_bytes(seed)
        tensors, metadata = read_torch_file(tmp_path / f"{number}.pt")
        assert sorted(tensors) == ["x.alpha", "x.lora_A.weight", "x.lora_B.weight"] and metadata["note"] == "seed"


@FUZZ
@given(field=st.sampled_from(CONFIG_FIELDS), value=JSON, whole=st.booleans())
def test_diffusers_files_with_arbitrary_adapter_metadata_give_our_error_or_a_model(field, value, whole, tmp_path):
    """diffusers' ``lora_adapter_metadata`` is a LoraConfig per component inside a safetensors header: any JSON
    value in any of its fields, or as the whole of it, is read or refused with our error by every reader that
    looks at it (and by inspect)."""
    from lorabridge.converters.registry import get_format
    from lorabridge.formats.neutral import inspect_file

    name = MODULE.removeprefix("base_model.model.")
    tensors = {f"unet.{name}.lora_A.weight": Tensor.from_numpy(np.ones((2, 640), np.float32)),
               f"unet.{name}.lora_B.weight": Tensor.from_numpy(np.ones((640, 2), np.float32))}
    config = value if whole else {f"unet.{key}": item for key, item in {**CONFIG, field: value}.items()}
    path = tmp_path / "fuzz.safetensors"
    path.unlink(missing_ok=True)
    write_safetensors(path, tensors, {"format": "pt", "lora_adapter_metadata": json.dumps(config)})
    for fmt in map(get_format, ("diffusers", "legacy-diffusers", "peft", "kohya")):
        reads_or_refuses(fmt.read if fmt.detect(path) else fmt.detect, path)
    reads_or_refuses(inspect_file, path)
