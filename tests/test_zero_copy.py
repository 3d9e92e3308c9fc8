"""Zero-copy (lorabridge/io/zero_copy.py): tensors that pass unchanged are copied file to file in the kernel.

The kernel copy, its ``sendfile`` fallback and the buffered write must give the same bytes, hashes and
CRCs; a source that changes under the copy must be an error, never a short or mixed output.
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from lorabridge import manifest
from lorabridge.converters import convert
from lorabridge.errors import LoraBridgeError
from lorabridge.formats.neutral import read_neutral
from lorabridge.formats.underscored_files import alpha_of
from lorabridge.io import atomic, zero_copy
from lorabridge.io.input_file import held_inputs
from lorabridge.io.safetensors_file import SafetensorsFile, write_safetensors
from lorabridge.naming.underscored import ALPHA
from lorabridge.tensor import FileSpan, Tensor

TMPFS = Path("/dev/shm")
# target format, write options: every container a conversion writes from tensors read unchanged
TARGETS = {
    "kohya": ("kohya", {}),
    "diffusers": ("diffusers", {}),
    "mindone-sgm ckpt": ("mindone-sgm", {}),
    "mindone-sgm ckpt crc": ("mindone-sgm", {"crc": True}),
    "mindone-diffusers safetensors crc": ("mindone-diffusers", {"container": "safetensors", "crc": True}),
}


def _refuse(*_args, **_kwargs):
    raise AssertionError("not reached")


def _failing(code: int):
    def fail(*_args, **_kwargs):
        raise OSError(code, os.strerror(code))
    return fail


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch):
    """The neutral manifest's ``created`` would differ between two writes a second apart."""
    monkeypatch.setattr(manifest, "now_utc", lambda: "2000-01-01T00:00:00Z")


@pytest.fixture(autouse=True)
def copy_every_run(monkeypatch):
    """The fixtures' tensors are a few bytes to a few KiB: copy every run in the kernel, however short, as
    real tensors are (the gathered write of short runs has its own tests below)."""
    monkeypatch.setattr(zero_copy, "KERNEL_COPY_MIN_BYTES", 1)


@pytest.fixture
def count_copies(monkeypatch):
    """How many times each kernel copy (os.copy_file_range, os.sendfile) and gathered write (os.pwritev) ran."""
    counts = {"copy_file_range": 0, "sendfile": 0, "pwritev": 0}
    for name in counts:
        real = getattr(os, name)

        def counted(*args, _real=real, _name=name):
            counts[_name] += 1
            return _real(*args)
        monkeypatch.setattr(os, name, counted)
    return counts


def force(monkeypatch, mode: str) -> None:
    """``sendfile``: copy_file_range fails as between two file systems; ``buffered``: sendfile fails too;
    ``gathered``: every run is short enough to be written from memory, gathered."""
    if mode == "gathered":
        monkeypatch.setattr(zero_copy, "KERNEL_COPY_MIN_BYTES", 1 << 40)
    if mode in ("sendfile", "buffered"):
        monkeypatch.setattr(os, "copy_file_range", _failing(errno.EXDEV))
    if mode == "buffered":
        monkeypatch.setattr(os, "sendfile", _failing(errno.ENOSYS))


def converted(src: Path, out: Path, target: str, options: dict) -> bytes:
    with held_inputs():  # as every command runs: inputs leased and mapped
        convert(src, out, target, force=True, progress=False, **options)
    return out.read_bytes() if out.is_file() else b""


@pytest.mark.parametrize("name", list(TARGETS))
def test_kernel_copy_sendfile_and_buffered_writes_are_byte_identical(neutral_file, tmp_path, monkeypatch, name):
    target, options = TARGETS[name]
    outputs = {}
    for mode in ("kernel", "sendfile", "buffered", "gathered"):
        with monkeypatch.context() as patch:
            force(patch, mode)
            suffix = ".ckpt" if name.endswith(("ckpt", "ckpt crc")) else ".safetensors"
            outputs[mode] = converted(neutral_file, tmp_path / f"{mode}{suffix}", target, options)
    assert outputs["kernel"] and outputs["kernel"] == outputs["sendfile"] == outputs["buffered"] == outputs["gathered"]


