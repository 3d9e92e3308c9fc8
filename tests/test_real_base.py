"""``make-base``: a real-size random base, every dimension of the reference model, written tensor by tensor.

The real SDXL (7 GB) and Flux.1 (34 GB) are built by ``make realsize`` only; here the reference models'
components are checked on the meta device (parameter counts of the published models) and the writer
runs on the tiny SDXL's components, loaded back by diffusers.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from lorabridge.architectures.architecture import Architecture
from lorabridge.architectures.real_base import build_base, random_state, random_tensor
from lorabridge.architectures.sdxl import SDXL
from lorabridge.errors import LoraBridgeError
from lorabridge.io.safetensors_file import SafetensorsFile

pytestmark = pytest.mark.torch


def _parameters(parts: dict) -> dict[str, int]:
    return {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items() if hasattr(part, "parameters")}


def test_sdxl_real_parts_have_sdxl_base_parameter_counts():
    assert _parameters(SDXL.real_parts()) == {"unet": 2_567_463_684, "text_encoder": 123_060_480,
                                              "text_encoder_2": 694_659_840, "vae": 83_653_863}


def test_flux_real_parts_have_flux_dev_parameter_counts():
    from lorabridge.architectures.flux1 import FLUX1

    counts = _parameters(FLUX1.real_parts())
    assert counts["transformer"] == 11_901_408_320 and counts["text_encoder"] == 123_060_480
    assert counts["text_encoder_2"] == 4_762_310_656 and counts["vae"] == 83_819_683


def test_random_state_shares_tied_values_and_refuses_persistent_buffers():
    import torch

    with torch.device("meta"):
        tied = torch.nn.Module()
        tied.a, tied.norm = torch.nn.Linear(4, 8), torch.nn.LayerNorm(8)
        tied.b = torch.nn.Linear(4, 8)
        tied.b.weight = tied.a.weight
    state = random_state(tied, seed=3)
    assert state["a.weight"].data == state["b.weight"].data != random_tensor("a.weight", (8, 4), (4, 0)).data
    assert set(np.frombuffer(state["norm.weight"].data, np.float16)) == {1.0}
    assert set(np.frombuffer(state["a.bias"].data, np.float16)) == {0.0}
    assert np.abs(np.frombuffer(state["a.weight"].data, np.float16)).max() <= 0.5  # 1/sqrt(fan in 4)
    tied.register_buffer("steps", torch.zeros(2, device="meta"))
    with pytest.raises(LoraBridgeError, match="persistent buffer 'steps'"):
        random_state(tied, seed=0)


def test_build_base_writes_a_seeded_fp16_pipeline_diffusers_loads(tmp_path, monkeypatch):
    import torch
    from diffusers import StableDiffusionXLPipeline

    from lorabridge.architectures.sdxl import tiny

    def tiny_on_meta(self):
        return {name: part.to("meta") if isinstance(part, torch.nn.Module) else part
                for name, part in tiny._components(0, {}).items()}

    monkeypatch.setattr(Architecture, "real_parts", tiny_on_meta)
    lines: list[str] = []
    first = build_base(SDXL, tmp_path / "a", seed=1, log=lines.append)
    build_base(SDXL, tmp_path / "b", seed=1)
    assert [line.split(":")[0] for line in lines[::2]] == ["[1/4] unet", "[2/4] vae", "[3/4] text_encoder", "[4/4] text_encoder_2"]

    def digest(root):
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*.safetensors"))}
    assert digest(first) == digest(tmp_path / "b") and len(digest(first)) == 4
    unet = SafetensorsFile(first / "unet" / "diffusion_pytorch_model.safetensors")
    assert {unet.header_entry(key)[0] for key in unet.keys()} == {"F16"}
    pipe = StableDiffusionXLPipeline.from_pretrained(first, local_files_only=True)
    assert pipe.unet.conv_in.weight.abs().max() > 0 and pipe.text_encoder_2.config.hidden_size == 48
    with pytest.raises(LoraBridgeError, match="output exists"):
        build_base(SDXL, first)


def test_make_base_lists_the_architectures_with_real_sizes_and_refuses_an_existing_output(run_cli, tmp_path):
    result = run_cli("make-base", "--arch", "sd15", tmp_path / "base")
    assert result.exit_code == 2 and "'sd15' is not one of 'flux', 'sdxl'" in result.output
    (tmp_path / "base").mkdir()
    result = run_cli("make-base", tmp_path / "base")
    assert result.exit_code == 1 and "output exists; pass --force to replace it" in result.output
