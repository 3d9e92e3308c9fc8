"""Checks shared by the PyTorch-world formats: on what a reader read, and before a writer writes.

A LoRA file from the PyTorch world can be for a model lorabridge does not know (SD 1.x, SD3),
name layers the model has not, pair factors of different ranks, or hold NaN/Inf.
:func:`check_model` finds all of that by comparing the modules with each registered
architecture's real module tree and says why in one line, with the first offending modules as
evidence. :func:`writable_lora` is the writer's side: plain-LoRA targets get
LoHa/LoKr baked or refused, DoRA checked, the dtype cast.

Shapes: a file whose modules *all* differ from the reference model, and are all narrower, is that
architecture at other widths (such as the tiny test pipelines) and is accepted, as the MindONE
reader does; a mix of fitting and misfitting shapes means another model. A shape a variant of the
reference has (:attr:`Architecture.variants`: Flux.1 Fill's ``x_embedder``) fits.
"""

from __future__ import annotations

import math
import mmap
import os
import warnings
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

from ..architectures import architectures
from ..architectures.architecture import Architecture
from ..errors import LoraBridgeError, LoraBridgeWarning, listed
from ..io import deferred
from ..io.input_file import offset_in_map
from ..io.streaming import kept_buffer, release_pages
from ..kinds import MISSING, DoraAxis, KindName
from ..model import LoraModel, LoraModule, named_tensors
from ..rules import alpha_problem, module_problems
from ..tensor import DTYPES, Tensor, refuse_math
from .contract import WriteOptions

Tree = Mapping[str, Mapping[str, tuple[int, ...]]]  # component -> module path -> weight shape

CHECKED_DTYPES = ("F64", "F32", "F16", "BF16")  # NaN/Inf checked (numpy cannot read FP8)
# dtype -> (unsigned integer of its width, exponent bits): a value is NaN or Inf when all its exponent bits are set.
EXPONENT_BITS = {"F64": ("<u8", 0x7FF0000000000000), "F32": ("<u4", 0x7F800000), "F16": ("<u2", 0x7C00),
                 "BF16": ("<u2", 0x7F80)}
SUMMED_DTYPES = ("F32", "F64")  # all_finite sums these first (numpy sums them natively, in SIMD)
FINITE_CHUNK = 1 << 18  # elements checked at a time: no full-size temporaries
SMALL_TENSOR_BYTES = 1 << 16  # tensors up to this size are checked for NaN/Inf together, in batches of
SMALL_BATCH_BYTES = 8 << 20  # up to this many bytes, joined in a kept buffer (io.streaming.kept_buffer)
STRETCH_GAP_BYTES = 4096  # small tensors at most this far apart in a kept map are checked as one stretch of it
DTYPE_NAMES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}

# Module-name fragments that point to a model; the first that matches names the likely model. A hint is
# asked about the modules that do not fit an architecture, and one naming that architecture's label is
# no evidence against it: Flux.1's entry speaks against SDXL only, and a narrow (tiny) Flux.1 LoRA with a
# single-block module is not taken for SD3 (whose diffusers names Flux.1's double blocks share).
ARCHITECTURE_HINTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Flux.1", ("single_transformer_blocks", "double_blocks", "single_blocks", "x_embedder", "txt_in")),
    ("SD3", ("joint_blocks", "context_block", "context_embedder", "attn.add_q_proj")),
    ("a DiT such as SD3 or Flux", ("transformer.transformer_blocks",)),
    ("SD 1.x/2.x", ("down_blocks.0.attentions", "up_blocks.3.attentions", "up_blocks.2.attentions")),
)
# Width of the text features cross-attention reads -> the model whose text encoder has it (SDXL: 2048).
CROSS_ATTENTION_WIDTHS = {768: "SD 1.x", 1024: "SD 2.x", 4096: "a T5-conditioned model"}


def warn(message: str) -> None:
    """Tell the user something that does not stop the conversion (commands print it as ``warning:``),
    after the verdicts of checks still running beside the write (:mod:`lorabridge.io.deferred`): warnings keep their order."""
    deferred.settle()
    warnings.warn(message, LoraBridgeWarning, stacklevel=3)


