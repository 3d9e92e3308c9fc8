"""ms2neutral / neutral2ms against real MindSpore and mindone (each MindSpore run in a subprocess).

- Files written by ``mindspore.save_checkpoint`` come back from ms2neutral + neutral2ms byte for
  byte, and ``mindspore.load_checkpoint`` reads the same tags, dtypes and bytes from both.
- neutral2ms output loads into a MindSpore cell built like MindONE's SDXL LoRA network (its
  ``lora_A``/``lora_B`` Dense layers under SGM paths) with no LoRA parameter left unloaded.
- The neutral file (and the mindone-diffusers .ckpt) load through mindone.diffusers'
  ``StableDiffusionXLPipeline.load_lora_weights`` with every module applied and alpha respected.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from lorabridge.converters.mindspore import ms2neutral, neutral2ms
from lorabridge.formats.neutral import read_neutral
from tests.fixtures.mindone import (CLIP_L, OPENCLIP, canonical_names, expected_deltas, save_with_mindspore,
                                    sgm_attention_layers, sgm_attention_lora, tiny_sgm_lora, tiny_text, tiny_widths)

pytestmark = pytest.mark.mindspore

COMPARE_WITH_LOAD_CHECKPOINT = """
import json, sys
import numpy as np
import mindspore as ms

def raw(value):
    if isinstance(value, str):
        return "str", value
    if value.dtype == ms.bfloat16:  # numpy has no bfloat16; widening to float32 is exact
        return str(value.dtype), value.astype(ms.float32).asnumpy().tobytes().hex()
    return str(value.dtype), value.asnumpy().tobytes().hex()

differences = {}
for original, converted, fmt, crc in json.loads(sys.argv[1]):
    left = ms.load_checkpoint(original, format=fmt, crc_check=crc)
    right = ms.load_checkpoint(converted, format=fmt, crc_check=crc)
    bad = [k for k in left if k not in right or raw(left[k]) != raw(right[k])]
    differences[converted] = {"tags": list(left) == list(right), "count": len(left), "different": bad[:5]}
print(json.dumps(differences))
"""


@pytest.fixture(scope="module")
def mindspore_files(tmp_path_factory, mindone_sdxl_ckpt, mindone_tiny_ckpt):
    """MindONE LoRAs written by mindspore.save_checkpoint: (their folder, {path: (container, crc)}), plus
    ``encrypted.ckpt`` in that folder."""
    root = tmp_path_factory.mktemp("ms_saved")
    variants = {root / "fp16.ckpt": {"dtype": "float16"}, root / "bf16.ckpt": {"dtype": "bfloat16"},
                root / "crc.ckpt": {"crc_check": True}, root / "ms.safetensors": {"format": "safetensors"},
                root / "encrypted.ckpt": {"enc_key": "0123456789abcdef", "enc_mode": "AES-GCM"}}
    save_with_mindspore(tiny_sgm_lora(), variants)
    return root, {mindone_sdxl_ckpt: ("ckpt", False), mindone_tiny_ckpt: ("ckpt", False),
                  root / "fp16.ckpt": ("ckpt", False), root / "bf16.ckpt": ("ckpt", False),
                  root / "crc.ckpt": ("ckpt", True), root / "ms.safetensors": ("safetensors", False)}


def test_mindspore_files_round_trip_bit_identically(mindspore_files, mindspore_run, tmp_path):
    pairs = []
    for original, (container, crc) in mindspore_files[1].items():
        neutral = ms2neutral(original, tmp_path / f"{original.stem}.neutral.safetensors", progress=False)
        back = neutral2ms(neutral.output, tmp_path / f"{original.stem}.back{original.suffix}", container=container,
                          crc=crc, progress=False).output
        assert back.read_bytes() == original.read_bytes(), original.name
        pairs.append((str(original), str(back), container, crc))
    checked = mindspore_run(COMPARE_WITH_LOAD_CHECKPOINT, json.dumps(pairs))
    for _, back, _, _ in pairs:
        assert checked[back]["tags"] and checked[back]["different"] == [], (back, checked[back])
    counts = {name.rsplit("/", 1)[1]: v["count"] for name, v in checked.items()}
    assert counts["sdxl_lora.back.ckpt"] == 1120


def test_a_file_encrypted_by_mindspore_is_refused_by_name(mindspore_files, run_cli, tmp_path):
    encrypted = mindspore_files[0] / "encrypted.ckpt"
    result = run_cli("ms2neutral", encrypted, "-o", tmp_path / "out.safetensors")
    assert result.exit_code == 1 and "encrypted (AES-GCM)" in result.output and str(encrypted) in result.output
    assert not (tmp_path / "out.safetensors").exists()


MINDONE_NAMED_CELL = """
import json, sys
import numpy as np
import mindspore as ms
from mindspore import nn, ops

