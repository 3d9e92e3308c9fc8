"""SDXL text encoders: MindONE/SGM names <-> diffusers (transformers) names, and the fused-qkv LoRA split.

SDXL has two text towers. CLIP-L (``text_encoder``) is a transformers
``CLIPTextModel`` on both sides: only the prefix changes. OpenCLIP bigG
(``text_encoder_2``) is spelled the OpenCLIP way in SGM/MindONE
(``resblocks.N.attn.in_proj``, ``mlp.c_fc``...) and the transformers way in
diffusers (``layers.N.self_attn.q_proj``, ``mlp.fc1``...). OpenCLIP computes
q, k and v with one fused ``in_proj`` (rows ordered q, k, v), so a LoRA on it
is split into three diffusers modules and three are merged back into one, with
delta W kept exactly (see :func:`split_fused_qkv` and :func:`merge_qkv`).
SGM names here are full checkpoint paths, ``conditioner.embedders.N...`` included.

What MindONE's SDXL code does (examples/stable_diffusion_xl, gm/modules/embedders):
its CLIP-L is a port of transformers' ``CLIPTextModel`` with the same module
names, and its LoRA variant adapts ``self_attn.{q,k,v,out}_proj``. Its OpenCLIP
attention keeps q/k/v as a bare ``in_proj_weight`` parameter (3*width, width),
not a layer, so its LoRA variant adapts only ``attn.out_proj``; a LoRA on the
fused projection is spelled ``attn.in_proj`` here, the name the
``in_proj_weight`` parameter implies.
"""

from __future__ import annotations

import numpy as np

from ..errors import LoraBridgeError
from ..kinds import AlphaSource
from ..model import LoraModule
from ..tensor import DTYPES, Tensor
from .sdxl_tree import sdxl_modules

# component -> SGM prefix in front of the path that stays unchanged / the OpenCLIP model root.
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
OPENCLIP_PREFIX = "conditioner.embedders.1.model."

