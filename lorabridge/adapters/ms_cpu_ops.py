"""Run mindone.diffusers on MindSpore's CPU backend: reroute the few ``mint`` ops without CPU kernels.

mindone is written for Ascend and calls ``mindspore.mint`` ops whose kernels exist only
there (on CPU: ``RuntimeError: The kernel GeluExt unregistered``). Each such op has an
older ``mindspore.ops`` equivalent that runs on CPU; :func:`apply` rebinds the ``mint``
entry points to those, everywhere MindSpore and mindone hold a reference to them. One more
replacement is for memory, not a missing kernel: mindone's attention off Ascend (its math path)
computes every score at once, several GB at 1024x1024, so it runs by chunks of query rows
(:data:`ATTENTION_CHUNK_BYTES`). It is meant for machines without an NPU and is never applied on Ascend.

Example:
    >>> import mindspore as ms; ms.set_device("CPU")   # doctest: +SKIP
    >>> from lorabridge.adapters import ms_cpu_ops; ms_cpu_ops.apply()   # doctest: +SKIP
    >>> from mindone.diffusers import StableDiffusionXLPipeline   # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def _gelu(input, approximate: str = "none"):
    from mindspore import ops

    return ops.gelu(input, approximate=approximate)


def _conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """MindSpore's CPU Conv2D: fp32 and fp16, no bf16 kernel.

    At SDXL's real shapes it runs on par with torch's CPU conv, and im2col + matmul in MindSpore
    ops was 2-19x slower (bench/ms_conv_bench.py, bench/RESULTS-infer.md), so it stays.
    """
    from mindspore import ops

    if isinstance(padding, str):
        return ops.conv2d(input, weight, bias, stride, padding, dilation=dilation, groups=groups)
    return ops.conv2d(input, weight, bias, stride, "pad", padding, dilation, groups)


def _layer_norm(input, normalized_shape, weight=None, bias=None, eps: float = 1e-5):
    from mindspore import ops

    begin = input.ndim - len(normalized_shape)
    if weight is None:
        weight = ops.ones(tuple(normalized_shape), input.dtype)
    if bias is None:
        bias = ops.zeros(tuple(normalized_shape), input.dtype)
    return ops.LayerNorm(begin, begin, eps)(input, weight, bias)[0]


def _arange(start=0, end=None, step=1, *, dtype=None):
    from mindspore import ops

    return ops.arange(start, end, step, dtype=dtype)


def _zeros_like(input, *, dtype=None):
    from mindspore import ops

    return ops.zeros_like(input, dtype=dtype)


def _nonzero_tuple(input):
    """``nonzero(as_tuple=True)``: one index tensor per dimension (DDPM's ``previous_timestep``)."""
    from mindspore import ops

    indices = ops.NonZero()(input)
    return tuple(indices[:, axis] for axis in range(input.ndim))


def _stack(tensors, dim: int = 0):
    from mindspore import ops

    return ops.stack(tensors, dim)


def _embedding(input, weight, padding_idx=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False):
    """``mint.nn.Embedding`` (T5's token embedding): a row lookup; ``padding_idx`` and ``scale_grad_by_freq``
    only shape gradients, and ``max_norm`` (renormalising rows in place) is used by no pipeline here."""
    from mindspore import ops

    if max_norm is not None:
        raise NotImplementedError("the CPU Embedding reroute does not renormalise rows (max_norm)")
    return ops.gather(weight, input, 0)


def _full(size, fill_value, *, dtype=None):
    """``mint.full``; without ``dtype``, the fill value's type decides (a Python float is float32), as in mint."""
    import mindspore as ms
    from mindspore import ops

    if dtype is None:
        dtype = fill_value.dtype if isinstance(fill_value, ms.Tensor) else \
            ms.bool_ if isinstance(fill_value, bool) else ms.int64 if isinstance(fill_value, int) else ms.float32
    return ops.full(tuple(size), fill_value, dtype=dtype)


def _outer(input, vec2):
    """``mint.outer`` (Flux's rotary position embedding): a broadcast product."""
    return input.reshape(-1, 1) * vec2.reshape(1, -1)


def _repeat_interleave(input, repeats, dim=None, output_size=None):
    """``Tensor.repeat_interleave`` by an int (Flux's rotary embedding): each element ``repeats`` times along ``dim``."""
    from mindspore import ops

    if dim is None:
        input, dim = input.reshape(-1), 0
    dim %= input.ndim
    shape = tuple(input.shape)
    spread = ops.broadcast_to(input.expand_dims(dim + 1), (*shape[:dim + 1], repeats, *shape[dim + 1:]))
    return spread.reshape(*shape[:dim], shape[dim] * repeats, *shape[dim + 1:])


def _attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
               backend="flash"):
    """mindone's ``scaled_dot_product_attention`` (Flux's attention) by its own math path, in the inputs' dtype:
    its flash path (Ascend's FlashAttentionScore) would also round fp32 inputs to fp16."""
    from mindone.diffusers.models.layers_compat import math_attention_op

    return math_attention_op(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


# The most bytes one chunk of attention scores may hold: SDXL's attention at 1024x1024 holds 1.3 GB of scores per
# UNet layer (2 x 10 heads x 4096 x 4096 fp32) and its VAE's 1 GB (16384 x 16384), each two or three times over
# (scores, probabilities): at most this much a chunk instead.
ATTENTION_CHUNK_BYTES = 256 * 2**20
_math_attention: Callable[..., Any] | None = None  # mindone's own Attention.math_attention_op, once replaced


def _chunked_math_attention(self, query, key, value, attn_mask=None):
    """mindone's ``Attention.math_attention_op`` (SDXL's UNet and VAE attention off Ascend) by chunks of query rows,
    each through its own ``get_attention_scores``: softmax is per row, so each row's result is what the whole
    computation gives, and the scores held at once are at most :data:`ATTENTION_CHUNK_BYTES`."""
    from mindspore import mint

    assert _math_attention is not None
    rows, keys = query.shape[-2], key.shape[-2]
    heads = query.numel() // (rows * query.shape[-1])  # batch x heads
    chunk = max(1, ATTENTION_CHUNK_BYTES // (heads * keys * 4))  # 4: the scores may be upcast to fp32
    if chunk >= rows:
        return _math_attention(self, query, key, value, attn_mask)
    per_row_mask = attn_mask is not None and attn_mask.ndim >= 2 and attn_mask.shape[-2] == rows
    parts = [_math_attention(self, query[..., start:start + chunk, :], key, value,
                             attn_mask[..., start:start + chunk, :] if per_row_mask else attn_mask)
             for start in range(0, rows, chunk)]
    return mint.cat(parts, dim=-2)


# (MindSpore kernel without a CPU implementation, module holding a Python entry point to it, attribute, CPU replacement)
REROUTES: tuple[tuple[str, str, str, Callable[..., Any]], ...] = (
    ("GeluExt", "mindspore.ops.functional_overload", "gelu", _gelu),
    ("Conv2DExt", "mindspore.ops.auto_generate.gen_ops_prim", "conv2d_ext_op", _conv2d),  # mint.nn.Conv2d
    ("Conv2DExt", "mindspore.ops.functional_overload", "conv2d", _conv2d),  # mint.nn.functional.conv2d
    ("LayerNormExt", "mindspore.ops.function.nn_func", "layer_norm", _layer_norm),
    ("Arange", "mindspore.ops.function.array_func", "arange_ext", _arange),
    ("ZerosLikeExt", "mindspore.ops.function.array_func", "zeros_like_ext", _zeros_like),
    ("NonZeroExt", "mindspore.ops.function.array_func", "non_zero_ext_", _nonzero_tuple),  # Tensor.nonzero(as_tuple=True)
    ("StackExt", "mindspore.ops.auto_generate.gen_ops_def", "stack_ext", _stack),  # mint.stack
    ("Embedding", "mindspore.ops.auto_generate.gen_ops_prim", "embedding_op", _embedding),  # mint.nn.Embedding (T5)
    ("FillScalar", "mindspore.ops.function.array_func", "full_ext", _full),  # mint.full (T5's attention bias)
    ("Outer", "mindspore.ops.auto_generate.gen_ops_prim", "outer_op", _outer),  # mint.outer (Flux's rotary embedding)
    ("RepeatInterleaveInt", "mindspore.ops.function.array_func", "repeat_interleave_int_", _repeat_interleave),
    ("FlashAttentionScore", "mindone.diffusers.models.layers_compat", "scaled_dot_product_attention", _attention),
)

_applied: dict[tuple[str, str], Any] = {}  # (module, attribute) -> the original, once rebound


def _rebind(original: Any, replacement: Callable[..., Any]) -> None:
    """Point every module-level name bound to ``original`` (in mindspore and mindone) at ``replacement``."""
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(("mindspore", "mindone")):
            continue
        for attr, value in list(vars(module).items()):
            if value is original:
                setattr(module, attr, replacement)


def apply() -> list[str]:
    """Reroute every op of :data:`REROUTES` (idempotent); returns the kernel names rerouted.

    Call it before models are built: names already bound to an op (``from ... import gelu``) are
    rebound, and modules imported later import the replacement from MindSpore's own modules.
    """
    global _math_attention
    import mindspore  # noqa: F401  (the modules below must be loaded)

    for _, module_name, attr, replacement in REROUTES:
        if (module_name, attr) not in _applied:
            original = getattr(importlib.import_module(module_name), attr)
            _rebind(original, replacement)
            _applied[module_name, attr] = original
    if _math_attention is None:  # not a missing kernel: memory (ATTENTION_CHUNK_BYTES)
        attention = importlib.import_module("mindone.diffusers.models.attention_processor").Attention
        _math_attention = attention.math_attention_op
        attention.math_attention_op = _chunked_math_attention
    return sorted({kernel for kernel, *_ in REROUTES})
