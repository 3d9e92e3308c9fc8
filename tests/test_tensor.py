"""Tensor: raw bytes with a dtype and shape; bf16 handled without torch, bit-exactly."""

import numpy as np
import pytest

from lorabridge.tensor import Tensor


def test_from_numpy_keeps_bytes_and_shape():
    array = np.arange(6, dtype=np.float16).reshape(2, 3)
    tensor = Tensor.from_numpy(array)
    assert (tensor.dtype, tensor.shape, tensor.nbytes) == ("F16", (2, 3), 12)
    assert np.array_equal(tensor.to_numpy(), array)


def test_bf16_rounding_matches_torch():
    torch = pytest.importorskip("torch")
    values = np.random.default_rng(0).standard_normal(1000).astype(np.float32) * 1e3
    values[:4] = [np.nan, np.inf, -np.inf, 0.0]
    ours = Tensor.from_numpy(values, "BF16")
    theirs = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    assert bytes(ours.data)[8:] == theirs[8:]  # non-NaN values: identical rounding
    assert np.isnan(ours.to_numpy()[0])
    assert np.array_equal(ours.to_numpy()[1:], torch.from_numpy(values[1:]).to(torch.bfloat16).float().numpy())


def test_cast_to_same_dtype_is_identity():
    tensor = Tensor.from_numpy(np.ones(3, np.float32))
    assert tensor.cast("F32") is tensor
    assert tensor.cast("F16").dtype == "F16"


def test_byte_count_must_match_shape():
    with pytest.raises(ValueError, match="needs 12 bytes"):
        Tensor("F32", (3,), b"\0" * 8)


@pytest.mark.parametrize("dtype", ["F8_E4M3", "F8_E5M2"])
def test_a_tensor_in_a_dtype_numpy_lacks_is_not_made_from_numpy_but_refused(dtype):
    """numpy has no FP8 type: asked for one, from_numpy (and so cast) used to return the array's own F32, unasked."""
    with pytest.raises(TypeError, match=f"{dtype} tensors cannot be made from numpy arrays"):
        Tensor.from_numpy(np.ones(2, np.float32), dtype)
    with pytest.raises(TypeError):
        Tensor.from_numpy(np.ones(2, np.float32)).cast(dtype)
