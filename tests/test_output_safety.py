"""Hostile and broken output paths: every refusal is one line ``error: <file>: <problem>``, exit 1, no
traceback, and no file (input or output) changes. Two runs racing to the same output never both win."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from lorabridge.errors import LoraBridgeError
from lorabridge.formats.neutral import read_neutral, write_neutral
from tests.fixtures.core import make_lora_model
from tests.test_pt_cli import refused

ROOT = Path(__file__).resolve().parent.parent


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry under ``root`` (hidden ones too): a file's bytes, a link's target, a directory's mark."""
    entries: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            entries[key] = "-> " + os.readlink(path)
        elif path.is_dir():
            entries[key] = "dir"
        else:
            entries[key] = path.read_bytes()
    return entries


@pytest.fixture
def peft_input(tmp_path, run_cli, neutral_file):
    """A PEFT adapter directory (unet/, text_encoder/, text_encoder_2/) written by the peft writer."""
    result = run_cli("convert", neutral_file, "--to", "peft", "-o", tmp_path / "adapters")
    assert result.exit_code == 0, result.output
    return tmp_path / "adapters"


# ---- outputs overlapping inputs ------------------------------------------------------------------------


@pytest.mark.parametrize("make_args, problem", [
    (lambda d: [d, "--to", "diffusers", "-o", d / "unet" / "adapter_model.safetensors"], "inside the input directory"),
    (lambda d: [d, "--to", "diffusers", "-o", d / "unet" / "new.safetensors"], "inside the input directory"),
    (lambda d: [d.parent / "link", "--to", "kohya", "-o", d / "unet" / "adapter_model.safetensors"],
     "inside the input directory"),
    (lambda d: [d, "--to", "diffusers", "-o", d.parent / "link" / "unet" / "adapter_model.safetensors"],
     "inside the input directory"),
    (lambda d: [d, "--to", "peft", "-o", d], "overwrite the input"),
    (lambda d: [d / "unet", "--to", "peft", "-o", d], "contains the input"),
    (lambda d: [d / "unet", "--to", "peft", "-o", d.parent / "link"], "contains the input"),
], ids=["onto-input-weights", "new-file-in-input", "input-via-symlink", "output-via-symlink", "equal", "contains",
        "contains-via-symlink"])
def test_output_overlapping_a_directory_input_is_refused_even_with_force(run_cli, peft_input, tmp_path, make_args,
                                                                         problem):
    (tmp_path / "link").symlink_to(peft_input, target_is_directory=True)
    before = snapshot(tmp_path)
    args = make_args(peft_input)
    line = refused(run_cli("convert", *args, "--force"), problem)
    assert str(args[-1]) in line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("output", ["work", "work/torch", "work/torch/sub"])
def test_compare_never_replaces_a_directory_holding_its_inputs(run_cli, tmp_path, output):
    from tests.test_compare import image

    for side in ("torch", "mindspore"):
        image(tmp_path / "work" / side, "000.png", 7)
    before = snapshot(tmp_path)
    refused(run_cli("compare", tmp_path / "work" / "torch", tmp_path / "work" / "mindspore", "-o", tmp_path / output,
                    "--force"), str(tmp_path / output))
    assert snapshot(tmp_path) == before


# ---- paths no output can be written at: one line, not a traceback --------------------------------------


@pytest.fixture
def unwritable_dir(tmp_path):
    """A directory this process may not create entries in: read-only by its mode, or, as root (whom modes
    do not stop), /sys, which refuses root too."""
    if os.geteuid() != 0:
        directory = tmp_path / "read-only"
        directory.mkdir()
        directory.chmod(0o555)
        yield directory
        directory.chmod(0o755)
        return
    try:
        os.unlink(tempfile.mkstemp(dir="/sys")[1])
    except PermissionError:
        yield Path("/sys")
    else:
        pytest.skip("no directory here refuses root")


@pytest.mark.parametrize("target", ["diffusers", "peft", "mindone-sgm"])
def test_unwritable_output_directory_is_one_line(run_cli, neutral_file, unwritable_dir, target):
    before = snapshot(neutral_file.parent)
    out = unwritable_dir / "out"
    refused(run_cli("convert", neutral_file, "--to", target, "-o", out), str(out), "cannot create the output")
    assert snapshot(neutral_file.parent) == before