def test_unchanged_tensors_are_copied_in_the_kernel(neutral_file, tmp_path, count_copies):
    converted(neutral_file, tmp_path / "out.safetensors", "kohya", {})
    assert count_copies["copy_file_range"] > 0 and count_copies["sendfile"] == 0


def test_tensors_lying_back_to_back_in_the_input_go_in_one_copy(neutral_file, tmp_path, count_copies):
    """diffusers' keys are the neutral file's, in its order: its whole data region is one run, one system call."""
    out = converted(neutral_file, tmp_path / "out.safetensors", "diffusers", {})
    assert len(SafetensorsFile(neutral_file)) > 10 and count_copies["copy_file_range"] == 1
    assert out and read_neutral(neutral_file).modules  # and the output is whole: byte-identity is tested above


def test_one_copy_per_run_of_back_to_back_tensors(tmp_path, count_copies):
    src = tmp_path / "in.safetensors"
    write_safetensors(src, {k: Tensor("U8", (4,), k.encode() * 4) for k in "abcdef"})
    source = SafetensorsFile(src).tensors()
    out = tmp_path / "out.safetensors"
    order = ["a", "b", "c", "e", "f", "d"]  # runs: a-c, e-f, d
    write_safetensors(out, {k: source[k] for k in order})
    assert count_copies["copy_file_range"] == 3
    assert [bytes(t.data) for t in SafetensorsFile(out).tensors().values()] == [k.encode() * 4 for k in order]


def test_runs_of_one_input_go_to_the_kernel_together_up_to_a_batch_size(tmp_path, monkeypatch):
    """Runs apart in one input (a checkpoint's tensors between record headers) are copied in one call of the
    output's copy_from, its position set once; COPY_BATCH_BYTES bounds a call, so progress moves in steps."""
    src = tmp_path / "in.safetensors"
    write_safetensors(src, {k: Tensor("U8", (4,), k.encode() * 4) for k in "abcdef"})
    source = SafetensorsFile(src).tensors()
    order = ["a", "b", "c", "e", "f", "d"]  # runs: a-c, e-f, d
    calls, real = [], atomic._EarlyWriteback.copy_from
    monkeypatch.setattr(atomic._EarlyWriteback, "copy_from", lambda self, file, spans: calls.append(list(spans)) or real(self, file, spans))
    for batch, expected in ((64 << 20, [[12, 8, 4]]), (8, [[12], [8], [4]])):
        monkeypatch.setattr(zero_copy, "COPY_BATCH_BYTES", batch)
        calls.clear()
        out = tmp_path / f"out-{batch}.safetensors"
        write_safetensors(out, {k: source[k] for k in order})
        assert [[count for _, count in spans] for spans in calls] == expected
        assert [bytes(t.data) for t in SafetensorsFile(out).tensors().values()] == [k.encode() * 4 for k in order]


def test_short_runs_are_gathered_into_one_write_from_memory(tmp_path, count_copies, monkeypatch):
    """A kernel copy's set-up costs more than copying a few KiB: runs under KERNEL_COPY_MIN_BYTES go from
    their mapped pages, all in one pwritev, in order."""
    monkeypatch.setattr(zero_copy, "KERNEL_COPY_MIN_BYTES", 256 * 1024)
    src = tmp_path / "in.safetensors"
    write_safetensors(src, {k: Tensor("U8", (4,), k.encode() * 4) for k in "abcdef"})
    source = SafetensorsFile(src).tensors()
    out = tmp_path / "out.safetensors"
    order = ["a", "b", "c", "e", "f", "d"]
    with held_inputs():
        write_safetensors(out, {k: source[k] for k in order})
    assert count_copies["copy_file_range"] == 0 and count_copies["pwritev"] == 1
    assert [bytes(t.data) for t in SafetensorsFile(out).tensors().values()] == [k.encode() * 4 for k in order]


