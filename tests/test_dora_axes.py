"""DoRA magnitudes on both axes: where each can be written, what the tools reading them compute, what is refused.

A magnitude per output row (PEFT's ``lora_magnitude_vector``, LyCORIS ``wd_on_output=True``) and one per
input column (OneTrainer's default ``decompose_output_axis=False``, LyCORIS ``wd_on_output=False``) are
different functions of W + delta W; the inputs here are written by lycoris-lora itself (tests/fixtures/lycoris.py).

What A1111 and ComfyUI compute from a kohya file's ``dora_scale``, restated from their source as math:

- A1111, AUTOMATIC1111/stable-diffusion-webui ``extensions-builtin/Lora/network.py``,
  ``NetworkModule.finalize_updown`` / ``apply_weight_decompose``: ``u = alpha/rank * up @ down``, then
  ``dora_scale * (W + u) / ||W + u||`` with the norm of each input column (over the output and kernel axes),
  no epsilon, minus W, times the strength. ``dora_scale`` is used whatever its shape: one of shape
  (out, 1) broadcasts against the (1, in) norms into an (out, in) factor, silently.
- ComfyUI, comfyanonymous/ComfyUI ``comfy/weight_adapter/base.py`` ``weight_decompose`` (the version that
  detects the axis, e.g. v0.3.77): per output row when ``dora_scale.shape[0] == W.shape[0]``, and then it
  divides by the norm of each row of W (the weight before the LoRA), not of W + delta W; else per input
  column of W + delta W; float32 epsilon added to the norm. (Older ComfyUI, e.g. ``comfy/lora.py``
  ``weight_decompose`` or ``base.py`` at 14c2085, has the per-column rule only, as A1111.)
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lycoris")
pytestmark = pytest.mark.torch

from lorabridge.converters import convert  # noqa: E402
from lorabridge.errors import LoraBridgeError  # noqa: E402
from lorabridge.formats import kohya  # noqa: E402
from lorabridge.io.safetensors_file import read_safetensors  # noqa: E402
from lorabridge.naming import underscored  # noqa: E402
from lorabridge.deltas import dora_weight  # noqa: E402
from lorabridge.report import inspection_report, render_validation, validation_report  # noqa: E402
from tests.fixtures.lycoris import layer_input, make_lycoris_file, run_layer  # noqa: E402

EPS = float(np.finfo(np.float32).eps)


def a1111_weight(w, down, up, alpha, dora_scale, strength=1.0):
    """A1111's weight for one kohya module with a dora_scale (see the module docstring)."""
    rank = down.shape[0]
    updown = (up.reshape(up.shape[0], -1) @ down.reshape(rank, -1)).reshape(w.shape) * (alpha / rank)
    merged = w + updown
    norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
    norm = norm.reshape(merged.shape[1], *[1] * (w.dim() - 1)).transpose(0, 1)
    return w + strength * (merged * (dora_scale / norm) - w)


def comfyui_weight(w, down, up, alpha, dora_scale, strength=1.0):
    """ComfyUI's weight for one kohya module with a dora_scale (see the module docstring)."""
    rank = down.shape[0]
    calc = w + (up.reshape(up.shape[0], -1) @ down.reshape(rank, -1)).reshape(w.shape) * (alpha / rank)
    if dora_scale.shape[0] == calc.shape[0]:
        norm = w.reshape(w.shape[0], -1).norm(dim=1, keepdim=True).reshape(w.shape[0], *[1] * (w.dim() - 1))
    else:
        norm = calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(calc.shape[1], *[1] * (calc.dim() - 1)).transpose(0, 1)
    calc = calc * (dora_scale / (norm + EPS))
    return w + strength * (calc - w)


def kohya_modules(path):
    """{canonical name: (down, up, alpha, dora_scale)} as stored in our kohya file ``path`` (names by our reader)."""
    stored, _ = read_safetensors(path)
    out = {}
    for name, module in kohya.read(path).modules.items():
        key, _ = underscored.stem(module, "original")
        down, up, scale = (torch.from_numpy(np.array(stored[f"{key}.{s}"].to_float32()))
                           for s in ("lora_down.weight", "lora_up.weight", "dora_scale"))
        out[name] = (down, up, float(stored[f"{key}.alpha"].to_float32()), scale)
    return out


def kohya_weights(modules, case, rule):
    """{canonical name: the weight ``rule`` computes} for every module of ``kohya_modules``."""
    return {name: rule(case.layers[name].weight.detach(), *parts) for name, parts in modules.items()}


def worst_error(case, weights):
    """The largest relative difference between lycoris' module outputs and the layers run with ``weights``."""
    worst = 0.0
    with torch.no_grad():
        for name, lyco in case.modules.items():
            x = layer_input(case.layers[name])
            expected = lyco(x)
            got = run_layer(case.layers[name], weights[name].numpy(), x)
            worst = max(worst, float((got - expected).abs().max() / expected.abs().max()))
    return worst


def dora_case(tmp_path_factory, tiny_sdxl_dir, **options):
    """(lycoris case, neutral file): a lycoris-lora DoRA LoRA of the UNet blocks and text encoders, converted."""
    tmp = tmp_path_factory.mktemp("dora")
    case = make_lycoris_file(tmp, tiny_sdxl_dir, "lora", blocks_only=True, dora_wd=True, **options)
    return case, convert(case.path, tmp / "n.safetensors", to="neutral", progress=False).output


@pytest.fixture(scope="module")
def per_column(tmp_path_factory, tiny_sdxl_dir):
    return dora_case(tmp_path_factory, tiny_sdxl_dir, wd_on_output=False)


