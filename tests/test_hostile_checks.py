"""Hostile and odd real-world input the shared checks must catch (issue 10): shapes readers and
``validate`` judge alike, alphas that are not numbers (and zero and negative ones, which are),
rank/alpha patterns that could hang, PEFT directories that would lose components, LoRAs wider than
SDXL, and casts that overflow.

Inputs are written in each tool's own layout: kohya keys as sd-scripts' ``networks/lora.py`` saves
them (``lora_unet_<path>.lora_down.weight``/``.lora_up.weight``/``.alpha``), LyCORIS files by
lycoris-lora itself where a real file is needed, PEFT directories as ``save_pretrained`` lays them out.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorabridge.converters import convert
from lorabridge.converters.registry import get_format
from lorabridge.errors import LoraBridgeError, LoraBridgeWarning, ValidationProblem
from lorabridge.formats import diffusers, kohya, lycoris, peft
from lorabridge.formats.neutral import read_neutral, write_neutral
from lorabridge.io.safetensors_file import read_safetensors, write_safetensors
from lorabridge.manifest import MANIFEST_KEY, tensor_sha256
from lorabridge.model import LoraModel, LoraModule
from lorabridge.report import validation_report
from lorabridge.tensor import Tensor
from tests.fixtures.core import make_lora_model

RNG = np.random.default_rng(0)
CONV = "unet.down_blocks.1.resnets.0.conv1"  # SDXL: (640, 320, 3, 3)
LINEAR = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # SDXL: (640, 640)
KOHYA_STEM = {CONV: "lora_unet_down_blocks_1_resnets_0_conv1",
              LINEAR: "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"}


def array(*shape: int) -> Tensor:
    return Tensor.from_numpy(RNG.standard_normal(shape).astype(np.float32))


def quiet(call, *args, **kwargs):
    """Run ``call`` with lorabridge's warnings silenced (tests about errors and results, not warnings)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LoraBridgeWarning)
        return call(*args, **kwargs)


def rewritten(src, dst, tensors=None, manifest_text=None):
    """A copy of neutral file ``src`` with some tensors replaced and/or new manifest text, its hash made right
    again: what a careless or hostile tool could write. Only the change itself is then wrong."""
    old, metadata = read_safetensors(src)
    tensors = {**old, **(tensors or {})}
    text = json.dumps({**json.loads(metadata[MANIFEST_KEY]), "tensor_sha256": tensor_sha256(tensors)})
    write_safetensors(dst, tensors, {**metadata, MANIFEST_KEY: manifest_text(text) if manifest_text else text})
    return dst


def problems_of(path) -> str:
    report = validation_report(path)
    assert not report["valid"], path
    return " | ".join(f"{p['where']}: {p['problem']}" for p in report["problems"])


# ---- one set of shape rules for readers, writers and validate ---------------------------------

LOHA = {"hada_w1_a": (64, 2), "hada_w1_b": (2, 64), "hada_w2_a": (64, 2), "hada_w2_b": (2, 64)}
LOKR = {"lokr_w1": (4, 4), "lokr_w2_a": (16, 2), "lokr_w2_b": (2, 16)}
BROKEN = [  # (kind, good shapes, role, bad shape, what the message says)
    pytest.param("loha", LOHA, "hada_w2_a", (32, 2), "Hadamard factors differ", id="loha-w2-rows"),
    pytest.param("loha", LOHA, "hada_w2_b", (2, 48), "Hadamard factors differ", id="loha-w2-columns"),
    pytest.param("loha", LOHA, "hada_w2_b", (3, 64), "rank mismatch", id="loha-w2-rank"),
    pytest.param("loha", {**LOHA, "hada_t1": (2, 2, 3, 3)}, "hada_w1_a", (2, 64), "needs both hada_t1 and hada_t2", id="loha-half-tucker"),
    pytest.param("lokr", LOKR, "lokr_w2_b", (3, 16), "rank mismatch", id="lokr-w2-rank"),
    pytest.param("lokr", {**LOKR, "lokr_w1_a": (4, 2)}, "lokr_w1_b", (2, 4), "both whole and decomposed", id="lokr-w1-twice"),
    pytest.param("lokr", {"lokr_w1_a": (4, 2), "lokr_w1_b": (2, 4), "lokr_w2_a": (16, 3), "lokr_w2_b": (3, 16)},
                 "lokr_w2_a", (16, 3), "rank mismatch", id="lokr-ranks-differ-between-factors"),
    pytest.param("lokr", LOKR, "lokr_w2_b", (2, 16, 3), "expected 2-d or 4-d", id="lokr-3d-factor"),
]