def known_modules() -> Tree:
    """Every registered architecture's module tree merged (component -> path -> shape; the first
    registered wins a path two have), for readers that must place a module before the architecture
    is known."""
    tree: dict[str, dict[str, tuple[int, ...]]] = {}
    for architecture in architectures():
        for component, modules in architecture.tree.all_modules().items():
            merged = tree.setdefault(component, {})
            for path, shape in modules.items():
                merged.setdefault(path, shape)
    return tree


def _role_problems(module: LoraModule) -> list[str]:
    """Missing or foreign roles, disagreeing ranks and shapes of one module: the rules ``validate`` applies."""
    problems = module_problems(module)
    return [f"{module.name} has {', '.join(sorted(module.tensors))} but no {role}" if what == MISSING
            else f"{module.name}: {what}" for role, what in problems]


def _hint(named: Sequence[LoraModule], shaped: Sequence[LoraModule]) -> str | None:
    """Which other model the names of ``named`` or the cross-attention width of ``shaped`` point to, if any.

    Only modules that do not fit an architecture are asked (see :func:`_fit_to`), so names that fit
    a registered architecture never point away from it (Flux.1's ``context_embedder``, ``attn.add_q_proj``).
    Names are compared with dots as underscores too: a kohya name that resolves to no layer
    keeps its underscores (``unet.down_blocks_0_attentions_0_...``).
    """
    names = [m.name.replace(".", "_") for m in named]
    for label, fragments in ARCHITECTURE_HINTS:
        if any(fragment.replace(".", "_") in name for name in names for fragment in fragments):
            return label
    for m in shaped:
        if m.name.endswith(("attn2.to_k", "attn2.to_v")) and m.in_features in CROSS_ATTENTION_WIDTHS:
            return CROSS_ATTENTION_WIDTHS[m.in_features]
    return None


def narrower(shape: Sequence[int], base: Sequence[int]) -> bool:
    """True when a weight of ``shape`` is SDXL-base's ``base`` at smaller or equal widths, same kernel.

    Only such files are taken as the SDXL layout at other widths (test pipelines): a LoRA *wider* than
    SDXL somewhere, such as SD 1.x's ``up_blocks.1`` at 1280 channels where SDXL has 640, is another model.
    """
    return len(shape) == len(base) and all(d <= b for d, b in zip(shape[:2], base[:2])) and tuple(shape[2:]) == tuple(base[2:])


@dataclass
class _Fit:
    """How a LoRA's modules fit one architecture's tree."""

    architecture: Architecture
    foreign: list[str]
    unknown: list[str]
    misshapen: list[str]
    fitting: int
    hint: str | None  # the other model the modules that do not fit point to

    def refusal(self, model: LoraModel) -> str:
        """Why the LoRA is not for this architecture (with evidence), or "" when it is."""
        label, reference = self.architecture.label, self.architecture.reference or self.architecture.label
        hint = self.hint
        if not (self.foreign or self.misshapen or hint or len(self.unknown) == len(model.modules)):
            return ""
        evidence = self.foreign + self.misshapen + [f"{n} (no such {label} layer)" for n in self.unknown]
        likely = f"; looks like {hint}" if hint else ""
        return (f"not {self.architecture.a_label} LoRA: {len(evidence)} of {len(model.modules)} modules do not fit "
                f"{reference}: {listed(evidence)}{likely}")


