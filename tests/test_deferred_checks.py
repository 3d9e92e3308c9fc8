"""The NaN/Inf scan runs in a thread beside the write (lorabridge/io/deferred.py): same warnings, in the
same order, the same --strict refusal with nothing published, the same output bytes as a scan run in place."""

from __future__ import annotations

import contextlib
import threading
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lorabridge.converters as converters
from lorabridge.io import streaming
from lorabridge.converters import convert
from lorabridge.errors import LoraBridgeError, LoraBridgeWarning
from lorabridge.formats.checks import warn
from lorabridge.formats.neutral import write_neutral
from lorabridge.io import deferred
from lorabridge.model import LoraModel, LoraModule
from lorabridge.tensor import Tensor

RNG = np.random.default_rng(14)


@pytest.fixture(scope="module")
def nan_neutral(tmp_path_factory):
    """A neutral file with NaN in two tensors and fp16-overflowing values in a third (a diverged run)."""
    from lorabridge.architectures.sdxl import SDXL

    model = LoraModel()
    linears = [(p, s) for p, s in SDXL.tree.all_modules()["unet"].items() if len(s) == 2][:6]
    for i, (path, shape) in enumerate(linears):
        a, b = RNG.standard_normal((4, shape[1])).astype(np.float32), RNG.standard_normal((shape[0], 4)).astype(np.float32)
        if i in (1, 4):
            b[0, :2] = np.nan
        if i == 2:
            a[0, 0] = 1e6
        model.add(LoraModule(f"unet.{path}", "lora", {"lora_A.weight": Tensor.from_numpy(a), "lora_B.weight": Tensor.from_numpy(b)}, 4.0))
    path = tmp_path_factory.mktemp("deferred") / "nan.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LoraBridgeWarning)
        write_neutral(model, path)
    return path


def run(src, out, in_place: bool, monkeypatch, **options):
    """``convert`` with the scan beside the write (as commands run it) or in place (as before)."""
    with monkeypatch.context() as patch:
        if in_place:
            patch.setattr(converters, "beside_writing", contextlib.nullcontext)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no warning other than the collected LoraBridgeWarnings
            return convert(src, out, progress=False, **options)


@pytest.mark.parametrize("target", ["diffusers", "kohya", "peft", "lycoris", "comfyui", "mindone-sgm"])
@pytest.mark.parametrize("dtype", [None, "fp16"])
def test_scan_beside_the_write_warns_and_writes_as_in_place(nan_neutral, tmp_path, monkeypatch, target, dtype):
    options = {"dtype": dtype} if dtype else {}
    if target == "mindone-sgm" and dtype:
        pytest.skip("MindONE keeps the dtype")
    here = run(nan_neutral, tmp_path / "here", False, monkeypatch, to=target, **options)
    before = run(nan_neutral, tmp_path / "before", True, monkeypatch, to=target, **options)
    strip = lambda notes, out: [n.replace(str(out), "OUT") for n in notes]  # noqa: E731
    assert strip(here.warnings, tmp_path / "here") == strip(before.warnings, tmp_path / "before")
    nan_notes = [i for i, n in enumerate(here.warnings) if "hold NaN or Inf values" in n]
    assert len(nan_notes) == 1 and "2 tensor(s)" in here.warnings[nan_notes[0]], here.warnings
    if dtype:  # the overflow warning of the cast, given after the scan's
        assert [i for i, n in enumerate(here.warnings) if "fp16 range" in n] == [nan_notes[0] + 1]
    assert contents(tmp_path / "here") == contents(tmp_path / "before")


def contents(out):
    """An output's bytes: the file's, or each file's of a directory output."""
    if out.is_dir():
        return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    return {".": out.read_bytes()}


@pytest.mark.parametrize("target", ["diffusers", "kohya", "peft", "mindone-sgm"])
def test_strict_refuses_before_anything_is_published(nan_neutral, tmp_path, monkeypatch, target):
    for in_place in (False, True):
        out = tmp_path / f"out-{in_place}"
        with pytest.raises(LoraBridgeError, match=r"2 tensor\(s\) hold NaN or Inf values: .*refused \(--strict\)"):
            run(nan_neutral, out, in_place, monkeypatch, to=target, strict=True)
        assert list(tmp_path.iterdir()) == [], "nothing published, no temporary left"


