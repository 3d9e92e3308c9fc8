"""The off-Ascend op adapter: the mint ops it reroutes really lack CPU kernels, and the reroutes compute the same.

Each rerouted op runs in MindSpore (subprocess) on fixed inputs; torch computes the reference. Convolution,
the bulk of SDXL's and Flux.1's UNet/VAE compute, is also checked at their shapes and for its routing.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = [pytest.mark.mindspore, pytest.mark.torch]

CODE = """
import json
import numpy as np
import mindspore as ms
from mindspore import mint
ms.set_device("CPU")
ms.set_context(mode=ms.PYNATIVE_MODE, pynative_synchronize=True)
x = ms.Tensor(np.linspace(-3, 3, 2 * 3 * 6 * 6, dtype=np.float32).reshape(2, 3, 6, 6))
w = ms.Tensor(np.cos(np.arange(4 * 3 * 3 * 3, dtype=np.float32)).reshape(4, 3, 3, 3))
b = ms.Tensor(np.array([0.1, -0.2, 0.3, 0.0], np.float32))
g = ms.Tensor(np.array([1.0, 0.5, 2.0, -1.0, 0.0, 3.0], np.float32))
ids = ms.Tensor(np.array([[0, 3, 1], [2, 2, 0]], np.int32))
table = ms.Tensor(np.sin(np.arange(4 * 5, dtype=np.float32)).reshape(4, 5))
q = ms.Tensor(np.cos(np.arange(2 * 2 * 3 * 4, dtype=np.float32)).reshape(2, 2, 3, 4))  # (batch, heads, tokens, dim)
from mindone.diffusers.models import layers_compat
ops = {
    "GeluExt": lambda: mint.nn.functional.gelu(x),
    "Conv2DExt": lambda: mint.nn.functional.conv2d(x, w, b, stride=2, padding=1),
    "LayerNormExt": lambda: mint.nn.functional.layer_norm(x, (6,), g, None, 1e-5),
    "Arange": lambda: mint.arange(0, 10, 3),
    "ZerosLikeExt": lambda: mint.zeros_like(x),
    "NonZeroExt": lambda: ms.ops.stack((x > 0).nonzero(as_tuple=True)),  # DDPMScheduler.previous_timestep
    "StackExt": lambda: mint.stack([x, -x], 1),  # UniPCMultistepScheduler
    "Embedding": lambda: mint.nn.functional.embedding(ids, table),  # T5's token embedding
    "FillScalar": lambda: mint.full((2, 3), 1.5),  # T5's attention bias
    "Outer": lambda: mint.outer(g, b),  # Flux.1's rotary embedding
    "RepeatInterleaveInt": lambda: mint.repeat_interleave(g, 2),
    "FlashAttentionScore": lambda: layers_compat.scaled_dot_product_attention(q, q * 0.5, q - 1.0),
}
missing = {}
for kernel, op in ops.items():
    try:
        op().asnumpy()
        missing[kernel] = None
    except RuntimeError as exc:
        missing[kernel] = str(exc).splitlines()[0]
