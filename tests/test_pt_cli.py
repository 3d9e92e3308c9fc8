"""pt2neutral, neutral2pt and convert from the command line, and every bad input they must refuse:
one line on stderr naming the file and the problem, exit 1, nothing written."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from lorabridge.formats.neutral import read_neutral, write_neutral
from lorabridge.io.ms_ckpt import write_ms_checkpoint
from lorabridge.io.safetensors_file import read_safetensors, write_safetensors
from lorabridge.model import LoraModule
from lorabridge.tensor import Tensor
from tests.fixtures.core import make_lora_model

RNG = np.random.default_rng(0)
ATTN = "unet.down_blocks.1.attentions.0.transformer_blocks.0"


def lora(name: str, inp: int, out: int, rank: int = 4, kernel: tuple = ()) -> dict[str, Tensor]:
    """Diffusers-keyed tensors of one random LoRA module."""
    return {f"{name}.lora_A.weight": Tensor.from_numpy(RNG.standard_normal((rank, inp, *kernel)).astype(np.float32)),
            f"{name}.lora_B.weight": Tensor.from_numpy(RNG.standard_normal((out, rank, *([1, 1] if kernel else []))).astype(np.float32))}


def sdxl_tensors() -> dict[str, Tensor]:
    return {**lora(f"{ATTN}.attn1.to_q", 640, 640), **lora(f"{ATTN}.attn2.to_k", 2048, 640),
            **lora("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", 768, 768)}


def write(path, tensors, metadata=None):
    write_safetensors(path, tensors, {"format": "pt", **(metadata or {})})
    return path


def refused(result, *fragments):
    """Exit 1, exactly one stderr line ``error: <file>: <problem>`` holding every fragment, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture
def diffusers_file(tmp_path):
    return write(tmp_path / "lora.safetensors", sdxl_tensors())


# ---- the commands ------------------------------------------------------------------------------


def test_pt2neutral_detects_converts_and_summarizes(run_cli, diffusers_file, tmp_path):
    result = run_cli("pt2neutral", diffusers_file, "--alpha", "2")
    assert result.exit_code == 0, result.output
    out = tmp_path / "lora_neutral.safetensors"
    assert f"diffusers -> neutral: {out}" in result.stdout
    assert "unet 2, text_encoder 1" in result.stdout and "user 3" in result.stdout
    model = read_neutral(out)
    assert model.provenance["source_format"] == "diffusers" and model.provenance["source_file"] == "lora.safetensors"
    assert run_cli("validate", out).exit_code == 0


def test_neutral2pt_writes_each_format_beside_the_input(run_cli, tmp_path):
    write_neutral(make_lora_model(), tmp_path / "n.safetensors")
    for fmt, name in [("diffusers", "n_diffusers.safetensors"), ("peft", "n_peft"),
                      ("legacy-diffusers", "n_legacy.safetensors"), ("kohya", "n_kohya.safetensors")]:
        result = run_cli("neutral2pt", tmp_path / "n.safetensors", "--format", fmt)
        assert result.exit_code == 0, result.output
        assert (tmp_path / name).exists() and f"neutral -> {fmt}" in result.stdout


def test_convert_goes_between_any_two_formats(run_cli, diffusers_file, tmp_path):
    steps = [("peft", "a_peft"), ("kohya", "b.safetensors"), ("legacy-diffusers", "c_pt.ckpt"), ("diffusers", "d.safetensors")]
    source = diffusers_file
    for fmt, name in steps:
        result = run_cli("convert", source, "-o", tmp_path / name, "--to", fmt, "--alpha", "4")
        assert result.exit_code == 0, result.output
        source = tmp_path / name
    start, end = read_safetensors(diffusers_file)[0], read_safetensors(tmp_path / "d.safetensors")[0]
    assert sorted(start) == sorted(end) and all(start[k].same_as(end[k]) for k in start)


def test_from_forces_the_input_format(run_cli, diffusers_file, tmp_path):
    refused(run_cli("pt2neutral", diffusers_file, "--from", "kohya", "-o", tmp_path / "x.safetensors"),
            "lora.safetensors", "is a LoRA key of kohya")
    assert run_cli("pt2neutral", diffusers_file, "--from", "diffusers", "-o", tmp_path / "x.safetensors").exit_code == 0