# OpenCLIP bigG, per layer: SGM name under ``transformer.resblocks.N.`` -> diffusers name under
# ``text_model.encoder.layers.N.``.
OPENCLIP_LAYER = {
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
}
# The fused attention input projection and the diffusers modules it stands for, in row order.
OPENCLIP_FUSED_QKV = ("attn.in_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
# OpenCLIP modules outside the layers (``positional_embedding`` and ``text_projection`` are bare
# parameters there, not modules, so no LoRA can target them).
OPENCLIP_TOP = {
    "token_embedding": "text_model.embeddings.token_embedding",
    "ln_final": "text_model.final_layer_norm",
}
OPENCLIP_LAYERS = "transformer.resblocks."
DIFFUSERS_LAYERS = "text_model.encoder.layers."

_OPENCLIP_LAYER_INV = {v: k for k, v in OPENCLIP_LAYER.items()}
_OPENCLIP_TOP_INV = {v: k for k, v in OPENCLIP_TOP.items()}


def _split_layer(path: str, prefix: str) -> tuple[str, str] | None:
    """("N", rest) of ``<prefix>N.<rest>``, or None."""
    if not path.startswith(prefix):
        return None
    index, _, rest = path[len(prefix):].partition(".")
    return (index, rest) if index.isdigit() and rest else None


def _openclip_to_diffusers(path: str) -> str | None:
    if path in OPENCLIP_TOP:
        return OPENCLIP_TOP[path]
    layer = _split_layer(path, OPENCLIP_LAYERS)
    if layer and layer[1] in OPENCLIP_LAYER:
        return f"{DIFFUSERS_LAYERS}{layer[0]}.{OPENCLIP_LAYER[layer[1]]}"
    return None


def sgm_text_to_diffusers(name: str) -> tuple[str, str] | None:
    """(component, diffusers path) of an SGM/MindONE text-encoder module name, or None.

    The fused bigG ``attn.in_proj`` has no single diffusers module: use :func:`fused_qkv_paths`.

    Example:
        >>> sgm_text_to_diffusers("conditioner.embedders.1.model.transformer.resblocks.3.mlp.c_fc")
        ('text_encoder_2', 'text_model.encoder.layers.3.mlp.fc1')
        >>> sgm_text_to_diffusers("conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj")
        ('text_encoder', 'text_model.encoder.layers.0.self_attn.q_proj')
    """
    if name.startswith(CLIP_L_PREFIX):
        component, path = "text_encoder", name[len(CLIP_L_PREFIX):]
    elif name.startswith(OPENCLIP_PREFIX):
        component, path = "text_encoder_2", _openclip_to_diffusers(name[len(OPENCLIP_PREFIX):])
    else:
        return None
    return (component, path) if path in sdxl_modules(component) else None


def diffusers_text_to_sgm(component: str, path: str) -> str | None:
    """The SGM/MindONE name of a diffusers text-encoder module, or None.

    bigG q/k/v projections have no own SGM module (they live in the fused
    ``in_proj``): use :func:`fused_qkv_name`.

    Example:
        >>> diffusers_text_to_sgm("text_encoder_2", "text_model.encoder.layers.3.self_attn.out_proj")
        'conditioner.embedders.1.model.transformer.resblocks.3.attn.out_proj'
    """
    if component not in ("text_encoder", "text_encoder_2") or path not in sdxl_modules(component):
        return None
    if component == "text_encoder":
        return CLIP_L_PREFIX + path
    if path in _OPENCLIP_TOP_INV:
        return OPENCLIP_PREFIX + _OPENCLIP_TOP_INV[path]
    layer = _split_layer(path, DIFFUSERS_LAYERS)
    if layer and layer[1] in _OPENCLIP_LAYER_INV:
        return f"{OPENCLIP_PREFIX}{OPENCLIP_LAYERS}{layer[0]}.{_OPENCLIP_LAYER_INV[layer[1]]}"
    return None


def fused_qkv_paths(name: str) -> tuple[str, tuple[str, str, str]] | None:
    """For a bigG fused ``in_proj`` SGM name: ("text_encoder_2", (q, k, v) diffusers paths), else None.

    Example:
        >>> fused_qkv_paths("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj")[1][1]
        'text_model.encoder.layers.0.self_attn.k_proj'
    """
    layer = _split_layer(name[len(OPENCLIP_PREFIX):], OPENCLIP_LAYERS) if name.startswith(OPENCLIP_PREFIX) else None
    if not layer or layer[1] != OPENCLIP_FUSED_QKV[0]:
        return None
    paths = tuple(f"{DIFFUSERS_LAYERS}{layer[0]}.{p}" for p in OPENCLIP_FUSED_QKV[1])
    return ("text_encoder_2", paths) if all(p in sdxl_modules("text_encoder_2") for p in paths) else None


def fused_qkv_name(component: str, path: str) -> tuple[str, int] | None:
    """For a bigG q/k/v diffusers path: (SGM fused ``in_proj`` name, row block 0/1/2), else None.

    Example:
        >>> fused_qkv_name("text_encoder_2", "text_model.encoder.layers.5.self_attn.v_proj")
        ('conditioner.embedders.1.model.transformer.resblocks.5.attn.in_proj', 2)
    """
    if component != "text_encoder_2" or path not in sdxl_modules(component):
        return None
    layer = _split_layer(path, DIFFUSERS_LAYERS)
    if not layer or layer[1] not in OPENCLIP_FUSED_QKV[1]:
        return None
    fused = f"{OPENCLIP_PREFIX}{OPENCLIP_LAYERS}{layer[0]}.{OPENCLIP_FUSED_QKV[0]}"
    return fused, OPENCLIP_FUSED_QKV[1].index(layer[1])


def _row_blocks(t: Tensor, parts: int) -> list[Tensor]:
    """Split a tensor into ``parts`` equal row blocks, as zero-copy views of its bytes (bit-exact)."""
    rows = t.shape[0] // parts
    step = len(t.data) // parts
    data = memoryview(t.data)
    return [Tensor(t.dtype, (rows, *t.shape[1:]), data[i * step:(i + 1) * step]) for i in range(parts)]


def _stack_rows(tensors: list[Tensor]) -> Tensor:
    """Concatenate same-dtype tensors along rows by joining their bytes (bit-exact)."""
    rows = sum(t.shape[0] for t in tensors)
    return Tensor(tensors[0].dtype, (rows, *tensors[0].shape[1:]), b"".join(bytes(t.data) for t in tensors))


def _raw(t: Tensor) -> np.ndarray:
    """The tensor's elements as unsigned integers of its width: bit patterns, for exact slicing and zero tests."""
    return np.frombuffer(t.data, dtype=f"<u{DTYPES[t.dtype][0]}").reshape(t.shape)


def _used_columns(b: Tensor) -> np.ndarray:
    """Indices of the rank columns of a lora_B block that hold a non-zero value (+0 and -0 are zero)."""
    bits = _raw(b)
    sign = np.array(1 << (bits.dtype.itemsize * 8 - 1), bits.dtype)
    return np.flatnonzero(((bits & ~sign) != 0).any(axis=0))


def part_ranks(b_parts: list[Tensor]) -> list[tuple[int, int]] | None:
    """The rank columns [start, end) of q, k and v when a fused LoRA is block-diagonal, else None.

    :func:`merge_qkv` gives q, k and v that have their own A consecutive column blocks of B
    (q's rows are zero outside the first block, and so on). The blocks are found again from the
    non-zero columns of each part's rows: the rule, exactly, is that every part must use at least
    one column, and all columns q uses must come before all that k uses, which come before all that
    v uses. Then k's block starts at its first used column, v's at its first used column, and q's
    block is everything before k's: an all-zero column between two blocks goes to the earlier part.
    Anything else (a part whose rows are all zero, as in a zero-initialised LoRA; parts sharing
    columns, as a LoRA trained on the fused projection does) is not block-diagonal: None.

    Example:
        >>> b = Tensor.from_numpy(np.kron(np.eye(3, dtype="f4"), np.ones((2, 2), "f4")))  # 6 x 6, blocks of 2
        >>> part_ranks(_row_blocks(b, 3))
        [(0, 2), (2, 4), (4, 6)]
    """
    used = [_used_columns(b) for b in b_parts]
    if any(u.size == 0 for u in used) or any(used[i][-1] >= used[i + 1][0] for i in range(len(used) - 1)):
        return None
    starts = [0] + [int(u[0]) for u in used[1:]]
    return list(zip(starts, starts[1:] + [b_parts[0].shape[1]]))


def _rank_slice(a: Tensor, b: Tensor, start: int, end: int) -> tuple[Tensor, Tensor]:
    """Rows [start, end) of A and the same columns of B, as their exact bytes."""
    step = len(a.data) // a.shape[0]
    a_part = Tensor(a.dtype, (end - start, *a.shape[1:]), memoryview(a.data)[start * step:end * step])
    b_part = Tensor(b.dtype, (b.shape[0], end - start), np.ascontiguousarray(_raw(b)[:, start:end]).tobytes())
    return a_part, b_part


def split_fused_qkv(module: LoraModule, q_name: str, k_name: str, v_name: str) -> list[LoraModule]:
    """Split a LoRA on a fused qkv projection into q, k and v LoRAs with exactly the same delta W.

    Each part takes its row block of B, so delta W of each part is bit for bit the
    matching row block of the fused delta W. When the fused LoRA is block-diagonal
    (:func:`part_ranks`: what :func:`merge_qkv` makes of q, k, v with their own A),
    each part keeps only its own rank columns of B and rows of A, with alpha scaled
    so alpha / rank stays the fused one: q, k and v merged then split come back with
    their own ranks and bytes. Otherwise each part keeps the whole A, rank and alpha.
    A DoRA magnitude per output row is split by rows the same way.

    Example (``fused`` named after the SGM ``attn.in_proj``)::

        layer = "text_encoder_2.text_model.encoder.layers.0.self_attn."
        q, k, v = split_fused_qkv(fused, layer + "q_proj", layer + "k_proj", layer + "v_proj")
    """
    if module.kind != "lora":
        raise LoraBridgeError(f"{module.name}: only plain LoRA can be split into q/k/v, not {module.kind}")
    a, b = module.tensors["lora_A.weight"], module.tensors["lora_B.weight"]
    if len(b.shape) != 2 or b.shape[0] % 3:
        raise LoraBridgeError(f"{module.name}: fused qkv lora_B has shape {list(b.shape)}, rows not divisible by 3")
    dora = module.tensors.get("dora_scale")
    if dora is not None and module.dora_axis != "out":
        raise LoraBridgeError(f"{module.name}: a DoRA magnitude per input column cannot be split into q/k/v")
    b_parts = _row_blocks(b, 3)
    dora_parts = _row_blocks(dora, 3) if dora is not None else [None] * 3
    blocks = part_ranks(b_parts) if len(a.shape) == 2 else None
    out = []
    for i, (name, b_part, dora_part) in enumerate(zip((q_name, k_name, v_name), b_parts, dora_parts)):
        a_part, alpha = a, module.alpha
        if blocks:
            start, end = blocks[i]
            a_part, b_part = _rank_slice(a, b_part, start, end)
            alpha = module.alpha * (end - start) / module.rank
        tensors = {"lora_A.weight": a_part, "lora_B.weight": b_part}
        if dora_part is not None:
            tensors["dora_scale"] = dora_part
        out.append(LoraModule(name, "lora", tensors, alpha, module.alpha_source, module.dora_axis, dict(module.extra)))
    return out


def _common_dtype(tensors: list[Tensor]) -> str:
    """The shared dtype, or F32 (which holds F16 and BF16 values exactly) when they differ."""
    dtypes = {t.dtype for t in tensors}
    return dtypes.pop() if len(dtypes) == 1 else "F32"


_ALPHA_SOURCE_PRIORITY: tuple[AlphaSource, ...] = ("assumed", "user", "stored")  # a merge is only as certain as its least certain part


def merge_qkv(q: LoraModule, k: LoraModule, v: LoraModule, fused_name: str) -> LoraModule:
    """Merge q, k and v LoRAs into one LoRA on the fused qkv projection, keeping delta W.

    When the three share a bit-identical A and the same alpha (what
    :func:`split_fused_qkv` produces), the result is that A with the three B
    stacked: split then merge gives back the original bytes. Otherwise A is the
    three A stacked (rank r_q + r_k + r_v), B is block-diagonal, and alpha is
    scaled so alpha / rank stays the q scale; a part with another scale has
    its B multiplied by the ratio (float math, rounded to B's dtype).

    Example::

        fused = merge_qkv(q, k, v, "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj")
    """
    parts = (q, k, v)
    for m in parts:
        if m.kind != "lora" or len(m.tensors["lora_A.weight"].shape) != 2:
            raise LoraBridgeError(f"{m.name}: only linear LoRA modules can be merged into a fused qkv projection")
    if len({m.in_features for m in parts}) != 1:
        raise LoraBridgeError(f"{fused_name}: q/k/v LoRAs have different input sizes {[m.in_features for m in parts]}")
    doras = [m.tensors.get("dora_scale") for m in parts]
    if any(d is not None for d in doras) and not all(d is not None and m.dora_axis == "out" for d, m in zip(doras, parts)):
        raise LoraBridgeError(f"{fused_name}: q/k/v must all carry a per-output-row DoRA magnitude, or none")
    alpha_source = next(s for s in _ALPHA_SOURCE_PRIORITY if any(m.alpha_source == s for m in parts))
    extra = dict(q.extra) if all(m.extra == q.extra for m in parts) else {}
    a_list = [m.tensors["lora_A.weight"] for m in parts]
    b_list = [m.tensors["lora_B.weight"] for m in parts]
    shared = all(a.same_as(a_list[0]) for a in a_list) and len({m.alpha for m in parts}) == 1
    if shared and len({b.dtype for b in b_list}) == 1:
        tensors = {"lora_A.weight": a_list[0], "lora_B.weight": _stack_rows(b_list)}
        alpha = q.alpha
    else:
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
    if doras[0] is not None:
        tensors["dora_scale"] = _stack_rows([d if d.dtype == doras[0].dtype else d.cast(doras[0].dtype) for d in doras])
    return LoraModule(fused_name, "lora", tensors, alpha, alpha_source, q.dora_axis, extra)
