"""The off-Ascend op adapter: the mint ops it reroutes really lack CPU kernels, and the reroutes compute the same.

Each rerouted op runs in MindSpore (subprocess) on fixed inputs; torch computes the reference.
"""

from __future__ import annotations

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
ops = {
    "GeluExt": lambda: mint.nn.functional.gelu(x),
    "Conv2DExt": lambda: mint.nn.functional.conv2d(x, w, b, stride=2, padding=1),
    "LayerNormExt": lambda: mint.nn.functional.layer_norm(x, (6,), g, None, 1e-5),
    "Arange": lambda: mint.arange(0, 10, 3),
    "ZerosLikeExt": lambda: mint.zeros_like(x),
    "NonZeroExt": lambda: ms.ops.stack((x > 0).nonzero(as_tuple=True)),  # DDPMScheduler.previous_timestep
    "StackExt": lambda: mint.stack([x, -x], 1),  # UniPCMultistepScheduler
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
    expected = {
        "GeluExt": F.gelu(x),
        "Conv2DExt": F.conv2d(x, w, b, stride=2, padding=1),
        "LayerNormExt": F.layer_norm(x, (6,), torch.tensor([1.0, 0.5, 2.0, -1.0, 0.0, 3.0]), None, 1e-5),
        "Arange": torch.arange(0, 10, 3),
        "ZerosLikeExt": torch.zeros_like(x),
        "NonZeroExt": torch.stack((x > 0).nonzero(as_tuple=True)),
        "StackExt": torch.stack([x, -x], 1),
        "Conv2d layer": F.conv2d(x, w, b, padding=1),
    }
    for name, reference in expected.items():
        np.testing.assert_allclose(np.array(ms_ops["values"][name]), reference.numpy(), rtol=1e-5, atol=1e-5, err_msg=name)