@pytest.mark.parametrize("target", ["neutral", "peft"])
def test_long_output_name_that_fits_is_written_and_one_too_long_is_one_line(run_cli, neutral_file, tmp_path, target):
    fits = tmp_path / ("a" * 255)  # the longest name ext4 and most others take; a temporary beside it must not be longer
    result = run_cli("convert", neutral_file, "--to", target, "-o", fits)
    assert result.exit_code == 0, result.output
    assert fits.exists() and not list(tmp_path.glob(".*partial"))
    before = snapshot(tmp_path)
    too_long = tmp_path / ("b" * 256)
    refused(run_cli("convert", neutral_file, "--to", target, "-o", too_long), "file name too long")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("output", [".", "..", "sub/..", "/"])
@pytest.mark.parametrize("force", [[], ["--force"]], ids=["", "force"])
def test_output_that_names_no_entry_is_one_line(run_cli, neutral_file, tmp_path, monkeypatch, output, force):
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    before = snapshot(tmp_path)
    refused(run_cli("convert", neutral_file, "--to", "peft", "-o", output, *force), "output must end in a")
    assert snapshot(tmp_path) == before


def test_output_inside_a_file_is_one_line(run_cli, neutral_file, tmp_path):
    refused(run_cli("convert", neutral_file, "--to", "neutral", "-o", tmp_path / "lora.safetensors" / "out.safetensors"),
            "is not a directory")


def test_a_write_the_system_refuses_midway_is_one_line_and_leaves_nothing(neutral_file, tmp_path):
    """A file size limit (ulimit -f) stops the write as a full disk would."""
    out = tmp_path / "out.safetensors"
    limit = neutral_file.stat().st_size // 2
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "convert", str(neutral_file), "--to", "diffusers",
                           "-o", str(out)], capture_output=True, text=True, cwd=ROOT,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"error: {out}: cannot write the output")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors"]


# ---- symlinks and names ----------------------------------------------------------------------------------


def test_dangling_symlink_at_the_output_needs_force(run_cli, neutral_file, tmp_path):
    link = tmp_path / "out.safetensors"
    link.symlink_to(tmp_path / "nowhere.safetensors")
    refused(run_cli("convert", neutral_file, "--to", "diffusers", "-o", link), "output exists")
    assert link.is_symlink() and not (tmp_path / "nowhere.safetensors").exists()
    assert run_cli("convert", neutral_file, "--to", "diffusers", "-o", link, "--force").exit_code == 0
    assert not link.is_symlink() and not (tmp_path / "nowhere.safetensors").exists()  # the link is replaced


FORGED = "x\nerror: forged"


def test_a_newline_in_a_file_name_cannot_forge_a_line(run_cli, neutral_file, tmp_path):
    missing = refused(run_cli("convert", tmp_path / FORGED, "--to", "diffusers", "-o", tmp_path / "out.safetensors"),
                      "no such file")
    assert repr(str(tmp_path / FORGED)) in missing
    source = tmp_path / f"{FORGED}.safetensors"
    source.write_bytes(neutral_file.read_bytes())
    out = tmp_path / f"{FORGED}-out.safetensors"
    result = run_cli("convert", source, "--to", "diffusers", "-o", out)
    assert result.exit_code == 0, result.output
    assert not any(line.startswith("error:") for line in result.output.splitlines()), result.output
    assert repr(str(out)) in result.stdout
    refused(run_cli("convert", source, "--to", "diffusers", "-o", out), repr(str(out)), "output exists")


def test_a_newline_in_a_key_cannot_forge_a_warning_line(run_cli, tmp_path):
    from lorabridge.io.safetensors_file import write_safetensors
    from tests.test_pt_cli import lora, sdxl_tensors

    path = tmp_path / "lora.safetensors"
    write_safetensors(path, {**sdxl_tensors(), **lora("unet.nowhere\nerror: forged", 8, 8)}, {"format": "pt"})
    result = run_cli("convert", path, "--to", "neutral", "-o", tmp_path / "out.safetensors", "--skip-unknown")
    assert result.exit_code == 0, result.output
    warnings = result.stderr.splitlines()
    assert warnings and all(line.startswith("warning: ") for line in warnings), result.stderr