@pytest.mark.parametrize("kind, shapes, role, bad, message", BROKEN)
def test_lycoris_factors_that_do_not_fit_together_are_refused_on_reading_and_by_validate(tmp_path, kind, shapes, role, bad, message):
    """Before: a LoHa whose two Hadamard factors differ in shape was read, and ``--bake-to-lora`` then crashed
    in numpy; validate did not check these shapes either."""
    stem, name = "lora_unet_down_blocks_1_attentions_0_proj_in", "unet.down_blocks.1.attentions.0.proj_in"
    factors = {r: array(*shape) for r, shape in {**shapes, role: bad}.items()}
    alpha = Tensor.from_numpy(np.array(2.0, "f4"))
    write_safetensors(tmp_path / "lyco.safetensors", {**{f"{stem}.{r}": t for r, t in factors.items()}, f"{stem}.alpha": alpha})
    with pytest.raises(LoraBridgeError, match=message):
        quiet(lycoris.read, tmp_path / "lyco.safetensors")
    with pytest.raises(LoraBridgeError, match=message):  # and so it never reaches the baking math
        quiet(convert, tmp_path / "lyco.safetensors", tmp_path / "k.safetensors", to="kohya", bake_to_lora=4, progress=False)
    # validate: a neutral file of a good module of the kind, whose tensors another tool replaced with these
    good = LoraModule(name, kind, {r: array(*s) for r, s in (LOHA if kind == "loha" else LOKR).items()}, 2.0)
    write_neutral(LoraModel(modules={name: good}), tmp_path / "good.safetensors")
    _, metadata = read_safetensors(tmp_path / "good.safetensors")
    write_safetensors(tmp_path / "bad.safetensors", {f"{name}.{r}": t for r, t in factors.items()}, metadata)
    assert message in problems_of(rewritten(tmp_path / "bad.safetensors", tmp_path / "bad.safetensors"))


def test_a_real_lycoris_loha_with_a_changed_factor_is_refused(lycoris_file, tmp_path):
    """The same with a file lycoris-lora wrote: one factor of one module replaced by a wider one."""
    case = lycoris_file("loha", blocks_only=True)
    tensors, metadata = read_safetensors(case.path)
    key = next(k for k in tensors if k.endswith(".hada_w2_a"))
    rows, rank = tensors[key].shape
    tensors[key] = array(rows * 2, rank)
    write_safetensors(tmp_path / "changed.safetensors", tensors, metadata)
    with pytest.raises(LoraBridgeError, match="Hadamard factors differ"):
        quiet(convert, tmp_path / "changed.safetensors", tmp_path / "n.safetensors", to="neutral", progress=False)


def kohya_file(path, modules: dict[str, tuple[tuple, tuple]], alpha=1.0, alpha_dtype="F32"):
    """A kohya file: module -> (lora_down shape, lora_up shape), ``.alpha`` per module unless ``alpha`` is None."""
    tensors = {}
    for name, (down, up) in modules.items():
        stem = KOHYA_STEM[name]
        tensors |= {f"{stem}.lora_down.weight": array(*down), f"{stem}.lora_up.weight": array(*up)}
        if alpha is not None:
            tensors[f"{stem}.alpha"] = Tensor.from_numpy(np.array(alpha, np.float32), alpha_dtype)
    write_safetensors(path, tensors, {"ss_network_module": "networks.lora"})
    return path