class LoraDense(nn.Dense):
    '''MindONE's SDXL LoRA layer (gm/modules/lora/layers.py): a Dense plus lora_A / lora_B Dense cells.'''
    def __init__(self, inp, out, rank):
        super().__init__(inp, out)
        self.lora_A = nn.Dense(inp, rank, has_bias=False)
        self.lora_B = nn.Dense(rank, out, has_bias=False)
        self.scaling = 1.0  # lora_alpha defaults to r in MindONE

def build(layers):
    net = nn.Cell()
    for path, (inp, out, rank) in layers.items():
        parent, _, leaf = path.rpartition(".")
        node = net
        for part in parent.split("."):
            if part not in node._cells:
                setattr(node, part, nn.Cell())
            node = getattr(node, part)
        setattr(node, leaf, LoraDense(inp, out, rank))
    for name, param in net.parameters_and_names():  # full names, as MindONE's _prefix_param gives them
        param.name = name
    return net

results, deltas = {}, {}
for ckpt, layers in json.loads(sys.argv[1]).items():
    net = build(layers)
    not_in_net, not_in_ckpt = ms.load_param_into_net(net, ms.load_checkpoint(ckpt))
    results[ckpt] = {"lora_params": sum("lora_" in p.name for p in net.get_parameters()),
                     "lora_not_loaded": [n for n in not_in_net if "lora_" in n], "ckpt_not_loaded": list(not_in_ckpt)}
    for path in layers:
        cell = net
        for part in path.split("."):
            cell = getattr(cell, part)
        delta = ops.matmul(cell.lora_B.weight, cell.lora_A.weight) * cell.scaling
        deltas[ckpt + "|" + path] = delta.asnumpy()
np.savez(sys.argv[2], **deltas)
print(json.dumps(results))
"""


def mindone_layers(rank: int, fused_rank: int) -> dict[str, tuple[int, int, int]]:
    """MindONE's SDXL LoRA layers at the tiny widths: SGM path -> (in, out, rank), from the fixture tables."""
    text = tiny_text()
    layers = {key: (inp, out, rank) for key, (inp, out) in sgm_attention_layers(tiny_widths()).items()}
    n1, h1, _ = text["text_encoder"]
    n2, h2, _ = text["text_encoder_2"]
    for n in range(n1):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            layers[f"{CLIP_L}{n}.self_attn.{proj}"] = (h1, h1, rank)
    for n in range(n2):
        layers[f"{OPENCLIP}{n}.attn.in_proj"] = (h2, 3 * h2, fused_rank)
        layers[f"{OPENCLIP}{n}.attn.out_proj"] = (h2, h2, rank)
    return layers