def test_gathered_writes_and_kernel_copies_keep_the_tensors_order(tmp_path, count_copies, monkeypatch):
    """Short runs gathered, long ones copied, tensors in memory written alone: the output is in the given order."""
    monkeypatch.setattr(zero_copy, "KERNEL_COPY_MIN_BYTES", 64)
    monkeypatch.setattr(zero_copy, "GATHER_MAX", 2)
    sizes = {"a": 4, "b": 100, "c": 4, "d": 4, "e": 200, "f": 4, "g": 4}
    src = tmp_path / "in.safetensors"
    write_safetensors(src, {k: Tensor("U8", (n,), k.encode() * n) for k, n in sizes.items()})
    source = SafetensorsFile(src).tensors()
    order = ["g", "a", "memory", "e", "c", "b", "d", "f"]  # each a run of its own but e and b, d and f
    given = {k: source[k] if k in source else Tensor("U8", (3,), b"mem") for k in order}
    out = tmp_path / "out.safetensors"
    with held_inputs():
        write_safetensors(out, given)
    assert [bytes(t.data) for t in SafetensorsFile(out).tensors().values()] == [bytes(t.data) for t in given.values()]
    assert count_copies["copy_file_range"] == 2 and count_copies["pwritev"] >= 2


def test_a_run_of_more_tiny_tensors_than_one_writev_takes_is_written_whole(tmp_path, monkeypatch):
    """A short run may hold thousands of tiny tensors (biases, scalars): more than IOV_MAX buffers go in several calls."""
    monkeypatch.setattr(zero_copy, "KERNEL_COPY_MIN_BYTES", 1 << 20)
    src = tmp_path / "in.safetensors"
    tensors = {f"t{i:04d}": Tensor("U8", (3,), i.to_bytes(3, "little")) for i in range(3000)}
    write_safetensors(src, tensors)
    out = tmp_path / "out.safetensors"
    with held_inputs():
        write_safetensors(out, SafetensorsFile(src).tensors())
    assert {k: bytes(t.data) for k, t in SafetensorsFile(out).tensors().items()} == {k: t.data for k, t in tensors.items()}


def test_a_gathered_write_cut_short_by_the_system_goes_on_where_it_stopped(tmp_path, monkeypatch):
    """pwritev may write less than asked (a signal, a full pipe of a FUSE file system): the rest follows, in order."""
    real = os.pwritev

    def at_most_5_bytes(fd, buffers, offset):
        first = memoryview(buffers[0])[:5]
        return real(fd, [first], offset)
    monkeypatch.setattr(os, "pwritev", at_most_5_bytes)
    monkeypatch.setattr(zero_copy, "KERNEL_COPY_MIN_BYTES", 1 << 20)
    src = tmp_path / "in.safetensors"
    write_safetensors(src, {k: Tensor("U8", (7,), k.encode() * 7) for k in "abc"})
    out = tmp_path / "out.safetensors"
    with held_inputs():
        write_safetensors(out, {k: t for k, t in reversed(SafetensorsFile(src).tensors().items())})
    assert [bytes(t.data) for t in SafetensorsFile(out).tensors().values()] == [k.encode() * 7 for k in "cba"]


def test_a_cast_is_written_from_memory_not_copied(neutral_file, tmp_path, count_copies):
    converted(neutral_file, tmp_path / "out.safetensors", "kohya", {"dtype": "fp16"})
    assert count_copies["copy_file_range"] == 0


