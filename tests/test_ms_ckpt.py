"""MindSpore checkpoint container, without MindSpore: round trips, layout, and every kind of bad input.

Cross-checks against real MindSpore are in test_ms_ckpt_mindspore.py.
"""

from __future__ import annotations

import mmap
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorabridge.errors import LoraBridgeError
from lorabridge.io import ms_ckpt
from lorabridge.io.ms_ckpt import (
    MsCheckpointFile,
    is_ms_checkpoint,
    iter_ms_checkpoint,
    read_ms_checkpoint,
    write_ms_checkpoint,
)
from lorabridge.io.ms_safetensors import read_ms_safetensors, write_ms_safetensors
from lorabridge.io.ms_dtypes import MS_TO_SAFETENSORS, SAFETENSORS_TO_MS
from lorabridge.io.safetensors_file import read_safetensors, write_safetensors
from lorabridge.tensor import Tensor
from tests.fixtures.ms_ckpt import SAMPLE_METADATA, ckpt_record, map_tensor_record, pb_field, pb_varint, record_tags


def f32(*shape, seed=0) -> Tensor:
    return Tensor.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


# ---------------------------------------------------------------- round trips


def test_every_dtype_round_trips_bit_exactly_in_order(ms_ckpt, ms_tensors):
    tensors, metadata = read_ms_checkpoint(ms_ckpt)
    assert list(tensors) == list(ms_tensors)
    for name, tensor in ms_tensors.items():
        assert tensors[name].same_as(tensor), name
    assert metadata == SAMPLE_METADATA


def test_dtype_table_covers_every_safetensors_dtype_mindspore_can_load():
    assert sorted(MS_TO_SAFETENSORS) == sorted(["Float64", "Float32", "Float16", "BFloat16", "Int64", "Int32", "Int16",
                                                "Int8", "UInt64", "UInt32", "UInt16", "UInt8", "Bool"])
    assert all(SAFETENSORS_TO_MS[st_name] == ms_name for ms_name, st_name in MS_TO_SAFETENSORS.items())


def test_tensors_are_zero_copy_views_of_the_mapped_file(ms_ckpt):
    for _, tensor in iter_ms_checkpoint(ms_ckpt):
        assert isinstance(tensor.data, memoryview)
        assert isinstance(tensor.data.obj, mmap.mmap)


def test_iteration_yields_tensors_only_and_metadata_is_separate(ms_ckpt, ms_tensors):
    assert [name for name, _ in iter_ms_checkpoint(ms_ckpt)] == list(ms_tensors)
    ckpt = MsCheckpointFile(ms_ckpt)
    assert ckpt.metadata == SAMPLE_METADATA
    assert "note" not in ckpt and len(ckpt) == len(ms_tensors)
    assert ckpt.header_entry("lora.bfloat16") == ("BF16", (3, 4))


def test_record_layout_matches_the_protobuf_messages(tmp_path):
    path = tmp_path / "one.ckpt"
    content = np.arange(6, dtype=np.float32).tobytes()
    write_ms_checkpoint(path, {"w": Tensor("F32", (2, 3), content)})
    assert path.read_bytes() == ckpt_record("w", [2, 3], "Float32", content)


def test_text_entries_are_utf32_after_the_tensors(tmp_path):
    path = tmp_path / "text.ckpt"
    write_ms_checkpoint(path, {"w": f32(2)}, {"note": "é✓", "empty": ""})
    tail = ckpt_record("note", [0], "str", "é✓".encode("utf-32-le")) + ckpt_record("empty", [0], "str", b"\0" * 4)
    assert path.read_bytes().endswith(tail)
    assert read_ms_checkpoint(path)[1] == {"note": "é✓", "empty": ""}


def test_scalars_and_empty_tensors(tmp_path):
    path = tmp_path / "edge.ckpt"
    write_ms_checkpoint(path, {"s": Tensor.from_numpy(np.array(2.5, np.float32)), "e": Tensor("F32", (0, 3), b"")})
    tensors, _ = read_ms_checkpoint(path)
    assert tensors["s"].shape == () and tensors["s"].to_numpy() == 2.5
    assert tensors["e"].shape == (0, 3)


def test_dims_zero_with_one_element_is_a_scalar_as_in_mindspore(tmp_path):
    path = tmp_path / "old_scalar.ckpt"
    path.write_bytes(ckpt_record("s", [0], "Float32", np.float32(1.5).tobytes()))
    tensors, _ = read_ms_checkpoint(path)
    assert tensors["s"].shape == () and tensors["s"].to_numpy() == 1.5