def test_a_check_in_the_block_gives_its_verdict_at_the_next_warning():
    seen = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LoraBridgeWarning)
        with deferred.beside_writing():
            deferred.check(lambda: "scanned", seen.append)
            seen.append("writing")
            warn("a later warning")
            seen.append("after the warning")
    assert seen == ["writing", "scanned", "after the warning"]
    assert [str(w.message) for w in caught] == ["a later warning"]


def test_a_refusal_started_first_wins_over_a_later_error():
    def refuse(_):
        raise LoraBridgeError("refused by the scan")

    with pytest.raises(LoraBridgeError, match="refused by the scan"):
        with deferred.beside_writing():
            deferred.check(lambda: None, refuse)
            raise LoraBridgeError("a later error")
    with pytest.raises(LoraBridgeError, match="a later error"):  # a scan that finds nothing changes nothing
        with deferred.beside_writing():
            deferred.check(lambda: None, lambda _: None)
            raise LoraBridgeError("a later error")
    deferred.settle()  # outside any block: nothing pending


def test_outside_the_block_a_check_runs_in_place():
    seen = []
    deferred.check(lambda: "scanned", seen.append)
    assert seen == ["scanned"]


def test_small_tensors_scanned_together_are_named_one_by_one():
    """Small tensors are scanned a batch at a time; a NaN/Inf is still named in the tensor that holds it,
    with its count, among many clean ones, in every dtype, and in large tensors scanned alone."""
    from lorabridge.formats import checks

    tensors = []
    for i in range(300):
        dtype = ("F32", "F16", "BF16", "F64")[i % 4]
        values = RNG.standard_normal(i % 17 + 1)
        if i in (7, 150, 299):
            values[-1] = (np.nan, np.inf, -np.inf)[(7, 150, 299).index(i)]
        tensors.append((f"t{i}", Tensor.from_numpy(values.astype(np.float32), dtype)))
    big = RNG.standard_normal(checks.SMALL_TENSOR_BYTES).astype(np.float32)
    big[5] = np.nan
    tensors.append(("big", Tensor.from_numpy(big)))
    assert checks._non_finite(tensors) == ["t7 (1 of 8)", "t150 (1 of 15)", "t299 (1 of 11)", f"big (1 of {big.size})"]
    assert checks._non_finite(tensors[:7] + tensors[8:150]) == []


