"""Tensors in a dtype numpy cannot compute with (FP8), and integers where floats belong, through every command.

numpy has no FP8 type: ``Tensor.to_numpy`` refuses F8_E4M3/F8_E5M2 with a TypeError, which was a traceback
wherever math reached it (an FP8 kohya alpha first; then folding alpha into lora_B, baking, resize, merge, fuse,
extract, merging a fused Flux ``qkv``). The rule checked here for every input format and every role: a command
either carries the FP8 tensor bit-exactly (exit 0: a rename, a split or a merge by rows; its bytes are found in
the output) or refuses in one line naming a file (exit 1): the input, or the output for a writer's refusal, as
writers' other refusals do. Never a traceback.

Inputs: a small valid file per format, written by lorabridge's own writers from a neutral model (the formats it
writes) or by hand from the tool's key grammar (XLabs' and OneTrainer's Flux layouts as tests/test_xlabs.py and
tests/test_onetrainer.py spell them, a LyCORIS Tucker LoCon's ``lora_mid``); then one role's tensor at a time
swapped for FP8 bytes of the same shape.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from lorabridge.architectures.fused import merge_present, split_fused
from lorabridge.converters import convert
from lorabridge.converters.registry import all_formats
from lorabridge.errors import LoraBridgeError
from lorabridge.formats.neutral import read_neutral, write_neutral
from lorabridge.io.safetensors_file import read_safetensors, write_safetensors
from lorabridge.model import LoraModel, LoraModule
from lorabridge.neutral_rules import ALLOWED_DTYPES
from lorabridge.tensor import DTYPES, Tensor

# Integer factors folded into integer B overflow in numpy's cast; readers warn about what they fold (lora_mid).
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore::lorabridge.errors.LoraBridgeWarning")]
RNG = np.random.default_rng(8)
TO_Q = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # SDXL (640, 640)
CONV = "unet.down_blocks.1.resnets.0.conv1"  # SDXL (640, 320, 3, 3)
SDXL_BASE_KEYS = {"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight": (640, 640),
                  "model.diffusion_model.input_blocks.4.0.in_layers.2.weight": (640, 320, 3, 3)}  # TO_Q and CONV
BIGG = "text_encoder_2.text_model.encoder.layers.0.self_attn."  # q/k/v: one fused in_proj in MindONE's SGM names
WRITABLE = [f.name for f in all_formats() if f.writable]
RICH = [f"{f.name}-rich" for f in all_formats() if f.writable and (set(f.kinds) - {"lora"} or f.dora_axes)]
FLUX = 3072
FP8 = "F8_E4M3"


def array(*shape: int) -> Tensor:
    return Tensor.from_numpy((RNG.standard_normal(shape) / 4).astype(np.float32))


def swapped(tensor: Tensor, dtype: str = FP8) -> Tensor:
    """``tensor``'s shape in ``dtype``, random bytes a test can find again in an output: 0x01..0x7b, positive
    finite numbers in both FP8 formats (no zero byte, so no piece of it looks like zero rows)."""
    size = tensor.numel * DTYPES[dtype][0]
    return Tensor(dtype, tensor.shape, RNG.integers(1, 0x7C, size, dtype=np.uint8).tobytes())


def quiet(call, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return call(*args, **kwargs)


def lora(name: str, rank: int, inp: int, out: int, kernel: tuple[int, ...] = (), alpha: float = 8.0, **extra) -> LoraModule:
    tensors = {"lora_A.weight": array(rank, inp, *kernel), "lora_B.weight": array(out, rank, *([1] * len(kernel)))}
    return LoraModule(name, "lora", {**tensors, **extra}, alpha, dora_axis="out" if extra else None)


def model_of(*modules: LoraModule) -> LoraModel:
    model = LoraModel(provenance={"source_format": "test"})
    for module in modules:
        model.add(module)
    return model


def plain_model() -> LoraModel:
    """A linear and a conv LoRA with alpha != rank (so writers without alpha fold it into B), and bigG's q/k/v
    with their own A (so MindONE's SGM writer merges them into one in_proj with numpy)."""
    return model_of(lora(TO_Q, 4, 640, 640), lora(CONV, 4, 320, 640, (3, 3)),
                    *(lora(BIGG + p, 2, 1280, 1280) for p in ("q_proj", "k_proj", "v_proj")))


def rich_model(kinds: set[str]) -> LoraModel:
    """The other kinds ``kinds`` names (dora, loha, lokr, full), one module each (a Tucker LoHa too)."""
    modules = []
    if "dora" in kinds:
        modules.append(lora("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k", 4, 640, 640,
                            dora_scale=array(640, 1)))
    if "loha" in kinds:
        modules.append(LoraModule("unet.down_blocks.1.attentions.0.proj_in", "loha",
                                  {r: array(*s) for r, s in (("hada_w1_a", (640, 2)), ("hada_w1_b", (2, 640)),
                                                             ("hada_w2_a", (640, 2)), ("hada_w2_b", (2, 640)))}, 2.0))
        modules.append(LoraModule("unet.conv_in", "loha",  # Tucker: w_a (r, out), w_b (r, in); conv_in's 4 inputs keep SVDs small
                                  {r: array(*s) for r, s in (("hada_w1_a", (2, 320)), ("hada_w1_b", (2, 4)),
                                                             ("hada_t1", (2, 2, 3, 3)), ("hada_w2_a", (2, 320)),
                                                             ("hada_w2_b", (2, 4)), ("hada_t2", (2, 2, 3, 3)))}, 2.0))
    if "lokr" in kinds:
        modules.append(LoraModule("unet.down_blocks.1.attentions.0.proj_out", "lokr",
                                  {r: array(*s) for r, s in (("lokr_w1", (8, 8)), ("lokr_w2_a", (80, 2)),
                                                             ("lokr_w2_b", (2, 80)))}, 2.0))
    if "full" in kinds:
        modules.append(LoraModule("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v", "full",
                                  {"diff": array(640, 640)}, 1.0))
    return model_of(*modules)


def kohya_pair(stem: str, rank: int, inp: int, out: int, alpha: float | None = 8.0, down: str = "lora_down.weight",
               up: str = "lora_up.weight") -> dict[str, Tensor]:
    pair = {f"{stem}.{down}": array(rank, inp), f"{stem}.{up}": array(out, rank)}
    return {**pair, f"{stem}.alpha": Tensor.from_numpy(np.array(alpha, "f4"))} if alpha is not None else pair


def write_sources(root: Path) -> dict[str, Path]:
    """One small valid file per input format: ``<format>`` holds plain LoRA, ``<format>-rich`` the other kinds it
    stores (DoRA, LoHa, LoKr, full); read-only and hand-made layouts last."""
    sources = {}
    for name in WRITABLE:
        target = next(f for f in all_formats() if f.name == name)
        extra = set(target.kinds) - {"lora"} | ({"dora"} if target.dora_axes else set())
        for label, model in ((name, plain_model()), (f"{name}-rich", rich_model(extra) if extra else None)):
            if model is None:
                continue
            neutral = root / f"made-{label}.safetensors"
            write_neutral(model, neutral)
            if name == "neutral":
                sources[label] = neutral
                continue
            out = root / (label if target.writes_directory else f"{label}.safetensors")
            options = {"container": "safetensors"} if name.startswith("mindone") else {}  # a .ckpt holds no FP8
            sources[label] = quiet(convert, neutral, out, to=name, progress=False, **options).output
    tensors = {}  # XLabs: double block 0's fused image qkv and proj, no alpha (x-flux's trainer saves none)
    for layer, (out, inp) in {"qkv_lora1": (3 * FLUX, FLUX), "proj_lora1": (FLUX, FLUX)}.items():
        tensors |= kohya_pair(f"double_blocks.0.processor.{layer}", 2, inp, out, None, "down.weight", "up.weight")
    write_safetensors(root / "xlabs.safetensors", tensors, {})
    tensors = {}  # OneTrainer (legacy): q, k, v with their own A (merged with numpy into kohya's fused qkv), and
    for stem in ("to_q", "to_k", "to_v", "add_k_proj"):  # add_k alone (its fused txt qkv gets zero q and v)
        tensors |= kohya_pair(f"lora_transformer_transformer_blocks_0_attn_{stem}", 2, FLUX, FLUX)
    write_safetensors(root / "onetrainer.safetensors", tensors, {"ot_branch": "master"})
    stem = "lora_unet_down_blocks_1_resnets_0_conv1"  # a LyCORIS Tucker LoCon: lora_mid folded into lora_down on reading
    tensors = {f"{stem}.lora_down.weight": array(4, 320, 1, 1), f"{stem}.lora_mid.weight": array(4, 4, 3, 3),
               f"{stem}.lora_up.weight": array(640, 4, 1, 1), f"{stem}.alpha": Tensor.from_numpy(np.array(8.0, "f4"))}
    write_safetensors(root / "lycoris-tucker.safetensors", tensors, {})
    return {**sources, **{n: root / f"{n}.safetensors" for n in ("xlabs", "onetrainer", "lycoris-tucker")}}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    return write_sources(tmp_path_factory.mktemp("sources"))


@pytest.fixture(scope="module")
def sdxl_base(tmp_path_factory) -> Path:
    """A single-file SDXL checkpoint holding the layers TO_Q and CONV adapt (fuse's base)."""
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    weights = {key: Tensor.from_numpy(RNG.standard_normal(shape).astype("f2")) for key, shape in SDXL_BASE_KEYS.items()}
    write_safetensors(path, weights)
    return path


def tensor_file(source: Path) -> Path:
    """The file holding a source's tensors (a PEFT adapter directory's first one)."""
    return next(iter(sorted(source.rglob("adapter_model.safetensors")))) if source.is_dir() else source


def role_of(key: str) -> str:
    """A key's role: its suffix after the module's name (``lora_up.weight``, ``alpha``, ``hada_w1_a``...)."""
    parts = key.split(".")
    return ".".join(parts[-2:] if parts[-1] == "weight" else parts[-1:])


def variants(source: Path, work: Path, dtype: str = FP8, roles: int | None = None) -> list[tuple[str, Path, bytes]]:
    """Copies of ``source``, each with the first tensor of one role (per role and rank of its shape) in ``dtype``:
    (role, copy, the bytes swapped in). A neutral file is written again by lorabridge (its manifest names dtypes),
    unless the dtype is one it refuses (then the manifest disagrees, as another tool's rewrite would leave it);
    at most ``roles`` of them."""
    tensors, metadata = read_safetensors(tensor_file(source))
    tensors = {key: Tensor(t.dtype, t.shape, bytes(t.data)) for key, t in tensors.items()}  # nothing left mapped
    firsts: dict[tuple[str, int], str] = {}
    for key, tensor in tensors.items():
        firsts.setdefault((role_of(key), len(tensor.shape)), key)
    out = []
    for (role, ndim), key in list(firsts.items())[:roles]:
        label = f"{role}-{ndim}d"
        changed = {**tensors, key: swapped(tensors[key], dtype)}
        copy = work / (f"{source.stem}-{label}" + ("" if source.is_dir() else source.suffix))
        if source.is_dir():
            shutil.copytree(source, copy)
            write_safetensors(copy / tensor_file(source).relative_to(source), changed, metadata)
        elif "lorabridge.manifest" in metadata and dtype in ALLOWED_DTYPES:
            model = read_neutral(source)
            module_name = next(name for name in model.modules if key.startswith(name + "."))
            module = model.modules[module_name]
            stored = key[len(module_name) + 1:]
            role_name = stored if stored in module.tensors else "dora_scale"  # lora_magnitude_vector, as PEFT spells it
            module.tensors[role_name] = changed[key].reshaped(module.tensors[role_name].shape)
            write_neutral(model, copy)
        else:
            write_safetensors(copy, changed, metadata)
        out.append((label, copy, bytes(changed[key].data)))
    return out


def commands(path: Path, out: Path, others: dict[str, Path], base: Path, rich: bool) -> list[list]:
    """Every command that takes a LoRA file, on ``path``, writing under ``out``."""
    runs = [["convert", path, "--to", to, "-o", out / f"to-{to}"] for to in WRITABLE]
    if rich:
        runs.append(["convert", path, "--to", "kohya", "--bake-to-lora", "2", "-o", out / "baked.safetensors"])
    return runs + [["resize", path, "--rank", "2", "-o", out / "resized.safetensors"],
                   ["merge", path, others["neutral"], "--weights", "1,0.5", "-o", out / "merged.safetensors"],
                   ["fuse", path, "--base", base, "-o", out / "fused.safetensors"],
                   ["check", path], ["inspect", path], ["validate", path]]


def output_tensors(path: Path) -> list[Tensor]:
    files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
    return [t for f in files for t in read_safetensors(f)[0].values()]


def came_through(written: list[Tensor], needle: bytes, dtype: str) -> bool:
    """Whether the ``needle`` bytes are in a ``dtype`` tensor written, whole (zero rows beside it: a fused layer's
    missing parts), or in pieces adding up to it (a fused layer split by rows or rank blocks)."""
    pieces = [bytes(t.data) for t in written if t.dtype == dtype]
    return any(needle in piece for piece in pieces) or sum(len(p) for p in pieces if p and p in needle) >= len(needle)


def outcome(run_cli, args: list, needle: bytes | None, dtype: str = FP8) -> str | None:
    """What is wrong with one command's run, or None: a traceback, an exit code other than 0 or 1, an error
    that is not one line naming the input or output, or (exit 0 of a command writing a file) the ``needle``
    bytes swapped in lost from every ``dtype`` tensor of the output (None: not checked)."""
    shown = " ".join(str(a) for a in args)
    try:
        result = run_cli(*args)
    except Exception as exc:  # the point: what escaped the CLI (run_cli lets exceptions through)
        return f"{shown}: {type(exc).__name__}: {exc}"
    lines = result.output.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    files = [str(a) for a in args if isinstance(a, Path)]
    if result.exit_code not in (0, 1):
        return f"{shown}: exit {result.exit_code}: {result.output[-300:]}"
    if errors and (len(lines) != 1 or not any(f in errors[0] for f in files)):
        return f"{shown}: not one line naming a file: {result.output[-400:]}"
    if result.exit_code == 1 and not errors and args[0] not in ("check", "validate"):  # their verdicts are reports
        return f"{shown}: exit 1 without an error line: {result.output[-300:]}"
    if needle is not None and result.exit_code == 0 and "-o" in args and args[0] in ("convert", "resize"):
        if not came_through(output_tensors(args[args.index("-o") + 1]), needle, dtype):
            return f"{shown}: exit 0, but the {dtype} tensor did not come through bit-exactly"
    return None


@pytest.mark.parametrize("source", [*WRITABLE, *RICH, "xlabs", "onetrainer", "lycoris-tucker"])
def test_an_fp8_tensor_in_any_role_is_carried_bit_exactly_or_refused_in_one_line(source, sources, sdxl_base, run_cli,
                                                                                   tmp_path):
    """Before: convert (folding alpha into B for MindONE and legacy-diffusers, --bake-to-lora, merging a fused
    Flux qkv or bigG in_proj), resize, merge, fuse and reading a Tucker LoCon were TypeError tracebacks."""
    problems = []
    for role, path, needle in variants(sources[source], tmp_path):
        out = tmp_path / f"out-{role}"
        out.mkdir()
        for args in commands(path, out, sources, sdxl_base, source.endswith("-rich")):
            problem = outcome(run_cli, args, needle)
            if problem:
                problems.append(f"{role}: {problem}")
    assert not problems, f"{len(problems)} run(s) of {source}:\n" + "\n".join(problems)


@pytest.mark.parametrize("dtype", ["F8_E5M2", "BOOL", "U8", "I64"])
@pytest.mark.parametrize("source", ["kohya", "neutral", "mindone-diffusers", "onetrainer"])
def test_other_dtypes_numpy_cannot_compute_with_or_that_are_no_floats_never_crash(source, dtype, sources, sdxl_base, run_cli,
                                                                                     tmp_path):
    """F8_E5M2 like F8_E4M3; BOOL/U8/I64 factors and alphas numpy can compute with (a neutral file refuses them
    by its dtype rule), so only the rule against tracebacks and multi-line errors applies: first roles only."""
    problems = []
    for role, path, needle in variants(sources[source], tmp_path, dtype, roles=3):
        out = tmp_path / f"out-{role}"
        out.mkdir()
        for args in commands(path, out, sources, sdxl_base, rich=False):
            problem = outcome(run_cli, args, needle if dtype == "F8_E5M2" else None, dtype)
            if problem:
                problems.append(f"{role}: {problem}")
    assert not problems, f"{len(problems)} run(s) of {source} with {dtype}:\n" + "\n".join(problems)


@pytest.mark.parametrize("source, to, dtype", [("kohya", "kohya", "fp16"), ("neutral", "lycoris", "bf16"),
                                               ("diffusers", "peft", "fp32")])
def test_dtype_casts_of_fp8_tensors_are_refused_in_one_line(source, to, dtype, sources, run_cli, tmp_path):
    role, path, _ = next(v for v in variants(sources[source], tmp_path) if v[0].startswith(("lora_up", "lora_B")))
    result = run_cli("convert", path, "--to", to, "--dtype", dtype, "-o", tmp_path / "cast")
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "F8_E4M3" in result.output, result.output
    assert str(path) in result.output or str(tmp_path / "cast") in result.output


def test_writers_name_the_fused_layer_whose_fp8_parts_they_cannot_merge(sources, run_cli, tmp_path):
    """kohya's Flux qkv from OneTrainer's q, k, v (their own A), MindONE's bigG in_proj from q, k, v: merged with
    numpy, so refused in one line naming the output (a writer's refusal) and the tensors; MindONE's merge used to
    raise without a file."""
    cases = [("onetrainer", "lora_up.weight", "kohya", "cannot merge 1 fused layer(s) from their parts: "
              "transformer.transformer_blocks.0.attn.to_q.lora_B.weight is F8_E4M3, which stacking q/k/v into one LoRA "
              "on transformer.double_blocks.0.img_attn.qkv"),
             ("mindone-sgm", "lora_A.weight", "mindone-sgm", f"3 tensors are FP8 ({BIGG}q_proj.lora_A.weight is F8_E4M3;")]
    for source, role, to, message in cases:
        path = next(p for r, p, _ in variants(sources[source], tmp_path) if r.startswith(role))
        out = tmp_path / f"{source}-out.safetensors"
        result = run_cli("convert", path, "--to", to, "-o", out)
        assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
        assert result.output.startswith(f"error: {out}: {message}"), result.output


def test_extract_refuses_an_fp8_weight_of_either_model_naming_its_file(run_cli, sdxl_base, tmp_path):
    """Before: a TypeError traceback from the first FP8 layer (a quantized checkpoint as --base or --tuned)."""
    tensors, _ = read_safetensors(sdxl_base)
    key = next(iter(SDXL_BASE_KEYS))
    tuned = {k: Tensor.from_numpy(t.to_float32() + np.float32(0.5), t.dtype) for k, t in tensors.items()}
    write_safetensors(tmp_path / "tuned.safetensors", tuned)
    write_safetensors(tmp_path / "fp8.safetensors", {**tuned, key: swapped(tuned[key])})
    out = tmp_path / "x.safetensors"
    assert run_cli("extract", "--base", sdxl_base, "--tuned", tmp_path / "tuned.safetensors", "--rank", "2",
                   "-o", out).exit_code == 0
    fp8, plain = tmp_path / "fp8.safetensors", tmp_path / "tuned.safetensors"
    for base, tuned_path in ((sdxl_base, fp8), (fp8, plain)):
        result = run_cli("extract", "--base", base, "--tuned", tuned_path, "--rank", "2", "-o", out, "--force")
        assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
        assert f"error: {fp8}: tensor {key!r} is F8_E4M3, which extract cannot compute with" in result.output


def test_fp8_parts_of_a_fused_layer_merge_by_their_bytes_or_are_refused():
    """One part present: the others get zero rows in B's own dtype (before: F32 zeros beside FP8 rows, so the
    merge took the numpy path and crashed); parts with their own A need numpy and are refused, naming them."""
    names = [f"transformer.transformer_blocks.0.attn.{p}" for p in ("to_q", "to_k", "to_v")]
    q = LoraModule(names[0], "lora", {"lora_A.weight": swapped(array(2, 16)), "lora_B.weight": swapped(array(16, 2))}, 2.0)
    fused = merge_present({0: q}, "transformer.x.qkv", (16, 16, 16))
    b = fused.tensors["lora_B.weight"]
    assert b.dtype == FP8 and bytes(b.data) == bytes(q.tensors["lora_B.weight"].data) + bytes(64)
    assert fused.tensors["lora_A.weight"] is q.tensors["lora_A.weight"]
    k = LoraModule(names[1], "lora", {"lora_A.weight": array(2, 16), "lora_B.weight": array(16, 2)}, 2.0)
    stacking = r"which stacking \(to_q, to_k, qkv\[2\]\) into one LoRA on transformer\.x\.qkv"  # qkv[2]: v's zero filler
    with pytest.raises(LoraBridgeError, match=rf"FP8 \({names[0]}\.lora_A\.weight is F8_E4M3; {names[0]}\.lora_B\.weight is "
                                              rf"F8_E4M3; .*, {stacking}"):
        merge_present({0: q, 1: k}, "transformer.x.qkv", (16, 16, 16))
    full = {i: LoraModule(name, "full", {"diff": swapped(array(16, 16)) if i else array(16, 16)}, 0.0, "assumed")
            for i, name in enumerate(names[:2])}
    with pytest.raises(LoraBridgeError, match=r"to_k\.diff is F8_E4M3, which casting the parts of transformer\.x\.qkv"):
        merge_present(full, "transformer.x.qkv", (16, 16, 16))


def test_an_fp8_lokr_that_splits_only_as_dense_deltas_is_refused():
    """A LoKr whose w2 rows (6) do not divide the parts' rows (4) splits through its float32 delta W."""
    module = LoraModule("text_encoder_2.x.in_proj", "lokr", {"lokr_w1": array(2, 2), "lokr_w2": swapped(array(6, 4))}, 1.0)
    plain = LoraModule(module.name, "lokr", {"lokr_w1": array(2, 2), "lokr_w2": array(6, 4)}, 1.0)
    assert {m.kind for m in split_fused(plain, ("q", "k", "v"))} == {"full"}
    with pytest.raises(LoraBridgeError, match=r"in_proj\.lokr_w2 is F8_E4M3, which splitting it into"):
        split_fused(module, ("q", "k", "v"))


@pytest.mark.parametrize("dtype", ["BOOL", "U8", "I64"])
@pytest.mark.parametrize("source", [*WRITABLE, "lycoris-rich", "xlabs", "onetrainer"])
def test_an_integer_or_boolean_factor_is_refused_by_every_reader_in_one_line(source, dtype, sources, run_cli, tmp_path):
    """No loader multiplies an integer factor in: every reader refuses one (rules.module_findings, reason "dtype"),
    naming the role; an integer alpha (diffusers' kohya conversions store I64 ones) is still read."""
    made = [v for v in variants(sources[source], tmp_path, dtype) if not v[0].startswith("alpha")]
    assert made
    for role, path, _ in made:
        result = run_cli("convert", path, "--to", "kohya" if source != "kohya" else "neutral", "-o", tmp_path / f"out-{role}")
        assert result.exit_code == 1 and result.output.count("\n") == 1, (role, result.output)
        said = f"dtype {dtype} is not one of" if source == "neutral" else f"holds {dtype} values, not floating-point ones"
        assert said in result.output and str(path) in result.output, result.output  # neutral: its spec's dtype rule
