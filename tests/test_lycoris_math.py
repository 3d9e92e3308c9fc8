"""The neutral LoHa/LoKr/DoRA math (lorabridge.deltas) is what lycoris-lora's modules compute.

Every LyCORIS variant is built by lycoris-lora 4.1.3 itself on a small Linear or Conv2d, given
random factors, saved through its own ``state_dict`` and read by our module builder; the layer
output with the LyCORIS module applied (its forward: what training optimised) must equal the
layer run with W + delta W (or the DoRA weight) from the neutral module.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lycoris")
pytestmark = pytest.mark.torch

from lycoris.modules.locon import LoConModule  # noqa: E402
from lycoris.modules.loha import LohaModule  # noqa: E402
from lycoris.modules.lokr import LokrModule  # noqa: E402

from lorabridge.formats.lycoris import lycoris_module, lycoris_tensors  # noqa: E402
from lorabridge.tensor import Tensor  # noqa: E402
from tests.fixtures.lycoris import effective_weight, run_layer  # noqa: E402

# Real SDXL layer names (the reader takes conv kernels from the SDXL tree), at small widths.
LINEAR = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
CONV3 = "unet.down_blocks.1.resnets.0.conv1"
CONV1 = "unet.down_blocks.1.resnets.0.conv_shortcut"

VARIANTS = {
    "locon": (LoConModule, {}),
    "locon-tucker": (LoConModule, {"use_tucker": True}),
    "loha": (LohaModule, {}),
    "loha-tucker": (LohaModule, {"use_tucker": True}),
    "loha-rs_lora": (LohaModule, {"rs_lora": True}),
    "lokr": (LokrModule, {"factor": 4}),
    "lokr-decompose-both": (LokrModule, {"factor": 4, "decompose_both": True, "lora_dim": 1}),
    "lokr-tucker": (LokrModule, {"factor": 4, "use_tucker": True}),
    "lokr-full-matrix": (LokrModule, {"factor": 4, "full_matrix": True}),
    "lora-dora-out": (LoConModule, {"weight_decompose": True}),
    "lora-dora-in": (LoConModule, {"weight_decompose": True, "wd_on_out": False}),
    "loha-dora-in": (LohaModule, {"weight_decompose": True, "wd_on_out": False}),
    "lokr-dora-out": (LokrModule, {"factor": 4, "weight_decompose": True}),
}
LAYERS = {
    LINEAR: lambda: torch.nn.Linear(32, 48),
    CONV3: lambda: torch.nn.Conv2d(16, 24, 3, padding=1),
    CONV1: lambda: torch.nn.Conv2d(16, 24, 1),
}


def lycoris_layer(variant: str, name: str, seed: int = 0):
    """(base layer, LyCORIS module with random factors applied to it)."""
    torch.manual_seed(seed)
    cls, kwargs = VARIANTS[variant]
    base = LAYERS[name]()
    kwargs = {"lora_dim": 2, **kwargs}
    module = cls("x", base, 1.0, alpha=3.0, **kwargs)
    with torch.no_grad():
        for pname, parameter in module.named_parameters():
            if not pname.endswith("dora_scale"):
                parameter.copy_(torch.randn_like(parameter) * 0.3)
            else:  # a trained magnitude differs from the initial norms
                parameter.mul_(1.0 + 0.1 * torch.rand_like(parameter))
    module.apply_to()
    return base, module


def parts_of(module) -> dict[str, Tensor]:
    """What LyCORIS saves for a module (its custom state dict), as file suffix -> Tensor."""
    return {k: Tensor.from_numpy(v.detach().float().numpy()) for k, v in module.state_dict().items()}


def layer_input(base):
    gen = torch.Generator().manual_seed(1)
    if isinstance(base, torch.nn.Conv2d):
        return torch.randn(2, base.in_channels, 5, 5, generator=gen)
    return torch.randn(3, base.in_features, generator=gen)


CASES = [(v, n) for v in VARIANTS for n in LAYERS
         if not (n == LINEAR and "tucker" in v) and not (v.startswith("lokr") and n == CONV1 and "tucker" in v)]


@pytest.mark.parametrize("variant,name", CASES, ids=[f"{v}-{n.rsplit('.', 1)[1]}" for v, n in CASES])
def test_neutral_module_computes_what_the_lycoris_forward_computes(variant, name):
    base, module = lycoris_layer(variant, name)
    neutral = lycoris_module(name, parts_of(module), None, folded=[])
    x = layer_input(base)
    with torch.no_grad():
        expected = module(x).numpy()
    with torch.no_grad():
        got = run_layer(base, effective_weight(neutral, base), x).numpy()
    assert neutral.weight_shape == tuple(base.weight.shape)
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-4 * float(np.abs(expected).max()))


@pytest.mark.parametrize("variant", ["locon", "loha", "lokr", "lora-dora-out"])
def test_scale_is_alpha_over_rank_read_from_the_stored_alpha(variant):
    base, module = lycoris_layer(variant, LINEAR)
    neutral = lycoris_module(LINEAR, parts_of(module), None, folded=[])
    assert neutral.alpha == 3.0 and neutral.alpha_source == "stored"
    assert neutral.scale == pytest.approx(module.scale)


def test_rs_lora_stores_alpha_times_sqrt_rank_so_alpha_over_rank_is_its_scale():
    base, module = lycoris_layer("loha-rs_lora", LINEAR)
    neutral = lycoris_module(LINEAR, parts_of(module), None, folded=[])
    assert neutral.alpha == pytest.approx(3.0 * np.sqrt(2))
    assert neutral.scale == pytest.approx(3.0 / np.sqrt(2)) == pytest.approx(module.scale)


@pytest.mark.parametrize("variant", ["loha", "lokr"])
def test_lycoris_get_diff_weight_applies_the_loha_lokr_scale_twice(variant):
    """lycoris 4.1.3's get_diff_weight (used by merge_to) = scale * forward delta; we follow the forward."""
    base, module = lycoris_layer(variant, LINEAR)
    neutral = lycoris_module(LINEAR, parts_of(module), None, folded=[])
    with torch.no_grad():
        forward_delta = module.get_weight(tuple(base.weight.shape)).numpy()
        merge_delta = module.get_diff_weight()[0].numpy()
    np.testing.assert_allclose(neutral.delta_weight(), forward_delta, rtol=1e-5, atol=1e-6)
    assert module.scale == 1.5
    np.testing.assert_allclose(merge_delta, module.scale * forward_delta, rtol=1e-5, atol=1e-6)