# ---- two runs, one output --------------------------------------------------------------------------------

# A conversion from the command line that stops, once its temporary output exists (at the first tensor
# written), until as many runs as the barrier expects have got there too: then all publish at once.
RACER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from lorabridge.io import safetensors_file
    barrier, expected = Path(sys.argv[1]), int(sys.argv[2])
    real_write = safetensors_file.write_safetensors
    def write_at_barrier(path, tensors, metadata=None, progress=None, **options):
        def tick(count):
            if not (barrier / str(os.getpid())).exists():
                (barrier / str(os.getpid())).touch()
                deadline = time.monotonic() + 60
                while len(list(barrier.iterdir())) < expected and time.monotonic() < deadline:
                    time.sleep(0.002)
        return real_write(path, tensors, metadata, progress=tick, **options)
    safetensors_file.write_safetensors = write_at_barrier   # before any format module imports it
    from lorabridge.cli import main
    sys.argv = ["lorabridge", *sys.argv[3:]]
    main()
""")


def race(tmp_path: Path, *argvs: list) -> list[subprocess.CompletedProcess]:
    """Run one conversion per argv at once, all publishing only once every one has its temporary output."""
    barrier = Path(tempfile.mkdtemp(dir=tmp_path, prefix="barrier"))
    children = [subprocess.Popen([sys.executable, "-c", RACER, str(barrier), str(len(argvs)), *map(str, argv)],
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for argv in argvs]
    done = []
    for child in children:
        stdout, stderr = child.communicate(timeout=120)
        done.append(subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr))
    assert len(list(barrier.iterdir())) == len(argvs), "a run did not reach the barrier"
    return done


@pytest.fixture
def two_inputs(tmp_path):
    inputs = []
    for seed in (1, 2):
        write_neutral(make_lora_model(seed=seed), tmp_path / f"in{seed}.safetensors")
        inputs.append(tmp_path / f"in{seed}.safetensors")
    return inputs


def references(tmp_path: Path, inputs: list[Path], target: str) -> list[dict]:
    """What each input converts to alone, as snapshots (a directory output's whole tree)."""
    results = []
    for number, source in enumerate(inputs):
        out = tmp_path / f"reference{number}"
        subprocess.run([sys.executable, str(ROOT / "cli.py"), "convert", str(source), "--to", target, "-o", str(out)],
                       cwd=ROOT, check=True, capture_output=True)
        results.append(snapshot_of(out))
    return results


def snapshot_of(path: Path) -> dict:
    return snapshot(path) if path.is_dir() else {"": path.read_bytes()}


@pytest.mark.parametrize("target", ["diffusers", "peft"])
def test_two_runs_racing_to_a_new_output_one_wins_the_other_gets_exists(tmp_path, two_inputs, target):
    wanted = references(tmp_path, two_inputs, target)
    out = tmp_path / "out"
    runs = race(tmp_path, *(["convert", source, "--to", target, "-o", out] for source in two_inputs))
    assert sorted(run.returncode for run in runs) == [0, 1], [run.stderr for run in runs]
    winner, loser = sorted(runs, key=lambda run: run.returncode)
    assert loser.stderr == f"error: {out}: output exists; pass --force to replace it\n"
    assert snapshot_of(out) == wanted[runs.index(winner)]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("target", ["diffusers", "peft"])
@pytest.mark.parametrize("previous", [False, True], ids=["new", "replacing"])
def test_two_runs_racing_with_force_leave_one_whole_output(tmp_path, two_inputs, target, previous):
    wanted = references(tmp_path, two_inputs, target)
    out = tmp_path / "out"
    if previous:
        (out / "unet").mkdir(parents=True) if target == "peft" else out.write_bytes(b"old")
    runs = race(tmp_path, *(["convert", source, "--to", target, "-o", out, "--force"] for source in two_inputs))
    assert [run.returncode for run in runs] == [0, 0], [run.stderr for run in runs]
    assert snapshot_of(out) in wanted
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_library_writes_outside_a_command_still_replace(tmp_path, lora_model):
    """Only a command's missing --force makes publishing exclusive; a plain library call replaces, as
    safetensors.save_file does."""
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old")
    write_neutral(lora_model, out)
    assert read_neutral(out).modules.keys() == lora_model.modules.keys()


@pytest.fixture(params=["renameat2", "link-or-rename"])
def publishing(request, monkeypatch):
    """Each way of publishing: renameat2 where Linux has it, else a hard link (files) or a checked rename
    (directories), as on macOS or a file system that takes no renameat2 flags (NFS)."""
    from lorabridge.io import atomic

    if request.param == "link-or-rename":
        monkeypatch.setattr(atomic, "_renameat2", None)
    return atomic


def make_entry(path: Path, kind: str) -> None:
    """Put a directory (with a file), an empty directory, a file or a dangling link at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "directory":
        (path / "sub").mkdir(parents=True)
        (path / "sub" / "old").write_bytes(b"old")
    elif kind == "empty directory":
        path.mkdir()
    elif kind == "file":
        path.write_bytes(b"old")
    else:
        path.symlink_to("nowhere")


KINDS = ["directory", "empty directory", "file", "dangling link"]


@pytest.mark.parametrize("existing", KINDS)
@pytest.mark.parametrize("appears", ["before", "while writing"])
def test_file_outputs_never_replace_an_entry_without_force(tmp_path, publishing, existing, appears):
    """"while writing": another run publishes first, after every early check: the publishing rename refuses."""
    work, reference = tmp_path / "work", tmp_path / "reference"
    make_entry(reference / "out", existing)
    work.mkdir()
    if appears == "before":
        make_entry(work / "out", existing)
    with pytest.raises(LoraBridgeError, match="output exists"):
        with publishing.replacing(False), publishing.atomic_write(work / "out") as handle:
            handle.write(b"new")
            if appears != "before":
                make_entry(work / "out", existing)
    assert snapshot(work) == snapshot(reference)


@pytest.mark.parametrize("existing", KINDS)
@pytest.mark.parametrize("appears", ["before", "while writing"])
def test_directory_outputs_never_replace_an_entry_without_force(tmp_path, publishing, existing, appears):
    work, reference = tmp_path / "work", tmp_path / "reference"
    make_entry(reference / "out", existing)
    work.mkdir()
    if appears == "before":
        make_entry(work / "out", existing)
    with pytest.raises(LoraBridgeError, match="output exists"):
        with publishing.atomic_directory(work / "out") as staging:
            (staging / "new").write_bytes(b"new")
            if appears != "before":
                make_entry(work / "out", existing)
    assert snapshot(work) == snapshot(reference)


@pytest.mark.parametrize("existing", ["file", "dangling link", None])
def test_file_outputs_with_force_replace_a_file_or_link(tmp_path, publishing, existing):
    if existing:
        make_entry(tmp_path / "out", existing)
    with publishing.replacing(True), publishing.atomic_write(tmp_path / "out") as handle:
        handle.write(b"new")
    assert snapshot(tmp_path) == {"out": b"new"}


@pytest.mark.parametrize("existing", KINDS[:2])
def test_a_file_output_onto_a_directory_is_one_line_even_with_force(tmp_path, publishing, existing):
    make_entry(tmp_path / "out", existing)
    before = snapshot(tmp_path)
    with pytest.raises(LoraBridgeError, match="Is a directory"):
        with publishing.replacing(True), publishing.atomic_write(tmp_path / "out") as handle:
            handle.write(b"new")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("existing", [*KINDS, None])
def test_directory_outputs_with_force_replace_anything(tmp_path, publishing, existing):
    if existing:
        make_entry(tmp_path / "out", existing)
    with publishing.atomic_directory(tmp_path / "out", force=True) as staging:
        (staging / "new").write_bytes(b"new")
    assert snapshot(tmp_path) == {"out": "dir", "out/new": b"new"}
