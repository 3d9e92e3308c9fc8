"""``make demo`` end to end: tiny SDXL -> MindONE ckpt -> ms2neutral -> infer torch + mindspore -> compare."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.torch, pytest.mark.mindspore, pytest.mark.slow]


def test_demo_runs_and_reports_parity(tmp_path):
    pytest.importorskip("mindspore")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GLOG_v": "3", "PYTHONPATH": os.getcwd()}
    proc = subprocess.run([sys.executable, "-m", "lorabridge.demo", str(tmp_path / "demo")], capture_output=True,
                          text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    commands = [line.split()[2] for line in proc.stdout.splitlines() if line.startswith("$ lorabridge")]
    assert commands == ["make-tiny", "ms2neutral", "infer", "infer", "infer", "compare", "compare"]
    assert "torch vs mindspore: MAE 0.0" in proc.stdout
    for name in ("torch-images", "mindspore-images", "diff-images"):
        assert (tmp_path / "demo" / name / "000-seed0.png").is_file()
