"""The streaming write/read path: one pass over the data, mapped pages let go, same bytes as before.

Speed and memory are measured in bench/convert_bench.py; these tests pin the behaviour the
optimizations must keep: the bytes written, the hashes, the errors, and that nothing is lost.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import struct
import threading
import warnings
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorabridge.converters import convert
from lorabridge.errors import LoraBridgeError
from lorabridge.formats import neutral
from lorabridge.formats.checks import all_finite
from lorabridge.io import atomic, ms_ckpt, safetensors_file, streaming, zero_copy
from lorabridge.io.input_file import held_inputs
from lorabridge.io.safetensors_file import SafetensorsFile, write_safetensors
from lorabridge.io.streaming import in_background, one_thread, release_pages
from lorabridge.manifest import build_manifest, load_schema, schema_problems, tensor_sha256
from lorabridge.tensor import FileSpan, Tensor
from tests.fixtures.core import make_lora_model


def _mapped(path, access=mmap.ACCESS_READ):
    handle = open(path, "r+b" if access == mmap.ACCESS_COPY else "rb")
    return handle, mmap.mmap(handle.fileno(), 0, access=access)


@pytest.fixture
def release_often(monkeypatch):
    """Release a map's pages on every use, so that small test files exercise the release."""
    monkeypatch.setattr(streaming, "RELEASE_EVERY_BYTES", 1)
    monkeypatch.setattr(streaming, "KEEP_MAPS_UP_TO_BYTES", 0)


def test_released_pages_read_back_the_same(tmp_path, release_often):
    path = tmp_path / "data.bin"
    path.write_bytes(np.random.default_rng(0).bytes(3 << 20))
    handle, mapped = _mapped(path)
    with handle, mapped, memoryview(mapped) as whole, whole[12345:2_000_000] as view:
        before = bytes(view)
        release_pages(view)
        assert bytes(view) == before
        release_pages(whole)
        assert bytes(view) == before


def test_a_strided_view_of_a_map_is_left_alone(tmp_path, release_often):
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(range(256)) * 4096)
    handle, mapped = _mapped(path)
    with handle, mapped, memoryview(mapped) as whole, whole[::2] as strided:
        release_pages(strided)  # no place in the map to charge: not an error either
        assert bytes(strided[:3]) == b"\x00\x02\x04"


def test_private_maps_are_never_released(tmp_path, release_often):
    """Dropping the pages of a private (copy-on-write) map would lose its changes: release leaves it alone."""
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(1 << 20))
    handle, mapped = _mapped(path, mmap.ACCESS_COPY)
    with handle, mapped, memoryview(mapped) as view:
        view[:4] = b"edit"
        release_pages(view)
        assert bytes(view[:4]) == b"edit"
    release_pages(b"bytes are not mapped")


def test_a_small_map_stays_mapped_and_is_hashed_from_its_pages_a_large_one_by_pread(tmp_path, monkeypatch):
    """A map of at most KEEP_MAPS_UP_TO_BYTES is never released, so a hash reads a tensor's mapped bytes in one
    piece; from a larger map, released as it is used, the bytes come by pread through the small buffer."""
    path = tmp_path / "data.bin"
    path.write_bytes(np.random.default_rng(5).bytes(1 << 16))
    handle, mapped = _mapped(path)
    source = zero_copy.SourceFile(os.dup(handle.fileno()), path)
    with handle, mapped, memoryview(mapped) as whole, whole[4096:12288] as view:
        tensor = Tensor("U8", (8192,), view, FileSpan(source, 4096))
        assert streaming.kept_mapped(view) and not streaming.kept_mapped(memoryview(bytes(view)))
        assert [len(piece) for piece in zero_copy.chunks(tensor, bytearray(1024))] == [8192]
        monkeypatch.setattr(streaming, "KEEP_MAPS_UP_TO_BYTES", (1 << 16) - 1)
        assert not streaming.kept_mapped(view)
        pieces = [bytes(piece) for piece in zero_copy.chunks(tensor, bytearray(1024))]
        assert [len(piece) for piece in pieces] == [1024] * 8 and b"".join(pieces) == bytes(view)



