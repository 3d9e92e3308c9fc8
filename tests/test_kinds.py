"""The KINDS table (lorabridge.kinds), specified: per kind its roles, rank, adapted weight shape,
delta W, shape rules and bake SVD on small random tensors; the DoRA magnitude's shapes and axes;
and the refusal of an unknown kind.

Every expected delta W is written here from the formulas, with einsum over named axes, never
with the functions of :mod:`lorabridge.deltas` (nor ``np.kron``), so the two agree only when both are right.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import numpy as np
import pytest

from lorabridge.kinds import (ALL_ROLES, DORA_AXES, DORA_ROLE, KINDS, AlphaSource, DoraAxis, KindName, dora_axis_of,
                              dora_findings, dora_shape, kinds_of)
from lorabridge.model import LoraModule
from lorabridge import rules
from lorabridge.rules import ALPHA_ORIGINS, module_findings
from lorabridge.tensor import Tensor

RNG = np.random.default_rng(11)
SCHEMA = Path(__file__).resolve().parent.parent / "schemas" / "neutral-lora-v1.schema.json"


def arrays(**shapes: tuple[int, ...]) -> dict[str, np.ndarray]:
    return {role: RNG.standard_normal(shape).astype(np.float32) for role, shape in shapes.items()}


def lora_conv(a, b):  # B (o, r, 1, 1) @ A (r, i, kh, kw)
    return np.einsum("or,rikl->oikl", b[:, :, 0, 0], a)


def tucker(t, a, b):  # core t (p, q, kh, kw), a (p, out), b (q, in) -> (out, in, kh, kw)
    return np.einsum("pqkl,po,qi->oikl", t, a, b)


def kron(x, y):  # the Kronecker product written out: (i, a) x (j, b) -> (i*a, j*b)[, kh, kw]
    if y.ndim == 4:
        return np.einsum("ij,abkl->iajbkl", x, y).reshape(x.shape[0] * y.shape[0], x.shape[1] * y.shape[1], *y.shape[2:])
    return np.einsum("ij,ab->iajb", x, y).reshape(x.shape[0] * y.shape[0], x.shape[1] * y.shape[1])


# id -> (kind, tensors, rank, weight shape, unscaled delta W written independently)
def _cases():
    r = 3
    x = arrays(**{"lora_A.weight": (r, 5), "lora_B.weight": (4, r)})
    yield "lora-linear", "lora", x, r, (4, 5), x["lora_B.weight"] @ x["lora_A.weight"]
    x = arrays(**{"lora_A.weight": (r, 5, 3, 3), "lora_B.weight": (4, r, 1, 1)})
    yield "lora-conv", "lora", x, r, (4, 5, 3, 3), lora_conv(x["lora_A.weight"], x["lora_B.weight"])
    x = arrays(hada_w1_a=(4, r), hada_w1_b=(r, 5), hada_w2_a=(4, r), hada_w2_b=(r, 5))
    yield "loha-linear", "loha", x, r, (4, 5), (x["hada_w1_a"] @ x["hada_w1_b"]) * (x["hada_w2_a"] @ x["hada_w2_b"])
    x = arrays(hada_w1_a=(4, r), hada_w1_b=(r, 5, 3, 3), hada_w2_a=(4, r), hada_w2_b=(r, 5, 3, 3))
    yield ("loha-conv", "loha", x, r, (4, 5, 3, 3),
           np.einsum("or,rikl->oikl", x["hada_w1_a"], x["hada_w1_b"]) * np.einsum("or,rikl->oikl", x["hada_w2_a"], x["hada_w2_b"]))
    x = arrays(hada_w1_a=(r, 4), hada_w1_b=(r, 5), hada_w2_a=(r, 4), hada_w2_b=(r, 5), hada_t1=(r, r, 3, 3), hada_t2=(r, r, 3, 3))
    yield ("loha-tucker", "loha", x, r, (4, 5, 3, 3),
           tucker(x["hada_t1"], x["hada_w1_a"], x["hada_w1_b"]) * tucker(x["hada_t2"], x["hada_w2_a"], x["hada_w2_b"]))
    x = arrays(lokr_w1=(2, 3), lokr_w2=(4, 5))
    yield "lokr-whole", "lokr", x, 0, (8, 15), kron(x["lokr_w1"], x["lokr_w2"])
    x = arrays(lokr_w1_a=(2, r), lokr_w1_b=(r, 3), lokr_w2_a=(4, r), lokr_w2_b=(r, 5))
    yield ("lokr-decomposed", "lokr", x, r, (8, 15),
           kron(x["lokr_w1_a"] @ x["lokr_w1_b"], x["lokr_w2_a"] @ x["lokr_w2_b"]))
    x = arrays(lokr_w1_a=(2, r), lokr_w1_b=(r, 3), lokr_w2=(4, 5))
    yield "lokr-w1-decomposed", "lokr", x, r, (8, 15), kron(x["lokr_w1_a"] @ x["lokr_w1_b"], x["lokr_w2"])
    x = arrays(lokr_w1=(2, 3), lokr_w2_a=(4, r), lokr_w2_b=(r, 5, 3, 3))
    yield "lokr-conv", "lokr", x, r, (8, 15, 3, 3), kron(x["lokr_w1"], np.einsum("ar,rbkl->abkl", x["lokr_w2_a"], x["lokr_w2_b"]))
    x = arrays(lokr_w1=(2, 3), lokr_w2_a=(r, 4), lokr_w2_b=(r, 5), lokr_t2=(r, r, 3, 3))
    yield ("lokr-tucker", "lokr", x, r, (8, 15, 3, 3),
           kron(x["lokr_w1"], tucker(x["lokr_t2"], x["lokr_w2_a"], x["lokr_w2_b"])))
    x = arrays(diff=(4, 5), diff_b=(4,))
    yield "full-linear", "full", x, 0, (4, 5), x["diff"]
    x = arrays(diff=(4, 5, 3, 3))
    yield "full-conv", "full", x, 0, (4, 5, 3, 3), x["diff"]


CASES = {case[0]: case[1:] for case in _cases()}
FACTORED = {"lora-linear", "lora-conv", "loha-linear", "loha-conv", "lokr-whole", "lokr-decomposed", "lokr-w1-decomposed", "lokr-conv"}


def tensors_of(x: dict[str, np.ndarray]) -> dict[str, Tensor]:
    return {role: Tensor.from_numpy(a) for role, a in x.items()}


@pytest.mark.parametrize("case", CASES)
def test_rank_shape_and_delta_of_each_kind(case):
    name, x, rank, shape, unscaled = CASES[case]
    kind, t = KINDS[name], tensors_of(x)
    assert set(x) <= set(kind.roles) and set(kind.required) <= set(x)
    assert kind.rank(t) == rank
    assert kind.weight_shape(t) == shape == unscaled.shape
    assert kind.shape_findings({role: a.shape for role, a in x.items()}) == []
    scale = 1.0 if name == "full" else 0.75  # a full delta has no scale: alpha means nothing for it
    delta = kind.delta(t, 0.75)
    assert delta.dtype == np.float32
    np.testing.assert_allclose(delta, scale * unscaled, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_module_delegates_to_its_kind(case):
    name, x, rank, shape, unscaled = CASES[case]
    module = LoraModule("unet.conv_in", name, tensors_of(x), alpha=6.0)
    assert (module.rank, module.weight_shape, module.in_features, module.out_features) == (rank, shape, shape[1], shape[0])
    assert module.kernel_size == (shape[2:] or None)
    np.testing.assert_allclose(module.delta_weight(), (6.0 / rank if rank else 1.0) * unscaled, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_bake_svd_is_the_unscaled_delta_or_none(case):
    name, x, _, shape, unscaled = CASES[case]
    svd = KINDS[name].svd(tensors_of(x), keep=1000)
    if case not in FACTORED:  # Tucker and full deltas: bake takes the dense SVD of delta W
        assert svd is None
        return
    u, s, vt = svd
    assert np.all(np.diff(s) <= 1e-9) and np.all(s >= -1e-12)
    np.testing.assert_allclose((u * s) @ vt, unscaled.reshape(shape[0], -1), rtol=1e-4, atol=1e-4)


def test_roles_prefixes_and_the_dora_magnitude():
    assert {name: (kind.required, kind.optional) for name, kind in KINDS.items()} == {
        "lora": (("lora_A.weight", "lora_B.weight"), ("dora_scale",)),
        "loha": (("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), ("hada_t1", "hada_t2", "dora_scale")),
        "lokr": ((), ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "dora_scale")),
        "full": (("diff",), ("diff_b",)),
    }
    for name, kind in KINDS.items():
        assert kind.name == name
        assert all(role.startswith(kind.prefix) for role in kind.roles if role != DORA_ROLE)
        assert kinds_of(list(kind.roles)) == {name}
    assert sorted(ALL_ROLES) == sorted({role for kind in KINDS.values() for role in kind.roles})
    assert [len(role) for role in ALL_ROLES] == sorted((len(role) for role in ALL_ROLES), reverse=True)
    assert kinds_of(["lora_mid.weight", "hada_w1_a"]) == {"lora", "loha"} and kinds_of([DORA_ROLE]) == set()


def test_literals_agree_with_the_table_and_the_schema():
    module = json.loads(SCHEMA.read_text("utf-8"))["$defs"]["module"]["properties"]
    assert get_args(KindName) == tuple(KINDS) == tuple(module["kind"]["enum"])
    assert get_args(AlphaSource) == tuple(ALPHA_ORIGINS) == tuple(module["alpha_source"]["enum"])
    assert get_args(DoraAxis) == DORA_AXES


@pytest.mark.parametrize("name, shapes, finding", [
    ("lora", {"lora_A.weight": (4, 8), "lora_B.weight": (16, 3)},
     ("rank-mismatch", "lora_B.weight", "rank mismatch, lora_A is [4, 8] but lora_B is [16, 3]")),
    ("lora", {"lora_A.weight": (4, 8, 3, 3), "lora_B.weight": (16, 4, 3, 3)},
     ("shape", "lora_B.weight", "shapes lora_A [4, 8, 3, 3] / lora_B [16, 4, 3, 3] are neither a linear LoRA nor a conv LoRA "
                                "(conv lora_B is (out, rank, 1, 1))")),
    ("loha", {"hada_w1_a": (4, 2), "hada_w1_b": (2, 5), "hada_w2_a": (4, 2), "hada_w2_b": (2, 6)},
     ("shape", "hada_w2_a", "the Hadamard factors differ in shape: w1 is [4, 5], w2 is [4, 6]")),
    ("loha", {"hada_w1_a": (2, 4), "hada_w1_b": (2, 5), "hada_w2_a": (2, 4), "hada_w2_b": (2, 5), "hada_t1": (2, 2, 3, 3)},
     ("missing-tensor", "hada_t2", "a Tucker LoHa needs both hada_t1 and hada_t2")),
    ("lokr", {"lokr_w1": (2, 3), "lokr_w1_a": (2, 1), "lokr_w2": (4, 5)},
     ("roles", "lokr_w1_a", "lokr_w1 is stored both whole and decomposed")),
    ("lokr", {"lokr_w1": (2, 3), "lokr_w2_b": (1, 5)}, ("missing-tensor", "lokr_w2_a", "missing")),
    ("lokr", {"lokr_w1": (2, 3), "lokr_w2": (4, 5), "lokr_t2": (1, 1, 3, 3)},
     ("roles", "lokr_t2", "a Tucker lokr_t2 needs a decomposed w2 (lokr_w2_a, lokr_w2_b), not lokr_w2")),
    ("full", {"diff": (320,)},
     ("shape", "diff", "diff is [320]: a full delta is kept for a Linear (out, in) or Conv2d (out, in, kh, kw) weight only")),
    ("full", {"diff": (4, 5), "diff_b": (5,)}, ("shape", "diff_b", "diff_b is [5], the bias of a [4, 5] weight is [4]")),
])
def test_shape_rules_of_each_kind(name, shapes, finding):
    assert KINDS[name].shape_findings(shapes) == [finding]


@pytest.mark.parametrize("weight", [(16, 8), (16, 8, 3, 3)])
def test_dora_magnitude_shapes_and_axes(weight):
    kernel = (1,) * (len(weight) - 2)
    assert dora_shape("out", weight) == (16, 1, *kernel) and dora_shape("in", weight) == (1, 8, *kernel)
    for axis in DORA_AXES:
        assert dora_axis_of(dora_shape(axis, weight), weight) == axis
        assert dora_findings(axis, Tensor.from_numpy(np.ones(dora_shape(axis, weight), "f4")), weight) == []
    assert dora_axis_of((16,), weight) == "out" and dora_axis_of((8,), weight) is None and dora_axis_of((), weight) is None
    swapped = Tensor.from_numpy(np.ones(dora_shape("in", weight), "f4"))
    assert dora_findings("out", swapped, weight) == [
        ("dora", "dora_scale", f"DoRA magnitude is {list(dora_shape('in', weight))}, dora_axis 'out' on a {list(weight)} "
                               f"weight needs {list(dora_shape('out', weight))} (that is the in axis' shape)")]
    assert dora_findings(None, swapped, weight) == [("dora", "dora_scale", "a DoRA magnitude needs dora_axis 'out' or 'in'")]
    assert dora_findings("in", Tensor.from_numpy(np.ones((3,), "f4")), weight) == [
        ("dora", "dora_scale", "DoRA magnitude has 3 values, expected 8 (axis in)")]


def test_an_unknown_kind_is_refused_clearly():
    message = r"unknown LoRA kind 'oft' \(lorabridge knows lora, loha, lokr, full\)"
    with pytest.raises(ValueError, match=message):
        KINDS["oft"]
    module = LoraModule("unet.conv_in", "oft", {"oft_blocks": Tensor.from_numpy(np.ones((2, 2), "f4"))}, 1.0)  # type: ignore[arg-type]
    for use in (lambda: module.rank, lambda: module.weight_shape, module.delta_weight):
        with pytest.raises(ValueError, match=message):
            use()


def test_module_findings_are_worked_out_once_per_signature_and_follow_every_part_of_it(monkeypatch):
    """A LoRA's modules share a few shape signatures: findings are remembered by kind, roles and shapes in
    order, DoRA axis and alpha, never by name or data, and any change to one of those is seen."""
    worked_out = []
    real = rules._worked_out_findings
    monkeypatch.setattr(rules, "_worked_out_findings", lambda m: worked_out.append(m.name) or real(m))
    monkeypatch.setattr(rules, "_findings_by_signature", {})

    def lora(name, a=(4, 8), b=(16, 3), alpha=4.0, dora_axis=None, **more):
        tensors = {"lora_A.weight": Tensor.from_numpy(RNG.standard_normal(a).astype(np.float32)),
                   "lora_B.weight": Tensor.from_numpy(RNG.standard_normal(b).astype(np.float32))}
        tensors.update({role: Tensor.from_numpy(np.ones(shape, "f4")) for role, shape in more.items()})
        return LoraModule(name, "lora", tensors, alpha, dora_axis=dora_axis)

    mismatch = [("rank-mismatch", "lora_B.weight", "rank mismatch, lora_A is [4, 8] but lora_B is [16, 3]")]
    assert module_findings(lora("unet.one")) == mismatch
    assert module_findings(lora("unet.two")) == mismatch and worked_out == ["unet.one"]  # other name and data
    assert module_findings(lora("unet.fits", b=(16, 4))) == []
    assert module_findings(lora("unet.nan", b=(16, 4), alpha=float("inf")))[0][:2] == ("schema", "alpha")
    assert module_findings(lora("unet.axis", b=(16, 4), dora_axis="out")) == [
        ("dora", "dora_axis", "set, but the module has no DoRA magnitude")]
    assert module_findings(lora("unet.dora", b=(16, 4), dora_axis="in", dora_scale=(16, 1))) == [
        ("dora", "dora_scale", "DoRA magnitude is [16, 1], dora_axis 'in' on a [16, 8] weight needs [1, 8] "
                               "(that is the out axis' shape)")]
    reordered = lora("unet.reordered", a=(4, 0), b=(0, 4))
    reordered.tensors = dict(reversed(reordered.tensors.items()))
    assert [role for _, role, _ in module_findings(reordered)] == ["lora_B.weight", "lora_A.weight"]
    assert len(worked_out) == 6
