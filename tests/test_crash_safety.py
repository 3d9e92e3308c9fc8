"""Outputs are all-or-nothing: a conversion killed part-way leaves no partial file at the output path."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lorabridge.converters import convert
from lorabridge.errors import LoraBridgeError
from lorabridge.formats.neutral import read_neutral, write_neutral
from lorabridge.io import atomic
from tests.fixtures.core import make_lora_model

ROOT = Path(__file__).resolve().parent.parent
# A child that converts a neutral file (to neutral, or the format in argv[3]), writing slowly (a sleep per
# tensor stands in for a slow disk).
SLOW_CONVERT = textwrap.dedent("""
    import sys, time
    from lorabridge.io import safetensors_file
    real_write = safetensors_file.write_safetensors
    def slow_write(path, tensors, metadata=None, progress=None, **options):
        def tick(n):
            time.sleep(0.02)
        return real_write(path, tensors, metadata, progress=tick, **options)
    safetensors_file.write_safetensors = slow_write   # before any format module imports it
    from lorabridge.converters import convert
    convert(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "neutral", force=True, progress=False)
""")


@pytest.fixture
def big_neutral(tmp_path):
    modules = {f"unet.down_blocks.1.attentions.0.transformer_blocks.{i}.attn1.to_q": (640, 640) for i in range(2)}
    modules |= {f"unet.mid_block.attentions.0.transformer_blocks.{i}.ff.net.2": (5120, 1280) for i in range(10)}
    path = tmp_path / "big.safetensors"
    write_neutral(make_lora_model(modules, rank=64), path)
    return path


@pytest.mark.parametrize("previous", [False, True], ids=["no-previous-output", "previous-output-kept"])
def test_sigkill_mid_write_leaves_no_partial_output(tmp_path, big_neutral, previous):
    out = tmp_path / "out.safetensors"
    if previous:
        write_neutral(make_lora_model(seed=7), out)
        before = out.read_bytes()
    child = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, str(big_neutral), str(out)], cwd=ROOT)
    deadline = time.monotonic() + 60
    while not any(p.stat().st_size > 0 for p in tmp_path.glob(".out.safetensors.*.partial")):
        assert child.poll() is None, "conversion ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    if previous:
        assert out.read_bytes() == before
    else:
        assert not out.exists()


def test_completed_conversion_is_whole_and_leaves_no_temp_files(tmp_path, big_neutral):
    out = tmp_path / "out.safetensors"
    convert(big_neutral, out, "neutral", progress=False)
    read_neutral(out, verify_hash=True)
    assert not list(tmp_path.glob("*.partial"))


def test_existing_output_needs_force(tmp_path, neutral_file):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    with pytest.raises(LoraBridgeError, match="pass --force"):
        convert(neutral_file, out, "neutral", progress=False)
    assert out.read_bytes() == b"precious"
    convert(neutral_file, out, "neutral", force=True, progress=False)
    read_neutral(out, verify_hash=True)


def test_output_equal_to_input_is_refused_even_with_force(neutral_file):
    before = neutral_file.read_bytes()
    for alias in (neutral_file, neutral_file.parent / "." / neutral_file.name):
        with pytest.raises(LoraBridgeError, match="overwrite the input"):
            convert(neutral_file, alias, "neutral", force=True, progress=False)
    assert neutral_file.read_bytes() == before


def test_failed_write_removes_its_temp_file(tmp_path, lora_model):
    from lorabridge.io.atomic import atomic_write

    with pytest.raises(RuntimeError):
        with atomic_write(tmp_path / "x.bin") as handle:
            handle.write(b"half")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_directory_outputs_are_swapped_in_whole(tmp_path):
    from lorabridge.io.atomic import atomic_directory

    out = tmp_path / "images"
    with atomic_directory(out) as staging:
        (staging / "a.png").write_bytes(b"new")
    assert (out / "a.png").read_bytes() == b"new" and oct(out.stat().st_mode & 0o777) != "0o700"
    with pytest.raises(LoraBridgeError, match="pass --force"):
        with atomic_directory(out):
            pass
    with pytest.raises(RuntimeError):
        with atomic_directory(out, force=True) as staging:
            (staging / "b.png").write_bytes(b"half")
            raise RuntimeError("killed")
    assert sorted(p.name for p in out.iterdir()) == ["a.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


@pytest.mark.parametrize("command, suffix", [(["neutral2pt"], ".safetensors"), (["neutral2ms"], ".ckpt"),
                                             (["convert", "--to", "kohya"], ".safetensors")])
def test_verify_hash_on_conversion_reports_a_flipped_byte_and_writes_nothing(run_cli, neutral_file, tmp_path, command,
                                                                              suffix):
    blob = bytearray(neutral_file.read_bytes())
    blob[-1] ^= 0x01
    neutral_file.write_bytes(bytes(blob))
    out = tmp_path / f"out{suffix}"
    result = run_cli(*command, neutral_file, "-o", out, "--verify-hash")
    assert result.exit_code == 1 and "hash mismatch" in result.output
    assert not out.exists()
    assert run_cli(*command, neutral_file, "-o", out).exit_code == 0  # without the flag the cheap path converts


def start_slow_conversion(source: Path, out: Path, target: str = "neutral") -> tuple[subprocess.Popen, Path]:
    """A conversion writing slowly, once its temporary output (file, or staging directory) has data."""
    child = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, str(source), str(out), target], cwd=ROOT)
    deadline = time.monotonic() + 60
    while True:
        for temporary in out.parent.glob(f".{out.name}.*.partial"):
            with contextlib.suppress(FileNotFoundError):  # published meanwhile
                if any(p.is_file() and p.stat().st_size > 0 for p in [temporary, *temporary.rglob("*")]):
                    return child, temporary
        assert child.poll() is None, "conversion ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.005)


@pytest.mark.parametrize("target", ["neutral", "peft"])
def test_a_killed_runs_temporary_is_removed_by_the_next_run_into_that_directory(tmp_path, big_neutral, target):
    killed, stale = start_slow_conversion(big_neutral, tmp_path / "killed", target)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert stale.exists()
    live, live_temporary = start_slow_conversion(big_neutral, tmp_path / "live", target)
    os.kill(live.pid, signal.SIGSTOP)  # a writer mid-way, however long the next run takes
    # Not ours, or not stale: a user's file; a name like ours whose process is alive; one a writer holds locked
    # although its PID is gone here (a writer in another container sharing the directory).
    keep = [tmp_path / ".notes.partial", tmp_path / f".x.lorabridge-{os.getpid()}.abcdefgh.partial",
            tmp_path / f".y.lorabridge-{killed.pid}.abcdefgh.partial"]
    for path in keep:
        path.write_bytes(b"keep")
    with open(keep[-1], "rb") as held:
        fcntl.flock(held, fcntl.LOCK_SH)
        convert(big_neutral, tmp_path / "next.safetensors", "neutral", progress=False)
    assert not stale.exists()
    assert live_temporary.exists() and all(path.read_bytes() == b"keep" for path in keep)
    os.kill(live.pid, signal.SIGCONT)
    assert live.wait(timeout=120) == 0
    assert (tmp_path / "live").exists() and not live_temporary.exists()


def test_a_large_directory_is_scanned_for_stale_temporaries_once_a_minute_a_small_one_before_each_output(
        tmp_path, neutral_file, monkeypatch):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()  # the PID of a writer that is gone

    def plant(folder: Path, name: str) -> Path:
        stale = folder / f".{name}.lorabridge-{dead}.abcdefgh.partial"
        stale.write_bytes(b"left by a killed run")
        return stale

    small, large = tmp_path / "small", tmp_path / "large"
    small.mkdir()
    large.mkdir()
    for number in range(atomic._SMALL_DIRECTORY + 1):  # a flat library's outputs
        (large / f"{number}.safetensors").touch()
    for folder in (small, large):
        stale = plant(folder, "a.safetensors")
        convert(neutral_file, folder / "first.safetensors", "kohya", progress=False)
        assert not stale.exists()  # the first output into a folder removes what killed runs left there
    for folder, still_there in ((small, False), (large, True)):
        stale = plant(folder, "b.safetensors")
        convert(neutral_file, folder / "second.safetensors", "kohya", progress=False)
        assert stale.exists() is still_there  # the large one: not read again within the minute
    monkeypatch.setattr(atomic, "_RESCAN_S", 0.0)  # the minute has passed
    convert(neutral_file, large / "third.safetensors", "kohya", progress=False)
    assert not stale.exists()


def test_library_convert_holds_its_inputs_while_it_reads(tmp_path, monkeypatch):
    """``converters.convert`` called from Python (not only the CLI) leases its inputs, so a file truncated
    under it is noticed: what it does after reading runs while inputs are held."""
    import warnings

    from lorabridge import converters
    from lorabridge.converters.registry import get_format
    from lorabridge.io.input_file import holding_inputs
    from tests.fixtures.core import make_lora_model

    src = tmp_path / "src_kohya.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_format("kohya").write(make_lora_model(), src)
    seen = []
    checking = converters.check_architecture
    monkeypatch.setattr(converters, "check_architecture", lambda *args: (seen.append(holding_inputs()), checking(*args)))
    converters.convert(src, tmp_path / "out.safetensors", to="neutral", from_formats=["kohya"], progress=False)
    assert seen == [True]
