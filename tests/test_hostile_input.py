"""Hostile and broken inputs through the CLI: each is refused with exactly one line
``error: <file>: <problem>``, exit 1, no traceback and nothing written, or (a compressed torch zip)
read correctly. Inputs that could hang or kill the process run the CLI in a subprocess."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

from lorabridge.errors import LoraBridgeError
from lorabridge.io.safetensors_file import read_safetensors, write_safetensors
from lorabridge.manifest import MANIFEST_KEY
from lorabridge.tensor import Tensor
from tests.fixtures.mindone import sgm_attention_lora, tiny_widths, write_ckpt

ROOT = Path(__file__).resolve().parent.parent
DEEP = "[" * 100_000 + "]" * 100_000
KOHYA_Q = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"  # (4, 768) down, (768, 4) up in the fixtures


def assert_refused(output: str, exit_code: int, bad: Path, out: Path, expected: str) -> None:
    """Exit 1, one line ``error: <bad>: ...`` mentioning ``expected``, no traceback, no output or leftover."""
    lines = output.strip().splitlines()
    assert exit_code == 1, output
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: "), output
    assert expected.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in output
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*")), list(out.parent.iterdir())


def run_subprocess(*args, timeout: float = 120, prelude: str = "") -> subprocess.CompletedProcess:
    """The CLI in a child process (``prelude`` runs first, e.g. to hook a reader), stdout and stderr together."""
    code = prelude + "\nfrom lorabridge.cli import main\nmain()\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, env=env, timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def header_of(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def with_header(header: dict | str, data: bytes) -> bytes:
    text = header if isinstance(header, str) else json.dumps(header)
    raw = text.encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.fixture
def kohya_file(tmp_path, neutral_file, run_cli):
    path = tmp_path / "kohya.safetensors"
    assert run_cli("neutral2pt", neutral_file, "--format", "kohya", "-o", path).exit_code == 0
    return path


@pytest.fixture
def diffusers_file(tmp_path, neutral_file, run_cli):
    path = tmp_path / "diffusers.safetensors"
    assert run_cli("neutral2pt", neutral_file, "-o", path).exit_code == 0
    assert "lora_adapter_metadata" in header_of(path)[0]["__metadata__"]
    return path


@pytest.fixture
def kohya_zip(tmp_path, neutral_file, run_cli):
    """A kohya LoRA as a torch.save zip archive (members stored, as torch writes them)."""
    path = tmp_path / "kohya.ckpt"
    assert run_cli("neutral2pt", neutral_file, "--format", "kohya", "-o", path).exit_code == 0
    assert zipfile.is_zipfile(path)
    return path


# ---- a compressed torch zip is read right, not memory-mapped into garbage ----------------------


@pytest.mark.torch
def test_a_deflate_compressed_torch_zip_converts_like_the_stored_one(tmp_path, kohya_zip, run_cli):
    torch = pytest.importorskip("torch")
    deflated = tmp_path / "deflated.ckpt"
    with zipfile.ZipFile(kohya_zip) as stored, zipfile.ZipFile(deflated, "w") as out:
        for info in stored.infolist():
            out.writestr(info.filename, stored.read(info), compress_type=zipfile.ZIP_DEFLATED)
    assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in zipfile.ZipFile(deflated).infolist())
    reference = torch.load(kohya_zip, weights_only=True)
    unmapped = torch.load(deflated, weights_only=True, mmap=False)  # a valid file: torch reads it
    assert reference.keys() == unmapped.keys() and all(torch.equal(reference[k], unmapped[k]) for k in reference)
    results = {}
    for name, src in (("stored", kohya_zip), ("deflated", deflated)):
        result = run_cli("pt2neutral", src, "-o", tmp_path / f"{name}.safetensors")
        assert result.exit_code == 0, result.output
        results[name] = read_safetensors(tmp_path / f"{name}.safetensors")[0]
    assert results["stored"].keys() == results["deflated"].keys() and len(results["stored"]) == 12
    for key, tensor in results["stored"].items():
        assert bytes(results["deflated"][key].data) == bytes(tensor.data), key


# ---- FIFOs, devices, sockets: refused before they are opened ------------------------------------


def make_fifo(tmp_path):
    os.mkfifo(tmp_path / "lora.safetensors")
    return tmp_path / "lora.safetensors"


def make_socket(tmp_path):
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / "lora.safetensors"))
    return tmp_path / "lora.safetensors"


SPECIAL_FILES = {"FIFO": (make_fifo, "FIFO"), "socket": (make_socket, "socket"),
                 "character device": (lambda tmp: Path("/dev/zero"), "character device")}
COMMANDS = {"pt2neutral": ("pt2neutral",), "convert": ("convert", "--to", "kohya"), "ms2neutral": ("ms2neutral",),
            "neutral2pt": ("neutral2pt",), "neutral2ms": ("neutral2ms",)}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("kind", list(SPECIAL_FILES))
def test_special_files_are_refused_without_being_opened(tmp_path, kind, command):
    make, expected = SPECIAL_FILES[kind]
    bad = make(tmp_path)
    out = tmp_path / "out.safetensors"
    result = run_subprocess(*COMMANDS[command], bad, "-o", out, timeout=60)
    assert_refused(result.stdout, result.returncode, bad, out, expected)


@pytest.mark.parametrize("member", ["adapter_config.json", "adapter_model.safetensors"])
def test_a_fifo_inside_a_peft_directory_is_refused(tmp_path, neutral_file, run_cli, member):
    peft = tmp_path / "peft"
    assert run_cli("neutral2pt", neutral_file, "--format", "peft", "-o", peft).exit_code == 0
    bad = peft / "unet" / member
    bad.unlink()
    os.mkfifo(bad)
    out = tmp_path / "out.safetensors"
    result = run_subprocess("pt2neutral", peft, "-o", out, timeout=60)
    assert_refused(result.stdout, result.returncode, bad, out, "FIFO")


def test_a_directory_is_refused_where_the_format_is_a_file(tmp_path, run_cli):
    (tmp_path / "dir").mkdir()
    out = tmp_path / "out.safetensors"
    result = run_cli("convert", tmp_path / "dir", "--from", "kohya", "--to", "neutral", "-o", out)
    assert_refused(result.output, result.exit_code, tmp_path / "dir", out, "not a LoRA file")




def test_hashing_a_source_that_became_a_fifo_after_its_check_fails_instead_of_blocking(tmp_path):
    from lorabridge.converters import _sha256_of_file  # what convert and a batch hash a large source with

    os.mkfifo(tmp_path / "lora.safetensors")
    with pytest.raises(LoraBridgeError, match="is a FIFO"):
        _sha256_of_file(tmp_path / "lora.safetensors")

def test_a_broken_symbolic_link_is_named_as_one(tmp_path, run_cli):
    (tmp_path / "lora.safetensors").symlink_to(tmp_path / "moved-away.safetensors")
    out = tmp_path / "out.safetensors"
    result = run_cli("convert", tmp_path / "lora.safetensors", "--to", "kohya", "-o", out)
    assert_refused(result.output, result.exit_code, tmp_path / "lora.safetensors", out,
                   f"is a broken symbolic link (to {str(tmp_path / 'moved-away.safetensors')!r})")

# ---- untrusted JSON: deep nesting, huge integers, bools as integers, lone surrogates -------------


def deep_header(files):
    header, data = header_of(files["kohya"])
    text = json.dumps(header)
    return with_header(text[:-1] + ', "deep": ' + DEEP + "}", data)


def deep_manifest(files):
    header, data = header_of(files["neutral"])
    header["__metadata__"][MANIFEST_KEY] = DEEP
    return with_header(header, data)


def deep_adapter_metadata(files):
    header, data = header_of(files["diffusers"])
    header["__metadata__"]["lora_adapter_metadata"] = '{"unet.r": ' + DEEP + "}"
    return with_header(header, data)


def entry_field(field, value):
    """The kohya file with one header field (of the tensor stored first) rewritten as JSON text by ``value``."""
    def make(files):
        header, data = header_of(files["kohya"])
        first = next(k for k, v in header.items() if k != "__metadata__" and v["data_offsets"][0] == 0)
        text = json.dumps(header[first][field])
        header[first][field] = "@@"
        return with_header(json.dumps(header).replace('"@@"', value(text)), data)
    return make


def first_entry_as(value):
    """The kohya file with the header entry of the tensor stored first replaced by ``value``."""
    def make(files):
        header, data = header_of(files["kohya"])
        first = next(k for k, v in header.items() if k != "__metadata__" and v["data_offsets"][0] == 0)
        header[first] = value
        return with_header(header, data)
    return make


def surrogate_in(place):
    def make(files):
        header, data = header_of(files["neutral" if place == "manifest" else "kohya"])
        if place == "metadata":
            header["__metadata__"]["ss_comment"] = "@@"
        elif place == "tensor name":
            header["@@" + KOHYA_Q + ".lora_down.weight"] = header.pop(f"{KOHYA_Q}.lora_down.weight")
        else:
            manifest = json.loads(header["__metadata__"][MANIFEST_KEY])
            manifest["training"]["note"] = "@@"
            header["__metadata__"][MANIFEST_KEY] = json.dumps(manifest)
        return with_header(json.dumps(header).replace("@@", "\\ud800"), data)
    return make


BAD_JSON = {
    "deep header": (deep_header, "convert", "nests deeper"),
    "deep manifest": (deep_manifest, "neutral2pt", "nests deeper"),
    "deep lora_adapter_metadata": (deep_adapter_metadata, "convert", "nests deeper"),
    "5000-digit data_offsets": (entry_field("data_offsets", lambda t: "[0, " + "9" * 5000 + "]"), "convert", "digits"),
    "30-digit data_offsets": (entry_field("data_offsets", lambda t: "[0, " + "9" * 30 + "]"), "convert", "out of range"),
    "2**63 in data_offsets": (entry_field("data_offsets", lambda t: f"[{2**63}, {2**63}]"), "convert", "data_offsets"),
    "5000-digit dimension": (entry_field("shape", lambda t: "[" + "9" * 5000 + ", 640]"), "convert", "digits"),
    "bool dimension": (entry_field("shape", lambda t: "[true]" if t == "[]" else "[true, " + t[1:]), "convert", "shape"),
    "bool data_offset": (entry_field("data_offsets", lambda t: t.replace("[0,", "[false,")), "convert", "data_offsets"),
    "list dtype": (entry_field("dtype", lambda t: f"[{t}]"), "convert", "unknown dtype"),
    "object dtype": (entry_field("dtype", lambda t: f'{{"name": {t}}}'), "convert", "unknown dtype"),
    "entry not an object": (first_entry_as(["F32", [4], [0, 16]]), "convert", "needs dtype, shape and data_offsets"),
    "entry without dtype": (first_entry_as({"shape": [4], "data_offsets": [0, 16]}), "convert", "needs dtype"),
    "lone surrogate in metadata": (surrogate_in("metadata"), "convert", "surrogate"),
    "lone surrogate in a tensor name": (surrogate_in("tensor name"), "convert", "surrogate"),
    "lone surrogate in the manifest": (surrogate_in("manifest"), "neutral2pt", "surrogate"),
}


@pytest.mark.parametrize("case", list(BAD_JSON))
def test_untrusted_json_gives_one_line(tmp_path, kohya_file, neutral_file, diffusers_file, run_cli, case):
    make, command, expected = BAD_JSON[case]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(make({"kohya": kohya_file, "neutral": neutral_file, "diffusers": diffusers_file}))
    out = tmp_path / "out.safetensors"
    extra = ("--to", "diffusers") if command == "convert" else ()
    result = run_cli(command, bad, *extra, "-o", out)
    assert_refused(result.output, result.exit_code, bad, out, expected)


def test_bool_dimensions_were_the_only_problem(tmp_path, kohya_file, run_cli):
    """The bool-dims file differs from a good one only in ``true`` for 1: with 1 it converts, and the
    safetensors library reads the output (which it could not when ``true`` was copied into it)."""
    safetensors = pytest.importorskip("safetensors")
    header, data = header_of(kohya_file)
    entry = header[f"{KOHYA_Q}.lora_down.weight"]
    a = np.frombuffer(data[entry["data_offsets"][0]:entry["data_offsets"][1]], np.float32).reshape(entry["shape"])
    tensors = {f"{KOHYA_Q}.lora_down.weight": Tensor.from_numpy(a[:1].copy()),
               f"{KOHYA_Q}.lora_up.weight": Tensor.from_numpy(np.ones((768, 1), np.float32))}
    good = tmp_path / "rank1.safetensors"
    write_safetensors(good, tensors)
    result = run_cli("convert", good, "--to", "diffusers", "-o", tmp_path / "out.safetensors")
    assert result.exit_code == 0, result.output
    with safetensors.safe_open(tmp_path / "out.safetensors", "np") as handle:
        assert sorted(tuple(handle.get_slice(k).get_shape()) for k in handle.keys()) == [(1, 768), (768, 1)]
    header, data = header_of(good)
    for key in tensors:
        header[key]["shape"] = [True if d == 1 else d for d in header[key]["shape"]]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(with_header(header, data))
    result = run_cli("convert", bad, "--to", "diffusers", "-o", tmp_path / "bad_out.safetensors")
    assert_refused(result.output, result.exit_code, bad, tmp_path / "bad_out.safetensors", "shape")


def peft_dir_with_config(tmp_path, neutral_file, run_cli, config_text: str) -> Path:
    peft = tmp_path / "peft"
    assert run_cli("neutral2pt", neutral_file, "--format", "peft", "-o", peft).exit_code == 0
    (peft / "unet" / "adapter_config.json").write_bytes(config_text.encode("utf-8", "surrogatepass"))
    return peft


@pytest.mark.parametrize("config, expected", [
    ('{"r": 4, "lora_alpha": ' + DEEP + "}", "nests deeper"),
    ('{"r": 4, "lora_alpha": 8, "note": "\\ud800"}', "surrogate"),
    ('{"r": 4, "lora_alpha": ' + "9" * 400 + "}", "out of range"),
    ('{"r": 4, "lora_alpha": ' + "9" * 5000 + "}", "digits"),
    ("\ud800", "not UTF-8"),
], ids=["deep", "surrogate", "400-digit alpha", "5000-digit alpha", "not UTF-8"])
def test_a_hostile_adapter_config_gives_one_line(tmp_path, neutral_file, run_cli, config, expected):
    peft = peft_dir_with_config(tmp_path, neutral_file, run_cli, config)
    out = tmp_path / "out.safetensors"
    result = run_cli("pt2neutral", peft, "-o", out)
    assert_refused(result.output, result.exit_code, peft / "unet" / "adapter_config.json", out, expected)


# ---- torch pickles holding what no LoRA holds --------------------------------------------------


def sparse_coo(torch):
    return torch.sparse_coo_tensor(torch.tensor([[0, 1], [1, 0]]), torch.tensor([1.0, 2.0]), (4, 768))


TORCH_VALUES = {
    "sparse COO": (sparse_coo, "sparse_coo"),
    "sparse CSR": (lambda torch: sparse_coo(torch).to_sparse_csr(), "sparse_csr"),
    "nested": (lambda torch: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]), "nested"),
    "meta": (lambda torch: torch.empty(4, 768, device="meta"), "meta"),
}


@pytest.mark.torch
@pytest.mark.parametrize("case", list(TORCH_VALUES))
def test_non_strided_tensors_in_a_pickle_give_one_line(tmp_path, run_cli, case):
    torch = pytest.importorskip("torch")
    make, expected = TORCH_VALUES[case]
    bad = tmp_path / "bad.pt"
    torch.save({f"{KOHYA_Q}.lora_down.weight": make(torch), f"{KOHYA_Q}.lora_up.weight": torch.ones(768, 4)}, bad)
    out = tmp_path / "out.safetensors"
    result = run_cli("pt2neutral", bad, "-o", out)
    assert_refused(result.output, result.exit_code, bad, out, expected)


@pytest.mark.torch
@pytest.mark.parametrize("entry", [{"\ud800": 1}, {"note": "\ud800"}], ids=["key", "value"])
def test_lone_surrogates_in_a_pickle_give_one_line(tmp_path, run_cli, entry):
    torch = pytest.importorskip("torch")
    bad = tmp_path / "bad.pt"
    torch.save({f"{KOHYA_Q}.lora_down.weight": torch.ones(4, 768), f"{KOHYA_Q}.lora_up.weight": torch.ones(768, 4),
                **entry}, bad)
    out = tmp_path / "out.safetensors"
    result = run_cli("pt2neutral", bad, "-o", out)
    assert_refused(result.output, result.exit_code, bad, out, "surrogate")


# ---- MindSpore safetensors crc_num that isdigit() but int() refuses ------------------------------


@pytest.mark.parametrize("crc", ["²", "٣٣", "9" * 5000], ids=["superscript two", "arabic-indic digits", "5000 digits"])
def test_a_crc_num_that_is_no_ascii_number_gives_one_line(tmp_path, run_cli, crc):
    arrays = sgm_attention_lora(widths=tiny_widths())
    tensors = {k: Tensor.from_numpy(v) for k, v in list(arrays.items())[:2]}
    bad = tmp_path / "bad.safetensors"
    write_safetensors(bad, tensors, {"format": "ms", "crc_num": crc})
    assert crc.isdigit()
    out = tmp_path / "out.safetensors"
    result = run_cli("ms2neutral", bad, "-o", out)
    assert_refused(result.output, result.exit_code, bad, out, "not a number")


# ---- an input truncated while it is read ---------------------------------------------------------

# Runs in the CLI's process: once ``hook`` (a reader function) has opened and mapped the input, another
# process truncates the file to 64 bytes, and the read goes on. Without protection, the next touch of a
# mapped page past byte 64 kills the process with SIGBUS, and a write() from one fails with EFAULT.
TRUNCATE_AFTER = textwrap.dedent("""
    import subprocess, sys, time
    import {module} as target
    from lorabridge.io import input_file
    input_file._CAN_LEASE = input_file._CAN_LEASE and {lease}
    real, truncators, calls = target.{function}, [], []
    def hooked(*args, **kwargs):
        value = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == {call}:
            truncators.append(subprocess.Popen(  # a plain blocking truncate(2) (coreutils' truncate opens O_NONBLOCK)
                [sys.executable, "-c", "import os, sys; os.truncate(sys.argv[1], 64)", sys.argv[-3]]))
            time.sleep(1.5)  # the truncation has happened, or (input leased) is waiting in the kernel
        return value
    target.{function} = hooked
