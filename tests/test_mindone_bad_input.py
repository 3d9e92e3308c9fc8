"""ms2neutral on damaged or foreign files: one line naming the file and the problem, exit 1, no output."""

from __future__ import annotations

import pickle
import struct
import zipfile

import numpy as np
import pytest

from tests.fixtures.mindone import sgm_attention_lora, tiny_widths, write_ckpt
from tests.fixtures.ms_ckpt import ckpt_record, pb_field

TAG = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.lora_A.weight"


def good_ckpt(tmp_path, **options):
    return write_ckpt(sgm_attention_lora(widths=tiny_widths()), tmp_path / "good.ckpt", **options)


def truncated(tmp_path):
    data = good_ckpt(tmp_path).read_bytes()
    return data[: len(data) // 2 + 3]


def crc_mismatch(tmp_path):
    data = bytearray(good_ckpt(tmp_path, crc=True).read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of tensor data
    return bytes(data)


def torch_zip(tmp_path):
    path = tmp_path / "archive.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"w": 1}))
    return path.read_bytes()


BAD_FILES = {
    "truncated record": (truncated, "truncat"),
    "varint past the end": (lambda tmp: b"\x0a\xff\xff\xff", "varint"),
    "dims disagree with content": (lambda tmp: ckpt_record(TAG, [2, 2], "Float32", b"\0" * 12), "12"),
    "absurd dims product": (lambda tmp: ckpt_record(TAG, [1 << 40, 1 << 40], "Float32", b"\0" * 16), "bytes"),
    "unknown dtype": (lambda tmp: ckpt_record(TAG, [2], "Float128", b"\0" * 32), "Float128"),
    "CRC mismatch": (crc_mismatch, "CRC"),
    "encrypted": (lambda tmp: struct.pack("<I", 0x7F3A5ED8) + b"\x11" * 64, "encrypted"),
    "PyTorch pickle": (lambda tmp: pickle.dumps({"lora": np.zeros(3)}, protocol=2), "PyTorch"),
    "PyTorch zip": (torch_zip, "PyTorch"),
    "map tensor": (lambda tmp: pb_field(1, pb_field(1, TAG.encode()) + pb_field(3, b"")), "map"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_input_gives_one_line_naming_the_file_and_writes_nothing(run_cli, tmp_path, case):
    make, expected = BAD_FILES[case]
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(make(tmp_path))
    out = tmp_path / "out.safetensors"
    result = run_cli("ms2neutral", bad, "-o", out)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: "), result.output
    assert expected.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in result.output
    assert not out.exists() and not list(tmp_path.glob(".out.safetensors*"))


def test_a_missing_input_and_an_existing_output_are_refused(run_cli, tmp_path):
    result = run_cli("ms2neutral", tmp_path / "absent.ckpt")
    assert result.exit_code == 1 and "no such file" in result.output
    src = good_ckpt(tmp_path)
    out = tmp_path / "taken.safetensors"
    out.write_bytes(b"keep me")
    result = run_cli("ms2neutral", src, "-o", out)
    assert result.exit_code == 1 and "pass --force" in result.output and out.read_bytes() == b"keep me"
    result = run_cli("neutral2ms", src, "-o", tmp_path / "x.ckpt")  # a .ckpt is no neutral input
    assert result.exit_code == 1 and not (tmp_path / "x.ckpt").exists()


def test_one_module_in_two_spellings_is_one_line_naming_both_keys(run_cli, tmp_path):
    """MindONE's kohya port resolves SGM and diffusers spellings alike (as kohya does), so both can name one layer."""
    rng = np.random.default_rng(0)
    arrays = {}
    for stem in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                 "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"):
        arrays[f"{stem}.lora_down.weight"] = rng.standard_normal((4, 640)).astype("f4")
        arrays[f"{stem}.lora_up.weight"] = rng.standard_normal((640, 4)).astype("f4")
    bad = write_ckpt(arrays, tmp_path / "twice.ckpt")
    result = run_cli("ms2neutral", bad, "-o", tmp_path / "out.safetensors")
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"error: {bad}: 1 module(s) named twice")
    assert "'lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q'" in line
    assert "'lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q'" in line
