"""``compare``: pixel error between images or directories of images, verdict against --max-mae, diff pictures."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lorabridge.adapters.png import read_png, write_png
from lorabridge.compare import heat_map, image_metrics


def image(tmp_path, name: str, value: int | np.ndarray, size=(16, 12)) -> str:
    pixels = np.full((*size, 3), value, np.uint8) if np.isscalar(value) else value
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(path, pixels, {"prompt": name})
    return path


def test_metrics_are_mae_max_and_psnr_on_0_255():
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 48  # one channel of one pixel off by 48: MAE 1, max 48
    assert image_metrics(a, b) == {"mae": 1.0, "max_error": 48, "psnr": round(10 * np.log10(255 ** 2 / (48 ** 2 / 48)), 2)}
    assert image_metrics(a, a) == {"mae": 0.0, "max_error": 0, "psnr": None}


def test_identical_images_pass(run_cli, tmp_path):
    a, b = image(tmp_path, "a.png", 100), image(tmp_path, "b.png", 100)
    result = run_cli("compare", a, b)
    assert result.exit_code == 0 and "MAE 0.0000" in result.output and "PSNR inf" in result.output


def test_fails_over_max_mae_default_five(run_cli, tmp_path):
    a, b = image(tmp_path, "a.png", 100), image(tmp_path, "b.png", 106)
    assert run_cli("compare", a, b).exit_code == 1
    assert run_cli("compare", a, b, "--max-mae", "6").exit_code == 0
    report = json.loads(run_cli("compare", a, b, "--json").output)
    assert report["pairs"][0]["mae"] == 6.0 and report["max_mae"] == 5.0 and report["passed"] is False


def test_side_by_side_with_heat_map(run_cli, tmp_path):
    base = np.full((16, 12, 3), 50, np.uint8)
    changed = base.copy()
    changed[4:8, 2:6] = 250
    a, b = image(tmp_path, "a.png", base), image(tmp_path, "b.png", changed)
    assert run_cli("compare", a, b, "-o", tmp_path / "diff.png").exit_code == 1
    diff, text = read_png(tmp_path / "diff.png")
    assert diff.shape == (16, 3 * 12 + 2 * 4, 3) and text["mae"] == str(image_metrics(base, changed)["mae"])
    np.testing.assert_array_equal(diff[:, :12], base)
    np.testing.assert_array_equal(diff[:, 16:28], changed)
    heat = diff[:, 32:]
    assert (heat[4:8, 2:6] == 255).all() and (heat[:4] == 0).all()  # largest difference white, none black
    assert run_cli("compare", a, b, "-o", tmp_path / "diff.png").exit_code == 1
    assert "pass --force" in run_cli("compare", a, b, "-o", tmp_path / "diff.png").output


def test_heat_map_grows_with_the_difference():
    a = np.zeros((1, 3, 3), np.uint8)
    b = np.array([[[0, 0, 0], [5, 0, 0], [10, 0, 0]]], np.uint8)
    a, b = np.repeat(a, 2, axis=1), np.concatenate([b, np.array([[[15, 0, 0], [20, 0, 0], [40, 0, 0]]], np.uint8)], axis=1)
    brightness = heat_map(a, b)[0].astype(int).sum(axis=1)
    assert all(x < y for x, y in zip(brightness, brightness[1:])), brightness


def test_directories_pair_files_by_name(run_cli, tmp_path):
    for name, (va, vb) in {"000.png": (10, 11), "001.png": (10, 12)}.items():
        image(tmp_path, f"torch/{name}", va)
        image(tmp_path, f"mindspore/{name}", vb)
    result = run_cli("compare", tmp_path / "torch", tmp_path / "mindspore", "-o", tmp_path / "diffs", "--json")
    report = json.loads(result.output)
    assert result.exit_code == 0 and [r["mae"] for r in report["pairs"]] == [1.0, 2.0]
    assert sorted(p.name for p in (tmp_path / "diffs").iterdir()) == ["000.png", "001.png"]
    image(tmp_path, "torch/002.png", 10)
    result = run_cli("compare", tmp_path / "torch", tmp_path / "mindspore")
    assert result.exit_code == 1 and "unpaired: 002.png" in result.output


@pytest.mark.parametrize("case, words", [
    ("missing", "no such file or directory"),
    ("sizes", "sizes differ: 12x16"),
    ("not an image", "not a readable image"),
    ("file vs dir", "compare two files or two directories"),
    ("no common names", "no image file names in common"),
])
def test_bad_input_is_one_line(run_cli, tmp_path, case, words):
    a = image(tmp_path, "a.png", 0)
    (tmp_path / "text.png").write_text("hello")
    (tmp_path / "d1").mkdir()
    image(tmp_path, "d2/x.png", 0)
    b = {"missing": tmp_path / "nope.png", "sizes": image(tmp_path, "b.png", 0, size=(8, 8)), "not an image": tmp_path / "text.png",
         "file vs dir": tmp_path / "d1", "no common names": None}[case]
    args = (tmp_path / "d1", tmp_path / "d2") if case == "no common names" else (a, b)
    result = run_cli("compare", *args, "-o", tmp_path / "out.png")
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1 and len(errors) == 1 and words in errors[0], result.output
    assert not (tmp_path / "out.png").exists()