def _fit_to(model: LoraModel, architecture: Architecture) -> _Fit:
    """Compare every module with ``architecture``'s tree: foreign components, unknown paths, other shapes
    (a shape one of the architecture's variants has fits)."""
    label, tree = architecture.label, architecture.tree.all_modules()
    foreign, unknown, misshapen, fitting, misnamed, other_shapes = [], [], [], 0, [], []
    for m in model.modules.values():
        if m.component not in tree:
            foreign.append(f"{m.name} (component {m.component!r}; {label} has {', '.join(tree)})")
            misnamed.append(m)
        elif m.path not in tree[m.component]:
            unknown.append(m.name)
            misnamed.append(m)
        elif tuple(m.weight_shape) != tuple(tree[m.component][m.path]) and \
                tuple(m.weight_shape) not in architecture.variant_shapes(m.component, m.path):
            base = tree[m.component][m.path]
            misshapen.append((f"{m.name} adapts a {list(m.weight_shape)} weight, {label}'s is {list(base)}",
                              narrower(m.weight_shape, base)))
            other_shapes.append(m)
        else:
            fitting += 1
    # All different and all narrower: the architecture's structure at smaller widths. Otherwise every misfit is evidence.
    evidence = [why for why, narrow in misshapen if fitting or not narrow]
    # Names are asked of the modules the architecture has not, and of all when none fits exactly: the
    # narrow rule must not take another model's LoRA (SD3's at its 1536 width) for this one at smaller widths.
    hint = _hint(misnamed if fitting else misnamed + other_shapes, other_shapes)
    return _Fit(architecture, foreign, unknown, evidence, fitting, None if hint == label else hint)


def _fit(model: LoraModel, path, skip_unknown: bool) -> None:
    """Decide the architecture from module names and shapes, or raise "not an SDXL LoRA" with evidence;
    list unknown modules, or drop them with ``skip_unknown``.

    Registered architectures are tried in order; the first the LoRA fits is recorded in
    ``model.architecture``. When none fits, the refusal is the one for the architecture with the
    most fitting modules (the first registered on a tie).
    """
    fits: list[_Fit] = []
    for architecture in architectures():  # stop at the first fit: later records' trees are not even loaded
        fits.append(_fit_to(model, architecture))
        if not fits[-1].refusal(model):
            break
    else:
        best = max(fits, key=lambda f: f.fitting)  # max keeps the first of equals
        raise LoraBridgeError(best.refusal(model), path)
    fit = fits[-1]
    model.architecture = fit.architecture.name
    unknown, label = fit.unknown, fit.architecture.label
    if unknown and not skip_unknown:
        raise LoraBridgeError(f"{len(unknown)} module(s) match no {label} layer: {listed(unknown)} "
                              "(--skip-unknown drops them with a warning)", path)
    if unknown:
        warn(f"{path}: dropped {len(unknown)} module(s) that match no {label} layer: {listed(unknown)}")
        for name in unknown:
            del model.modules[name]


def all_finite(tensor: Tensor) -> bool:
    """True when no value is NaN or Inf: the exponent bits, looked at in chunks through one small buffer.

    Several times faster than ``np.isfinite`` on F16/BF16 (which numpy widens), and allocates
    nothing the size of the tensor. F32 and F64 are summed first, one fast pass without temporaries:
    a finite sum means finite values (a NaN or Inf makes the sum NaN or Inf); a sum that overflowed
    proves nothing, and the exponent bits decide.
    """
    import numpy as np
    if tensor.dtype in SUMMED_DTYPES:
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow or NaN here is a finding, not a warning
            if math.isfinite(np.add.reduce(tensor.to_numpy().reshape(-1))):
                return True
    bits_type, exponent = EXPONENT_BITS[tensor.dtype]
    bits = np.frombuffer(tensor.data, dtype=bits_type)
    buffer = np.empty(min(FINITE_CHUNK, bits.size), dtype=bits_type)
    for start in range(0, bits.size, FINITE_CHUNK):
        chunk = buffer[:min(FINITE_CHUNK, bits.size - start)]
        np.bitwise_and(bits[start:start + FINITE_CHUNK], exponent, out=chunk)
        if chunk.max() == exponent:
            return False
    return True


def check_finite(model: LoraModel, path, *, strict: bool = False) -> None:
    """Refuse NaN/Inf alphas; warn about NaN/Inf tensor values (a diverged training run), or refuse them with ``strict``.

    A non-finite alpha is refused whatever ``strict`` says: it turns all of a module's delta W to NaN/Inf,
    and the neutral manifest (JSON) cannot hold it.
    """
    unusable = [f"{m.name} ({why})" for m in model.modules.values() if (why := alpha_problem(m.alpha))]
    if unusable:
        raise LoraBridgeError(f"{len(unusable)} module(s) have an alpha that is not a finite number: {listed(unusable)}", path)
    tensors = [(f"{m.name}.{role}", t) for m in model.modules.values() for role, t in m.tensors.items()]

    def verdict(bad: list[str]) -> None:
        if not bad:
            return
        message = f"{len(bad)} tensor(s) hold NaN or Inf values: {listed(bad)}"
        if strict:
            raise LoraBridgeError(f"{message}; refused (--strict)", path)
        warn(f"{path}: {message}; images will turn to NaN where they apply")

    deferred.check(lambda: _non_finite(tensors), verdict)  # in a thread beside the write where the command allows