""")
READ_HOOKS = {  # input kind -> (fixture, command, module and function to hook, which call truncates)
    "safetensors": ("neutral_file", ("neutral2pt", "--format", "kohya"), "lorabridge.io.safetensors_file", "map_input", 1),
    # the first torch.load is format detection, which keeps only the keys; the second is the read
    "torch zip": ("kohya_zip", ("pt2neutral",), "lorabridge.io.torch_file", "_torch_load", 2),
    "MindSpore ckpt": ("ms_ckpt", ("ms2neutral",), "lorabridge.io.ms_ckpt", "map_input", 1),
}


@pytest.fixture
def ms_ckpt(tmp_path):
    return write_ckpt(sgm_attention_lora(widths=tiny_widths()), tmp_path / "lora.ckpt")


@pytest.mark.parametrize("lease", [True, False], ids=["leased", "no-lease-read-into-memory"])
@pytest.mark.parametrize("kind", list(READ_HOOKS))
def test_an_input_truncated_while_read_gives_one_line_and_no_output(request, tmp_path, kind, lease):
    fixture, command, module, function, call = READ_HOOKS[kind]
    if kind == "torch zip":
        pytest.importorskip("torch")
    src = request.getfixturevalue(fixture)
    size = src.stat().st_size
    out = tmp_path / "out.safetensors"
    result = run_subprocess(*command, src, "-o", out, prelude=TRUNCATE_AFTER.format(
        module=module, function=function, lease=lease, call=call))
    assert result.returncode != -7, "killed by SIGBUS"
    assert_refused(result.stdout, result.returncode, src, out, "while")
    assert size > 4096 and src.stat().st_size == 64, "the truncation really happened (once lorabridge let go)"
