"""Which options each format honours is data (its declared ``read_options``/``write_options``): the
declarations are checked against what the readers and writers do, and a conversion refuses an option that neither
its reader nor its writer honours instead of silently dropping it."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import pytest

from lorabridge.converters import convert
from lorabridge.converters.registry import FORMATS, all_formats, get_format
from lorabridge.formats.contract import OPTION_DEFAULTS, READ_OPTIONS, WRITE_OPTIONS, ReadOptions, WriteOptions
from lorabridge.errors import LoraBridgeError
from lorabridge.formats.neutral import write_neutral
from lorabridge.io.safetensors_file import read_safetensors, write_safetensors
from lorabridge.model import LoraModule
from lorabridge.tensor import Tensor
from tests.fixtures.core import make_lora_model, make_lora_module

# Formats with a writer; read-only ones (XLabs, OneTrainer) have no write options and their read options
# are checked on files built from their own grammars (tests/test_xlabs.py, tests/test_onetrainer.py).
WRITABLE = [name for name in FORMATS if get_format(name).writable]
# A non-default value of every option, as a user would give it.
GIVEN = {"alpha": 2.0, "skip_unknown": True, "strict": True, "verify_hash": True,
         "dtype": "fp16", "bake_to_lora": 2, "container": "safetensors", "crc": True, "fold_alpha": False,
         "factor_names": "lora_A"}
ATTN = "unet.down_blocks.1.attentions.0.transformer_blocks.0"
UNKNOWN = f"{ATTN}.attn1.to_qq"  # no such SDXL layer


def suffix(name: str) -> str:
    return "" if name == "peft" else ".ckpt" if name.startswith("mindone") else ".safetensors"


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch):
    """The neutral manifest records its creation time: fix it so two writes of one model are byte-identical."""
    monkeypatch.setattr("lorabridge.manifest.now_utc", lambda: "2000-01-01T00:00:00Z")


def fingerprint(path: Path) -> str:
    """sha256 over every file of an output (a PEFT directory has several)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        digest.update(file.read_bytes())
    return digest.hexdigest()


