"""The MindSpore checkpoint container against real MindSpore (each check batch runs in one subprocess).

- Files MindSpore writes (every dtype, CRC on/off, real 512 MiB-style chunking with a lowered chunk
  size, two hand-made same-tag records, encrypted, MindSpore-flavoured safetensors) read the same
  with lorabridge as with mindspore.load_checkpoint, and lorabridge rewrites them byte for byte.
- Files lorabridge writes load in mindspore.load_checkpoint with the same names, dtypes and bytes,
  and MindSpore saving what it loaded reproduces lorabridge's file exactly.
"""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest

from lorabridge.errors import LoraBridgeError
from lorabridge.io import ms_ckpt
from lorabridge.io.ms_ckpt import read_ms_checkpoint, write_ms_checkpoint
from lorabridge.io.ms_safetensors import read_ms_safetensors, write_ms_safetensors
from lorabridge.io.ms_dtypes import SAFETENSORS_TO_MS
from lorabridge.tensor import Tensor
from tests.fixtures.mindspore import run_mindspore
from tests.fixtures.ms_ckpt import SAMPLE_METADATA, map_tensor_record, record_tags

pytestmark = pytest.mark.mindspore

# Shared by the subprocesses: what mindspore.load_checkpoint returned, as JSON.
SUMMARY = """
import hashlib, json, os, sys
import numpy as np, mindspore as ms
import mindspore.train.serialization as serialization

out = sys.argv[1]
def at(name):
    return os.path.join(out, name)

def summary(loaded):
    result = {}
    for name, value in loaded.items():
        if isinstance(value, str):
            result[name] = ["str", value]
        else:
            data = value.asnumpy().tobytes()
            result[name] = [str(value.dtype), list(value.shape), hashlib.sha256(data).hexdigest()]
    return result

def load(name, **options):
    fmt = "safetensors" if name.endswith(".safetensors") else "ckpt"
    return ms.load_checkpoint(at(name), format=fmt, **options)
"""

MINDSPORE_WRITES = SUMMARY + """
from mindspore.train.checkpoint_pb2 import Checkpoint

rng = np.random.default_rng(0)
arrays = {
    "f32": rng.standard_normal((3, 5)).astype(np.float32),
    "f16": rng.standard_normal((2, 3)).astype(np.float16),
    "f64": rng.standard_normal((4,)),
    "i8": np.array([-128, 0, 127], np.int8), "i16": np.array([-32768, 7, 32767], np.int16),
    "i32": np.array([-2**31, 7, 2**31 - 1], np.int32), "i64": np.array([-2**63, 7, 2**63 - 1], np.int64),
    "u8": np.array([0, 7, 255], np.uint8), "u16": np.array([0, 7, 65535], np.uint16),
    "u32": np.array([0, 7, 2**32 - 1], np.uint32), "u64": np.array([0, 7, 2**64 - 1], np.uint64),
    "bool": np.array([True, False, True]), "scalar": np.array(1.5, np.float16),
}
params = {name: ms.Parameter(ms.Tensor(value), name=name) for name, value in arrays.items()}
params["bf16"] = ms.Parameter(ms.Tensor(rng.standard_normal((4, 6)).astype(np.float32), ms.bfloat16), name="bf16")
params["big"] = ms.Parameter(ms.Tensor(rng.standard_normal((20, 30)).astype(np.float32)), name="big")
no_bf16 = {name: p for name, p in params.items() if name != "bf16"}
append = {"epoch_num": 3, "note": "héllo ✓"}

ms.save_checkpoint(params, at("plain.ckpt"), append_dict=dict(append))
ms.save_checkpoint(params, at("crc.ckpt"), crc_check=True, append_dict=dict(append))
ms.save_checkpoint(params, at("ms.safetensors"), format="safetensors")
ms.save_checkpoint(no_bf16, at("crc.safetensors"), format="safetensors", crc_check=True)
for mode in ("AES-GCM", "AES-CBC", "SM4-CBC"):
    ms.save_checkpoint(no_bf16, at(f"enc_{mode}.ckpt"), enc_key=b"0123456789abcdef", enc_mode=mode)

# MindSpore's own chunking, with its 512 MiB record size lowered to 1 KiB: "big" (2400 bytes) takes 3 records
serialization.SLICE_SIZE = 1
ms.save_checkpoint(params, at("chunked.ckpt"), crc_check=True)

# two records with the same tag, each with the full dims and half the bytes, made with MindSpore's proto class
half = np.arange(8, dtype=np.float32)
with open(at("two_records.ckpt"), "wb") as handle:
    for part in (half[:4], half[4:]):
        record = Checkpoint()
        value = record.value.add()
        value.tag = "w"
        value.tensor.dims.extend([2, 4])
        value.tensor.tensor_type = "Float32"
        value.tensor.tensor_content = part.tobytes()
        handle.write(record.SerializeToString())

data = bytearray(open(at("crc.ckpt"), "rb").read())
data[60] ^= 1
open(at("damaged.ckpt"), "wb").write(bytes(data))
try:
    load("damaged.ckpt", crc_check=True)
    rejects_damaged = False
except ValueError:
    rejects_damaged = True

parsed = Checkpoint()
parsed.ParseFromString(open(at("map.ckpt"), "rb").read())
map_value = parsed.value[0]

print(json.dumps({
    "loaded": {name: summary(load(name, crc_check=name in ("crc.ckpt", "chunked.ckpt", "crc.safetensors")))
               for name in ("plain.ckpt", "crc.ckpt", "chunked.ckpt", "two_records.ckpt",
                            "ms.safetensors", "crc.safetensors")},
    "rejects_damaged": rejects_damaged,
    "map_record": [map_value.tag, map_value.WhichOneof("value"), len(map_value.maptensor.tensor)],
}))
"""


