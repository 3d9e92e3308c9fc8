"""Byte-identical output pins: every writer, on fixed seeded models, writes files with these exact sha256s.

Why: refactors of the writers (one core for every architecture, issue 11) must not change one byte of
what users get. Each case writes a seeded fixture model (tests/fixtures/core.py ``make_lora_model``, a
LoHa + LoKr model, DoRA per output row and per input column where the format holds it) twice, into two
different directories, and checks both writes hash alike (the output is deterministic) and match the
pinned table below (the output is unchanged).

What the test controls, because it is not the writer's content:

* the neutral manifest's ``provenance.created`` comes from ``lorabridge.manifest.now_utc()`` (the clock):
  it is patched to a fixed instant;
* its ``provenance.converter`` names ``lorabridge.__version__`` (as ``lorabridge.manifest`` imported it):
  patched to a fixed string, so a version bump alone needs no re-pin;
* the torch-pickle ``.ckpt`` (legacy-diffusers) holds bytes torch's own ``torch.save`` chooses: it is
  compared only under the torch version it was pinned with (:data:`TORCH_PINNED`), else skipped with
  that reason.

Nothing else is normalised: output paths, temporary names and file names do not reach the bytes (the
two writes go to different directories).

Re-pinning: run ``PYTHONPATH=. python tests/test_output_pins.py``; it prints a new ``PINS`` table (and
``TORCH_PINNED``) to paste over the one below. A re-pin changes what users get byte for byte: it must
be a deliberate change, in its own commit, reviewed, saying which formats changed and why.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from lorabridge import manifest
from lorabridge.converters.registry import get_format
from lorabridge.formats.contract import WriteOptions
from lorabridge.model import LoraModel, LoraModule
from lorabridge.tensor import Tensor
from tests.fixtures.core import make_lora_model, make_lora_module

FIXED_CREATED = "2000-01-01T00:00:00Z"
FIXED_VERSION = "0.0.0-pinned"
ATTN = "unet.down_blocks.1.attentions.0.transformer_blocks.0"


def _random(rng: np.random.Generator, shape: tuple) -> Tensor:
    return Tensor.from_numpy(rng.standard_normal(shape).astype("f4"))


def lycoris_model() -> LoraModel:
    """One LoHa and one LoKr module, seeded."""
    rng = np.random.default_rng(1)
    model = LoraModel(provenance={"source_format": "test"})
    model.add(LoraModule(f"{ATTN}.attn1.to_q", "loha", {role: _random(rng, shape) for role, shape in [
        ("hada_w1_a", (64, 2)), ("hada_w1_b", (2, 64)), ("hada_w2_a", (64, 2)), ("hada_w2_b", (2, 64))]}, alpha=2.0))
    model.add(LoraModule(f"{ATTN}.attn1.to_k", "lokr", {role: _random(rng, shape) for role, shape in [
        ("lokr_w1", (8, 8)), ("lokr_w2_a", (8, 2)), ("lokr_w2_b", (2, 8))]}, alpha=2.0))
    return model


def dora_model(axis: str) -> LoraModel:
    """One DoRA module (64 in, 32 out, rank 2), magnitudes per output row ("out") or input column ("in")."""
    rng = np.random.default_rng(2)
    module = make_lora_module(f"{ATTN}.attn2.to_v", (64, 32), 2, 2.0, rng)
    shape = (32, 1) if axis == "out" else (1, 64)
    module.tensors["dora_scale"] = Tensor.from_numpy(np.abs(rng.standard_normal(shape)).astype("f4"))
    module.dora_axis = axis
    model = LoraModel(provenance={"source_format": "test"})
    model.add(module)
    return model


MODELS: dict[str, Callable[[], LoraModel]] = {
    "lora": make_lora_model,
    "lora-f16": lambda: make_lora_model(dtype="F16"),
    "loha+lokr": lycoris_model,
    "dora-out": lambda: dora_model("out"),
    "dora-in": lambda: dora_model("in"),
}

# case id -> (format, model, output name, write options)
CASES: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    "neutral/lora": ("neutral", "lora", "out.safetensors", {}),
    "neutral/lora-f16": ("neutral", "lora-f16", "out.safetensors", {}),
    "neutral/loha+lokr": ("neutral", "loha+lokr", "out.safetensors", {}),
    "neutral/dora-out": ("neutral", "dora-out", "out.safetensors", {}),
    "neutral/dora-in": ("neutral", "dora-in", "out.safetensors", {}),
    "diffusers/lora": ("diffusers", "lora", "out.safetensors", {}),
    "diffusers/lora-fp16": ("diffusers", "lora", "out.safetensors", {"dtype": "fp16"}),
    "diffusers/dora-out": ("diffusers", "dora-out", "out.safetensors", {}),
    "peft/lora": ("peft", "lora", "out", {}),
    "peft/dora-out": ("peft", "dora-out", "out", {}),
    "kohya/lora": ("kohya", "lora", "out.safetensors", {}),
    "kohya/lora-bf16": ("kohya", "lora", "out.safetensors", {"dtype": "bf16"}),
    "kohya/dora-out": ("kohya", "dora-out", "out.safetensors", {}),
    "kohya/dora-in": ("kohya", "dora-in", "out.safetensors", {}),
    "legacy-diffusers/lora.safetensors": ("legacy-diffusers", "lora", "out.safetensors", {}),
    "legacy-diffusers/lora.ckpt": ("legacy-diffusers", "lora", "out.ckpt", {}),
    "lycoris/lora": ("lycoris", "lora", "out.safetensors", {}),
    "lycoris/loha+lokr": ("lycoris", "loha+lokr", "out.safetensors", {}),
    "lycoris/dora-out": ("lycoris", "dora-out", "out.safetensors", {}),
    "lycoris/dora-in": ("lycoris", "dora-in", "out.safetensors", {}),
    "mindone-sgm/lora.ckpt": ("mindone-sgm", "lora", "out.ckpt", {}),
    "mindone-sgm/lora.ckpt-crc": ("mindone-sgm", "lora", "out.ckpt", {"crc": True}),
    "mindone-sgm/lora.safetensors": ("mindone-sgm", "lora", "out.safetensors", {}),
    "mindone-sgm/lora.safetensors-crc": ("mindone-sgm", "lora", "out.safetensors", {"crc": True}),
    "mindone-sgm/lora.ckpt-no-fold-alpha": ("mindone-sgm", "lora", "out.ckpt", {"fold_alpha": False}),
    "mindone-diffusers/lora.ckpt": ("mindone-diffusers", "lora", "out.ckpt", {}),
    "mindone-diffusers/lora.safetensors": ("mindone-diffusers", "lora", "out.safetensors", {}),
    "mindone-kohya/lora.ckpt": ("mindone-kohya", "lora", "out.ckpt", {}),
    "mindone-kohya/lora.safetensors": ("mindone-kohya", "lora", "out.safetensors", {}),
}

# The torch version the torch-pickle pins were recorded with (torch.save's bytes are torch's, not ours).
TORCH_PINNED = "2.13.0+cpu"
TORCH_PICKLE_CASES = frozenset({"legacy-diffusers/lora.ckpt"})

# case id -> {file (relative to the output; "." for a single file): sha256}. Re-pin only as the docstring says.
PINS: dict[str, dict[str, str]] = {
    "neutral/lora": {
        ".": "35f29160143a93a43ecd89aeec78f840266b9d3227a4c746e2c4d71b72fbc34e"},
    "neutral/lora-f16": {
        ".": "3f600e4eb2d4f3a800a65d251e18568697c06bb4c85e108b5e69772c1eebe1e6"},
    "neutral/loha+lokr": {
        ".": "a8a8c06a6ebca38c2c90430bfd4b2ad44b4576f3be7804c78d16a7ad7c6d1107"},
    "neutral/dora-out": {
        ".": "a90fa9427d225ebca718999affc9f33b7ce3378c6fcef3047bb382d106652c21"},
    "neutral/dora-in": {
        ".": "5f37ea0a4efdbc2c64e045b939c49cf9ef2b735dfb426aeb56946cc2b2ab5f77"},
    "diffusers/lora": {
        ".": "9cddaddb6a941a994e43545d19aaa22d2e7cea3d9ae37b72e1c5eeb96e1d46ab"},
    "diffusers/lora-fp16": {
        ".": "0615cfbcdc14a99643ddf0d2a233fa46967d2dbdda50fc2d679ad04e0e362ae6"},
    "diffusers/dora-out": {
        ".": "24c8feff6dbd936f7950ed656962b7a400fbb49f23bba63d07d936e619a16bad"},
    "peft/lora": {
        "text_encoder/adapter_config.json": "52f4add517b5c5d32ffcd233bf8df245d0a5613b08bc9f9877ecd20ee13e79fb",
        "text_encoder/adapter_model.safetensors": "740cd0ef98fd9b23fca0011573d0062389d9767a61cc548d91163b97354bcf2b",
        "text_encoder_2/adapter_config.json": "89d97e80621925bfd251f91791a1fed2675a67192010f9226b727310d31763b3",
        "text_encoder_2/adapter_model.safetensors": "b3df6194f3402171a04d658014456f9414ff95dc1d20112568ed42f14731d3ec",
        "unet/adapter_config.json": "c95f6ae217180f4c53861245f1316034ba0dedb029115b156c48d6541add451c",
        "unet/adapter_model.safetensors": "d5d55571520f405a66aee388f39960d9833ef09bff092a11bcd7f24a78a2a48a"},
    "peft/dora-out": {
        "unet/adapter_config.json": "7199aa28843a1f511b6f2159ce4625211448a345dfef495b6eda32fd5a73ade4",
        "unet/adapter_model.safetensors": "ba6d6462a66ccb7d9e630e2db6f520c57d2938cf00b1c7209d755adea505ed2c"},
    "kohya/lora": {
        ".": "5ece7cc917d0a2ba14cb5ce22c678d23c825ee6c36f2bd0bdadaddb35c313916"},
    "kohya/lora-bf16": {
        ".": "ad9bd446805f91c5e6048aaa0cf590c59f2bea591c4d528fe9649249d3503952"},
    "kohya/dora-out": {
        ".": "a805f2ef7f512320f197094da4991f6ba84fa3b9c138edca7f32be309f349765"},
    "kohya/dora-in": {
        ".": "f0662163b8c25f94a9ceb5c3afb98d8b0ef1320321ebc94c1d48c92d6a7b2d63"},
    "legacy-diffusers/lora.safetensors": {
        ".": "17c39662cd494f9c21c86ea7aa5363addd93b3a6650f38808d6ccf4674848d54"},
    "legacy-diffusers/lora.ckpt": {
        ".": "bf243cee627cd0cf98aa982b6f103eb445dbf08af18edbae51bb2910479e9ac7"},
    "lycoris/lora": {
        ".": "509e956a5026b1f1beb066dd674cd6eacbd1a06d70e3b5fffd5fad1d4a2bc70c"},
    "lycoris/loha+lokr": {
        ".": "f18096d0ed5894239eda2d3aa30676d0a47a96eeafeadeee5956327aaff595c7"},
    "lycoris/dora-out": {
        ".": "dc2846e17b79be468012ddd17e461ea4183bd8f583e9fc9249db85f711eadfe0"},
    "lycoris/dora-in": {
        ".": "56096a8606ff5b5ea4381a5e8eeba76e9020ecc92ae4eb8b546d3cd9945f8d7d"},
    "mindone-sgm/lora.ckpt": {
        ".": "89c19a6bb5e7a629740e17f9279d2aca9918362062f1d99f91df28c30673d338"},
    "mindone-sgm/lora.ckpt-crc": {
        ".": "f918bd84e6e47967ab51d3925b766cb60b014c7ea7365357f2f0de5c4c1b0603"},
    "mindone-sgm/lora.safetensors": {
        ".": "fa60ae618ea8ae89056a0b3ecb52611faac5ea4242796c41878651e0ab02165c"},
    "mindone-sgm/lora.safetensors-crc": {
        ".": "495ba12f9f5b6690fedc6e9290c1069571b78840cfccdc17f0f65f91bcec4912"},
    "mindone-sgm/lora.ckpt-no-fold-alpha": {
        ".": "84d1e78402dabb7b18fcd4cc421208330803ab0d56575f5150c393baf0c6214c"},
    "mindone-diffusers/lora.ckpt": {
        ".": "cdd6310f51607af7c7794308665a85ee93928d9110863a33fffb618a1b0c4993"},
    "mindone-diffusers/lora.safetensors": {
        ".": "269cff5f73298e245488567e49c7306c945d919599cce0c6e1462dfe338ae491"},
    "mindone-kohya/lora.ckpt": {
        ".": "08fc4632ccaf016add5106c375b85d0f657a3ac5fd2fc149f4db6a3210ee0cb4"},
    "mindone-kohya/lora.safetensors": {
        ".": "e48af9784be05beefd76a768b9b34d949eb6ff6d4568cb5d44475bc835824c87"},
}


def write_case(case: str, directory: Path) -> dict[str, str]:
    """Write ``case`` into ``directory`` (clock and version fixed) and return the sha256 of each output file."""
    fmt, model, name, options = CASES[case]
    directory.mkdir(parents=True)
    out = directory / name
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        patch.setattr(manifest, "now_utc", lambda: FIXED_CREATED)
        patch.setattr(manifest, "__version__", FIXED_VERSION)
        warnings.simplefilter("ignore")  # notes about folded alpha, DoRA axes...: not what is pinned here
        get_format(fmt).write(MODELS[model](), out, WriteOptions(**options))
    files = sorted(p for p in out.rglob("*") if p.is_file()) if out.is_dir() else [out]
    return {(p.relative_to(out).as_posix() if out.is_dir() else "."): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


@pytest.mark.parametrize("case", list(CASES))
def test_writer_output_is_deterministic_and_byte_identical_to_its_pin(case, tmp_path):
    if case in TORCH_PICKLE_CASES:
        torch = pytest.importorskip("torch")
        if torch.__version__ != TORCH_PINNED:
            pytest.skip(f"pinned under torch {TORCH_PINNED}, this is torch {torch.__version__}: torch.save's bytes differ")
    first = write_case(case, tmp_path / "first")
    second = write_case(case, tmp_path / "second")
    assert first == second, f"{case}: two writes of the same model differ"
    assert first == PINS[case], f"{case}: output bytes changed (see this module's docstring on re-pinning)"


def test_every_case_is_pinned_and_every_pin_is_a_case():
    assert PINS.keys() == CASES.keys()


if __name__ == "__main__":  # print a fresh PINS table (see the module docstring)
    import tempfile

    import torch

    print(f'TORCH_PINNED = "{torch.__version__}"')
    print("PINS: dict[str, dict[str, str]] = {")
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            digests = write_case(case, Path(tmp) / case.replace("/", "_"))
            print(f'    "{case}": {{' + ",".join(f'\n        "{file}": "{sha}"' for file, sha in digests.items()) + "},")
    print("}")