def test_a_conv_lora_up_with_a_3x3_kernel_is_refused_not_converted_into_an_invalid_file(tmp_path):
    """Before: pt2neutral wrote it, and its own validate then rejected the output (conv lora_B is (out, r, 1, 1))."""
    src = kohya_file(tmp_path / "k.safetensors", {CONV: ((2, 32, 3, 3), (64, 2, 3, 3))})
    with pytest.raises(LoraBridgeError, match=r"unet\.down_blocks\.1\.resnets\.0\.conv1: shapes lora_A \[2, 32, 3, 3\] / "
                                              r"lora_B \[64, 2, 3, 3\] are neither a linear LoRA nor a conv LoRA"):
        quiet(convert, src, tmp_path / "n.safetensors", to="neutral", progress=False)
    assert not (tmp_path / "n.safetensors").exists()


def test_the_neutral_writer_refuses_what_validate_would_reject(tmp_path):
    module = LoraModule(CONV, "lora", {"lora_A.weight": array(2, 32, 3, 3), "lora_B.weight": array(64, 2, 3, 3)}, 2.0)
    with pytest.raises(ValidationProblem, match="neither a linear LoRA nor a conv LoRA"):
        write_neutral(LoraModel(modules={CONV: module}), tmp_path / "n.safetensors")
    assert list(tmp_path.iterdir()) == []


SHAPE = st.lists(st.integers(0, 3), min_size=0, max_size=5).map(tuple)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(down=SHAPE, up=SHAPE, name=st.sampled_from([CONV, LINEAR]))
def test_what_the_kohya_reader_accepts_validate_accepts(tmp_path_factory, down, up, name):
    """Any lora_down/lora_up shapes: the reader refuses them with our error, or its neutral file is valid."""
    tmp = tmp_path_factory.mktemp("shapes")
    src = kohya_file(tmp / "k.safetensors", {name: (down, up)})
    try:
        quiet(convert, src, tmp / "n.safetensors", to="neutral", progress=False)
    except LoraBridgeError:
        return
    assert validation_report(tmp / "n.safetensors")["valid"], (down, up)


# ---- alpha: a finite number; zero warned about, negative fine -----------------------------------


def diffusers_tensors(model: LoraModel) -> dict[str, Tensor]:
    return {f"{m.name}.{r}": t for m in model.modules.values() for r, t in m.tensors.items()}


@pytest.mark.parametrize("metadata", [
    '{"unet.r": 4, "unet.lora_alpha": NaN}',
    '{"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"attn1.to_q": Infinity}}',
    '{"unet.r": 4, "unet.lora_alpha": 1e400}',
], ids=["nan", "infinity-in-pattern", "overflow"])
def test_a_non_finite_alpha_in_lora_adapter_metadata_is_refused(tmp_path, metadata):
    model = make_lora_model()
    write_safetensors(tmp_path / "d.safetensors", diffusers_tensors(model), {"lora_adapter_metadata": metadata})
    with pytest.raises(LoraBridgeError, match=r"unet\..*: alpha (nan|inf) is not a finite number \(stored in the file\)"):
        quiet(diffusers.read, tmp_path / "d.safetensors")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_kohya_alpha_tensor_is_refused(tmp_path, value):
    src = kohya_file(tmp_path / "k.safetensors", {LINEAR: ((2, 640), (640, 2))}, alpha=value, alpha_dtype="F16")
    with pytest.raises(LoraBridgeError, match=r"attn1\.to_q: alpha -?(nan|inf) is not a finite number"):
        quiet(kohya.read, src)


