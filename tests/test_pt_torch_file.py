"""Torch pickles are read only through torch.load(weights_only=True): tensors come back exact, code never runs."""

from __future__ import annotations

import builtins
import pickle

import numpy as np
import pytest

from lorabridge.errors import LoraBridgeError
from lorabridge.io.torch_file import (container_of, read_state_dict, read_torch_file, state_dict_keys,
                                      write_state_dict, write_torch_file)
from lorabridge.io.safetensors_file import write_safetensors
from lorabridge.tensor import Tensor

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch


class CreatesAFile:
    """Unpickling this calls open(path, "w"): proof of execution is the file appearing."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return builtins.open, (self.path, "w")


def sample_state_dict():
    g = torch.Generator().manual_seed(0)
    return {
        "a.lora_A.weight": torch.randn(4, 8, generator=g),
        "a.lora_B.weight": torch.randn(16, 4, generator=g).half(),
        "b.lora_A.weight": torch.randn(2, 3, 3, 3, generator=g).bfloat16(),
        "b.alpha": torch.tensor(3.0),
    }


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy-pickle"])
def test_reads_every_dtype_bit_exact(tmp_path, zip_format):
    sd = sample_state_dict()
    path = tmp_path / "lora.ckpt"
    torch.save({**sd, "epoch": 3}, path, _use_new_zipfile_serialization=zip_format)
    assert container_of(path) == ("torch-zip" if zip_format else "torch-legacy")
    tensors, metadata = read_torch_file(path)
    assert metadata == {"epoch": "3"}
    for key, value in sd.items():
        raw = value.view(torch.int16) if value.dtype == torch.bfloat16 else value
        assert tensors[key].shape == tuple(value.shape)
        assert bytes(tensors[key].data) == raw.numpy().tobytes(), key
    assert tensors["b.lora_A.weight"].dtype == "BF16" and tensors["a.lora_B.weight"].dtype == "F16"


def test_unwraps_a_nested_state_dict(tmp_path):
    path = tmp_path / "lora.bin"
    torch.save({"state_dict": {"x.lora_A.weight": torch.ones(2, 2)}, "global_step": 10}, path)
    tensors, _ = read_torch_file(path)
    assert list(tensors) == ["x.lora_A.weight"]


def test_writes_torch_files_that_torch_loads_exactly(tmp_path):
    tensors = {k: Tensor.from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3), dtype) for k, dtype in
               (("f32", "F32"), ("f16", "F16"), ("bf16", "BF16"))}
    tensors["empty"] = Tensor.from_numpy(np.zeros((0, 3), np.float32))
    write_torch_file(tmp_path / "out.pt", tensors)
    loaded = torch.load(tmp_path / "out.pt", weights_only=True)
    assert loaded["bf16"].dtype == torch.bfloat16 and loaded["empty"].shape == (0, 3)
    back, _ = read_state_dict(tmp_path / "out.pt")
    assert all(back[k].same_as(t) for k, t in tensors.items())


def test_state_dict_writer_picks_the_container_by_suffix(tmp_path):
    tensors = {"w": Tensor.from_numpy(np.ones(3, np.float32))}
    write_state_dict(tmp_path / "a.safetensors", tensors, {"format": "pt"})
    write_state_dict(tmp_path / "a.ckpt", tensors)
    assert container_of(tmp_path / "a.safetensors") == "safetensors"
    assert container_of(tmp_path / "a.ckpt") == "torch-zip"
    assert state_dict_keys(tmp_path / "a.safetensors") == (["w"], {"format": "pt"})


@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_raw_pickle_is_refused_and_runs_nothing(tmp_path, protocol):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps({"x.lora_A.weight": CreatesAFile(marker)}, protocol=protocol))
    with pytest.raises(LoraBridgeError, match="refused to load.*could run code; nothing was executed"):
        read_torch_file(path)
    assert not marker.exists()


def test_malicious_torch_save_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil_pt.ckpt"
    torch.save({"x.lora_A.weight": torch.zeros(2, 2), "payload": CreatesAFile(marker)}, path)
    assert not marker.exists()
    with pytest.raises(LoraBridgeError, match=r"Unsupported global: GLOBAL (io|builtins)\.open"):
        read_torch_file(path)
    assert state_dict_keys(path) is None  # detection refuses it the same way
    assert not marker.exists()


def test_the_refusal_path_really_would_have_run_code(tmp_path):
    """Guard against a vacuous test: an unrestricted unpickler does create the file."""
    marker = tmp_path / "PWNED"
    pickle.loads(pickle.dumps(CreatesAFile(marker), protocol=2)).close()  # noqa: S301 - this is the point
    assert marker.exists()


@pytest.mark.parametrize("content, problem", [
    (b"", "empty file"),
    (b"\x0a\x05hello", "not a torch file"),
    (b"PK\x03\x04 broken zip", "not a readable torch file"),
    (b"\x80\x02\x8a", "not a readable torch file"),  # found by atheris: truncated pickle, IndexError inside torch
    (b"\x80\x05b", "not a readable torch file"),  # found by atheris: BUILD on an empty stack
])
def test_damaged_files_are_one_line_errors(tmp_path, content, problem):
    path = tmp_path / "x.bin"
    path.write_bytes(content)
    with pytest.raises(LoraBridgeError, match=problem):
        read_state_dict(path)


def test_safetensors_is_told_from_torch_by_content_not_suffix(tmp_path):
    path = tmp_path / "really_safetensors.ckpt"
    write_safetensors(path, {"w": Tensor.from_numpy(np.ones(2, np.float32))})
    assert container_of(path) == "safetensors"
    assert list(read_state_dict(path)[0]) == ["w"]


def test_a_safetensors_header_whose_length_starts_like_a_pickle_is_still_safetensors(tmp_path):
    """A header of 0x0280 bytes starts the file with b"\\x80\\x02", a pickle's protocol-2 marker: it was read
    as a torch pickle (whose loader dropped the metadata, and with it diffusers' alphas)."""
    path = tmp_path / "x.safetensors"
    for pad in range(700):
        write_safetensors(path, {"w": Tensor.from_numpy(np.ones(2, np.float32))}, {"pad": "x" * pad})
        if path.read_bytes()[:2] == b"\x80\x02":
            break
    assert path.read_bytes()[:2] == b"\x80\x02"
    assert container_of(path) == "safetensors"
    assert read_state_dict(path)[1]["pad"] == "x" * pad