def test_existing_output_needs_force(run_cli, diffusers_file, tmp_path):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    refused(run_cli("pt2neutral", diffusers_file, "-o", out), "pass --force")
    assert out.read_bytes() == b"keep me"
    assert run_cli("pt2neutral", diffusers_file, "-o", out, "--force").exit_code == 0
    refused(run_cli("convert", diffusers_file, "-o", diffusers_file, "--to", "diffusers", "--force"), "overwrite the input")


# ---- bad input ---------------------------------------------------------------------------------


def assert_nothing_written(tmp_path, *inputs):
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in inputs)


@pytest.mark.parametrize("tensors, evidence, likely", [
    pytest.param({**lora("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 320, 320),
                  **lora("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", 768, 640),
                  **lora("unet.up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_v", 320, 320)},
                 "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q (no such SDXL layer)", "SD 1.x/2.x", id="sd15"),
    pytest.param({**lora(f"{ATTN}.attn1.to_q", 640, 640), **lora(f"{ATTN}.attn2.to_k", 1024, 640)},
                 "attn2.to_k adapts a [640, 1024] weight, SDXL's is [640, 2048]", "SD 2.x", id="sd2-shapes-only"),
    pytest.param({**lora("transformer.transformer_blocks.0.attn.to_q", 1536, 1536),
                  **lora("transformer.transformer_blocks.0.attn.add_q_proj", 1536, 1536)},
                 "component 'transformer'", "SD3", id="sd3"),
])  # a Flux.1 LoRA is registered now: tests/test_architectures_flux1.py
def test_lora_for_another_architecture_is_not_an_sdxl_lora(run_cli, tmp_path, tensors, evidence, likely):
    src = write(tmp_path / "other.safetensors", tensors)
    line = refused(run_cli("pt2neutral", src), "other.safetensors", "not an SDXL LoRA", evidence, f"looks like {likely}")
    assert line.count(";") <= 4  # the first offending modules, not all of them
    assert_nothing_written(tmp_path, src)
    refused(run_cli("pt2neutral", src, "--skip-unknown"), "not an SDXL LoRA")  # never skipped into a broken LoRA


def test_sdxl_structure_at_other_widths_is_accepted(run_cli, tmp_path):
    """Every module narrower than SDXL-base (a small test pipeline) is the SDXL layout, not another model."""
    src = write(tmp_path / "tiny.safetensors", {**lora(f"{ATTN}.attn1.to_q", 64, 64), **lora(f"{ATTN}.attn2.to_k", 64, 64)})
    assert run_cli("pt2neutral", src).exit_code == 0


def test_unknown_modules_are_listed_or_skipped(run_cli, tmp_path):
    src = write(tmp_path / "lora.safetensors", {**sdxl_tensors(), **lora(f"{ATTN}.attn1.to_qq", 640, 640),
                                                **lora("unet.down_blocks.1.attentions.0.transformer_blocks.7.attn1.to_q", 640, 640)})
    refused(run_cli("pt2neutral", src), "2 module(s) match no SDXL layer", f"{ATTN}.attn1.to_qq", "--skip-unknown")
    assert_nothing_written(tmp_path, src)
    result = run_cli("pt2neutral", src, "--skip-unknown")
    assert result.exit_code == 0 and "warning:" in result.stderr and "dropped 2 module(s)" in result.stderr
    assert len(read_neutral(tmp_path / "lora_neutral.safetensors").modules) == 3


def test_keys_that_are_no_lora_weights_are_listed_or_skipped(run_cli, tmp_path):
    extra = {"unet.conv_in.weight": Tensor.from_numpy(np.zeros((320, 4, 3, 3), np.float32))}
    src = write(tmp_path / "lora.safetensors", {**sdxl_tensors(), **extra})
    refused(run_cli("pt2neutral", src), "1 tensor key(s) are not LoRA weights", "unet.conv_in.weight")
    assert run_cli("pt2neutral", src, "--skip-unknown").exit_code == 0


def test_malicious_pickle_is_refused_and_nothing_runs(run_cli, tmp_path):
    class Payload:
        def __reduce__(self):
            return open, (str(tmp_path / "PWNED"), "w")

    src = tmp_path / "lora_pt.ckpt"
    src.write_bytes(pickle.dumps({"unet.x.processor.to_q_lora.down.weight": Payload()}, protocol=2))
    refused(run_cli("pt2neutral", src), "lora_pt.ckpt", "refused to load", "nothing was executed")
    refused(run_cli("convert", src, "-o", tmp_path / "x.safetensors", "--to", "neutral", "--from", "legacy-diffusers"),
            "refused to load")
    assert_nothing_written(tmp_path, src)


@pytest.mark.parametrize("a_shape, b_shape, problem", [
    ((4, 640), (640, 2), "rank mismatch, lora_A is [4, 640] but lora_B is [640, 2]"),
    ((4, 640), None, "has lora_A.weight but no lora_B.weight"),
])
def test_broken_factor_pairs_are_refused(run_cli, tmp_path, a_shape, b_shape, problem):
    tensors = sdxl_tensors()
    tensors[f"{ATTN}.attn1.to_q.lora_A.weight"] = Tensor.from_numpy(np.ones(a_shape, np.float32))
    if b_shape:
        tensors[f"{ATTN}.attn1.to_q.lora_B.weight"] = Tensor.from_numpy(np.ones(b_shape, np.float32))
    else:
        del tensors[f"{ATTN}.attn1.to_q.lora_B.weight"]
    src = write(tmp_path / "lora.safetensors", tensors)
    refused(run_cli("pt2neutral", src), problem)
    assert_nothing_written(tmp_path, src)


def test_nan_and_inf_warn_or_are_refused_with_strict(run_cli, tmp_path):
    tensors = sdxl_tensors()
    bad = tensors[f"{ATTN}.attn1.to_q.lora_B.weight"].to_numpy().copy()
    bad[0, 0], bad[1, 1] = np.nan, np.inf
    tensors[f"{ATTN}.attn1.to_q.lora_B.weight"] = Tensor.from_numpy(bad)
    src = write(tmp_path / "lora.safetensors", tensors)
    refused(run_cli("pt2neutral", src, "--strict"), "1 tensor(s) hold NaN or Inf", "to_q.lora_B.weight (2 of 2560)", "--strict")
    assert_nothing_written(tmp_path, src)
    result = run_cli("pt2neutral", src)
    assert result.exit_code == 0 and "warning:" in result.stderr and "NaN or Inf" in result.stderr
    refused(run_cli("neutral2pt", tmp_path / "lora_neutral.safetensors", "--strict", "-o", tmp_path / "o.safetensors"),
            "NaN or Inf")  # a neutral input is checked on the way out too


@pytest.mark.parametrize("make, problem", [
    (lambda p: p.write_bytes(b""), "empty file (0 bytes)"),
    (lambda p: write_safetensors(p, {}), "holds no tensors"),
    (lambda p: write_safetensors(p, {"model.weight": Tensor.from_numpy(np.ones(3, np.float32))}),
     "none of its 1 tensor keys is a LoRA key"),
    (lambda p: p.write_bytes(b"\x0a\x03abc" * 10), "neither safetensors nor a torch pickle"),
])
def test_files_no_format_accepts_say_why(run_cli, tmp_path, make, problem):
    src = tmp_path / "input.ckpt"
    make(src)
    refused(run_cli("pt2neutral", src), "input.ckpt", problem)
    refused(run_cli("convert", src, "-o", tmp_path / "o.safetensors", "--to", "diffusers"), problem)
    assert_nothing_written(tmp_path, src)


def test_a_mindspore_checkpoint_is_sent_to_ms2neutral(run_cli, tmp_path):
    src = tmp_path / "sdxl_lora.ckpt"
    write_ms_checkpoint(src, {"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.lora_A.weight":
                              Tensor.from_numpy(np.ones((2, 640), np.float32))})
    refused(run_cli("pt2neutral", src), "a MindSpore checkpoint, not a PyTorch-world file: use ms2neutral")
    # convert and batch read MindONE's checkpoints themselves: there the way is to leave out a --from that excluded them
    refused(run_cli("convert", src, "--from", "kohya", "--to", "diffusers", "-o", tmp_path / "o.safetensors"),
            "a MindSpore checkpoint, not kohya: leave out --from, or name mindone-sgm or ")
    assert_nothing_written(tmp_path, src)


def test_a_mindspore_checkpoint_without_a_lora_says_so_where_its_readers_were_tried(run_cli, tmp_path):
    src = tmp_path / "weights.ckpt"  # before: "use ms2neutral", which refuses it too
    write_ms_checkpoint(src, {"model.diffusion_model.out.2.weight": Tensor.from_numpy(np.ones((4, 4), np.float32))})
    refused(run_cli("convert", src, "--to", "diffusers", "-o", tmp_path / "o.safetensors"),
            "a MindSpore checkpoint holding no LoRA that mindone-sgm")
    assert_nothing_written(tmp_path, src)


def test_wrong_direction_inputs_are_refused(run_cli, diffusers_file, tmp_path):
    write_neutral(make_lora_model(), tmp_path / "n.safetensors")
    refused(run_cli("pt2neutral", tmp_path / "n.safetensors"), "already a neutral LoRA file")
    refused(run_cli("neutral2pt", diffusers_file), "lora.safetensors", "not a neutral LoRA file", "convert --to diffusers")
    refused(run_cli("neutral2pt", tmp_path / "missing.safetensors"), "no such file")
    refused(run_cli("convert", diffusers_file, "-o", tmp_path / "x", "--to", "onnx"), "unknown format 'onnx'")
    refused(run_cli("pt2neutral", tmp_path / "missing.safetensors"), "no such file or directory")


def test_loha_needs_bake_to_lora_for_diffusers(run_cli, tmp_path):
    model = make_lora_model()
    f = lambda *s: Tensor.from_numpy(RNG.standard_normal(s).astype(np.float32))  # noqa: E731
    model.add(LoraModule(f"{ATTN}.attn1.to_v", "loha", {"hada_w1_a": f(640, 4), "hada_w1_b": f(4, 640),
                                                       "hada_w2_a": f(640, 4), "hada_w2_b": f(4, 640)}, 4.0))
    write_neutral(model, tmp_path / "n.safetensors")
    refused(run_cli("neutral2pt", tmp_path / "n.safetensors"), "1 module(s) are loha", "--bake-to-lora")
    result = run_cli("neutral2pt", tmp_path / "n.safetensors", "--bake-to-lora", "16")
    assert result.exit_code == 0 and "baked 1 module(s)" in result.stderr and "relative error" in result.stderr
    metadata = read_safetensors(tmp_path / "n_diffusers.safetensors")[1]
    assert json.loads(metadata["lora_adapter_metadata"])["unet.rank_pattern"][f"{ATTN[5:]}.attn1.to_v"] == 16


def test_summary_describes_the_file_written_not_the_input(run_cli, tmp_path):
    """dtype, tensor bytes and file bytes of the output (a kohya fp16 file holds F16, half the input's tensor bytes)."""
    write_neutral(make_lora_model(), tmp_path / "n.safetensors")
    out = tmp_path / "k.safetensors"
    result = run_cli("neutral2pt", tmp_path / "n.safetensors", "--format", "kohya", "--dtype", "fp16", "-o", out)
    assert result.exit_code == 0, result.output
    tensors, _ = read_safetensors(out)
    assert {t.dtype for t in tensors.values()} == {"F16"}
    assert f"({out.stat().st_size:,} bytes)" in result.stdout
    assert f"tensors  {len(tensors)} written: {sum(t.nbytes for t in tensors.values()):,} bytes, F16\n" in result.stdout
    peft = tmp_path / "p"
    result = run_cli("neutral2pt", tmp_path / "n.safetensors", "--format", "peft", "-o", peft)
    files = [p for p in peft.rglob("*") if p.is_file()]
    assert f"({sum(p.stat().st_size for p in files):,} bytes)" in result.stdout  # a directory: all its files
    assert "tensors  12 written: 431,104 bytes, F32\n" in result.stdout