def _non_finite(tensors: list[tuple[str, Tensor]]) -> list[str]:
    """``name (count of numel)`` for each of ``tensors`` holding NaN or Inf values.

    Small tensors lying side by side in a kept map are checked a stretch of the map at a time, where they lie
    (:func:`_side_by_side`); other small F32/F64 ones are summed one by one (:func:`_summed_one_by_one`), and the
    rest checked a batch at a time (:func:`_small_batches`): a LoRA's thousand tensors of a few KiB each would
    otherwise cost :func:`all_finite`'s per-call overhead a thousand times, several times the work itself. Only
    a stretch or batch that holds a NaN/Inf is looked at tensor by tensor.
    """
    import numpy as np
    checked = [i for i, (_, t) in enumerate(tensors) if t.dtype in CHECKED_DTYPES and t.numel]
    suspects = []
    for i in checked:  # each large tensor alone, its mapped pages let go as it is done (RSS stays small)
        tensor = tensors[i][1]
        if tensor.nbytes > SMALL_TENSOR_BYTES:
            if not all_finite(tensor):
                suspects.append(i)
            release_pages(tensor.data)
    small = [(i, tensors[i][1]) for i in checked if tensors[i][1].nbytes <= SMALL_TENSOR_BYTES]
    stretches, small = _side_by_side(small)
    for stretch, members in stretches:
        if not all_finite(stretch):
            suspects += [i for i, t in members if not all_finite(t)]
    suspects += _summed_one_by_one([item for item in small if item[1].dtype in SUMMED_DTYPES])
    small = [item for item in small if item[1].dtype not in SUMMED_DTYPES]
    with kept_buffer(SMALL_BATCH_BYTES) as buffer:  # kept between scans: a fresh 8 MiB costs ~2,000 page faults
        for batch in _small_batches(small):
            joined = _joined([t for _, t in batch], buffer)
            for _, t in batch:
                release_pages(t.data)
            if not all_finite(joined):
                suspects += [i for i, t in batch if not all_finite(t)]
    bad = []
    for i in sorted(suspects):
        name, t = tensors[i]
        values = t.to_numpy()
        count = int(values.size - np.count_nonzero(np.isfinite(values)))
        bad.append(f"{name} ({count} of {values.size})")
    return bad


def _summed_one_by_one(tensors: list[tuple[int, Tensor]]) -> list[int]:
    """The indices of ``tensors`` (small F32/F64) that may hold NaN or Inf: those whose sum is not finite
    (:func:`all_finite`'s first test), each summed where it lies. Why not joined into batches, as the
    other dtypes are: one lean numpy call per tensor (~3 us) costs less than copying the bytes together
    (a rank-4 SDXL .ckpt's 1,120 F32 tensors: 7-9 ms against 12-16 ms)."""
    import numpy as np
    suspects = []
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow or NaN here is a finding, not a warning
        for i, tensor in tensors:
            if not math.isfinite(np.add.reduce(np.frombuffer(tensor.data, DTYPES[tensor.dtype][1]))):
                suspects.append((i, tensor))
            release_pages(tensor.data)
    return [i for i, tensor in suspects if not all_finite(tensor)]  # a sum that overflowed proves nothing