@pytest.fixture(scope="module")
def per_row(tmp_path_factory, tiny_sdxl_dir):
    return dora_case(tmp_path_factory, tiny_sdxl_dir)


@pytest.mark.slow
def test_per_column_dora_goes_to_kohya_unchanged_and_a1111_and_comfyui_compute_what_lycoris_computes(per_column, tmp_path):
    case, neutral = per_column
    out = convert(neutral, tmp_path / "k.safetensors", to="kohya", progress=False)
    assert out.warnings == []
    original, _ = read_safetensors(case.path)
    written, _ = read_safetensors(out.output)
    scales = sorted(t.shape for k, t in written.items() if k.endswith(".dora_scale"))
    assert scales == sorted(t.shape for k, t in original.items() if k.endswith(".dora_scale"))
    assert {s[0] for s in scales} == {1} and {len(s) for s in scales} == {2, 4}  # linear and conv, per input column
    modules = kohya_modules(out.output)
    assert worst_error(case, kohya_weights(modules, case, a1111_weight)) < 1e-4
    assert worst_error(case, kohya_weights(modules, case, comfyui_weight)) < 1e-4


@pytest.mark.slow
def test_per_row_dora_in_kohya_is_computed_wrong_by_a1111_and_comfyui_as_the_writer_warns(per_row, tmp_path):
    case, neutral = per_row
    out = convert(neutral, tmp_path / "k.safetensors", to="kohya", progress=False)
    assert any("per output row" in w and "A1111" in w and "wrong weight" in w for w in out.warnings), out.warnings
    modules = kohya_modules(out.output)
    assert worst_error(case, kohya_weights(modules, case, a1111_weight)) > 1e-2
    assert worst_error(case, kohya_weights(modules, case, comfyui_weight)) > 1e-2


@pytest.mark.slow
def test_per_column_dora_written_as_lycoris_loads_in_a_lycoris_network_and_computes_the_same(per_column, lycoris_file, tmp_path):
    """lycoris' create_*_from_weights rebuild DoRA modules per output row only (tests/test_lycoris.py); a network
    created with wd_on_output=False, as its trainer resumes one, loads our file with load_weights."""
    case, neutral = per_column
    ours = convert(neutral, tmp_path / "ours.safetensors", to="lycoris", progress=False).output
    fresh = lycoris_file("lora", blocks_only=True, dora_wd=True, wd_on_output=False, seed=1)
    assert fresh.network.load_weights(str(ours)) == {}  # no missing, no unexpected keys
    with torch.no_grad():
        for name, original in case.modules.items():
            x = layer_input(case.layers[name])
            torch.testing.assert_close(fresh.modules[name](x), original(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", ["diffusers", "peft"])
def test_per_column_dora_is_refused_by_peft_formats_naming_the_modules_and_formats_that_hold_it(per_column, tmp_path, target):
    _, neutral = per_column
    with pytest.raises(LoraBridgeError, match=rf"the {target} format stores DoRA magnitudes per output row only; \d+ module\(s\) "
                                              r"have them per input column .*: (unet|text_encoder)\..*base weights.*--format kohya or lycoris"):
        convert(neutral, tmp_path / "out", to=target, progress=False)


def test_dora_is_refused_by_formats_without_it_naming_the_formats_that_hold_it(per_row, tmp_path):
    _, neutral = per_row
    with pytest.raises(LoraBridgeError, match=r"legacy-diffusers format stores no DoRA magnitudes; .* per output row .*"
                                              r"--format diffusers, peft, kohya or lycoris"):
        convert(neutral, tmp_path / "old.safetensors", to="legacy-diffusers", progress=False)


def test_validate_and_inspect_warn_that_diffusers_cannot_load_dora_per_input_column(per_column):
    _, neutral = per_column
    report = validation_report(neutral)
    assert report["valid"]
    assert any("per input column (dora_axis in)" in w and "--to kohya or --to lycoris" in w for w in report["warnings"])
    assert "warning: " in render_validation(report)
    assert inspection_report(neutral)["warnings"] == report["warnings"]


def test_diffusers_indeed_cannot_load_a_neutral_file_with_dora_per_input_column(per_column, tiny_pipe_factory):
    """What the warning above says, seen: diffusers drops dora_scale keys, PEFT's magnitudes stay on the meta device."""
    _, neutral = per_column
    pipe = tiny_pipe_factory()
    with pytest.raises(NotImplementedError, match="Cannot copy out of meta tensor"):
        pipe.load_lora_weights(str(neutral.parent), weight_name=neutral.name)
        pipe.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"])


# --- the axes are not interchangeable -----------------------------------------------------------------

def test_a_magnitude_moves_to_the_other_axis_only_when_dora_rescales_the_whole_weight():
    """Per column, W' = V * (m_in / ||V||_col); per row, W' = V * (m_out / ||V||_row). Equal (where V has no
    zeros) only if every column's factor is one number k: then m_out = k * ||V||_row."""
    rng = np.random.default_rng(0)
    w, delta = rng.standard_normal((6, 5)).astype(np.float32), rng.standard_normal((6, 5)).astype(np.float32)
    v = w + delta
    col, row = np.linalg.norm(v, axis=0, keepdims=True), np.linalg.norm(v, axis=1, keepdims=True)
    k = 1.7
    np.testing.assert_allclose(dora_weight(w, delta, k * col, "in"), dora_weight(w, delta, k * row, "out"), rtol=1e-5)
    per_column = dora_weight(w, delta, rng.uniform(0.5, 2.0, (1, 5)) * col, "in")
    ratio = per_column / v  # what a per-row magnitude would have to make constant along each row
    assert np.ptp(ratio, axis=1).min() > 0.1