def test_a_non_finite_alpha_in_adapter_config_json_is_refused(tmp_path):
    write_neutral(make_lora_model(), tmp_path / "n.safetensors")
    out = quiet(convert, tmp_path / "n.safetensors", tmp_path / "peft", to="peft", progress=False).output
    config = json.loads((out / "unet" / "adapter_config.json").read_text())
    (out / "unet" / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": float("nan")}))  # Python writes NaN
    with pytest.raises(LoraBridgeError, match="alpha nan is not a finite number"):
        quiet(convert, out, tmp_path / "back.safetensors", to="neutral", progress=False)


def test_a_non_finite_user_alpha_is_refused_by_the_library_and_the_cli(tmp_path, run_cli):
    src = kohya_file(tmp_path / "k.safetensors", {LINEAR: ((2, 640), (640, 2))}, alpha=None)
    with pytest.raises(LoraBridgeError, match=r"alpha nan is not a finite number \(given with --alpha\)"):
        quiet(convert, src, tmp_path / "n.safetensors", to="neutral", alpha=float("nan"), progress=False)
    for command in (["pt2neutral", src], ["convert", src, "--to", "neutral", "-o", tmp_path / "o.safetensors"]):
        result = run_cli(*command, "--alpha", "nan")
        assert result.exit_code == 2 and "'nan' is not a finite number" in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.safetensors"]


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_validate_rejects_a_manifest_that_is_not_strict_json(tmp_path, neutral_file, token):
    """Before: Python's json module read NaN, and validate called the file valid; no other JSON reader would."""
    bad = rewritten(neutral_file, tmp_path / "bad.safetensors", manifest_text=lambda text: text.replace('"alpha": 8.0', f'"alpha": {token}', 1))
    assert "manifest is not JSON" in problems_of(bad)
    with pytest.raises(LoraBridgeError, match="manifest is not JSON"):
        quiet(convert, bad, tmp_path / "x.ckpt", to="mindone-sgm", progress=False)
    assert not (tmp_path / "x.ckpt").exists()


def test_writers_never_write_a_non_finite_alpha(tmp_path):
    model = make_lora_model()
    next(iter(model.modules.values())).alpha = float("nan")
    with pytest.raises(ValidationProblem, match="alpha nan is not a finite number"):
        write_neutral(model, tmp_path / "n.safetensors")
    for target in ("diffusers", "kohya", "lycoris", "mindone-sgm"):
        with pytest.raises(LoraBridgeError, match="alpha that is not a finite number"):
            get_format(target).write(model, tmp_path / f"{target}.safetensors")
    model.training = {"learning_rate": float("inf")}  # any other non-JSON number in the manifest
    next(iter(model.modules.values())).alpha = 8.0
    with pytest.raises(LoraBridgeError, match="cannot be written as JSON"):
        write_neutral(model, tmp_path / "n.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_zero_alpha_is_kept_and_named_in_a_warning(tmp_path):
    """alpha 0: delta W = 0 in the spec, PEFT, diffusers and ComfyUI; sd-scripts reads it as alpha = rank."""
    src = kohya_file(tmp_path / "k.safetensors", {LINEAR: ((2, 640), (640, 2)), CONV: ((2, 320, 3, 3), (640, 2, 1, 1))}, alpha=0.0)
    with pytest.warns(LoraBridgeWarning, match=r"2 module\(s\) have alpha 0, so they change nothing .*kohya sd-scripts"):
        model = kohya.read(src)
    assert {m.alpha for m in model.modules.values()} == {0.0}
    assert not model.modules[LINEAR].delta_weight().any()
    out = quiet(convert, quiet(convert, src, tmp_path / "n.safetensors", to="neutral", progress=False).output,
                tmp_path / "back.safetensors", to="kohya", progress=False).output
    back = quiet(kohya.read, out)
    assert {m.alpha for m in back.modules.values()} == {0.0}
    assert all(t.same_as(model.modules[n].tensors[r]) for n, m in back.modules.items() for r, t in m.tensors.items())


@pytest.mark.torch
def test_a_negative_alpha_loads_in_diffusers_with_its_sign(tiny_pipe_factory, tmp_path):
    """Negative alphas (sign-flipped LoRAs, kohya merges with negative ratios) are kept and applied as stored."""
    from tests.fixtures.torch_lora import COMPONENTS, assert_fused, base_weights, varied_model

    pipe = tiny_pipe_factory()
    model = varied_model(pipe, every=7)
    for i, module in enumerate(model.modules.values()):
        module.alpha = -module.alpha if i % 2 else module.alpha
    write_neutral(model, tmp_path / "n.safetensors")
    assert validation_report(tmp_path / "n.safetensors")["valid"]
    out = quiet(convert, tmp_path / "n.safetensors", tmp_path / "d.safetensors", to="diffusers", progress=False).output
    base = base_weights(pipe, model.modules)
    pipe.load_lora_weights(str(tmp_path), weight_name=out.name)
    pipe.fuse_lora(components=list(COMPONENTS))
    assert min(m.alpha for m in read_neutral(tmp_path / "n.safetensors").modules.values()) < 0
    assert_fused(pipe, model, base)


# ---- rank/alpha patterns: PEFT's answers, in bounded time -----------------------------------------

# Keys as tools write them: diffusers/lorabridge write full module paths; users write suffixes and simple regexes.
PATTERNS = ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "attn2.to_k", "to_out.0", "mlp.fc1",
            "attn[12].to_[qv]", "^down_blocks.*attn1.to_q", ".*proj_in", "layers.1[0-9].self_attn.(q|k)_proj",
            r"up_blocks\.0\.attentions\.\d\.transformer_blocks\.[0-9]+\.ff\.net\.2", "resnets.[01].conv(1|2)",
            "text_model.encoder.layers.3.*"]


def test_patterns_match_as_peft_matches_them_on_every_sdxl_module():
    get_pattern_key = pytest.importorskip("peft.utils.other").get_pattern_key
    from lorabridge.architectures.sdxl import SDXL
    from lorabridge.naming.peft_config import pattern_value

    values = {key: i for i, key in enumerate(PATTERNS)}
    paths = [path for modules in SDXL.tree.all_modules().values() for path in modules]
    hits = 0
    for path in paths:
        expected = values.get(get_pattern_key(PATTERNS, path), -1)
        assert pattern_value(values, path, -1) == expected, path
        hits += expected >= 0
    assert hits > 100  # the patterns do match real modules


# Exponential for a backtracking matcher on any SDXL path: before, reading this file never finished.
CATASTROPHIC = [r"(\w+\.?)+z", r"([a-z_0-9]+\.?)+\.z"]


@pytest.mark.parametrize("key", CATASTROPHIC)
def test_a_catastrophic_alpha_pattern_is_refused_at_once_not_run(tmp_path, key):
    import subprocess
    import sys

    model = make_lora_model()
    metadata = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {key: 2}})}
    write_safetensors(tmp_path / "d.safetensors", diffusers_tensors(model), metadata)
    code = ("import sys\nfrom lorabridge.errors import LoraBridgeError\nfrom lorabridge.formats import diffusers\n"
            "try:\n    diffusers.read(sys.argv[1])\nexcept LoraBridgeError as exc:\n    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "d.safetensors")], capture_output=True, text=True, timeout=60)
    assert "is a regex lorabridge does not run" in done.stdout and "name the modules instead" in done.stdout, done


def test_the_cli_names_the_refused_pattern_in_one_line(tmp_path, run_cli):
    model = make_lora_model()
    metadata = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"(a+)+b": 2}})}
    write_safetensors(tmp_path / "d.safetensors", diffusers_tensors(model), metadata)
    result = run_cli("pt2neutral", tmp_path / "d.safetensors")
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "pattern '(a+)+b' is a regex lorabridge does not run (a group is repeated" in result.stderr