from lorabridge.adapters.mindspore_backend import setup
rerouted = setup("CPU")
conv_layer = mint.nn.Conv2d(3, 4, 3, padding=1)
conv_layer.weight.set_data(w)
conv_layer.bias.set_data(b)
values = {kernel: op().asnumpy().tolist() for kernel, op in ops.items()}
values["Conv2d layer"] = conv_layer(x).asnumpy().tolist()
print(json.dumps({"missing": missing, "rerouted": rerouted, "values": values}))
"""


@pytest.fixture(scope="module")
def ms_ops():
    from tests.fixtures.mindspore import run_mindspore

    return run_mindspore(CODE)


def test_every_rerouted_op_lacks_a_cpu_kernel(ms_ops):
    assert sorted(ms_ops["rerouted"]) == sorted(ms_ops["missing"])
    assert all(message and ("unregistered" in message or "failed" in message)
               for message in ms_ops["missing"].values()), ms_ops["missing"]


def test_reroutes_compute_what_the_mint_ops_mean(ms_ops):
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.linspace(-3, 3, 2 * 3 * 6 * 6, dtype=np.float32).reshape(2, 3, 6, 6))
    w = torch.from_numpy(np.cos(np.arange(4 * 3 * 3 * 3, dtype=np.float32)).reshape(4, 3, 3, 3))
    b = torch.tensor([0.1, -0.2, 0.3, 0.0])
    g = torch.tensor([1.0, 0.5, 2.0, -1.0, 0.0, 3.0])
    ids = torch.tensor([[0, 3, 1], [2, 2, 0]])
    table = torch.from_numpy(np.sin(np.arange(4 * 5, dtype=np.float32)).reshape(4, 5))
    q = torch.from_numpy(np.cos(np.arange(2 * 2 * 3 * 4, dtype=np.float32)).reshape(2, 2, 3, 4))
    expected = {
        "GeluExt": F.gelu(x),
        "Conv2DExt": F.conv2d(x, w, b, stride=2, padding=1),
        "LayerNormExt": F.layer_norm(x, (6,), g, None, 1e-5),
        "Arange": torch.arange(0, 10, 3),
        "ZerosLikeExt": torch.zeros_like(x),
        "NonZeroExt": torch.stack((x > 0).nonzero(as_tuple=True)),
        "StackExt": torch.stack([x, -x], 1),
        "Embedding": F.embedding(ids, table),
        "FillScalar": torch.full((2, 3), 1.5),
        "Outer": torch.outer(g, b),
        "RepeatInterleaveInt": torch.repeat_interleave(g, 2),
        "FlashAttentionScore": F.scaled_dot_product_attention(q, q * 0.5, q - 1.0),
        "Conv2d layer": F.conv2d(x, w, b, padding=1),
    }
    for name, reference in expected.items():
        np.testing.assert_allclose(np.array(ms_ops["values"][name]), reference.numpy(), rtol=1e-5, atol=1e-5, err_msg=name)


# Convolution at SDXL's (and Flux.1's VAE's) shapes, through the adapter as mindone's layers call it.
# (batch, in channels, out channels, side, kernel, stride, padding, dtype): reduced sides, plus one real
# shape (VAE decoder 512ch 3x3 at 64x64, the latent of a 512px image upsampled once).
CONV_SHAPES = [
    (2, 320, 320, 16, 3, 1, 1, "float32"),  # UNet resnet conv
    (1, 512, 512, 12, 3, 1, 1, "float32"),  # VAE decoder resnet conv
    (2, 320, 640, 16, 1, 1, 0, "float32"),  # resnet 1x1 conv_shortcut
    (2, 320, 320, 16, 3, 2, 1, "float32"),  # UNet Downsample2D
    (2, 4, 320, 16, 3, 1, 1, "float32"),  # UNet conv_in
    (1, 128, 3, 16, 3, 1, 1, "float32"),  # VAE conv_out
    (1, 512, 512, 64, 3, 1, 1, "float32"),  # real size
    (2, 320, 320, 16, 3, 1, 1, "float16"),
]

CONV_CODE = """
import json, sys
import numpy as np
import mindspore as ms
from mindspore import mint
from lorabridge.adapters.mindspore_backend import setup
setup("CPU")
out_dir = sys.argv[1]
for index, (n, c, o, side, k, stride, padding, dtype) in enumerate(json.loads(sys.argv[2])):
    rng = np.random.default_rng(index)
    x = rng.standard_normal((n, c, side, side), dtype=np.float32)
    w = rng.standard_normal((o, c, k, k), dtype=np.float32) / np.sqrt(c * k * k)
    b = rng.standard_normal(o, dtype=np.float32)
    layer = mint.nn.Conv2d(c, o, k, stride=stride, padding=padding, dtype=getattr(ms, dtype))
    layer.weight.set_data(ms.Tensor(w).astype(getattr(ms, dtype)))
    layer.bias.set_data(ms.Tensor(b).astype(getattr(ms, dtype)))
    np.save(f"{out_dir}/{index}.npy", layer(ms.Tensor(x).astype(getattr(ms, dtype))).asnumpy().astype(np.float32))