def test_locon_get_diff_weight_applies_the_scale_once():
    base, module = lycoris_layer("locon", CONV3)
    neutral = lycoris_module(CONV3, parts_of(module), None, folded=[])
    with torch.no_grad():
        np.testing.assert_allclose(neutral.delta_weight(), module.get_diff_weight()[0].numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant,axis,shape", [("lora-dora-out", "out", (24, 1, 1, 1)), ("lora-dora-in", "in", (1, 16, 1, 1))])
def test_dora_axis_is_read_from_the_magnitude_shape(variant, axis, shape):
    _, module = lycoris_layer(variant, CONV3)
    neutral = lycoris_module(CONV3, parts_of(module), None, folded=[])
    assert neutral.dora_axis == axis and neutral.tensors["dora_scale"].shape == shape


def test_flattened_conv_factors_get_their_kernel_axes_back_and_lose_them_again_on_write():
    _, module = lycoris_layer("loha", CONV3)
    parts = parts_of(module)
    assert parts["hada_w1_b"].shape == (2, 16 * 9)  # how LyCORIS stores a non-Tucker conv factor
    neutral = lycoris_module(CONV3, parts, None, folded=[])
    assert neutral.tensors["hada_w1_b"].shape == (2, 16, 3, 3)
    written = lycoris_tensors(neutral)
    assert all(written[k].same_as(parts[k]) for k in parts)


def test_tucker_locon_is_folded_into_lora_down_and_reported():
    _, module = lycoris_layer("locon-tucker", CONV3)
    folded: list[str] = []
    neutral = lycoris_module(CONV3, parts_of(module), None, folded=folded)
    assert folded == [CONV3]
    assert neutral.kind == "lora" and neutral.tensors["lora_A.weight"].shape == (2, 16, 3, 3)