def _mapped_kib(mapped: mmap.mmap) -> int:
    """Resident KiB of ``mapped`` in this process (its block in /proc/self/smaps)."""
    base = np.frombuffer(mapped, np.uint8).__array_interface__["data"][0]
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for at, line in enumerate(lines):
        if "-" in line.split(" ")[0] and int(line.split("-")[0], 16) == base:
            return next(int(row.split()[1]) for row in lines[at + 1:] if row.startswith("Rss:"))
    raise AssertionError("map not found in /proc/self/smaps")


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads /proc/self/smaps (Linux)")
def test_a_pass_reading_small_pieces_far_apart_is_charged_for_what_it_maps_not_its_bytes(tmp_path, monkeypatch):
    """A fault maps the pages around the byte touched (64 KiB at least, a whole large folio for a file read from the
    disk): 4 KiB read every 256 KiB counted as 4 KiB each let 64 times more stay mapped than the release stride."""
    monkeypatch.setattr(streaming, "KEEP_MAPS_UP_TO_BYTES", 0)
    monkeypatch.setattr(streaming, "RELEASE_EVERY_BYTES", 1 << 20)
    path, data = tmp_path / "data.bin", np.random.default_rng(3).bytes(64 << 20)
    path.write_bytes(data)
    handle, mapped = _mapped(path)
    peak = 0
    with handle, mapped, memoryview(mapped) as whole:
        for start in range(0, 64 << 20, 256 << 10):
            with whole[start:start + 4096] as piece:
                assert piece[0] == data[start]
                release_pages(piece)
            peak = max(peak, _mapped_kib(mapped))
    assert peak <= 2 * 1024 + 4 * 2048, peak  # the stride, plus a few largest folios around the last pieces

def test_in_background_returns_the_result_or_raises_the_error():
    assert in_background(sum, [1, 2, 3])() == 6
    with pytest.raises(ZeroDivisionError):
        in_background(lambda: 1 / 0)()


def test_inside_one_thread_the_work_runs_once_in_the_thread_that_first_asks_and_never_if_none_asks():
    """A batch whose workers keep every core busy starts no helper threads (see one_thread's measurement)."""
    calls = []

    def work(value):
        calls.append(threading.get_ident())
        if value is None:
            raise ValueError("no value")
        return value

    started = threading.active_count()
    with one_thread():
        result, failing, unasked = in_background(work, 7), in_background(work, None), in_background(work, 8)
        assert calls == [] and threading.active_count() == started
    assert result() == result() == 7 and calls == [threading.get_ident()], "run once, here, when asked"
    for _ in range(2):
        with pytest.raises(ValueError, match="no value"):
            failing()
    assert len(calls) == 2, "the error is kept, not the work done again"
    assert in_background(work, 9)() == 9 and calls[-1] != threading.get_ident(), "outside the block: a thread again"
    del unasked


def _tensors():
    rng = np.random.default_rng(1)
    return {"b": Tensor.from_numpy(rng.standard_normal((3, 4)).astype("f4")),
            "a": Tensor.from_numpy(rng.standard_normal(5).astype("f2"))}


def test_late_metadata_gives_the_bytes_of_knowing_it_up_front(tmp_path):
    digest = hashlib.sha256(b"x").hexdigest()
    write_safetensors(tmp_path / "known.safetensors", _tensors(), {"hash": digest, "other": "text"})
    write_safetensors(tmp_path / "late.safetensors", _tensors(), {"hash": "f" * 64, "other": "text"},
                      late={"f" * 64: lambda: digest})
    assert (tmp_path / "late.safetensors").read_bytes() == (tmp_path / "known.safetensors").read_bytes()