print(json.dumps({}))
"""


def test_conv_matches_torch_at_sdxl_shapes(tmp_path):
    """The adapter's conv (MindSpore's Conv2D) agrees with torch to fp32 accumulation error (fp16: fp16 rounding)."""
    import torch
    import torch.nn.functional as F

    from tests.fixtures.mindspore import run_mindspore

    run_mindspore(CONV_CODE, tmp_path, json.dumps(CONV_SHAPES))
    for index, (n, c, o, side, k, stride, padding, dtype) in enumerate(CONV_SHAPES):
        rng = np.random.default_rng(index)
        x = rng.standard_normal((n, c, side, side), dtype=np.float32)
        w = rng.standard_normal((o, c, k, k), dtype=np.float32) / np.sqrt(c * k * k)
        b = rng.standard_normal(o, dtype=np.float32)
        if dtype == "float16":  # the reference sees the same rounded inputs, in float64
            x, w, b = (a.astype(np.float16) for a in (x, w, b))
        reference = F.conv2d(*(torch.from_numpy(a.astype(np.float64)) for a in (x, w, b)), stride=stride,
                             padding=padding).numpy()
        result = np.load(tmp_path / f"{index}.npy")
        # fp32 sums of c*k*k products of unit-scale terms: error ~ sqrt(c*k*k) * 2^-24 * |terms|; 1e-4
        # of the output's magnitude leaves a wide margin (seen: 1e-6 relative). fp16 rounds to 2^-11.
        tolerance = (1e-4 if dtype == "float32" else 4e-3) * np.abs(reference).max()
        diff = np.abs(result - reference).max()
        print(f"conv {(n, c, o, side, k, stride, padding, dtype)}: max |diff| {diff:.2e} (tolerance {tolerance:.2e})")
        assert result.shape == reference.shape
        assert diff <= tolerance, (index, diff, tolerance)


ROUTING_CODE = """
import json
import mindspore as ms
from mindspore import mint, nn
from lorabridge.adapters import ms_cpu_ops
from lorabridge.adapters.mindspore_backend import setup
from lorabridge.architectures.sdxl.tiny import UNET_CONFIG, VAE_CONFIG
setup("CPU")
from mindone.diffusers import AutoencoderKL, UNet2DConditionModel
models = {
    "sdxl unet": UNet2DConditionModel(**UNET_CONFIG),
    "sdxl vae": AutoencoderKL(**VAE_CONFIG),
    "flux vae": AutoencoderKL(**{**VAE_CONFIG, "latent_channels": 16, "use_quant_conv": False,
                                 "use_post_quant_conv": False}),
}
report = {}
for name, model in models.items():
    convs = [(path, cell) for path, cell in model.cells_and_names() if "conv" in type(cell).__name__.lower()]
    report[name] = {
        "count": len(convs),
        "types": sorted({f"{type(cell).__module__}.{type(cell).__name__}" for _, cell in convs}),
        "not_rerouted": [path for path, cell in convs if getattr(cell, "conv2d", None) is not ms_cpu_ops._conv2d],
    }
print(json.dumps(report))
"""


def test_every_conv_of_the_sdxl_and_flux_models_goes_through_the_adapter():
    """mindone's UNet and VAE build every convolution as ``mint.nn.Conv2d`` (no ``nn.Conv2d``/``ops.conv2d``),
    and each of those calls the adapter's conv: one place decides how CPU convolution runs."""
    from tests.fixtures.mindspore import run_mindspore

    report = run_mindspore(ROUTING_CODE)
    for name, model in report.items():
        assert model["count"] > 0, name
        assert model["types"] == ["mindspore.mint.nn.layer.conv.Conv2d"], (name, model["types"])
        assert model["not_rerouted"] == [], (name, model["not_rerouted"])


ATTENTION_CODE = """
import json, sys
import numpy as np
import mindspore as ms
from lorabridge.adapters import ms_cpu_ops
from lorabridge.adapters.mindspore_backend import setup
setup("CPU")
from mindone.diffusers.models.attention_processor import Attention
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((2, 3, 40, 8)).astype(np.float32) for _ in range(3))  # batch, heads, tokens, dim
attention = Attention(query_dim=24, heads=3, dim_head=8)
whole = attention.math_attention_op(*(ms.Tensor(a) for a in (q, k, v))).asnumpy()
ms_cpu_ops.ATTENTION_CHUNK_BYTES = 2 * 3 * 40 * 4 * 7  # 7 query rows a chunk: 6 chunks, the last one short
calls = []
original = ms_cpu_ops._math_attention
ms_cpu_ops._math_attention = lambda self, query, *rest: calls.append(query.shape[-2]) or original(self, query, *rest)
chunked = attention.math_attention_op(*(ms.Tensor(a) for a in (q, k, v))).asnumpy()
np.save(sys.argv[1], np.stack([whole, chunked]))
print(json.dumps({"rows": calls}))
"""


def test_attention_runs_by_chunks_of_query_rows_and_computes_the_same(tmp_path):
    """mindone's math attention (SDXL's UNet and VAE off Ascend) holds every score at once: 1.3 GB per UNet layer
    at 1024x1024. By chunks of rows it holds at most ATTENTION_CHUNK_BYTES, and each row is what the whole gives."""
    import torch

    from tests.fixtures.mindspore import run_mindspore

    report = run_mindspore(ATTENTION_CODE, tmp_path / "out.npy")
    assert report["rows"] == [7, 7, 7, 7, 7, 5]
    whole, chunked = np.load(tmp_path / "out.npy")
    rng = np.random.default_rng(0)
    q, k, v = (torch.from_numpy(rng.standard_normal((2, 3, 40, 8)).astype(np.float32)) for _ in range(3))
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v).numpy()
    assert np.abs(chunked - whole).max() <= 1e-6
    assert np.abs(chunked - reference).max() <= 1e-5