# ---- PEFT directories: no component left out silently ----------------------------------------------


@pytest.fixture
def peft_layout(tmp_path):
    """unet/, text_encoder/, text_encoder_2/ adapter directories as lorabridge writes them (PeftModel loads them)."""
    write_neutral(make_lora_model(), tmp_path / "n.safetensors")
    return quiet(convert, tmp_path / "n.safetensors", tmp_path / "peft", to="peft", progress=False).output


def test_a_component_directory_without_its_config_is_not_dropped(peft_layout, tmp_path, run_cli):
    """Before: the UNet adapter was skipped without a word and pt2neutral exited 0 with the text encoders only."""
    (peft_layout / "unet" / "adapter_config.json").unlink()
    result = run_cli("pt2neutral", peft_layout, "-o", tmp_path / "out.safetensors")
    assert result.exit_code == 1 and "unet/ has adapter_model.safetensors but no adapter_config.json" in result.stderr
    assert not (tmp_path / "out.safetensors").exists()
    result = run_cli("pt2neutral", peft_layout, "-o", tmp_path / "out.safetensors", "--skip-unknown")
    assert result.exit_code == 0 and "warning: " in result.stderr and "left out 1 adapter folder(s): unet/" in result.stderr
    assert {m.component for m in read_neutral(tmp_path / "out.safetensors").modules.values()} == {"text_encoder", "text_encoder_2"}


