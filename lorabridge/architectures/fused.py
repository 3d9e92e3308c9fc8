"""Fused layers: one matrix in the original checkpoint, several modules in diffusers, as data plus one
exact split and merge.

OpenCLIP bigG computes q, k and v with one ``in_proj`` (rows ordered q, k, v); Flux fuses ``qkv`` and
``linear1`` the same way. An architecture lists its fused layers as :class:`FusedLayer` data; a LoRA on
the fused matrix is split into one LoRA per part and the parts merged back with delta W kept exactly
(:func:`split_fused`, :func:`merge_fused`): split then merge, and merge then split, give back the
original bytes. LoHa, LoKr and full modules split by rows too, each kind's way
(:meth:`~lorabridge.kinds.base.Kind.split_rows`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import LoraBridgeError
from ..io.streaming import release_pages
from ..kinds import KINDS, AlphaSource
from ..model import LoraModule, named_tensors
from ..tensor import DTYPES, Tensor, refuse_math, row_blocks, zeros

if TYPE_CHECKING:
    import numpy as np

BLOCK = "{n}"  # where a fused layer's name holds its block number


@dataclass(frozen=True)
class FusedLayer:
    """One fused layer per block: its name in the original checkpoint and the diffusers paths of its parts.

    Both are paths inside ``component`` (the original name without the checkpoint's prefix for the
    component, as :meth:`Architecture.original_path` spells paths: Flux.1's ``double_blocks.{n}.img_attn.qkv``),
    spell the block number as ``{n}``, and ``parts`` are in row order.

    Example:
        >>> layer = FusedLayer("text_encoder_2", "te.layers.{n}.in_proj", ("layers.{n}.q", "layers.{n}.k"))
        >>> layer.parts_of("te.layers.3.in_proj"), layer.fused_of("layers.3.k")
        (('layers.3.q', 'layers.3.k'), ('te.layers.3.in_proj', 1))
    """

    component: str
    original: str
    parts: tuple[str, ...]

    def parts_of(self, name: str) -> tuple[str, ...] | None:
        """The part paths of a fused ``name`` (original spelling), or None if it is not this layer."""
        block = _block(self.original, name)
        return None if block is None else tuple(p.replace(BLOCK, block) for p in self.parts)

    def fused_of(self, path: str) -> tuple[str, int] | None:
        """(fused original name, row block) of a part ``path``, or None if it is no part of this layer."""
        for index, part in enumerate(self.parts):
            block = _block(part, path)
            if block is not None:
                return self.original.replace(BLOCK, block), index
        return None


def _block(template: str, name: str) -> str | None:
    """The block number ``name`` puts where ``template`` has ``{n}``, or None if it does not match."""
    head, _, tail = template.partition(BLOCK)
    if not (name.startswith(head) and name.endswith(tail)) or len(name) <= len(head) + len(tail):
        return None
    block = name[len(head):len(name) - len(tail)]
    return block if block.isdigit() else None


def part_rows(total: int, sizes: Sequence[int]) -> list[int] | None:
    """The rows of each part when ``total`` rows split in the ratio of ``sizes`` (the parts' output sizes
    in the full-size model), or None when they do not divide exactly.

    Example:
        >>> part_rows(30, (10, 10, 10)), part_rows(42, (3072, 3072, 3072, 12288)), part_rows(10, (1, 2))
        ([10, 10, 10], [6, 6, 6, 24], None)
    """
    whole = sum(sizes)
    rows = [total * size // whole for size in sizes]
    return rows if all(r * whole == total * size for r, size in zip(rows, sizes)) else None


def _stack_rows(tensors: list[Tensor]) -> Tensor:
    """Concatenate same-dtype tensors along rows by joining their bytes (bit-exact)."""
    rows = sum(t.shape[0] for t in tensors)
    return Tensor(tensors[0].dtype, (rows, *tensors[0].shape[1:]), b"".join([t.data for t in tensors]))


def _raw(t: Tensor) -> np.ndarray:
    """The tensor's elements as unsigned integers of its width: bit patterns, for exact slicing and zero tests."""
    import numpy as np
    return np.frombuffer(t.data, dtype=f"<u{DTYPES[t.dtype][0]}").reshape(t.shape)


def _used_columns(b: Tensor) -> np.ndarray:
    """Indices of the rank columns of a lora_B block that hold a non-zero value (+0 and -0 are zero)."""
    import numpy as np
    bits = _raw(b)
    sign = np.array(1 << (bits.dtype.itemsize * 8 - 1), bits.dtype)
    return np.flatnonzero(((bits & ~sign) != 0).any(axis=0))


def part_ranks(b_parts: list[Tensor]) -> list[tuple[int, int]] | None:
    """The rank columns [start, end) of q, k and v when a fused LoRA is block-diagonal, else None.

    :func:`merge_fused` gives parts (q, k, v) that have their own A consecutive column blocks of B
    (q's rows are zero outside the first block, and so on). The blocks are found again from the
    non-zero columns of each part's rows: the rule, exactly, is that every part must use at least
    one column, and all columns a part uses must come before all that the next part uses. Then
    each part after the first starts at its first used column, and the first part's block is
    everything before the second's: an all-zero column between two blocks goes to the earlier part.
    Anything else (a part whose rows are all zero, as in a zero-initialised LoRA; parts sharing
    columns, as a LoRA trained on the fused projection does) is not block-diagonal: None.

    Example:
        >>> b = Tensor.from_numpy(np.kron(np.eye(3, dtype="f4"), np.ones((2, 2), "f4")))  # 6 x 6, blocks of 2
        >>> part_ranks(row_blocks(b, [2, 2, 2]))
        [(0, 2), (2, 4), (4, 6)]
    """
    used = []
    for b in b_parts:
        used.append(_used_columns(b))
        release_pages(b.data)  # read all through: a file's 32 fused text-encoder B's would stay mapped (78 MiB)
    if any(u.size == 0 for u in used) or any(used[i][-1] >= used[i + 1][0] for i in range(len(used) - 1)):
        return None
    starts = [0] + [int(u[0]) for u in used[1:]]
    return list(zip(starts, starts[1:] + [b_parts[0].shape[1]]))


def _rank_slice(a: Tensor, b: Tensor, start: int, end: int) -> tuple[Tensor, Tensor]:
    """Rows [start, end) of A and the same columns of B, as their exact bytes."""
    import numpy as np
    step = len(a.data) // a.shape[0]
    a_part = Tensor(a.dtype, (end - start, *a.shape[1:]), memoryview(a.data)[start * step:end * step])
    b_part = Tensor(b.dtype, (b.shape[0], end - start), np.ascontiguousarray(_raw(b)[:, start:end]).tobytes())
    return a_part, b_part


def split_fused(module: LoraModule, names: tuple[str, ...], sizes: Sequence[int] | None = None) -> list[LoraModule]:
    """Split a module on a fused projection into one module per part (``names``, in row order), same delta W.

    ``sizes`` are the parts' output sizes in the full-size model (Flux's ``linear1``: q, k, v and the
    MLP, 3072/3072/3072/12288); delta W's rows split in their ratio, so a narrower test model splits
    alike. Without them the parts are equal (q, k and v of a fused ``in_proj``).

    Each part is a module of the same kind, rank and alpha whose factors are the fused one's, the
    factor that carries the rows cut to the part's rows (:meth:`~lorabridge.kinds.base.Kind.split_rows`:
    B of a LoRA, ``hada_w1_a``/``hada_w2_a`` of a LoHa, w1 of a LoKr, ``diff`` of a full delta), so
    delta W of each part is bit for bit the matching row block of the fused delta W. When a LoRA is
    block-diagonal (:func:`part_ranks`: what :func:`merge_fused` makes of parts with their own A),
    each part keeps only its own rank columns of B and rows of A, with alpha scaled so alpha / rank
    stays the fused one: q, k and v merged then split come back with their own ranks and bytes.
    A LoKr whose Kronecker factor w2 has a row count that does not divide every part's rows has no
    part that is a LoKr: each part is then kind ``full``, its rows of the float32 delta W rounded once
    to the module's dtype (a much larger file: readers warn, naming such layers). A DoRA magnitude per
    output row is split by rows the same way (a ``full`` part cannot hold one: refused).

    Example (``fused`` named after the SGM ``attn.in_proj``)::

        layer = "text_encoder_2.text_model.encoder.layers.0.self_attn."
        q, k, v = split_fused(fused, (layer + "q_proj", layer + "k_proj", layer + "v_proj"))
    """
    count, shape = len(names), module.weight_shape
    if len(shape) != 2:
        raise LoraBridgeError(f"{module.name}: fused {_parts(names, '')} is a Linear layer, this {module.kind} "
                              f"adapts a {list(shape)} weight")
    rows = part_rows(shape[0], sizes or [1] * count)
    if rows is None:
        ratio = f"in the ratio {':'.join(map(str, sizes))}" if sizes else f"by {count}"
        held = (f"lora_B has shape {list(module.tensors['lora_B.weight'].shape)}" if module.kind == "lora"
                else f"{module.kind} delta W has shape {list(shape)}")
        raise LoraBridgeError(f"{module.name}: fused {_parts(names, '')} {held}, rows not divisible {ratio}")
    dora = module.tensors.get("dora_scale")
    if dora is not None and module.dora_axis != "out":
        raise LoraBridgeError(f"{module.name}: a DoRA magnitude per input column cannot be split into {_parts(names)}")
    factors = {role: t for role, t in module.tensors.items() if role != "dora_scale"}
    split = KINDS[module.kind].split_rows(factors, rows)
    if split is None:
        return _dense_parts(module, names, rows)
    dora_parts: list[Tensor | None] = list(row_blocks(dora, rows)) if dora is not None else [None] * count
    blocks = part_ranks([p["lora_B.weight"] for p in split]) if module.kind == "lora" else None
    out = []
    for i, (name, tensors, dora_part) in enumerate(zip(names, split, dora_parts)):
        alpha = module.alpha
        if blocks:
            start, end = blocks[i]
            a_part, b_part = _rank_slice(tensors["lora_A.weight"], tensors["lora_B.weight"], start, end)
            tensors = {"lora_A.weight": a_part, "lora_B.weight": b_part}
            alpha = module.alpha * (end - start) / module.rank
        if dora_part is not None:
            tensors["dora_scale"] = dora_part
        out.append(LoraModule(name, module.kind, tensors, alpha, module.alpha_source, module.dora_axis, dict(module.extra)))
    return out


def _dense_parts(module: LoraModule, names: tuple[str, ...], rows: list[int]) -> list[LoraModule]:
    """One kind ``full`` module per part: its rows of the float32 delta W, rounded once to the module's dtype."""
    if "dora_scale" in module.tensors:
        raise LoraBridgeError(f"{module.name}: this {module.kind} with a DoRA magnitude does not split into "
                              f"{_parts(names)} (its factors do not divide at their rows, and a full delta holds no DoRA)")
    refuse_math(named_tensors([module]), f"splitting it into {_parts(names)} full deltas")
    delta, start, out = module.delta_weight(), 0, []
    extra = {key: value for key, value in module.extra.items() if key != "alpha_dtype"}  # a full delta stores no alpha
    for name, count in zip(names, rows):
        diff = Tensor.from_numpy(delta[start:start + count], module.dtype)
        out.append(LoraModule(name, "full", {"diff": diff}, 0.0, "assumed", extra=dict(extra)))
        start += count
    return out


def _common_dtype(tensors: list[Tensor]) -> str:
    """The shared dtype, or F32 (which holds F16 and BF16 values exactly) when they differ."""
    dtypes = {t.dtype for t in tensors}
    return dtypes.pop() if len(dtypes) == 1 else "F32"


_ALPHA_SOURCE_PRIORITY: tuple[AlphaSource, ...] = ("assumed", "user", "stored")  # a merge is only as certain as its least certain part


def merge_fused(parts: tuple[LoraModule, ...], fused_name: str) -> LoraModule:
    """Merge the LoRAs of a fused layer's parts (in row order) into one LoRA on the fused projection, keeping delta W.

    When they share a bit-identical A and the same alpha (what :func:`split_fused`
    produces), the result is that A with the B stacked: split then merge gives back
    the original bytes. Otherwise A is the A stacked (rank r_q + r_k + r_v for
    q, k, v), B is block-diagonal, and alpha is scaled so alpha / rank stays the
    first part's scale; a part with another scale has its B multiplied by the ratio
    (float math, rounded to B's dtype). FP8 factors merge the first way only: numpy,
    which the second computes in, has no FP8 type (refused, naming them).

    Example::

        fused = merge_fused((q, k, v), "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj")
    """
    q = parts[0]
    names = tuple(m.name.rsplit(".", 1)[-1] for m in parts)
    for m in parts:
        if m.kind != "lora" or len(m.tensors["lora_A.weight"].shape) != 2:
            raise LoraBridgeError(f"{m.name}: only linear LoRA modules can be merged into a fused projection")
    if len({m.in_features for m in parts}) != 1:
        raise LoraBridgeError(f"{fused_name}: {_parts(names, '')} LoRAs have different input sizes {[m.in_features for m in parts]}")
    doras = [m.tensors.get("dora_scale") for m in parts]
    if any(d is not None for d in doras) and not all(d is not None and m.dora_axis == "out" for d, m in zip(doras, parts)):
        raise LoraBridgeError(f"{fused_name}: {_parts(names, '')} must all carry a per-output-row DoRA magnitude, or none")
    alpha_source = next(s for s in _ALPHA_SOURCE_PRIORITY if any(m.alpha_source == s for m in parts))
    extra = dict(q.extra) if all(m.extra == q.extra for m in parts) else {}
    a_list = [m.tensors["lora_A.weight"] for m in parts]
    b_list = [m.tensors["lora_B.weight"] for m in parts]
    shared = all(a.same_as(a_list[0]) for a in a_list) and len({m.alpha for m in parts}) == 1
    if shared and len({b.dtype for b in b_list}) == 1:
        tensors = {"lora_A.weight": a_list[0], "lora_B.weight": _stack_rows(b_list)}
        alpha = q.alpha
    else:
        refuse_math(named_tensors(parts, ("lora_A.weight", "lora_B.weight")),
                    f"stacking {_parts(names, '')} into one LoRA on {fused_name} (their A, alpha or B dtype differ)")
        import numpy as np  # only here: split then merged (the common case) joins bytes, no numpy on the way to the first write
        a_dtype, b_dtype = _common_dtype(a_list), _common_dtype(b_list)
        total = sum(m.rank for m in parts)
        a_cat = np.concatenate([a.to_float32() for a in a_list], axis=0)
        b_diag = np.zeros((sum(m.out_features for m in parts), total), np.float32)
        row = col = 0
        for m, b in zip(parts, b_list):
            block = b.to_float32()
            if m.scale != q.scale:
                block = block * np.float32(m.scale / q.scale)
            b_diag[row:row + block.shape[0], col:col + block.shape[1]] = block
            row, col = row + block.shape[0], col + block.shape[1]
        tensors = {"lora_A.weight": Tensor.from_numpy(a_cat, a_dtype), "lora_B.weight": Tensor.from_numpy(b_diag, b_dtype)}
        alpha = q.scale * total
    present = [d for d in doras if d is not None]  # all of them or none (checked above)
    if present:
        dtype = present[0].dtype
        mixed = len({d.dtype for d in present}) > 1
        refuse_math(named_tensors(parts, ("dora_scale",)) if mixed else {},
                    f"casting the DoRA magnitudes of {_parts(names, '')} to one dtype for {fused_name}")
        tensors["dora_scale"] = _stack_rows([d if d.dtype == dtype else d.cast(dtype) for d in present])
    return LoraModule(fused_name, "lora", tensors, alpha, alpha_source, q.dora_axis, extra)


def merge_present(parts: Mapping[int, LoraModule], fused_name: str, sizes: Sequence[int]) -> LoraModule:
    """One fused LoRA from the parts present (row block -> LoRA) of a layer with ``len(sizes)`` parts; a
    missing part gets the first present part's A and B = 0 (so its delta W is 0), its rows in the ratio of
    ``sizes`` (the parts' full-size output sizes). What a format that only has the fused name writes.
    Parts that are all full deltas merge into one full delta, their rows stacked (a missing part's are 0).

    Example::

        fused = merge_present({0: q, 2: v}, "double_blocks.0.img_attn.qkv", (3072, 3072, 3072))  # k's delta W is 0
    """
    kinds = {m.kind for m in parts.values()}
    if kinds == {"full"}:
        return _merge_full(parts, fused_name, sizes)
    if kinds != {"lora"}:
        raise LoraBridgeError(f"{fused_name}: its parts are {'/'.join(sorted(kinds))} modules; one module on a fused "
                              "layer is made of LoRA parts or of full deltas only")
    first, present = next(iter(parts.items()))
    a, b = present.tensors["lora_A.weight"], present.tensors["lora_B.weight"]

    def filler(i: int) -> LoraModule:
        rows = present.out_features * sizes[i] // sizes[first]
        none = zeros(b.dtype, (rows, present.rank))  # in B's dtype whatever it is (FP8 too): the bytes merge as they are
        return LoraModule(f"{fused_name}[{i}]", "lora", {"lora_A.weight": a, "lora_B.weight": none},
                          present.alpha, present.alpha_source)

    every = tuple(parts.get(i) or filler(i) for i in range(len(sizes)))
    fused = merge_fused(every, fused_name)
    for tensor in (t for m in every for t in m.tensors.values()):
        release_pages(tensor.data)  # merging read them all (before any is written)
    return fused


def _merge_full(parts: Mapping[int, LoraModule], fused_name: str, sizes: Sequence[int]) -> LoraModule:
    """One full delta from the full deltas of a fused layer's parts present: ``diff`` (and ``diff_b`` where any
    part has one) stacked by rows, zeros for a missing part; the bytes of each part kept where dtypes agree."""
    first, present = next(iter(parts.items()))
    roles = ("diff", "diff_b") if any("diff_b" in m.tensors for m in parts.values()) else ("diff",)
    dtype = _common_dtype([t for m in parts.values() for t in m.tensors.values()])
    cast = {name: t for name, t in named_tensors(parts.values()).items() if t.dtype != dtype}
    refuse_math(cast, f"casting the parts of {fused_name} to one dtype")

    def rows(i: int, role: str) -> Tensor:
        module = parts.get(i)
        if module is not None and role in module.tensors:
            return module.tensors[role].cast(dtype)
        count = present.out_features * sizes[i] // sizes[first]
        return zeros(dtype, (count, *present.tensors["diff"].shape[1:]) if role == "diff" else (count,))

    tensors = {role: _stack_rows([rows(i, role) for i in range(len(sizes))]) for role in roles}
    extra = dict(present.extra) if all(m.extra == present.extra for m in parts.values()) else {}
    return LoraModule(fused_name, "full", tensors, present.alpha, present.alpha_source, extra=extra)


def _parts(names: tuple[str, ...], article: str = "its parts ") -> str:
    """How messages name the parts: ``q/k/v`` for q_proj, k_proj, v_proj (or to_q...), else their names."""
    leaves = [name.rsplit(".", 1)[-1] for name in names]
    short = [leaf.removesuffix("_proj").removeprefix("to_") for leaf in leaves]
    return "/".join(short) if all(len(s) == 1 for s in short) else f"{article}({', '.join(leaves)})".strip()