def test_scans_running_at_once_join_their_batches_in_buffers_of_their_own(monkeypatch):
    """Join buffers are kept between scans (no fresh 8 MiB each time), but two scans in threads, both
    holding a joined batch when they check it, never share one: each finds its own NaN."""
    from lorabridge.formats import checks

    both_joined = threading.Barrier(2, timeout=10)
    real_scan = checks.all_finite

    def scan_when_both_have_joined(tensor):
        if tensor.shape == (16,):  # a joined batch: wait until the other thread holds one too
            both_joined.wait()
        return real_scan(tensor)

    monkeypatch.setattr(checks, "all_finite", scan_when_both_have_joined)
    sets = {}
    for name, bad in (("a", 1), ("b", 6)):
        values = np.ones((2, 8), np.float16)  # F16: joined (small F32 are summed one by one, where they lie)
        values.flat[bad] = np.nan
        sets[name] = [(f"{name}{i}", Tensor.from_numpy(values[i])) for i in range(2)]
    found = {}
    threads = [threading.Thread(target=lambda n=n: found.__setitem__(n, checks._non_finite(sets[n]))) for n in sets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert found == {"a": ["a0 (1 of 8)"], "b": ["b0 (1 of 8)"]}
    monkeypatch.setattr(checks, "all_finite", real_scan)
    spares = streaming._kept[checks.SMALL_BATCH_BYTES]
    kept = len(spares)
    checks._non_finite(sets["a"])
    assert kept >= 2 and len(spares) == kept  # taken and given back, none made


def test_each_large_tensor_s_mapped_pages_are_let_go_before_the_next_is_scanned(monkeypatch):
    """The scan touches every page of a mapped input: each tensor's are released as soon as it is scanned (or,
    small, copied into its batch), so the process's RSS stays near one tensor, not the whole file."""
    from lorabridge.formats import checks

    events = []
    real_scan = checks.all_finite
    monkeypatch.setattr(checks, "all_finite", lambda t: events.append(("scan", t.nbytes)) or real_scan(t))
    monkeypatch.setattr(checks, "release_pages", lambda data: events.append(("release", len(data))))
    big = checks.SMALL_TENSOR_BYTES // 4 + 1  # F32 values just over the small-tensor size
    tensors = [(f"big{i}", Tensor.from_numpy(np.ones(big, np.float32))) for i in range(3)]
    tensors += [(f"small{i}", Tensor.from_numpy(np.ones(8, np.float32))) for i in range(4)]
    tensors += [(f"half{i}", Tensor.from_numpy(np.ones(8, np.float16))) for i in range(4)]
    assert checks._non_finite(tensors) == []
    scans_of_big = [i for i, e in enumerate(events) if e == ("scan", big * 4)]
    assert len(scans_of_big) == 3 and all(events[i + 1] == ("release", big * 4) for i in scans_of_big)
    assert events[-9:] == ([("release", 32)] * 4  # small F32: each summed where it lies, then released
                           + [("release", 16)] * 4 + [("scan", 64)])  # small F16: released once joined


def test_small_f32_tensors_summed_one_by_one_are_reported_only_for_a_nan_or_inf_not_for_an_overflowing_sum():
    from lorabridge.formats import checks

    values = {"fine": [1.0, 2.0], "huge": [3e38, 3e38], "nan": [1.0, np.nan], "inf": [-np.inf, 1.0]}
    tensors = [(name, Tensor.from_numpy(np.array(v, np.float32))) for name, v in values.items()]
    tensors.append(("double", Tensor.from_numpy(np.array([np.nan, 1.0, 2.0], np.float64))))
    assert checks._non_finite(tensors) == ["nan (1 of 2)", "inf (1 of 2)", "double (1 of 3)"]


@pytest.mark.parametrize("source_format", ["mindone-sgm", "kohya"])
def test_a_reader_s_scan_runs_beside_the_rest_and_still_refuses_before_publishing(nan_neutral, tmp_path, monkeypatch,
                                                                                  source_format):
    """Readers of foreign files scan for NaN/Inf as they check the model; in a conversion that scan runs in a thread
    too (convert wraps reading and writing in one block): same warnings, same output, and --strict publishes nothing."""
    import threading

    from lorabridge.formats import checks

    suffix = ".ckpt" if source_format == "mindone-sgm" else ".safetensors"
    foreign = tmp_path / f"nan{suffix}"
    run(nan_neutral, foreign, False, monkeypatch, to=source_format)
    threads, real = [], checks._non_finite
    monkeypatch.setattr(checks, "_non_finite", lambda tensors: threads.append(threading.current_thread()) or real(tensors))
    here = run(foreign, tmp_path / "here.safetensors", False, monkeypatch, to="neutral")
    assert threads and all(t is not threading.main_thread() for t in threads)
    before = run(foreign, tmp_path / "before.safetensors", True, monkeypatch, to="neutral")
    strip = lambda notes, out: [n.replace(str(out), "OUT") for n in notes]  # noqa: E731
    assert strip(here.warnings, tmp_path / "here.safetensors") == strip(before.warnings, tmp_path / "before.safetensors")
    assert sum("hold NaN or Inf values" in n for n in here.warnings) == 1
    with pytest.raises(LoraBridgeError, match=r"2 tensor\(s\) hold NaN or Inf values: .*refused \(--strict\)"):
        run(foreign, tmp_path / "strict.safetensors", False, monkeypatch, to="neutral", strict=True)
    assert not (tmp_path / "strict.safetensors").exists() and not list(tmp_path.glob(".*partial"))


def test_the_first_refusal_stops_the_block_and_later_checks_are_dropped():
    """A reader's and a writer's scan can both refuse the same NaN: the command stops with the first, not the last."""
    def refuse(who):
        def verdict(_):
            raise LoraBridgeError("refused", who)
        return verdict
    with pytest.raises(LoraBridgeError) as raised:
        with deferred.beside_writing():
            deferred.check(lambda: None, refuse("reader"))
            deferred.check(lambda: None, refuse("writer"))
            deferred.settle()
    assert str(raised.value.path) == "reader" and raised.value.__context__ is None


_VALUES = st.sampled_from([0.0, 1.5, -2.0, 3e38, np.nan, np.inf, -np.inf])  # 3e38 twice overflows a float32 sum


@settings(max_examples=150, deadline=None)
@given(layout=st.lists(st.tuples(st.sampled_from(["F32", "F16", "U8"]), st.lists(_VALUES, min_size=1, max_size=12),
                                 st.booleans()), min_size=1, max_size=14))
def test_small_tensors_side_by_side_in_a_file_are_reported_exactly_as_one_by_one(tmp_path_factory, layout):
    """Small tensors lying in a mapped file are checked a stretch of the map at a time (a kohya file's pairs with
    their alphas between): whatever lies between them (unchecked tensors holding NaN, bytes that put the next
    tensor off an element boundary), the findings are those of each tensor checked alone."""
    from lorabridge.formats import checks
    from lorabridge.io.safetensors_file import SafetensorsFile, write_safetensors

    numpy_types = {"F32": np.float32, "F16": np.float16, "U8": np.uint8}
    tensors = {}
    with np.errstate(invalid="ignore", over="ignore"):
        for n, (dtype, values, _) in enumerate(layout):
            tensors[f"t{n:02d}"] = Tensor.from_numpy(np.array(values).astype(numpy_types[dtype]))
    path = tmp_path_factory.mktemp("side") / "layout.safetensors"
    write_safetensors(path, tensors)
    read = SafetensorsFile(path)
    checked = [(name, read.tensor(name)) for n, name in enumerate(tensors) if layout[n][2] and layout[n][0] != "U8"]
    expected = []
    for name, tensor in checked:
        values = tensor.to_numpy()
        if not np.isfinite(values).all():
            expected.append(f"{name} ({int(values.size - np.isfinite(values).sum())} of {values.size})")
    assert checks._non_finite(checked) == expected
    stretches, _ = checks._side_by_side([(n, t) for n, (_, t) in enumerate(checked)])
    assert all(len(members) > 1 for _, members in stretches)


def test_a_kohya_file_s_small_tensors_are_checked_in_a_few_stretches(tmp_path, monkeypatch):
    """The point of stretches: a kohya file's 2 x N small F32 factors, each with its F32 alpha before it, take a few
    calls, not one each (the alphas, 4 bytes between them, are inside the stretch)."""
    from lorabridge.formats import checks
    from lorabridge.io.safetensors_file import SafetensorsFile, write_safetensors

    tensors = {}
    for n in range(40):
        tensors[f"m{n:02d}.alpha"] = Tensor.from_numpy(np.array(4.0, np.float32))
        tensors[f"m{n:02d}.lora_down.weight"] = Tensor.from_numpy(np.ones((4, 8), np.float32))
        tensors[f"m{n:02d}.lora_up.weight"] = Tensor.from_numpy(np.ones((8, 4), np.float32))
    write_safetensors(tmp_path / "k.safetensors", tensors)
    read = SafetensorsFile(tmp_path / "k.safetensors")
    factors = [(name, read.tensor(name)) for name in tensors if not name.endswith("alpha")]
    scanned = []
    real_scan = checks.all_finite
    monkeypatch.setattr(checks, "all_finite", lambda t: scanned.append(t.nbytes) or real_scan(t))
    assert checks._non_finite(factors) == []
    assert scanned == [40 * (2 * 4 * 8 * 4 + 4) - 4]  # one stretch: every factor, and the alphas between them
