"""merge: exact concatenation with per-module alphas folded (checked against PEFT's add_weighted_adapter
"cat"), --rank by truncated SVD (no worse than PEFT's "svd"), and the refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lorabridge.errors import LoraBridgeError
from lorabridge.formats.neutral import write_neutral
from lorabridge.model import LoraModel, LoraModule
from lorabridge.tensor import Tensor
from lorabridge.toolbox.files import read_lora
from lorabridge.toolbox.merge import merge_models
from tests.fixtures.core import make_lora_model
from tests.test_bake import LINEAR, eckart_young, loha, random_module


def model_of(*modules: LoraModule, architecture: str | None = None) -> LoraModel:
    model = LoraModel({m.name: m for m in modules})
    if architecture:
        model.architecture = architecture
    return model


def lora(name=LINEAR, rank=4, out=24, inp=20, alpha=8.0, seed=0, kernel=(), dtype="F32") -> LoraModule:
    b_shape = (out, rank, 1, 1) if kernel else (out, rank)
    return random_module(name, "lora", {"lora_A.weight": (rank, inp, *kernel), "lora_B.weight": b_shape},
                         alpha=alpha, seed=seed, dtype=dtype)


@pytest.mark.parametrize("kernel", [(), (3, 3)], ids=["linear", "conv"])
def test_exact_merge_is_the_weighted_sum_with_each_inputs_alpha(kernel):
    a, b = lora(rank=4, alpha=8.0, seed=1, kernel=kernel), lora(rank=3, alpha=-1.5, seed=2, kernel=kernel)
    merged, errors = merge_models([model_of(a), model_of(b)], [0.75, -2.0])
    module = merged.modules[a.name]
    expected = 0.75 * a.delta_weight() - 2.0 * b.delta_weight()
    assert module.kind == "lora" and module.rank == 7 and module.alpha == 7.0
    np.testing.assert_allclose(module.delta_weight(), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert errors[0].relative_error < 1e-6 and errors[0].rank_after == 7


def test_modules_in_only_some_inputs_are_kept_at_their_weight():
    only_a, shared_a, shared_b = lora("unet.x", seed=1), lora("unet.y", seed=2), lora("unet.y", seed=3, rank=2)
    only_b = lora("text_encoder.z", seed=4, rank=5, alpha=1.0)
    merged, _ = merge_models([model_of(only_a, shared_a), model_of(shared_b, only_b)], [0.5, -1.0])
    assert list(merged.modules) == ["unet.x", "unet.y", "text_encoder.z"]
    np.testing.assert_allclose(merged.modules["unet.x"].delta_weight(), 0.5 * only_a.delta_weight(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(merged.modules["text_encoder.z"].delta_weight(), -only_b.delta_weight(), rtol=1e-5, atol=1e-6)
    assert merged.modules["unet.y"].rank == 6 and merged.modules["text_encoder.z"].rank == 5


def test_a_loha_in_any_input_makes_the_layer_an_exact_full_delta():
    la, lb = loha(rank=2, out=24, inp=20), lora(seed=5)
    merged, errors = merge_models([model_of(la), model_of(lb)], [1.0, 0.5])
    module = merged.modules[LINEAR]
    assert module.kind == "full" and errors[0].relative_error < 1e-6
    np.testing.assert_allclose(module.delta_weight(), la.delta_weight() + 0.5 * lb.delta_weight(), rtol=1e-5, atol=1e-5)


def test_fp16_inputs_stay_fp16_and_the_one_rounding_is_reported():
    a, b = lora(seed=1, dtype="F16"), lora(seed=2, dtype="F16")
    merged, errors = merge_models([model_of(a), model_of(b)], [0.3, 0.7])
    assert {t.dtype for t in merged.modules[LINEAR].tensors.values()} == {"F16"}
    assert 0 < errors[0].relative_error < 2e-3


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_rank_merge_reaches_the_eckart_young_optimum_of_the_exact_sum(rank):
    a, b = lora(rank=4, seed=1), lora(rank=3, alpha=2.0, seed=2)
    merged, errors = merge_models([model_of(a), model_of(b)], [1.0, -0.5], rank=rank)
    exact = a.delta_weight() - 0.5 * b.delta_weight()
    assert merged.modules[LINEAR].rank == rank and merged.modules[LINEAR].alpha == rank
    assert errors[0].relative_error == pytest.approx(eckart_young(exact, rank), rel=1e-4, abs=1e-6)
    measured = np.linalg.norm(exact - merged.modules[LINEAR].delta_weight()) / np.linalg.norm(exact)
    assert errors[0].relative_error == pytest.approx(measured, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("models, weights, rank, message", [
    ([model_of(lora())] * 2, [1.0], None, "1 weight(s) for 2 input(s)"),
    ([model_of(lora())] * 2, [1.0, float("nan")], None, "weight 2 is nan"),
    ([model_of(lora())] * 2, [1.0, 1.0], 0, "--rank must be at least 1, got 0"),
    ([model_of(lora())] * 2, [1.0, 1.0], -3, "--rank must be at least 1"),
    ([model_of(lora()), model_of(lora(), architecture="flux.1-dev")], [1.0, 1.0], None,
     "the inputs are made for different architectures: a.safetensors is stable-diffusion-xl-v1-base, b.safetensors is flux.1-dev"),
    ([model_of(lora()), model_of(lora(out=12))], [1.0, 1.0], None, "has different weight shapes"),
    ([model_of(random_module(LINEAR, "lora", {"lora_A.weight": (2, 4), "lora_B.weight": (6, 2), "dora_scale": (6, 1)},
                             dora_axis="out")), model_of(lora())], [1.0, 1.0], None, "merging DoRA is not defined"),
])
def test_bad_merges_are_refused_in_one_line(models, weights, rank, message):
    with pytest.raises(LoraBridgeError) as caught:
        merge_models(models, weights, rank, ["a.safetensors", "b.safetensors"])
    assert message in caught.value.one_line() and "\n" not in caught.value.one_line()


def test_cli_merge_writes_reports_and_refuses_without_overwriting(tmp_path, run_cli):
    a, b, out = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "m.safetensors"
    write_neutral(make_lora_model(rank=4, seed=1), a)
    write_neutral(make_lora_model(rank=2, alpha=1.0, seed=2), b)
    result = run_cli("merge", a, b, "--weights", "1,-0.5", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["rank_after"] == 6 * 6 and report["overall_relative_error"] < 1e-6
    merged, _ = read_lora(out)
    ma, mb = read_lora(a)[0], read_lora(b)[0]
    for name, module in merged.modules.items():
        expected = ma.modules[name].delta_weight() - 0.5 * mb.modules[name].delta_weight()
        np.testing.assert_allclose(module.delta_weight(), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert [i["weight"] for i in merged.provenance["history"][-1]["inputs"]] == [1.0, -0.5]
    ranked = run_cli("merge", a, b, "--weights", "1,1", "--rank", "2", "-o", tmp_path / "r.safetensors")
    assert ranked.exit_code == 0 and "overall relative error" in ranked.output
    before = out.read_bytes()
    for args, message in [(["--weights", "1,1"], "output exists"), (["--weights", "1", "--force"], "1 weight(s) for 2 input(s)"),
                          (["--weights", "1,nan", "--force"], "every weight must be a finite number"),
                          (["--weights", "1,1", "--rank", "0", "--force"], "--rank must be at least 1")]:
        result = run_cli("merge", a, b, "-o", out, *args)
        assert result.exit_code != 0 and message in result.output, result.output
    assert out.read_bytes() == before
    assert "at least two inputs" in run_cli("merge", a, "--weights", "1", "-o", tmp_path / "one.safetensors").output


def test_peft_add_weighted_adapter_cat_and_svd_agree():
    """A tiny torch model with two PEFT adapters of different ranks and alphas on two layers:
    our exact merge is PEFT's "cat", and our --rank merge's error is no larger than PEFT's "svd"."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(20, 24), torch.nn.ReLU(), torch.nn.Linear(24, 16))
    model = peft.get_peft_model(net, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False),
                                adapter_name="first")
    model.add_adapter("second", peft.LoraConfig(r=3, lora_alpha=1.5, target_modules=["0", "2"], init_lora_weights=False))
    layers = {"0": model.base_model.model[0], "2": model.base_model.model[2]}

    def ours(adapter: str) -> LoraModel:
        modules = []
        for key, layer in layers.items():
            tensors = {"lora_A.weight": Tensor.from_numpy(layer.lora_A[adapter].weight.detach().numpy()),
                       "lora_B.weight": Tensor.from_numpy(layer.lora_B[adapter].weight.detach().numpy())}
            modules.append(LoraModule(f"unet.layer{key}", "lora", tensors, alpha=layer.scaling[adapter] * tensors["lora_A.weight"].shape[0]))
        return model_of(*modules)

    weights = [0.7, -0.4]
    model.add_weighted_adapter(["first", "second"], weights, "cat", combination_type="cat")
    model.add_weighted_adapter(["first", "second"], weights, "svd", combination_type="svd", svd_rank=2)
    exact, _ = merge_models([ours("first"), ours("second")], weights)
    ranked, errors = merge_models([ours("first"), ours("second")], weights, rank=2)
    for (key, layer), error in zip(layers.items(), errors):
        theirs = layer.get_delta_weight("cat").detach().numpy()
        np.testing.assert_allclose(exact.modules[f"unet.layer{key}"].delta_weight(), theirs, rtol=0, atol=1e-6)
        truth = sum(w * layer.get_delta_weight(name).detach().numpy().astype(np.float64) for w, name in zip(weights, ("first", "second")))
        peft_error = np.linalg.norm(truth - layer.get_delta_weight("svd").detach().numpy()) / np.linalg.norm(truth)
        assert error.relative_error <= peft_error + 1e-6
        assert error.relative_error == pytest.approx(eckart_young(truth.astype(np.float32), 2), rel=1e-4)