def test_neutral2ms_output_loads_into_a_mindone_named_cell(tiny_lora_file, mindspore_run, tmp_path):
    """A neutral file made from the real tiny pipeline's module tree (diffusers names; q/k/v with their own A)."""
    ckpt = neutral2ms(tiny_lora_file, tmp_path / "tiny_sgm.ckpt", progress=False).output
    layers = mindone_layers(rank=4, fused_rank=12)  # bigG q, k, v of rank 4 merge into one in_proj of rank 12
    results = mindspore_run(MINDONE_NAMED_CELL, json.dumps({str(ckpt): layers}), tmp_path / "deltas.npz")
    result = results[str(ckpt)]
    assert result["lora_params"] == 2 * len(layers)
    assert result["lora_not_loaded"] == [] and result["ckpt_not_loaded"] == []
    deltas = np.load(tmp_path / "deltas.npz")
    model = read_neutral(tiny_lora_file)
    for sgm in layers:
        want = np.concatenate([model.modules[name].delta_weight() for name in canonical_names(sgm)])
        np.testing.assert_allclose(deltas[f"{ckpt}|{sgm}"], want, rtol=1e-5, atol=1e-6, err_msg=sgm)


MINDONE_PIPELINE = """
import json, sys
import numpy as np
from tests.fixtures.sdxl import load_mindone_pipeline

directory, files, names, out = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
arrays, report = {}, {}
for label, path in files.items():
    pipe = load_mindone_pipeline(directory)
    def cell(name):  # MindSpore cells have no get_submodule
        node = pipe
        for part in name.split("."):
            node = node[int(part)] if part.isdigit() and not hasattr(node, part) else getattr(node, part)
        return node
    base = {n: cell(n).weight.asnumpy().copy() for n in names}
    folder, _, weight_name = path.rpartition("/")
    pipe.load_lora_weights(folder, weight_name=weight_name)
    report[label] = {f"{c}.{n}": [m.r["default_0"], float(m.scaling["default_0"])]
                     for c in ("unet", "text_encoder", "text_encoder_2")
                     for n, m in getattr(pipe, c).cells_and_names() if "default_0" in (getattr(m, "r", None) or {})}
    pipe.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"])
    for n in names:
        arrays[f"{label}|{n}|base"], arrays[f"{label}|{n}|fused"] = base[n], cell(n).weight.asnumpy()
np.savez(out, **arrays)
print(json.dumps(report))
"""


def test_mindone_diffusers_loads_our_files_with_every_module_and_alpha(tiny_sdxl_dir, mindone_tiny_ckpt, mindspore_run,
                                                                       tmp_path):
    neutral = ms2neutral(mindone_tiny_ckpt, tmp_path / "tiny.safetensors", alpha=8, progress=False).output
    peft_ckpt = neutral2ms(neutral, tmp_path / "tiny_peft.ckpt", naming="mindone-diffusers", progress=False).output
    files = {"neutral": str(neutral), "mindone-diffusers ckpt": str(peft_ckpt)}
    want = expected_deltas(tiny_sgm_lora(), scale=8 / 4)  # from the MindSpore-saved arrays, not from our reader
    assert len(want) == 580
    report = mindspore_run(MINDONE_PIPELINE, tiny_sdxl_dir, json.dumps(files), json.dumps(list(want)),
                           tmp_path / "fused.npz")
    # the neutral file carries alpha in its adapter metadata; the .ckpt has alpha/rank folded into lora_B
    expected_scaling = {"neutral": 2.0, "mindone-diffusers ckpt": 1.0}
    fused = np.load(tmp_path / "fused.npz")
    for label in files:
        assert set(report[label]) == set(want), label  # every module applied, nothing else
        assert {tuple(v) for v in report[label].values()} == {(4, expected_scaling[label])}
        for name, delta in want.items():
            base, got = fused[f"{label}|{name}|base"], fused[f"{label}|{name}|fused"]
            np.testing.assert_allclose(got, base + delta, rtol=1e-4, atol=1e-5, err_msg=f"{label}: {name}")


def test_full_size_attention_lora_is_1120_tensors_of_about_23_mb(mindone_sdxl_ckpt):
    assert mindone_sdxl_ckpt.stat().st_size == pytest.approx(23.3e6, rel=0.02)
    assert len(sgm_attention_lora(rank=4)) == 1120