def test_large_tensors_are_split_into_same_tag_chunks_and_joined_on_read(tmp_path, monkeypatch):
    monkeypatch.setattr(ms_ckpt, "CHUNK_BYTES", 16)
    big, small = f32(5, 3), f32(2)  # 60 bytes -> chunks of 16, 16, 16, 12
    path = tmp_path / "chunked.ckpt"
    write_ms_checkpoint(path, {"big": big, "small": small}, crc=True)
    assert record_tags(path.read_bytes()) == ["big"] * 4 + ["small"]
    tensors, _ = read_ms_checkpoint(path)
    assert tensors["big"].same_as(big) and tensors["small"].same_as(small)


def test_hand_made_chunks_with_full_dims_are_joined(tmp_path):
    values = np.arange(8, dtype=np.float32)
    path = tmp_path / "two.ckpt"
    path.write_bytes(ckpt_record("w", [2, 4], "Float32", values[:5].tobytes())
                     + ckpt_record("w", [2, 4], "Float32", values[5:].tobytes()))
    tensors, _ = read_ms_checkpoint(path)
    np.testing.assert_array_equal(tensors["w"].to_numpy(), values.reshape(2, 4))


def test_packed_dims_are_accepted(tmp_path):
    """Protobuf readers must accept packed repeated ints even where the writer used the plain form."""
    content = np.arange(6, dtype=np.int32).tobytes()
    tensor = pb_field(1, pb_varint(2) + pb_varint(3)) + pb_field(2, b"Int32") + pb_field(3, content)
    path = tmp_path / "packed.ckpt"
    path.write_bytes(pb_field(1, pb_field(1, b"w") + pb_field(2, tensor)))
    assert read_ms_checkpoint(path)[0]["w"].shape == (2, 3)


def test_unknown_protobuf_fields_are_skipped(tmp_path):
    content = np.zeros(2, np.float32).tobytes()
    tensor = pb_field(9, b"future") + pb_varint(1 << 3) + pb_varint(2) + pb_field(2, b"Float32") + pb_field(3, content)
    path = tmp_path / "future.ckpt"
    path.write_bytes(pb_field(1, pb_field(1, b"w") + pb_field(2, tensor) + pb_varint(7 << 3) + pb_varint(1)))
    assert read_ms_checkpoint(path)[0]["w"].shape == (2,)


def test_crc_trailer_is_crc32_of_all_records_in_10_big_endian_bytes(ms_ckpt, ms_ckpt_crc):
    plain, with_crc = ms_ckpt.read_bytes(), ms_ckpt_crc.read_bytes()
    assert with_crc == plain + b"crc_num" + zlib.crc32(plain).to_bytes(10, "big")
    assert MsCheckpointFile(ms_ckpt_crc).has_crc and not MsCheckpointFile(ms_ckpt).has_crc
    assert read_ms_checkpoint(ms_ckpt_crc)[1] == SAMPLE_METADATA


def test_progress_reports_every_content_byte(tmp_path, ms_tensors):
    seen = []
    write_ms_checkpoint(tmp_path / "p.ckpt", ms_tensors, progress=seen.append)
    assert sum(seen) == sum(t.nbytes for t in ms_tensors.values())


def test_writing_replaces_atomically_and_a_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.ckpt"
    write_ms_checkpoint(path, {"w": f32(4)})
    before = path.read_bytes()

    def explode(_):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_ms_checkpoint(path, {"w": f32(4, seed=1), "v": f32(4)}, progress=explode)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.ckpt"]