def our_summary(tensors: dict[str, Tensor], metadata: dict[str, str]) -> dict:
    result = {name: [SAFETENSORS_TO_MS[t.dtype], list(t.shape), hashlib.sha256(t.data).hexdigest()]
              for name, t in tensors.items()}
    result.update({key: ["str", value] for key, value in metadata.items()})
    return result


def same_file_as_mindspore(ours, theirs) -> bool:
    """Byte-identical; for safetensors with several metadata keys, whose order the safetensors library
    randomises per process, the same parsed header, tensor layout and data bytes."""
    a, b = ours.read_bytes(), theirs.read_bytes()
    if a == b or not ours.name.endswith(".safetensors"):
        return a == b
    (len_a,), (len_b,) = struct.unpack("<Q", a[:8]), struct.unpack("<Q", b[:8])
    head_a, head_b = json.loads(a[8:8 + len_a]), json.loads(b[8:8 + len_b])
    return (len_a == len_b and head_a == head_b and list(head_a) == list(head_b)
            and len(head_a["__metadata__"]) > 1 and a[8 + len_a:] == b[8 + len_b:])


@pytest.fixture(scope="module")
def mindspore_files(tmp_path_factory):
    """Files written by mindspore.save_checkpoint, and what mindspore.load_checkpoint made of them."""
    out = tmp_path_factory.mktemp("mindspore_writes")
    (out / "map.ckpt").write_bytes(map_tensor_record("embedding"))
    return out, run_mindspore(MINDSPORE_WRITES, out)


@pytest.mark.parametrize("name", ["plain.ckpt", "crc.ckpt", "chunked.ckpt", "two_records.ckpt"])
def test_mindspore_ckpt_reads_the_same_as_in_mindspore(mindspore_files, name):
    out, report = mindspore_files
    tensors, metadata = read_ms_checkpoint(out / name)
    ours = our_summary(tensors, metadata)
    assert ours == report["loaded"][name]
    assert list(ours) == list(report["loaded"][name]), "file order is kept"


def test_mindspore_chunks_are_same_tag_records_joined_on_read(mindspore_files):
    out, _ = mindspore_files
    tags = record_tags((out / "chunked.ckpt").read_bytes())
    assert tags.count("big") == 3  # 2400 bytes in records of at most 1 KiB
    assert record_tags((out / "two_records.ckpt").read_bytes()) == ["w", "w"]
    assert read_ms_checkpoint(out / "chunked.ckpt")[0]["big"].shape == (20, 30)


@pytest.mark.parametrize("name, chunk", [("plain.ckpt", None), ("crc.ckpt", None), ("chunked.ckpt", 1024)])
def test_rewriting_a_mindspore_ckpt_reproduces_its_bytes(mindspore_files, tmp_path, monkeypatch, name, chunk):
    out, _ = mindspore_files
    if chunk:
        monkeypatch.setattr(ms_ckpt, "CHUNK_BYTES", chunk)
    source = ms_ckpt.MsCheckpointFile(out / name)
    write_ms_checkpoint(tmp_path / name, dict(source.items()), source.metadata, crc=source.has_crc)
    assert (tmp_path / name).read_bytes() == (out / name).read_bytes()


@pytest.mark.parametrize("name", ["ms.safetensors", "crc.safetensors"])
def test_mindspore_safetensors_read_the_same_and_rewrite_exactly(mindspore_files, tmp_path, name):
    out, report = mindspore_files
    tensors, metadata = read_ms_safetensors(out / name)
    assert metadata.get("format") == "ms"
    assert our_summary(tensors, {}) == report["loaded"][name]
    extra = {k: v for k, v in metadata.items() if k not in ("format", "crc_num")}
    write_ms_safetensors(tmp_path / name, tensors, extra, crc="crc_num" in metadata)
    assert same_file_as_mindspore(tmp_path / name, out / name)