@pytest.mark.parametrize("mode", ["kernel", "sendfile", "buffered"])
def test_neutral_round_trip_hashes_are_right_whichever_copy(neutral_file, tmp_path, monkeypatch, mode):
    """ckpt -> neutral: tensor_sha256 (read by pread beside the copy) and source_sha256 as a fresh read gives."""
    ckpt = tmp_path / "lora.ckpt"
    converted(neutral_file, ckpt, "mindone-sgm", {"crc": True})
    force(monkeypatch, mode)
    out = tmp_path / "back.safetensors"
    converted(ckpt, out, "neutral", {})
    model = read_neutral(out, verify_hash=True)  # recomputes tensor_sha256 from the bytes written
    assert model.provenance["source_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()


def test_output_on_another_file_system_falls_back(neutral_file, tmp_path, count_copies):
    """ext4 (or whatever holds tmp_path) to tmpfs: copy_file_range says EXDEV on current kernels, sendfile copies."""
    if not TMPFS.is_dir() or os.stat(TMPFS).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no tmpfs on another file system than tmp_path")
    reference = converted(neutral_file, tmp_path / "here.safetensors", "diffusers", {})
    there = TMPFS / f"lorabridge-zero-copy-{os.getpid()}.safetensors"
    try:
        assert converted(neutral_file, there, "diffusers", {}) == reference
    finally:
        there.unlink(missing_ok=True)
    assert count_copies["copy_file_range"] + count_copies["sendfile"] > 0


@pytest.mark.parametrize("mode", ["kernel", "sendfile"])
def test_a_source_cut_short_under_the_copy_is_an_error(tmp_path, monkeypatch, mode):
    force(monkeypatch, mode)
    src = tmp_path / "in.bin"
    src.write_bytes(b"x" * 8192)
    source = zero_copy.SourceFile(os.open(src, os.O_RDONLY), src)
    os.truncate(src, 100)
    with open(tmp_path / "out.bin", "wb") as out, pytest.raises(LoraBridgeError, match="changed while it was being read"):
        zero_copy.copy_range(source, 0, out.fileno(), 0, 8192)
    with pytest.raises(LoraBridgeError, match="changed while it was being read"):
        list(zero_copy.chunks(Tensor("U8", (8192,), b"x" * 8192, FileSpan(source, 0)), bytearray(1024)))


def test_an_input_opened_for_writing_during_the_copy_publishes_nothing(neutral_file, tmp_path, monkeypatch):
    """The copy reads the input while the output is written: a writer arriving then (breaking the read lease)
    is reported before the output is published, as one arriving while the input is read is."""
    real, calls = zero_copy.copy_range, []

    def breaking(*args):
        if not calls:  # another process opens the input for writing: O_NONBLOCK fails at once but breaks the lease
            subprocess.run([sys.executable, "-c", "import os, sys\ntry: os.open(sys.argv[1], os.O_WRONLY | os.O_NONBLOCK)\n"
                            "except BlockingIOError: pass", os.fspath(neutral_file)], check=True)
        calls.append(1)
        return real(*args)
    monkeypatch.setattr("lorabridge.io.atomic.copy_range", breaking)
    out = tmp_path / "out.safetensors"
    with pytest.raises(LoraBridgeError, match="opened this input for writing"):
        converted(neutral_file, out, "kohya", {})
    assert calls and not out.exists() and not list(tmp_path.glob(".*partial"))


def test_bytes_read_into_memory_carry_no_span(neutral_file, monkeypatch):
    """An input that could not be leased is read, not mapped: its file may differ from the bytes read, so no copy."""
    from lorabridge.io import input_file

    monkeypatch.setattr(input_file, "_CAN_LEASE", False)
    with held_inputs():
        handle = SafetensorsFile(neutral_file)
        assert all(handle.tensor(name).source is None for name in handle.keys())
    mapped = SafetensorsFile(neutral_file)  # outside held_inputs: mapped, as numpy.memmap would
    assert all(mapped.tensor(name).source is not None for name in mapped.keys())


def test_write_safetensors_copies_a_span_in_the_middle_of_a_file(tmp_path):
    src = tmp_path / "in.safetensors"
    tensors = {"a": Tensor("U8", (3,), b"abc"), "b": Tensor("F32", (2,), bytes(range(8)))}
    write_safetensors(src, tensors)
    copied = SafetensorsFile(src).tensors()
    out = tmp_path / "out.safetensors"
    write_safetensors(out, {"b": copied["b"], "new": Tensor("U8", (1,), b"z"), "a": copied["a"]})
    back = SafetensorsFile(out).tensors()
    assert (bytes(back["a"].data), bytes(back["b"].data), bytes(back["new"].data)) == (b"abc", bytes(range(8)), b"z")


def test_an_alpha_is_read_from_its_file_not_through_the_map(tmp_path):
    """Reading a scalar through the map faults in the pages around it (a whole large folio on recent kernels):
    a kohya Flux.1 LoRA's 494 alphas, spread through the file, left ~100 MB of it resident. A small tensor with a
    span is read by pread: here its data (a decoy) differs from the file, so which one was read shows."""
    path = tmp_path / "alpha.bin"
    path.write_bytes(struct.pack("<f", 8.0))
    source = zero_copy.SourceFile(os.open(path, os.O_RDONLY), path)
    alpha = Tensor("F32", (), struct.pack("<f", 1.0), FileSpan(source, 0))
    assert zero_copy.small_tensor_bytes(alpha) == struct.pack("<f", 8.0)
    assert alpha_of({ALPHA: alpha}, 4, None) == (8.0, "stored", {"alpha_dtype": "F32"})
    os.truncate(path, 2)
    with pytest.raises(LoraBridgeError, match="changed while it was being read"):
        zero_copy.small_tensor_bytes(alpha)