def test_an_adapter_under_an_unknown_name_is_not_dropped(peft_layout):
    (peft_layout / "unet").rename(peft_layout / "unet_lora")
    with pytest.raises(LoraBridgeError, match=r"1 adapter folder\(s\) would be left out: unet_lora/ is no pipeline component"):
        quiet(convert, peft_layout, peft_layout.parent / "o.safetensors", to="neutral", progress=False)
    for component in ("text_encoder", "text_encoder_2"):
        (peft_layout / component / "adapter_config.json").unlink()
    with pytest.raises(LoraBridgeError, match=r"no adapter_config\.json here .*: text_encoder/ has adapter_model\.safetensors "
                                              r"but no adapter_config\.json; text_encoder_2/ .*; unet_lora/ is no pipeline component"):
        quiet(peft.read, peft_layout)


# ---- wider than SDXL is another model ----------------------------------------------------------------


def test_a_lora_wider_than_sdxl_is_not_taken_for_sdxl_at_other_widths(tmp_path):
    """SD 1.x's up_blocks.1 has 1280 channels where SDXL's has 640; its attn1/ff names exist in SDXL too.
    Before: every module misfit, so the file passed as "SDXL at other widths" (meant for narrower test pipelines)."""
    block = "unet.up_blocks.1.attentions.0.transformer_blocks.0"
    modules = {f"{block}.attn1.to_q": (1280, 1280), f"{block}.attn1.to_out.0": (1280, 1280), f"{block}.ff.net.2": (5120, 1280)}
    model = LoraModel()
    for name, (inp, out) in modules.items():
        model.add(LoraModule(name, "lora", {"lora_A.weight": array(4, inp), "lora_B.weight": array(out, 4)}, 4.0))
    write_safetensors(tmp_path / "sd15.safetensors", diffusers_tensors(model), {"format": "pt"})
    with pytest.raises(LoraBridgeError, match=r"not an SDXL LoRA: 3 of 3 modules .*attn1\.to_q adapts a \[1280, 1280\] weight, "
                                              r"SDXL's is \[640, 640\]"):
        quiet(diffusers.read, tmp_path / "sd15.safetensors")
    narrow = LoraModel(modules={n: LoraModule(n, "lora", {"lora_A.weight": array(4, 64), "lora_B.weight": array(64, 4)}, 4.0)
                                for n in list(modules)[:2]})
    write_safetensors(tmp_path / "tiny.safetensors", diffusers_tensors(narrow), {"format": "pt"})
    assert len(quiet(diffusers.read, tmp_path / "tiny.safetensors").modules) == 2  # narrower: still the test-pipeline case