def _side_by_side(tensors: list[tuple[int, Tensor]]) -> tuple[list[tuple[Tensor, list[tuple[int, Tensor]]]], list[tuple[int, Tensor]]]:
    """(stretches, the rest): ``tensors`` of one dtype lying in one kept map (:func:`~lorabridge.io.input_file.offset_in_map`)
    at most :data:`STRETCH_GAP_BYTES` apart, each stretch as one flat tensor over the map from its first member's
    start to its last one's end, with its members; at most :data:`SMALL_BATCH_BYTES` a stretch.

    Why it is sound: every member starts a whole number of elements from the stretch's start, so each of its values
    is one of the stretch's, and a finite stretch means finite members. The bytes between members (a kohya file's
    alphas, a MindSpore record's head) are read as values too: if they look like NaN/Inf, the members are checked
    one by one, as they were before. Why: a rank-4 SDXL LoRA's 1,120 F32 tensors summed one call each took
    9-10 ms; its whole data region, summed in one call, 3 ms.
    """
    placed, rest = [], []
    for item in tensors:
        where = offset_in_map(item[1])
        if where is None:
            rest.append(item)
        else:
            placed.append((id(where[0]), item[1].dtype, where[1], where[0], item))
    placed.sort(key=lambda entry: entry[:3])
    groups: list[_Stretch] = []
    for _, dtype, offset, mapped, item in placed:
        end, last = offset + item[1].nbytes, groups[-1] if groups else None
        if last is not None and last.takes(mapped, dtype, offset, end):
            last.end = end
            last.members.append(item)
        else:
            groups.append(_Stretch(mapped, dtype, offset, end, [item]))
    stretches = []
    for group in groups:
        if len(group.members) == 1:
            rest.append(group.members[0])
        else:
            view = memoryview(group.mapped)[group.start:group.end]
            stretches.append((Tensor(group.dtype, (len(view) // DTYPES[group.dtype][0],), view), group.members))
    return stretches, rest


@dataclass
class _Stretch:
    """Small tensors of one dtype side by side in one map (:func:`_side_by_side`), from ``start`` to ``end`` in it."""

    mapped: mmap.mmap
    dtype: str
    start: int
    end: int
    members: list[tuple[int, Tensor]]

    def takes(self, mapped: mmap.mmap, dtype: str, offset: int, end: int) -> bool:
        """Whether a tensor of ``dtype`` at ``offset``..``end`` of ``mapped`` extends this stretch: the same map and dtype,
        at most :data:`STRETCH_GAP_BYTES` after its end, a whole number of elements from its start (every value read
        is one of the tensor's), the stretch at most :data:`SMALL_BATCH_BYTES`."""
        return (mapped is self.mapped and dtype == self.dtype and self.end <= offset <= self.end + STRETCH_GAP_BYTES
                and (offset - self.start) % DTYPES[dtype][0] == 0 and end - self.start <= SMALL_BATCH_BYTES)


def _small_batches(tensors: list[tuple[int, Tensor]]) -> Iterator[list[tuple[int, Tensor]]]:
    """``tensors`` in batches of one dtype, each at most :data:`SMALL_BATCH_BYTES` (bounded memory)."""
    batches: dict[str, list[tuple[int, Tensor]]] = {}  # dtype -> the batch being filled
    sizes: dict[str, int] = {}  # dtype -> its bytes
    for item in tensors:
        dtype, nbytes = item[1].dtype, item[1].nbytes
        if dtype in batches and sizes[dtype] + nbytes > SMALL_BATCH_BYTES:
            yield batches.pop(dtype)
        if dtype not in batches:
            batches[dtype], sizes[dtype] = [], 0
        batches[dtype].append(item)
        sizes[dtype] += nbytes
    yield from batches.values()


def _joined(tensors: list[Tensor], buffer: bytearray) -> Tensor:
    """One flat tensor of ``tensors``' values (all of one dtype, at most ``len(buffer)`` bytes), back to back
    in ``buffer``: valid until the buffer is filled again."""
    end = 0
    for tensor in tensors:
        start, end = end, end + tensor.nbytes
        buffer[start:end] = memoryview(tensor.data).cast("B")
    return Tensor(tensors[0].dtype, (end // DTYPES[tensors[0].dtype][0],), memoryview(buffer)[:end])


def warn_zero_alphas(model: LoraModel, path) -> None:
    """Name the modules whose alpha is 0: they add nothing here, and tools disagree about them.

    The neutral spec, PEFT, diffusers and ComfyUI scale by alpha / rank = 0; kohya sd-scripts'
    ``LoRAModule`` reads alpha 0 as alpha = rank. The value is kept (round trips stay exact).
    A LoKr with both factors whole has scale 1 whatever its alpha, so it is not named.
    """
    zero = [m.name for m in model.modules.values() if m.alpha == 0 and m.rank]
    if zero:
        warn(f"{path}: {len(zero)} module(s) have alpha 0, so they change nothing (scale alpha/rank = 0; kohya "
             f"sd-scripts alone would read alpha 0 as alpha = rank): {listed(zero)}")


def warn_user_alpha(model: LoraModel, user_alpha: float | None, path) -> None:
    """Say that ``--alpha`` reached only the modules whose file stores no alpha of their own.

    Example:
        >>> warn_user_alpha(model, 8.0, "lora.safetensors")   # doctest: +SKIP
    """
    stored = sum(m.alpha_source == "stored" for m in model.modules.values())
    if user_alpha is not None and stored:
        warn(f"{path}: the file stores alpha for {stored} module(s); --alpha {user_alpha:g} applies only to the others")


def check_model(model: LoraModel, path: str | os.PathLike, *, unrecognized: Sequence[str] = (),
                skip_unknown: bool = False, strict: bool = False) -> LoraModel:
    """Check a model a reader built from ``path`` and return it (unknown modules dropped with ``skip_unknown``).

    ``unrecognized`` lists tensor keys the reader could not place in any module. Refused, with
    :class:`LoraBridgeError`: no LoRA tensors; another architecture ("not an SDXL LoRA" and the
    evidence); modules or keys matching nothing (unless ``skip_unknown``: dropped with a warning);
    missing factors, shapes that break the kind's rules (:mod:`lorabridge.rules`, what ``validate``
    applies); a NaN/Inf alpha; NaN/Inf tensor values with ``strict`` (else a warning). Zero alphas are warned about.

    Example:
        >>> model = check_model(model, "lora.safetensors", skip_unknown=True)   # doctest: +SKIP
    """
    if not model.modules:
        shown = f": {listed(list(unrecognized))}" if unrecognized else ""
        raise LoraBridgeError(f"no LoRA tensors found ({len(unrecognized)} other tensor(s){shown})", path)
    problems = [p for m in model.modules.values() for p in _role_problems(m)]
    if problems:
        raise LoraBridgeError(f"{len(problems)} broken LoRA module(s): {listed(problems)}", path)
    _fit(model, path, skip_unknown)
    if unrecognized and not skip_unknown:
        raise LoraBridgeError(f"{len(unrecognized)} tensor key(s) are not LoRA weights of this format: "
                              f"{listed(list(unrecognized))} (--skip-unknown drops them with a warning)", path)
    if unrecognized:
        warn(f"{path}: dropped {len(unrecognized)} tensor key(s) that are not LoRA weights: {listed(list(unrecognized))}")
    check_finite(model, path, strict=strict)
    warn_zero_alphas(model, path)
    return model


# Where a DoRA magnitude on each axis can go, for refusals.
DORA_FORMATS = {"out": "--format diffusers, peft, kohya or lycoris", "in": "--format kohya or lycoris"}


def dora_refusal(model: LoraModel, target: str, axes: tuple[DoraAxis, ...]) -> str | None:
    """Why ``target``, storing DoRA magnitudes on ``axes`` only, cannot hold the model's, or None.

    No axis is converted into the other: per output row, ``m_i / ||(W + dW)_i||`` scales row i; per
    input column, ``m_j / ||(W + dW)_:j||`` scales column j. One equals the other only when every
    row's (or column's) factor is the same number k, i.e. DoRA rescales the whole weight by k;
    and even to find that out takes the base weights W, which a LoRA file does not hold.
    """
    for axis in ("in", "out"):
        modules = [m.name for m in model.modules.values() if m.dora_axis == axis and axis not in axes]
        if not modules:
            continue
        holds = "stores DoRA magnitudes per output row only" if axes else "stores no DoRA magnitudes"
        where = "output row (dora_axis out)" if axis == "out" else "input column (dora_axis in: OneTrainer, LyCORIS wd_on_output=False)"
        return (f"the {target} format {holds}; {len(modules)} module(s) have them per {where}: {listed(modules)}. "
                "Moving a magnitude to the other axis needs the base weights and is exact only when DoRA rescales "
                f"the whole weight by one factor, so lorabridge does not; write {DORA_FORMATS[axis]}, which keep this axis")
    return None


def writable_lora(model: LoraModel, path: str | os.PathLike, options: WriteOptions, *, target: str,
                  kinds: tuple[KindName, ...], dora_axes: tuple[DoraAxis, ...]) -> LoraModel:
    """The model as a plain-LoRA writer needs it: LoHa/LoKr baked (or refused), DoRA checked, dtype cast.

    ``target`` names the format in messages; ``kinds`` are the module kinds it holds (other kinds
    are baked with ``options.bake_to_lora``, or refused); ``dora_axes`` are the DoRA magnitude axes it stores
    (PEFT's ``lora_magnitude_vector`` holds ``"out"`` only, kohya's ``dora_scale`` both, MindONE none):
    both as the format declares them (:class:`~lorabridge.formats.contract.Format`). A module on another
    axis is refused (see :func:`dora_refusal`). ``options.dtype``: ``fp32``/``fp16``/``bf16``, None keeps.
    NaN/Inf are checked here too (``options.strict``), for inputs (neutral files) no foreign reader checked.

    Example:
        >>> model = writable_lora(model, "out.safetensors", WriteOptions(dtype="fp16"), target="diffusers",
        ...                       kinds=("lora",), dora_axes=("out",))   # doctest: +SKIP
    """
    from ..bake import lora_only

    model, notes = lora_only(model, target, options.bake_to_lora, path, kinds)
    for note in notes:
        warn(f"{path}: {note}")
    refusal = dora_refusal(model, target, dora_axes)
    if refusal:
        raise LoraBridgeError(refusal, path)
    check_finite(model, path, strict=options.strict)
    return cast_model(model, options.dtype, path, strict=options.strict)


def _overflow(source: Tensor, cast: Tensor) -> int:
    """How many finite values of ``source`` became Inf in ``cast`` (0 when the cast changed nothing)."""
    import numpy as np
    if cast is source or source.dtype not in CHECKED_DTYPES or all_finite(cast) or not all_finite(source):
        return 0  # a source with NaN/Inf of its own was reported by check_finite
    return int(cast.numel - np.count_nonzero(np.isfinite(cast.to_numpy())))


def cast_model(model: LoraModel, dtype: str | None, path, *, strict: bool = False) -> LoraModel:
    """``model`` with every tensor in ``dtype`` (``fp32``/``fp16``/``bf16``; None keeps the model as is).

    Values beyond the target's range (fp16: 65504) become Inf: one warning names the tensors and
    counts (instead of numpy's anonymous "overflow encountered in cast"), or ``strict`` refuses them.

    Example:
        >>> half = cast_model(model, "fp16", "out.safetensors")   # doctest: +SKIP
    """
    if dtype is None:
        return model
    if dtype not in DTYPE_NAMES:
        raise LoraBridgeError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_NAMES)}")
    wanted = DTYPE_NAMES[dtype]
    refuse_math(named_tensors(model.modules.values()), f"--dtype {dtype}", path)  # Tensor.cast computes in numpy
    cast = LoraModel(architecture=model.architecture, provenance=model.provenance, training=model.training, extra=model.extra)
    overflowed = []
    for m in model.modules.values():
        tensors = {role: t.cast(wanted) for role, t in m.tensors.items()}
        overflowed += [f"{m.name}.{role} ({count} of {t.numel})" for role, t in tensors.items()
                       if (count := _overflow(m.tensors[role], t))]
        cast.add(LoraModule(m.name, m.kind, tensors, m.alpha, m.alpha_source, m.dora_axis, m.extra))
    if overflowed:
        message = f"{len(overflowed)} tensor(s) hold values beyond the {dtype} range, which become Inf: {listed(overflowed)}"
        if strict:
            raise LoraBridgeError(f"{message}; refused (--strict)", path)
        warn(f"{path}: {message}; images will turn to NaN where they apply (fp32 or bf16 keeps them)")
    return cast