def test_a_header_is_parsed_once_per_command_however_often_the_file_is_opened(tmp_path, monkeypatch):
    """Detecting a format, reading it and summing up each open the file: inside held_inputs (every command) the
    map is shared, and so is its checked header; each reader still gets metadata of its own to change."""
    path = tmp_path / "lora.safetensors"
    write_safetensors(path, _tensors(), {"note": "kept"})
    parses = []
    parse = safetensors_file.load_json
    monkeypatch.setattr(safetensors_file, "load_json", lambda *args, **kw: parses.append(args[2]) or parse(*args, **kw))
    with held_inputs():
        first, second = SafetensorsFile(path), SafetensorsFile(path)
        first.metadata["note"] = "changed by the first reader"
        assert second.metadata == {"note": "kept"} and second.keys() == first.keys()
        assert second.tensor("a").data.tobytes() == first.tensor("a").data.tobytes()
    assert parses == [path]
    SafetensorsFile(path), SafetensorsFile(path)  # outside held_inputs every open maps the file anew
    assert parses == [path] * 3


def _data_start(path) -> int:
    with open(path, "rb") as handle:
        return 8 + struct.unpack("<Q", handle.read(8))[0]


def _trailing_spaces(path) -> int:
    header = Path(path).read_bytes()[8:_data_start(path)]
    return len(header) - len(header.rstrip(b" "))


def test_copied_tensors_land_where_they_lay_within_a_page_and_the_data_stays_8_byte_aligned(tmp_path):
    """The header ends with as many spaces as put the output's data at the input's place within a page: the
    kernel then copies whole pages. Tensors made in memory get the 8-byte alignment alone."""
    from safetensors import safe_open

    write_safetensors(tmp_path / "in.safetensors", _tensors(), {"note": "an input"})
    with held_inputs():
        source = SafetensorsFile(tmp_path / "in.safetensors").tensors()
        write_safetensors(tmp_path / "copied.safetensors", source, {"note": "a longer note: the header grows"})
    write_safetensors(tmp_path / "made.safetensors", _tensors())
    copied, made = _data_start(tmp_path / "copied.safetensors"), _data_start(tmp_path / "made.safetensors")
    assert copied % 4096 == _data_start(tmp_path / "in.safetensors") % 4096 and copied % 8 == 0
    assert made % 8 == 0 and _trailing_spaces(tmp_path / "made.safetensors") < 8  # no page padding without an input
    with safe_open(tmp_path / "copied.safetensors", "np") as f:
        assert {k: f.get_tensor(k).tobytes() for k in f.keys()} == {k: bytes(t.data) for k, t in _tensors().items()}


_ODD_NAMES = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12).filter(lambda n: n != "__metadata__")


@settings(max_examples=60, deadline=None)
@given(names=st.lists(_ODD_NAMES, min_size=0, max_size=6, unique=True),
       metadata=st.dictionaries(_ODD_NAMES, st.text(max_size=12), max_size=3))