@pytest.mark.parametrize("tensors, metadata, problem", [
    ({"w": Tensor("F8_E4M3", (2,), b"\0\0")}, None, "cannot hold F8_E4M3"),
    ({"w": Tensor("F32", (0,), b"")}, None, "shape (0,)"),
    ({"w": f32(2)}, {"w": "x"}, "both a tensor and a metadata key"),
    ({"w": f32(2)}, {"note": "ends\x00"}, "NUL"),
    ({"w": f32(2)}, {"note": 3}, "must be a string"),
    ({}, {}, "empty checkpoint"),
    ({"\udc80": f32(2)}, None, "UTF-8"),
])
def test_writer_refuses_what_mindspore_cannot_read_back(tmp_path, tensors, metadata, problem):
    path = tmp_path / "out.ckpt"
    with pytest.raises(LoraBridgeError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        write_ms_checkpoint(path, tensors, metadata)
    assert not path.exists() and not list(tmp_path.iterdir())


# ---------------------------------------------------------------- sniffing


def test_is_ms_checkpoint(tmp_path, ms_ckpt, ms_ckpt_crc):
    assert is_ms_checkpoint(ms_ckpt) and is_ms_checkpoint(ms_ckpt_crc)
    encrypted = tmp_path / "enc.ckpt"
    encrypted.write_bytes(struct.pack("<I", 0x7F3A5ED8) + bytes(40))
    assert is_ms_checkpoint(encrypted), "encrypted MindSpore files are recognised, so reading can explain them"
    st_file = tmp_path / "x.safetensors"
    write_safetensors(st_file, {"w": f32(2)})
    text = tmp_path / "notes.ckpt"
    text.write_text("hello world")
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    for path in (st_file, text, empty, tmp_path / "missing.ckpt", tmp_path):
        assert not is_ms_checkpoint(path), path


# ---------------------------------------------------------------- bad input


def one_line_error(path, *needles):
    """Read ``path``; it must fail with one LoraBridgeError line naming the file and each needle."""
    with pytest.raises(LoraBridgeError) as info:
        read_ms_checkpoint(path)
    text = str(info.value)
    assert "\n" not in text and str(path) in text
    for needle in needles:
        assert needle in text, text
    return text


def test_truncated_file(ms_ckpt):
    data = ms_ckpt.read_bytes()
    ms_ckpt.write_bytes(data[:len(data) - 7])
    one_line_error(ms_ckpt, "remain (truncated")


def test_truncated_inside_a_record_header(tmp_path):
    path = tmp_path / "cut.ckpt"
    path.write_bytes(ckpt_record("w", [2], "Float32", bytes(8))[:9])
    one_line_error(path, "truncated")


def test_varint_running_past_the_end(tmp_path):
    path = tmp_path / "varint.ckpt"
    path.write_bytes(b"\x0a\xff\xff\xff")
    one_line_error(path, "varint runs past the end", "at byte 1")


def test_overlong_varint(tmp_path):
    path = tmp_path / "varint.ckpt"
    path.write_bytes(b"\x0a" + b"\xff" * 11 + b"\x01")
    one_line_error(path, "longer than 10 bytes")


def test_dims_disagreeing_with_the_content_length(tmp_path):
    path = tmp_path / "dims.ckpt"
    path.write_bytes(ckpt_record("w", [2, 3], "Float32", bytes(20)))
    one_line_error(path, "'w'", "need 24 bytes but the content holds 20")


def test_chunks_holding_too_much(tmp_path):
    path = tmp_path / "dup.ckpt"
    path.write_bytes(ckpt_record("w", [2], "Float32", bytes(8)) * 2)
    one_line_error(path, "need 8 bytes but the content holds 16 in 2 records")


def test_dims_needing_terabytes_are_refused_without_allocating(tmp_path):
    path = tmp_path / "huge.ckpt"
    path.write_bytes(ckpt_record("w", [1_000_000, 1_000_000], "Float32", bytes(16)))
    tracemalloc.start()
    try:
        one_line_error(path, "need 4.0 TB", "more than the whole file")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


def test_astronomical_dims_count(tmp_path):
    path = tmp_path / "huge.ckpt"
    path.write_bytes(ckpt_record("w", [2 ** 62] * 64, "Float32", bytes(16)))
    one_line_error(path, "more than the whole file")


def test_negative_dimension(tmp_path):
    path = tmp_path / "neg.ckpt"
    path.write_bytes(ckpt_record("w", [-2], "Float32", bytes(8)))
    one_line_error(path, "negative dimension")


def test_unknown_dtype_string(ms_ckpt):
    ms_ckpt.write_bytes(ms_ckpt.read_bytes().replace(b"Float32", b"Float99", 1))
    one_line_error(ms_ckpt, "unknown tensor_type 'Float99'")


def test_dtypes_mindspore_writes_but_lorabridge_does_not_read(tmp_path):
    path = tmp_path / "complex.ckpt"
    path.write_bytes(ckpt_record("c", [2], "Complex64", bytes(16)))
    one_line_error(path, "Complex64", "complex tensors are not supported")


def test_chunks_that_disagree(tmp_path):
    path = tmp_path / "mixed.ckpt"
    path.write_bytes(ckpt_record("w", [4], "Float32", bytes(8)) + ckpt_record("w", [4], "Float16", bytes(8)))
    one_line_error(path, "chunks of 'w' disagree")


def test_duplicate_tag(tmp_path):
    path = tmp_path / "dup.ckpt"
    path.write_bytes(ckpt_record("w", [1], "Float32", bytes(4)) + ckpt_record("v", [1], "Float32", bytes(4))
                     + ckpt_record("w", [1], "Float32", bytes(4)))
    one_line_error(path, "'w' appears twice")


def test_crc_mismatch(ms_ckpt_crc):
    data = bytearray(ms_ckpt_crc.read_bytes())
    data[60] ^= 0x01  # inside the first tensor's content: structure intact, CRC broken
    ms_ckpt_crc.write_bytes(bytes(data))
    one_line_error(ms_ckpt_crc, "CRC mismatch", "damaged")


def test_crc_trailer_damaged(ms_ckpt_crc):
    data = bytearray(ms_ckpt_crc.read_bytes())
    data[-1] ^= 0xFF
    ms_ckpt_crc.write_bytes(bytes(data))
    one_line_error(ms_ckpt_crc, "CRC mismatch")


@pytest.mark.parametrize("magic, mode", [(0x7F3A5ED8, "AES-GCM"), (0x7F3A5ED9, "AES-CBC"), (0x7F3A5EDA, "SM4-CBC")])
def test_encrypted_file(tmp_path, magic, mode):
    path = tmp_path / "enc.ckpt"
    path.write_bytes(struct.pack("<II", magic, 72) + np.random.default_rng(0).bytes(72))
    one_line_error(path, "encrypted", mode)


def test_map_tensor(tmp_path):
    path = tmp_path / "map.ckpt"
    path.write_bytes(ckpt_record("w", [1], "Float32", bytes(4)) + map_tensor_record("embedding"))
    one_line_error(path, "'embedding' is a map tensor")


def test_invalid_utf8_tag(tmp_path):
    path = tmp_path / "tag.ckpt"
    record = ckpt_record("w", [1], "Float32", bytes(4))
    path.write_bytes(record.replace(b"\x0a\x01w", b"\x0a\x01\xff", 1))
    one_line_error(path, "tag is not valid UTF-8")


def test_trailing_garbage(ms_ckpt):
    ms_ckpt.write_bytes(ms_ckpt.read_bytes() + b"garbage")
    one_line_error(ms_ckpt, "expected a checkpoint record", "found 0x67")


@pytest.mark.torch
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy-pickle"])
def test_pytorch_checkpoint(tmp_path, zip_format):
    torch = pytest.importorskip("torch")
    path = tmp_path / "lora.ckpt"
    torch.save({"w": torch.zeros(2)}, path, _use_new_zipfile_serialization=zip_format)
    one_line_error(path, "this is a PyTorch checkpoint", "not a MindSpore one")


def test_safetensors_given_to_the_ckpt_reader(tmp_path):
    path = tmp_path / "lora.safetensors"
    write_safetensors(path, {"w": f32(2)})
    one_line_error(path, "safetensors file", "read_ms_safetensors")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.ckpt"
    path.write_bytes(b"")
    one_line_error(path, "empty file")


def test_directory(tmp_path):
    one_line_error(tmp_path, "is a directory")


def test_missing_file(tmp_path):
    one_line_error(tmp_path / "nope.ckpt", "no such file")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_files_fail_with_lorabridge_errors_only(tmp_path_factory, data):
    """Any truncation or byte flip of a valid file reads fine or raises LoraBridgeError, never anything else."""
    directory = tmp_path_factory.mktemp("fuzz")
    good = directory / "good.ckpt"
    write_ms_checkpoint(good, {"a": f32(2, 3), "b": Tensor.from_numpy(np.arange(3, dtype=np.int64))},
                        {"note": "x"}, crc=data.draw(st.booleans()))
    raw = bytearray(good.read_bytes())
    cut = data.draw(st.integers(1, len(raw)))
    for index in data.draw(st.lists(st.integers(0, len(raw) - 1), max_size=3)):
        raw[index] = data.draw(st.integers(0, 255))
    bad = directory / "bad.ckpt"
    bad.write_bytes(bytes(raw[:cut]))
    try:
        read_ms_checkpoint(bad)
    except LoraBridgeError as exc:
        assert "\n" not in str(exc)


def _parse_both_ways(raw: bytes):
    """(the save_checkpoint-layout reader's result, the by-fields parser's result or its Malformed message)."""
    fast = ms_ckpt._record_as_saved(raw, 0, len(raw))
    try:
        slow = ms_ckpt._record_by_fields(raw, 0, len(raw))
    except ms_ckpt.Malformed as exc:
        slow = str(exc)
    return fast, slow


def test_records_as_save_checkpoint_lays_them_out_take_the_direct_reader(tmp_path):
    write_ms_checkpoint(tmp_path / "a.ckpt", {"a" * 200: f32(300, 2), "b": f32()})
    raw = (tmp_path / "a.ckpt").read_bytes()
    fast, slow = _parse_both_ways(raw)
    assert fast is not None and fast == slow  # multi-byte lengths (tag, tensor, content) and a dim over 127
    assert fast[0].dims == (300, 2) and fast[0].tag == "a" * 200


@settings(max_examples=400, deadline=None)
@given(tag=st.text(max_size=140), dims=st.lists(st.integers(0, (1 << 64) - 1), max_size=4),
       tensor_type=st.sampled_from(["Float32", "Int64", "str", "Float1"]), content=st.binary(max_size=300),
       packed=st.booleans(), extra=st.sampled_from([b"", pb_field(9, b"x"), pb_varint(4 << 3) + pb_varint(1)]),
       flips=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=2),
       cut=st.integers(0, 40))