def outcome(call) -> str:
    """What a read or write did: its refusal, or a fingerprint of what it produced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return f"ok {call()}"
        except LoraBridgeError as exc:
            return f"refused: {exc.message}"


def model_for(option: str):
    """A model on which ``option`` makes a difference to a writer that honours it."""
    model = make_lora_model()  # alpha 8, rank 4: alpha/rank 2 to fold
    if option == "bake_to_lora":
        rng = np.random.default_rng(0)
        model.add(LoraModule(f"{ATTN}.attn1.to_k", "loha", {role: Tensor.from_numpy(rng.standard_normal(shape).astype("f4"))
                  for role, shape in [("hada_w1_a", (640, 2)), ("hada_w1_b", (2, 640)), ("hada_w2_a", (640, 2)),
                                      ("hada_w2_b", (2, 640))]}, alpha=2.0))
    if option == "strict":
        a = next(iter(model.modules.values())).tensors["lora_A.weight"]
        values = a.to_numpy().copy()
        values[0, 0] = np.nan
        next(iter(model.modules.values())).tensors["lora_A.weight"] = Tensor.from_numpy(values)
    return model


@pytest.mark.parametrize("option", sorted(WRITE_OPTIONS))
@pytest.mark.parametrize("name", WRITABLE)
def test_write_options_table_matches_what_writers_do(name, option, tmp_path):
    """A declared write option changes the file written (or whether it is written); an undeclared one changes nothing."""
    writer, model = get_format(name), model_for(option)

    def write(tag: str, options: WriteOptions):
        out = tmp_path / f"{tag}{suffix(name)}"
        writer.write(model, out, options)
        return fingerprint(out)

    plain = outcome(lambda: write("plain", WriteOptions()))
    given = outcome(lambda: write("given", WriteOptions(**{option: GIVEN[option]})))
    assert (plain != given) == (option in writer.write_options), (plain, given)


def written_by(name: str, tmp_path: Path, option: str) -> Path:
    """A file of format ``name`` on which reading with ``option`` makes a difference, if the format can hold one."""
    model = make_lora_model(alpha=4.0)
    if option == "alpha":  # a file without alpha: only "assumed" alphas, which writers that can leave out do
        for module in model.modules.values():
            module.alpha_source = "assumed"
    if option == "skip_unknown" and name in ("diffusers", "peft", "legacy-diffusers", "lycoris", "mindone-diffusers"):
        model.add(make_lora_module(UNKNOWN, (640, 640), 4, 4.0, np.random.default_rng(1)))  # names it can spell
    if option == "strict":
        model = model_for("strict")
    path = tmp_path / f"in{suffix(name)}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_format(name).write(model, path)
    if option == "alpha" and name == "diffusers":  # it stores alpha in metadata: drop it
        tensors, metadata = read_safetensors(path)
        write_safetensors(path, tensors, {"format": "pt"})
    if option == "verify_hash" and name == "neutral":  # flip one tensor byte: only the hash check sees it
        data = bytearray(path.read_bytes())
        data[-1] ^= 1
        path.write_bytes(bytes(data))
    return path


# (format, option) pairs whose files never hold what the option acts on: kohya-style writers cannot
# name an unknown module; PEFT and LyCORIS files always store alpha.
UNREACHABLE = {("mindone-sgm", "skip_unknown"), ("mindone-kohya", "skip_unknown"), ("kohya", "skip_unknown"),
               ("comfyui", "skip_unknown"),
               ("peft", "alpha"), ("lycoris", "alpha")}


@pytest.mark.parametrize("option", sorted(READ_OPTIONS))
@pytest.mark.parametrize("name", WRITABLE)
def test_read_options_table_matches_what_readers_do(name, option, tmp_path):
    """A declared read option changes the model read (or whether it is read); an undeclared one changes nothing."""
    if (name, option) in UNREACHABLE:
        pytest.skip(f"a {name} file cannot hold what {option} acts on")
    path, reader = written_by(name, tmp_path, option), get_format(name)

    def read(options: ReadOptions) -> str:
        model = reader.read(path, options)
        return repr(sorted((m.name, m.alpha, m.alpha_source, {r: (t.dtype, t.shape) for r, t in m.tensors.items()})
                           for m in model.modules.values()))

    plain, given = outcome(lambda: read(ReadOptions())), outcome(lambda: read(ReadOptions(**{option: GIVEN[option]})))
    assert (plain != given) == (option in reader.read_options), (plain, given)


def test_every_option_has_a_default_and_a_format_honouring_it():
    assert set(GIVEN) == set(OPTION_DEFAULTS) == READ_OPTIONS | WRITE_OPTIONS
    assert all(any(o in f.read_options | f.write_options for f in all_formats()) for o in OPTION_DEFAULTS)


@pytest.mark.parametrize("args, message", [
    (["--to", "neutral", "--dtype", "fp16"], "--dtype is not supported when writing neutral"),
    (["--to", "mindone-sgm", "--dtype", "fp16"], "--dtype is not supported when writing mindone-sgm"),
    (["--to", "kohya", "--alpha", "2"], "--alpha is not supported when reading neutral"),
    (["--to", "lycoris", "--bake-to-lora", "2"], "--bake-to-lora is not supported when writing lycoris"),
    (["--to", "neutral", "--strict"], "--strict is not supported when reading neutral or writing neutral"),
    (["--to", "neutral", "--skip-unknown"], "--skip-unknown is not supported when reading neutral"),
])
def test_convert_refuses_an_option_neither_side_honours(run_cli, tmp_path, args, message):
    write_neutral(make_lora_model(), tmp_path / "n.safetensors")
    result = run_cli("convert", tmp_path / "n.safetensors", "-o", tmp_path / "out.x", *args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n.safetensors"]


def test_neutral2ms_refuses_folding_alpha_where_the_naming_stores_it(run_cli, tmp_path):
    write_neutral(make_lora_model(), tmp_path / "n.safetensors")
    result = run_cli("neutral2ms", tmp_path / "n.safetensors", "--naming", "mindone-kohya", "--no-fold-alpha")
    assert result.exit_code == 1 and "--no-fold-alpha is not supported when writing mindone-kohya" in result.stderr


def test_options_reach_only_the_side_that_declares_them(tmp_path):
    write_neutral(make_lora_model(), tmp_path / "n.safetensors")
    result = convert(tmp_path / "n.safetensors", tmp_path / "k.safetensors", "kohya", dtype="fp16", verify_hash=True,
                     alpha=None, strict=False)  # defaults count as not given
    assert dict(result.written.dtypes) == {"F16": 18}
    with pytest.raises(TypeError, match="unknown conversion option.*colour"):
        convert(tmp_path / "n.safetensors", tmp_path / "x.safetensors", "kohya", colour="red")