def test_a_mindone_lora_wider_than_sdxl_is_refused_too(tmp_path):
    from lorabridge.formats.mindone import MINDONE_DIFFUSERS

    block = "unet.up_blocks.1.attentions.0.transformer_blocks.0"
    model = LoraModel()
    for leaf in ("attn1.to_q", "attn1.to_k"):
        model.add(LoraModule(f"{block}.{leaf}", "lora", {"lora_A.weight": array(4, 1280), "lora_B.weight": array(1280, 4)}, 4.0))
    quiet(MINDONE_DIFFUSERS.write, model, tmp_path / "ms.ckpt")
    with pytest.raises(LoraBridgeError, match=r"not an SDXL LoRA: 2 of 2 modules .*attn1\.to_q adapts a \[1280, 1280\] weight, "
                                              r"SDXL's is \[640, 640\]"):
        quiet(MINDONE_DIFFUSERS.read, tmp_path / "ms.ckpt")


# ---- casts that overflow: one warning naming the tensors, --strict refuses ------------------------


@pytest.fixture
def loud_neutral(tmp_path):
    """A neutral file whose lora_B values in 40 modules exceed fp16's range (65504), as a diverging run's can."""
    from lorabridge.architectures.sdxl import SDXL

    model = LoraModel()
    for path, shape in list((p, s) for p, s in SDXL.tree.all_modules()["unet"].items() if len(s) == 2)[:40]:
        b = np.full((shape[0], 1), 1e5, np.float32)
        model.add(LoraModule(f"unet.{path}", "lora", {"lora_A.weight": array(1, shape[1]), "lora_B.weight": Tensor.from_numpy(b)}, 1.0))
    write_neutral(model, tmp_path / "loud.safetensors")
    return tmp_path / "loud.safetensors"


@pytest.mark.parametrize("target", ["diffusers", "kohya", "lycoris", "peft"])
def test_an_fp16_overflow_is_one_warning_naming_the_tensors_and_strict_refuses_it(loud_neutral, tmp_path, target):
    """Before: numpy's "overflow encountered in cast" once per tensor (with warnings shown always), naming nothing."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = convert(loud_neutral, tmp_path / f"out-{target}", to=target, dtype="fp16", progress=False)
    assert [w for w in caught if not issubclass(w.category, LoraBridgeWarning)] == []
    overflow = [w for w in result.warnings if "fp16 range" in w]
    assert len(overflow) == 1, result.warnings
    assert overflow[0].startswith(f"{tmp_path / f'out-{target}'}: 40 tensor(s) hold values beyond the fp16 range, which become Inf: "
                                  "unet.time_embedding.linear_1.lora_B.weight (1280 of 1280)") and "(+37 more)" in overflow[0]
    with pytest.raises(LoraBridgeError, match=r"40 tensor\(s\) hold values beyond the fp16 range.*refused \(--strict\)"):
        quiet(convert, loud_neutral, tmp_path / f"strict-{target}", to=target, dtype="fp16", strict=True, progress=False)
    assert not (tmp_path / f"strict-{target}").exists()
    assert not [w for w in quiet(convert, loud_neutral, tmp_path / f"bf16-{target}", to=target, dtype="bf16",
                                 progress=False).warnings if "range" in w]  # bf16 holds them


@pytest.mark.parametrize("target", ["kohya", "lycoris"])
def test_an_alpha_beyond_fp16_stays_finite_in_an_fp16_file(tmp_path, target):
    """kohya and LyCORIS store .alpha in the module's dtype; an alpha of 1e5 in fp16 would be Inf (delta W
    all Inf in every loader), so that one tensor is stored in F32 instead."""
    from lorabridge.formats.kohya import read as read_kohya

    model = LoraModel()
    model.add(LoraModule("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "lora",
                         {"lora_A.weight": array(4, 640), "lora_B.weight": array(640, 4)}, 1e5))
    write_neutral(model, tmp_path / "big-alpha.safetensors")
    out = tmp_path / f"out-{target}.safetensors"
    quiet(convert, tmp_path / "big-alpha.safetensors", out, to=target, dtype="fp16", progress=False)
    (module,) = quiet(read_kohya, out).modules.values()
    assert module.alpha == 1e5 and module.dtype == "F16"