def test_the_direct_reader_agrees_with_the_by_fields_parser_or_leaves_the_record_to_it(
        tag, dims, tensor_type, content, packed, extra, flips, cut):
    """Whatever the bytes, the direct reader returns what the protobuf parser returns, or None (then the parser decides)."""
    dims_fields = (pb_field(1, b"".join(pb_varint(d) for d in dims)) if packed
                   else b"".join(pb_varint(1 << 3) + pb_varint(d) for d in dims))
    proto = dims_fields + pb_field(2, tensor_type.encode()) + pb_field(3, content) + extra
    raw = bytearray(pb_field(1, pb_field(1, tag.encode()) + pb_field(2, proto)))
    for index, value in flips:
        raw[index % len(raw)] = value
    raw = raw[:max(1, len(raw) - cut)]
    fast, slow = _parse_both_ways(bytes(raw))
    assert fast is None or fast == slow
    if not packed and not extra and not flips and not cut and all(d < 1 << 63 for d in dims):
        assert fast is not None  # as save_checkpoint writes it: never left to the slow parser


# ---------------------------------------------------------------- MindSpore's safetensors checkpoints


def test_ms_safetensors_round_trip_with_format_ms_and_crc(tmp_path, ms_tensors):
    path = tmp_path / "lora.safetensors"
    write_ms_safetensors(path, ms_tensors, {"note": "x"}, crc=True)
    tensors, metadata = read_ms_safetensors(path)
    assert metadata["format"] == "ms" and metadata["note"] == "x" and metadata["crc_num"].isdigit()
    assert set(tensors) == set(ms_tensors)
    assert all(tensors[name].same_as(tensor) for name, tensor in ms_tensors.items())


