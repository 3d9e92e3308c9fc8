"""validate and inspect from the command line; errors are one line; --help stays light."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lorabridge.adapters.options import BACKENDS, DTYPES, SCHEDULERS

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "spec" / "vectors"


def test_validate_valid_file_exits_zero(run_cli, neutral_file):
    result = run_cli("validate", neutral_file)
    assert result.exit_code == 0 and "valid neutral LoRA" in result.output


def test_validate_lists_every_problem_with_location_as_json(run_cli, tmp_path):
    result = run_cli("validate", "--json", VECTORS / "manifest-mismatch.safetensors")
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert report["valid"] is False
    assert report["problems"][0]["where"].endswith(".in_features")


def test_inspect_summarizes(run_cli, neutral_file):
    result = run_cli("inspect", neutral_file)
    assert result.exit_code == 0
    assert "stable-diffusion-xl-v1-base" in result.output and "unet: 4" in result.output
    data = json.loads(run_cli("inspect", "--json", neutral_file).output)
    assert data["modules"] == 6 and data["ranks"] == {"4": 6}


@pytest.mark.parametrize("name,message", [
    ("truncated.safetensors", "truncated"),
    ("header-not-json.safetensors", "header is not JSON"),
    ("oversize-header.safetensors", "over the 100000000 limit"),
    ("wrong-hash.safetensors", None),
])
def test_bad_input_is_one_line_naming_the_file(name, message):
    proc = subprocess.run([sys.executable, "cli.py", "inspect", str(VECTORS / name)], cwd=ROOT,
                          capture_output=True, text=True)
    if name == "wrong-hash.safetensors":  # inspect does not hash; validate does
        proc = subprocess.run([sys.executable, "cli.py", "validate", str(VECTORS / name)], cwd=ROOT,
                              capture_output=True, text=True)
        assert proc.returncode == 1 and "hash mismatch" in proc.stdout
        return
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and name in proc.stderr and message in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("target", ["missing.safetensors", "."])
def test_missing_path_or_directory_is_refused(target, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "inspect", target], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert ("no such file" if target != "." else "is a directory") in proc.stderr


def test_debug_shows_the_traceback():
    proc = subprocess.run([sys.executable, "cli.py", "--debug", "inspect", str(VECTORS / "truncated.safetensors")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


@pytest.mark.parametrize("argv", [["--help"], ["validate", "--help"], ["inspect", str(VECTORS / "mixed.safetensors")],
                                  ["validate", str(VECTORS / "mixed.safetensors")]])
def test_light_commands_import_no_framework_and_not_numpy(argv):
    """Reading a file's header and manifest needs none of them: numpy's import alone is ~0.1 s of a 0.3 s inspect."""
    code = ("import sys, runpy\n"
            f"sys.argv = ['cli.py', *{argv!r}]\n"
            "try:\n    runpy.run_path('cli.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in sys.modules\n"
            "               if m.split('.')[0] in ('torch', 'mindspore', 'diffusers', 'mindone', 'transformers', 'numpy'))\n"
            "print('HEAVY', heavy)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert "HEAVY []" in proc.stdout, proc.stdout[-500:] + proc.stderr[-2000:]


@pytest.mark.parametrize("argv", [["neutral2pt"], ["neutral2ms"], ["convert", "--to", "kohya"]])
def test_a_conversion_from_neutral_imports_numpy_beside_its_main_thread(argv, neutral_file, tmp_path):
    """numpy (~0.1 s to import) is imported by the NaN/Inf scan's thread, while the main thread reads, plans and
    starts copying: a main thread that needed it too (an alpha tensor, a merge, a page count) would wait for it."""
    code = ("import sys, threading, runpy\n"
            "class Watch:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'numpy':\n"
            "            print('NUMPY-BY', threading.current_thread().name, flush=True)\n"
            "sys.meta_path.insert(0, Watch())\n"
            f"sys.argv = ['cli.py', {argv[0]!r}, {str(neutral_file)!r}, *{argv[1:]!r}, '-o', {str(tmp_path / 'out')!r}]\n"
            "runpy.run_path('cli.py', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported_by = [line.split(" ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("NUMPY-BY ")]
    assert len(imported_by) == 1 and imported_by[0] != "MainThread", proc.stdout[-500:]


def test_main_leaves_the_exit_collection_nothing_to_walk(monkeypatch, capsys):
    """The process exits after one command: what it built is frozen, not walked by the collector at exit."""
    import gc

    from lorabridge import cli as cli_module

    monkeypatch.setattr(sys, "argv", ["lorabridge", "inspect", str(VECTORS / "mixed.safetensors")])
    try:
        with pytest.raises(SystemExit) as exited:
            cli_module.main()
        assert exited.value.code == 0 and "mixed.safetensors" in capsys.readouterr().out
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_every_command_has_help():
    from click.testing import CliRunner

    from lorabridge.cli import cli

    for name in cli.commands:
        result = CliRunner().invoke(cli, [name, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output, name


@pytest.mark.parametrize("option,value,choices", [("--scheduler", "lms", SCHEDULERS), ("--backend", "jax", BACKENDS),
                                                   ("--dtype", "fp8", DTYPES)])
def test_infer_refuses_an_unknown_choice_listing_the_choices(run_cli, tmp_path, option, value, choices):
    """click refuses it (usage error, exit 2) before the command runs: the choices come from adapters/options.py."""
    args = {"--backend": "torch", "--scheduler": "euler", "--dtype": "auto", option: value}
    result = run_cli("infer", "--base", tmp_path / "base", "--prompt", "x", "-o", tmp_path / "out",
                     *(word for pair in args.items() for word in pair))
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}': '{value}' is not one of " in result.output
    assert all(f"'{choice}'" in result.output for choice in choices), result.output
    assert list(tmp_path.iterdir()) == []


def test_every_writing_command_shares_one_force_option():
    from lorabridge.cli import cli

    helps = {name: [p.help for p in command.params if p.name == "force"] for name, command in cli.commands.items()}
    writers = {name for name, found in helps.items() if found}
    assert writers == {"make-tiny", "make-base", "ms2neutral", "neutral2ms", "pt2neutral", "neutral2pt", "convert",
                       "infer", "compare", "resize", "merge", "fuse", "extract", "batch"}
    assert len({found[0] for name, found in helps.items() if found}) == 1


@pytest.mark.parametrize("module", ["lorabridge", "lorabridge.cli"])
def test_python_dash_m_runs_the_command_line(module):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("Usage: lorabridge "), proc.stdout + proc.stderr