def test_the_header_is_the_compact_json_of_the_tensors_and_metadata(tmp_path_factory, names, metadata):
    """Whatever the names (quotes, backslashes, newlines, control characters, non-ASCII), the header the writer
    builds entry by entry is what ``json.dumps`` makes of the same dict, as the safetensors library reads it."""
    tensors = {name: Tensor("F16", (2, index + 1), bytes(4 * (index + 1))) for index, name in enumerate(names)}
    out = tmp_path_factory.mktemp("header") / "odd.safetensors"
    write_safetensors(out, tensors, metadata)
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for name, tensor in tensors.items():
        header[name] = {"dtype": "F16", "shape": list(tensor.shape), "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    written = Path(out).read_bytes()[8:_data_start(out)]
    assert written.rstrip(b" ") == json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert SafetensorsFile(out).metadata == metadata


def test_a_tensor_named_like_the_metadata_key_is_refused(tmp_path):
    with pytest.raises(ValueError, match="__metadata__"):
        write_safetensors(tmp_path / "out.safetensors", {"__metadata__": _tensors()["a"]}, {"note": "x"})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("metadata, late, message", [
    ({"hash": "abc"}, {"zzz": lambda: "xyz"}, "occurs 0 times"),
    ({"one": "abc", "two": "abc"}, {"abc": lambda: "xyz"}, "occurs 2 times"),
    ({"hash": "abc"}, {"abc": lambda: "wxyz"}, "not as long as its placeholder"),
])
def test_bad_late_metadata_is_refused_and_leaves_no_file(tmp_path, metadata, late, message):
    out = tmp_path / "out.safetensors"
    with pytest.raises(ValueError, match=message):
        write_safetensors(out, _tensors(), metadata, late=late)
    assert list(tmp_path.iterdir()) == []


def test_neutral_writer_is_one_pass_but_writes_the_two_pass_bytes(tmp_path, lora_model, monkeypatch):
    """Hashing beside writing behind a placeholder gives the file of hashing first, then writing."""
    monkeypatch.setattr("lorabridge.manifest.now_utc", lambda: "2025-01-01T00:00:00Z")
    manifest = neutral.write_neutral(lora_model, tmp_path / "one_pass.safetensors")
    tensors = lora_model.tensors()
    expected = build_manifest(lora_model, tensor_sha256(tensors))
    write_safetensors(tmp_path / "two_pass.safetensors", tensors, neutral.interop_metadata(lora_model, expected))
    assert (tmp_path / "one_pass.safetensors").read_bytes() == (tmp_path / "two_pass.safetensors").read_bytes()
    assert manifest == expected


def test_source_is_hashed_for_the_targets_that_store_the_hash(tmp_path, neutral_file):
    """The neutral manifest records the source's sha256 (hashed beside reading); other formats have
    nowhere to keep it, so their conversions skip that pass over the input."""
    digest = hashlib.sha256(neutral_file.read_bytes()).hexdigest()
    result = convert(neutral_file, tmp_path / "copy.safetensors", "neutral", progress=False)
    stored = json.loads(SafetensorsFile(tmp_path / "copy.safetensors").metadata["lorabridge.manifest"])
    assert result.model.provenance["source_sha256"] == stored["provenance"]["source_sha256"] == digest
    result = convert(neutral_file, tmp_path / "lora_diffusers.safetensors", "diffusers", progress=False)
    assert result.model.provenance["source_sha256"] is None
    assert result.model.provenance["source_file"] == neutral_file.name


def test_early_writeback_keeps_every_byte(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "WRITEBACK_BYTES", 4096)
    data = np.random.default_rng(2).bytes(100_000)
    with atomic.atomic_write(tmp_path / "out.bin") as out:
        for start in range(0, len(data), 3000):
            out.write(data[start:start + 3000])
        out.seek(10)
        out.write(b"patched")
    assert (tmp_path / "out.bin").read_bytes() == data[:10] + b"patched" + data[17:]


def test_checkpoint_walk_and_crc_read_the_same_with_pages_released_as_they_go(tmp_path, monkeypatch, release_often):
    rng = np.random.default_rng(3)
    tensors = {f"w{i}": Tensor.from_numpy(rng.standard_normal((64, 33)).astype("f4")) for i in range(20)}
    ms_ckpt.write_ms_checkpoint(tmp_path / "x.ckpt", tensors, metadata={"note": "n"}, crc=True)
    monkeypatch.setattr(ms_ckpt, "RELEASE_STRIDE", 1000)  # release after nearly every record, CRC in pieces
    read, metadata = ms_ckpt.read_ms_checkpoint(tmp_path / "x.ckpt")
    assert metadata == {"note": "n"}
    assert all(read[k].same_as(t) for k, t in tensors.items())
    damaged = bytearray((tmp_path / "x.ckpt").read_bytes())
    damaged[200] ^= 1
    (tmp_path / "y.ckpt").write_bytes(damaged)
    with pytest.raises(LoraBridgeError, match="CRC mismatch"):  # byte 200 is inside the first tensor
        ms_ckpt.read_ms_checkpoint(tmp_path / "y.ckpt")


# --- NaN/Inf check by exponent bits: the same verdict as numpy's isfinite ---------------------------
WIDTHS = {"F16": "<u2", "BF16": "<u2", "F32": "<u4", "F64": "<u8"}


def _isfinite_reference(tensor: Tensor) -> bool:
    values = tensor.to_numpy() if tensor.dtype != "BF16" else tensor.to_float32()
    return bool(np.isfinite(values).all())


@settings(max_examples=200, deadline=None)
@given(dtype=st.sampled_from(sorted(WIDTHS)), seed=st.integers(0, 2**32 - 1), size=st.integers(1, 600_000),
       poison=st.sampled_from([None, "nan", "inf", "-inf", "raw"]))
def test_all_finite_agrees_with_isfinite(dtype, seed, size, poison):
    rng = np.random.default_rng(seed)
    width = np.dtype(WIDTHS[dtype]).itemsize
    raw = bytearray(rng.integers(0, 256, size * width, dtype=np.uint8).tobytes()) if poison == "raw" else None
    if raw is None:
        values = rng.standard_normal(size).astype(np.float32)
        if poison:
            values[rng.integers(0, size)] = float(poison)
        tensor = Tensor.from_numpy(values, dtype)
    else:
        tensor = Tensor(dtype, (size,), bytes(raw))
    assert all_finite(tensor) == _isfinite_reference(tensor)


def test_all_finite_finds_a_bad_value_in_the_last_chunk():
    values = np.zeros(2**18 * 3 + 5, np.float32)
    values[-1] = np.inf
    assert not all_finite(Tensor.from_numpy(values))
    assert all_finite(Tensor.from_numpy(values[:-1]))


@pytest.mark.parametrize("numpy_type", [np.float32, np.float64])
def test_a_sum_that_overflows_is_no_evidence_of_nan_or_inf(numpy_type):
    """F32/F64 are summed first; finite values whose sum overflows are still finite, and -Inf and +Inf,
    whose sum is NaN, are still found."""
    largest = np.finfo(numpy_type).max
    values = np.full(1000, largest / 2, dtype=numpy_type)
    with np.errstate(over="ignore"):
        assert not np.isfinite(np.add.reduce(values))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and numpy's overflow is not the user's warning
        assert all_finite(Tensor.from_numpy(values))
    values[[3, 700]] = [-np.inf, np.inf]
    assert not all_finite(Tensor.from_numpy(values))


# --- schema check of distinct module entries: the same problems as checking every entry --------------
def _full_check(manifest):
    validator = jsonschema.Draft202012Validator(load_schema(), format_checker=jsonschema.FormatChecker())
    return [(e.json_path, e.message) for e in sorted(validator.iter_errors(manifest), key=lambda e: e.json_path)]


GOOD_ENTRY = {"kind": "lora", "rank": 4, "alpha": 4.0, "alpha_source": "assumed", "in_features": 320,
              "out_features": 320, "dtype": "F32"}
ENTRY_VARIANTS = [GOOD_ENTRY, {**GOOD_ENTRY, "rank": 8}, {**GOOD_ENTRY, "kind": "lokr", "rank": 0},
                  {**GOOD_ENTRY, "rank": 0}, {**GOOD_ENTRY, "kind": "x"}, {**GOOD_ENTRY, "dtype": "F12", "alpha": "a"},
                  {"kind": "lora"}, {**GOOD_ENTRY, "kernel_size": []}, {**GOOD_ENTRY, "unknown": 1}, "not an object", 7]
NAMES = ["unet.a.to_q", "unet.b", "text_encoder.x.y", "bad name", "nodots", "unet.c'quote", "unet.d.e"]


@settings(max_examples=150, deadline=None)
@given(modules=st.dictionaries(st.sampled_from(NAMES) | st.from_regex(r"unet\.[a-z]{1,3}", fullmatch=True),
                               st.sampled_from(range(len(ENTRY_VARIANTS))), max_size=12),
       drop=st.sets(st.sampled_from(["format", "provenance", "layout"])))
def test_grouped_schema_check_equals_the_full_check(modules, drop):
    manifest = build_manifest(make_lora_model(), "0" * 64)
    manifest["modules"] = {name: json.loads(json.dumps(ENTRY_VARIANTS[i])) for name, i in modules.items()}
    for key in drop:
        del manifest[key]
    assert schema_problems(manifest) == _full_check(manifest)


def test_grouped_schema_check_of_odd_manifests():
    for manifest in ({"modules": []}, {"modules": {"unet.a": GOOD_ENTRY, "unet.b": GOOD_ENTRY}}, [], "x",
                     {"modules": {"unet.a": {"alpha": float("nan")}, "unet.b": {"alpha": float("nan")}}}):
        assert schema_problems(manifest) == _full_check(manifest)


def test_tensor_hash_of_mapped_tensors_is_unchanged_by_releasing(neutral_file):
    tensors = SafetensorsFile(neutral_file).tensors()
    copies = {k: Tensor(t.dtype, t.shape, bytes(t.data)) for k, t in tensors.items()}
    assert tensor_sha256(tensors) == tensor_sha256(copies) == tensor_sha256(tensors)
    header = struct.unpack("<Q", neutral_file.read_bytes()[:8])[0]
    assert header % 8 == 0


def test_checkpoint_tags_are_read_lazily_for_detection(tmp_path):
    """Detection reads tags record by record: the first tag comes even when a later record is damaged."""
    tensors = {f"w{i}": Tensor.from_numpy(np.full((8, 8), i, np.float32)) for i in range(3)}
    ms_ckpt.write_ms_checkpoint(tmp_path / "x.ckpt", tensors, metadata={"note": "n"}, crc=True)
    assert list(ms_ckpt.iter_ms_tags(tmp_path / "x.ckpt")) == ["w0", "w1", "w2", "note"]
    data = (tmp_path / "x.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[:len(data) // 2])
    tags = ms_ckpt.iter_ms_tags(tmp_path / "cut.ckpt")
    assert next(tags) == "w0"
    with pytest.raises(LoraBridgeError, match="cut.ckpt: .*truncated"):
        list(tags)


def test_kernel_copies_in_pieces_written_out_behind_keep_every_byte(tmp_path, monkeypatch):
    """A long kernel copy goes in WRITEBACK_BYTES pieces, each handed to the writeback thread while the next is
    copied (pieces handed over while it was busy go out together): the published file is the input's bytes,
    the header patched after the copy included."""
    from lorabridge.io.input_file import held_inputs
    from lorabridge.io.safetensors_file import SafetensorsFile

    monkeypatch.setattr(atomic, "WRITEBACK_BYTES", 4096)
    monkeypatch.setattr(zero_copy, "KERNEL_COPY_MIN_BYTES", 1)
    written_out = []
    real = atomic._write_out
    monkeypatch.setattr(atomic, "_write_out", lambda fd, start, count, durable: written_out.append(count) or real(fd, start, count, durable))
    data = np.random.default_rng(5).bytes(100_000)
    write_safetensors(tmp_path / "in.safetensors", {"t": Tensor("U8", (len(data),), data)})
    with held_inputs():
        source = SafetensorsFile(tmp_path / "in.safetensors").tensors()
        write_safetensors(tmp_path / "out.safetensors", source, {"late": "X" * 8}, late={"X" * 8: lambda: "Y" * 8})
    out = SafetensorsFile(tmp_path / "out.safetensors")
    assert bytes(out.tensor("t").data) == data and out.metadata == {"late": "Y" * 8}
    assert sum(written_out) >= len(data) - 4096 and all(count >= 4096 for count in written_out)


def test_kernel_copies_are_cut_where_the_outputs_large_folios_end(tmp_path, monkeypatch):
    """No kernel copy to an output crosses a large folio's boundary of it, wherever the copy starts (a safetensors
    output's data starts after its header): each ends on one unless its data ends first. A copy ending inside a
    folio left the next one finishing a folio the flusher was writing out (~0.2 s on a 784 MB conversion)."""
    from lorabridge.io.input_file import held_inputs
    from lorabridge.io.safetensors_file import SafetensorsFile

    monkeypatch.setattr(atomic, "WRITEBACK_BYTES", 16384)
    monkeypatch.setattr(atomic, "LARGEST_FOLIO_BYTES", 4096)
    monkeypatch.setattr(zero_copy, "KERNEL_COPY_MIN_BYTES", 1)
    pieces = []
    real = atomic.copy_range
    monkeypatch.setattr(atomic, "copy_range", lambda source, offset, dst, position, count:
                        pieces.append((position, count)) or real(source, offset, dst, position, count))
    data = np.random.default_rng(6).bytes(100_000)
    write_safetensors(tmp_path / "in.safetensors", {"t": Tensor("U8", (len(data),), data)})
    with held_inputs():
        write_safetensors(tmp_path / "out.safetensors", SafetensorsFile(tmp_path / "in.safetensors").tensors())
    out = SafetensorsFile(tmp_path / "out.safetensors")
    assert bytes(out.tensor("t").data) == data
    assert pieces[0][0] == out.data_start and pieces[0][0] % 4096  # the copy starts mid-folio
    assert [position for position, _ in pieces[1:]] == [position + count for position, count in pieces[:-1]]
    assert all((position + count) % 4096 == 0 for position, count in pieces[:-1])
    assert all(position // 4096 == (position + count - 1) // 4096 for position, count in pieces)
    assert sum(count for _, count in pieces) == len(data)


@pytest.mark.parametrize("synced_each", [True, False])
def test_an_output_synced_before_publishing_is_flushed_piece_by_piece_as_it_grows(tmp_path, monkeypatch, synced_each):
    """The disk's cache flush is the slow part of an fsync: an output fsynced before it is published has its
    data flushed (fdatasync) as it grows, beside the writing. A batch syncs the file system once at its end,
    so its outputs' pieces are only handed to the device, never flushed one by one."""
    monkeypatch.setattr(atomic, "WRITEBACK_BYTES", 4096)
    flushed = []
    monkeypatch.setattr(atomic, "_data_sync", lambda fd: flushed.append(os.fstat(fd).st_size))
    with contextlib.nullcontext() if synced_each else atomic.syncing_at_the_end():
        with atomic.atomic_write(tmp_path / "out.bin") as out:
            for _ in range(20):
                out.write(b"x" * 4096)
    assert (tmp_path / "out.bin").read_bytes() == b"x" * 4096 * 20
    if synced_each:
        assert flushed and flushed == sorted(flushed) and flushed[-1] <= 4096 * 20
    else:
        assert flushed == []


def test_a_failed_write_out_is_reported_as_a_one_line_error_and_nothing_is_published(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "WRITEBACK_BYTES", 4096)

    def failing(fd, start, count, durable):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(atomic, "_write_out", failing)
    with pytest.raises(LoraBridgeError, match="cannot write the output: Input/output error"):
        with atomic.atomic_write(tmp_path / "out.bin") as out:
            out.write(b"x" * 10_000)
    assert list(tmp_path.iterdir()) == []


def test_the_source_is_hashed_beside_the_write_not_before_it(tmp_path, neutral_file, monkeypatch):
    """convert -> neutral starts writing before the source's sha256 is known: the hash goes into the header
    behind a placeholder once the data is written, as tensor_sha256 does."""
    import lorabridge.converters as converters
    from lorabridge.io import zero_copy as zc

    writing = threading.Event()
    real_hash, real_write = converters._sha256_of_file, zc.write_tensors

    def slow_hash(path, held=None):
        assert writing.wait(10), "the write did not start while the source was being hashed"
        return real_hash(path, held)

    def write_tensors(out, tensors):
        writing.set()
        yield from real_write(out, tensors)
    monkeypatch.setattr(converters, "_sha256_of_file", slow_hash)
    monkeypatch.setattr("lorabridge.io.safetensors_file.write_tensors", write_tensors)
    result = convert(neutral_file, tmp_path / "copy.safetensors", "neutral", progress=False)
    stored = json.loads(SafetensorsFile(tmp_path / "copy.safetensors").metadata["lorabridge.manifest"])
    digest = hashlib.sha256(neutral_file.read_bytes()).hexdigest()
    assert stored["provenance"]["source_sha256"] == result.model.provenance["source_sha256"] == digest


def test_the_source_is_hashed_from_the_bytes_the_reader_holds_when_they_stay_in_memory(tmp_path, neutral_file, monkeypatch):
    """A small mapped input (or one read into memory) is hashed where the reader holds it, with no read of
    the file; a map too large to keep is hashed by reading the file in pieces. The hash is the same."""
    import lorabridge.converters as converters

    reads, real_open = [], converters.open_regular

    def counting_open(path):
        if Path(path) == neutral_file:
            reads.append(path)
        return real_open(path)

    monkeypatch.setattr(converters, "open_regular", counting_open)
    digest = hashlib.sha256(neutral_file.read_bytes()).hexdigest()
    reads.clear()
    assert convert(neutral_file, tmp_path / "a.safetensors", "neutral", progress=False).model.provenance["source_sha256"] == digest
    assert reads == []
    monkeypatch.setattr(streaming, "KEEP_MAPS_UP_TO_BYTES", 0)
    assert convert(neutral_file, tmp_path / "b.safetensors", "neutral", progress=False).model.provenance["source_sha256"] == digest
    assert reads == [neutral_file]
    assert converters._sha256_of_file(neutral_file, memoryview(neutral_file.read_bytes())) == digest


@pytest.mark.parametrize("target, suffix", [("neutral", ".safetensors"), ("kohya", ".safetensors"), ("mindone-sgm", ".ckpt")])
def test_the_summary_is_read_from_the_output_while_the_disk_takes_its_last_bytes(tmp_path, neutral_file, monkeypatch, target, suffix):
    """A single output fsynced on its own is read back (the command's summary) once all its bytes are written and
    before the wait for the disk, then published; what is read equals reading the published file."""
    import lorabridge.converters as converters
    from lorabridge.io.contents import file_contents

    events, real_read, real_finish = [], converters.file_contents, atomic._EarlyWriteback.finish_writeback
    monkeypatch.setattr(converters, "file_contents", lambda path: events.append(("read", Path(path))) or real_read(path))
    monkeypatch.setattr(atomic._EarlyWriteback, "finish_writeback", lambda self: events.append(("wait", None)) or real_finish(self))
    out = tmp_path / f"out{suffix}"
    result = convert(neutral_file, out, target, progress=False)
    assert [event for event, _ in events] == ["read", "wait"]
    assert events[0][1].parent == tmp_path and events[0][1] != out  # the temporary file, not yet published
    assert result.read_back is not None and result.written == result.read_back == file_contents(out)


@pytest.mark.parametrize("synced_at_the_end, read_back", [(True, True), (False, False)])
def test_outputs_not_waited_for_or_not_summarised_are_not_read_back(tmp_path, neutral_file, monkeypatch, synced_at_the_end, read_back):
    """Outputs synced once as a batch ends are not waited for one by one, and a caller that never asks for the
    summary (a batch's worker, synced at the end or on a Dask cluster) says so: nothing is read back while
    writing, and ``written`` reads the published output only when asked."""
    import lorabridge.converters as converters
    from lorabridge.io.contents import file_contents

    reads, real_read = [], converters.file_contents
    monkeypatch.setattr(converters, "file_contents", lambda path: reads.append(path) or real_read(path))
    with atomic.syncing_at_the_end() if synced_at_the_end else contextlib.nullcontext():
        result = convert(neutral_file, tmp_path / "out.safetensors", "kohya", progress=False, read_back=read_back)
    assert reads == [] and result.read_back is None
    assert result.written == file_contents(tmp_path / "out.safetensors") and reads == [tmp_path / "out.safetensors"]


def test_an_output_being_written_is_read_back_mapped_not_leased_or_copied(tmp_path):
    """Inside held_inputs an input that cannot be leased (one open for writing) is read into memory; an output this
    thread reads back while writing it is mapped, as outside held_inputs."""
    from lorabridge.io.input_file import held_inputs, map_input, reading_own_output

    path = tmp_path / "being-written.bin"
    with open(path, "wb") as handle, held_inputs():
        handle.write(b"x" * 8192)
        handle.flush()
        with reading_own_output():
            assert isinstance(map_input(path)[1], mmap.mmap)
        assert not isinstance(map_input(path)[1], mmap.mmap)  # no lease on a file open for writing: read instead