def test_ms_safetensors_crc_is_over_sorted_names_and_bytes(tmp_path):
    tensors = {"b": f32(2), "a": f32(3, seed=1)}
    path = tmp_path / "lora.safetensors"
    write_ms_safetensors(path, tensors, crc=True)
    expected = zlib.crc32(tensors["b"].data, zlib.crc32(b"b", zlib.crc32(tensors["a"].data, zlib.crc32(b"a"))))
    assert read_safetensors(path)[1]["crc_num"] == str(expected)


def test_ms_safetensors_crc_mismatch(tmp_path):
    path = tmp_path / "lora.safetensors"
    write_ms_safetensors(path, {"w": f32(4)}, crc=True)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(LoraBridgeError, match="CRC mismatch"):
        read_ms_safetensors(path)


def test_ms_safetensors_refuses_packed_int4_tensors(tmp_path):
    path = tmp_path / "int4.safetensors"
    write_safetensors(path, {"q": Tensor("U8", (2,), b"\x12\x34")}, {"format": "ms", "q": "Int4"})
    with pytest.raises(LoraBridgeError, match="packed 4-bit"):
        read_ms_safetensors(path)


@pytest.mark.parametrize("metadata, problem", [({"w": "Int4"}, "both a tensor and a metadata key"),
                                               ({"crc_num": "1"}, "reserved")])
def test_ms_safetensors_writer_refuses_metadata_mindspore_misreads(tmp_path, metadata, problem):
    path = tmp_path / "x.safetensors"
    with pytest.raises(LoraBridgeError, match=problem):
        write_ms_safetensors(path, {"w": f32(2)}, metadata)
    assert not path.exists()