@pytest.mark.parametrize("mode", ["AES-GCM", "AES-CBC", "SM4-CBC"])
def test_mindspore_encrypted_files_are_refused_by_name(mindspore_files, mode):
    out, _ = mindspore_files
    assert ms_ckpt.is_ms_checkpoint(out / f"enc_{mode}.ckpt")
    with pytest.raises(LoraBridgeError, match=f"encrypted \\({mode}\\)"):
        read_ms_checkpoint(out / f"enc_{mode}.ckpt")


def test_a_damaged_crc_file_is_refused_by_both(mindspore_files):
    out, report = mindspore_files
    assert report["rejects_damaged"]
    with pytest.raises(LoraBridgeError, match="CRC mismatch"):
        read_ms_checkpoint(out / "damaged.ckpt")


def test_the_hand_made_map_tensor_record_is_what_mindspore_parses_as_one(mindspore_files):
    out, report = mindspore_files
    assert report["map_record"] == ["embedding", "maptensor", 3]
    with pytest.raises(LoraBridgeError, match="map tensor"):
        read_ms_checkpoint(out / "map.ckpt")


MINDSPORE_READS = SUMMARY + """
report = {}
for name, options in json.loads(sys.argv[2]).items():
    loaded = load(name, crc_check=options["crc"])
    report[name] = summary(loaded)
    if options["resave"]:
        serialization.SLICE_SIZE = options["slice_kb"]
        params = {k: v for k, v in loaded.items() if not isinstance(v, str)}
        strings = {k: v for k, v in loaded.items() if isinstance(v, str)}
        fmt = "safetensors" if name.endswith(".safetensors") else "ckpt"
        ms.save_checkpoint(params, at("ms_" + name), crc_check=options["crc"], format=fmt, append_dict=strings or None)
print(json.dumps(report))
"""


def test_our_files_load_in_mindspore_and_mindspore_rewrites_them_identically(tmp_path, ms_tensors, monkeypatch):
    rng = np.random.default_rng(3)
    dense = {k: v for k, v in ms_tensors.items() if k != "empty"}  # save_checkpoint drops empty tensors
    big = {"big": Tensor.from_numpy(rng.standard_normal((20, 30)).astype(np.float32)),
           "big.bf16": Tensor.from_numpy(rng.standard_normal((40, 20)).astype(np.float32), "BF16"), **dense}
    no_bf16 = {k: v for k, v in ms_tensors.items() if v.dtype != "BF16"}  # MindSpore's safetensors CRC can't hash bf16
    default_kb = ms_ckpt.CHUNK_BYTES // 1024
    files = {  # name: (tensors, metadata, crc, record size in KiB, whether MindSpore saves it again to compare)
        "ours.ckpt": (dense, SAMPLE_METADATA, False, default_kb, True),
        "ours_crc.ckpt": (dense, SAMPLE_METADATA, True, default_kb, True),
        "ours_chunked.ckpt": (big, {}, True, 1, True),
        "ours_empty.ckpt": (ms_tensors, {}, False, default_kb, False),
        "ours.safetensors": (ms_tensors, {}, False, default_kb, True),
        "ours_crc.safetensors": (no_bf16, {}, True, default_kb, True),
    }
    for name, (tensors, metadata, crc, chunk_kb, _) in files.items():
        with monkeypatch.context() as patch:
            patch.setattr(ms_ckpt, "CHUNK_BYTES", chunk_kb * 1024)
            writer = write_ms_safetensors if name.endswith(".safetensors") else write_ms_checkpoint
            writer(tmp_path / name, tensors, metadata, crc=crc)
    tags = record_tags((tmp_path / "ours_chunked.ckpt").read_bytes())
    assert (tags.count("big"), tags.count("big.bf16")) == (3, 2)
    options = {name: {"crc": crc, "resave": resave, "slice_kb": chunk_kb}
               for name, (_, _, crc, chunk_kb, resave) in files.items()}
    report = run_mindspore(MINDSPORE_READS, tmp_path, json.dumps(options))

    for name, (tensors, metadata, _, _, resave) in files.items():
        assert report[name] == our_summary(tensors, metadata), name
        if resave:
            assert same_file_as_mindspore(tmp_path / name, tmp_path / f"ms_{name}"), name
    assert report["ours_empty.ckpt"]["empty"][:2] == ["Float32", [0, 3]], "MindSpore reads empty tensors it never writes"
