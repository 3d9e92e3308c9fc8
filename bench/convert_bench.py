"""Conversion benchmarks: lorabridge's commands side by side with cp, the seed's script and diffusers.

One command runs everything and writes ``bench/RESULTS.md``::

    .venv/bin/python bench/convert_bench.py            # every input (SDXL's last about 2 GiB), 3 repeats
    .venv/bin/python bench/convert_bench.py --quick    # the two smaller SDXL inputs, 1 repeat
    .venv/bin/python bench/convert_bench.py --inputs flux-rank32-kohya   # Flux.1-dev, rank 32, alone
    make bench

Inputs (``bench_inputs.py``) are files a trainer writes at an architecture's real shapes: MindONE SGM
``.ckpt`` at SDXL-base shapes, kohya sd-scripts' Flux.1-dev LoRA; plus the files made of each once,
untimed (:data:`BENCHES`: the neutral file, and for Flux.1 its diffusers and MindONE files). Each
architecture has its contenders (:data:`BENCHES`). Every contender is a separate process, measured
by ``measure.py`` (wall time, ``ru_maxrss``, sampled ``RssAnon``/``RssFile``); all contenders of a
repeat run one after the other, after ``sync``, on inputs in the page cache. Figures are medians over
repeats (peaks: the highest). Ratios are against ``cp`` of the same input file and against the
architecture's baseline (the seed's script for SDXL, diffusers for Flux.1). RESULTS.md has one
section per architecture; a run rewrites the sections of the architectures it ran and keeps the
others, and hand-written notes after the ``NOTES_MARKER`` line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import pstats
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

from bench_inputs import INPUTS, InputSpec, generate
from measure import Launcher, Run

from lorabridge.architectures import architectures
from lorabridge.architectures.flux1 import FLUX1
from lorabridge.architectures.sdxl import SDXL
from lorabridge.io.safetensors_file import SafetensorsFile

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
RESULTS = REPO / "bench" / "RESULTS.md"
NOTES_MARKER = "<!-- notes: everything below this line is hand-written and kept when the script rewrites the file -->"
SECTION_MARKER = "<!-- section: {} -->"  # starts the generated section of one architecture
# Commands run as a user's would: offline, and with Python's bytecode cache (an environment that
# sets PYTHONDONTWRITEBYTECODE would have every run compile lorabridge's modules from source).
ENV = {**{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"},
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
VERSIONS = ("lorabridge", "numpy", "safetensors", "torch", "mindspore", "diffusers", "jsonschema", "click")
TARGET_CP_RATIO = 0.8  # issue 14: every converter at >= 0.8x cp's throughput on the rank-128 file...
TARGET_CP_SYNC_RATIO = 1.0  # ... and >= 1.0x that of cp + fsync (our outputs are fsynced before they are published)
TARGET_SEED_SPEEDUP = 10.0  # >= 10x faster than the seed's approach
TARGET_RSS_SLACK = 100 * 2**20  # peak RSS <= largest tensor + 100 MB
TARGET_CLI_S = 0.3  # --help and inspect
TARGET_INPUT = "rank128-attn-ff-proj-te"
PROFILE_LINES = 14


@dataclass
class Files:
    """The files of one input: the generated one and those made of it (label -> path), the seed's name
    lists (SDXL), outputs."""

    inputs: dict[str, Path]
    out: Path
    ms_names: Path | None = None
    pt_names: Path | None = None

    def input(self, reads: str) -> Path:
        return self.inputs[reads]


@dataclass(frozen=True)
class Contender:
    name: str
    kind: str  # "floor" (cp), "baseline" (seed, diffusers) or "ours"
    reads: str  # label of the input file it reads (Files.inputs)
    output: str  # output file (or directory) name under Files.out
    argv: Callable[[Files, Path], list[str]]  # (files, output path) -> command line
    versus: str = "ckpt"  # the baseline compared with: the one reading this input label


def _cli(*args: str) -> Callable[[Files, Path], list[str]]:
    """``python cli.py <args>`` with IN / OUT filled in: IN is the input the contender reads."""
    def argv(files: Files, out: Path, reads: str) -> list[str]:
        return [PY, "cli.py", *(os.fspath(files.input(reads)) if a == "IN" else os.fspath(out) if a == "OUT" else a
                                for a in args)]
    return argv


def _cp(reads: str) -> Callable[[Files, Path], list[str]]:
    return lambda f, out: ["cp", os.fspath(f.input(reads)), os.fspath(out)]


def _cp_sync(reads: str) -> Callable[[Files, Path], list[str]]:
    return lambda f, out: ["sh", "-c", 'cp "$1" "$2" && sync "$2"', "sh", os.fspath(f.input(reads)), os.fspath(out)]


def _floor(hashes: int, reads: str) -> Callable[[Files, Path], list[str]]:
    return lambda f, out: [PY, "bench/contenders/floor_copy.py", str(hashes), os.fspath(f.input(reads)), os.fspath(out)]


def _ours(reads: str, *args: str) -> Callable[[Files, Path], list[str]]:
    return lambda f, out: _cli(*args)(f, out, reads)


def _diffusers(pipeline: str, reads: str) -> Callable[[Files, Path], list[str]]:
    return lambda f, out: [PY, "bench/contenders/diffusers_resave.py", pipeline, os.fspath(f.input(reads)), os.fspath(out)]


def _sdxl_contenders() -> list[Contender]:
    cp, cp_sync, ours = _cp, _cp_sync, _ours
    return [
        Contender("cp", "floor", "ckpt", "cp.ckpt", cp("ckpt")),
        Contender("cp + fsync", "floor", "ckpt", "cp_sync.ckpt", cp_sync("ckpt")),
        Contender("floor for -> neutral: python + numpy, cp, 2 sha256 passes beside, fsync", "floor", "ckpt",
                  "floor.ckpt", _floor(2, "ckpt")),
        Contender("seed: load_checkpoint, pair by position, torch.save", "baseline", "ckpt", "seed_pt.ckpt",
                  lambda f, out: [PY, "bench/contenders/seed_ms2pt.py", os.fspath(f.input("ckpt")), os.fspath(f.ms_names),
                                  os.fspath(f.pt_names), os.fspath(out)]),
        Contender("ours: ms2neutral", "ours", "ckpt", "ms2neutral.safetensors",
                  ours("ckpt", "ms2neutral", "IN", "-o", "OUT")),
        Contender("cp", "floor", "neutral", "cp.safetensors", cp("neutral")),
        Contender("cp + fsync", "floor", "neutral", "cp_sync.safetensors", cp_sync("neutral")),
        Contender("floor: python + numpy, cp, fsync", "floor", "neutral", "floor.safetensors", _floor(0, "neutral")),
        Contender("diffusers: lora_state_dict + save_lora_weights", "baseline", "neutral", "diffusers_out",
                  _diffusers("StableDiffusionXLPipeline", "neutral")),
        Contender("ours: neutral2pt (diffusers)", "ours", "neutral", "neutral2pt.safetensors",
                  ours("neutral", "neutral2pt", "IN", "-o", "OUT")),
        Contender("ours: neutral2ms (mindone-sgm .ckpt)", "ours", "neutral", "neutral2ms.ckpt",
                  ours("neutral", "neutral2ms", "IN", "-o", "OUT")),
        Contender("ours: convert --to kohya", "ours", "neutral", "kohya.safetensors",
                  ours("neutral", "convert", "IN", "--to", "kohya", "-o", "OUT")),
    ]


def _flux_contenders() -> list[Contender]:
    """kohya -> neutral and -> diffusers against diffusers' kohya conversion; neutral -> diffusers, kohya and
    MindONE, diffusers -> neutral and MindONE -> neutral against diffusers' load-and-save of the neutral file."""
    flux = lambda name, kind, reads, output, argv, versus="neutral": Contender(name, kind, reads, output, argv, versus)  # noqa: E731
    return [
        flux("cp", "floor", "kohya", "cp.safetensors", _cp("kohya"), "kohya"),
        flux("cp + fsync", "floor", "kohya", "cp_sync.safetensors", _cp_sync("kohya"), "kohya"),
        flux("diffusers: FluxPipeline.lora_state_dict (kohya -> diffusers) + save_lora_weights", "baseline", "kohya",
             "diffusers_from_kohya", _diffusers("FluxPipeline", "kohya"), "kohya"),
        flux("ours: pt2neutral (kohya -> neutral)", "ours", "kohya", "pt2neutral.safetensors",
             _ours("kohya", "pt2neutral", "IN", "-o", "OUT"), "kohya"),
        flux("ours: convert --to diffusers (kohya -> diffusers)", "ours", "kohya", "kohya2diffusers.safetensors",
             _ours("kohya", "convert", "IN", "--to", "diffusers", "-o", "OUT"), "kohya"),
        flux("cp", "floor", "neutral", "cp.safetensors", _cp("neutral")),
        flux("cp + fsync", "floor", "neutral", "cp_sync.safetensors", _cp_sync("neutral")),
        flux("diffusers: FluxPipeline.lora_state_dict + save_lora_weights", "baseline", "neutral", "diffusers_out",
             _diffusers("FluxPipeline", "neutral")),
        flux("ours: neutral2pt (diffusers)", "ours", "neutral", "neutral2pt.safetensors",
             _ours("neutral", "neutral2pt", "IN", "-o", "OUT")),
        flux("ours: convert --to kohya (fused qkv/linear1)", "ours", "neutral", "kohya.safetensors",
             _ours("neutral", "convert", "IN", "--to", "kohya", "-o", "OUT")),
        flux("ours: neutral2ms --naming mindone-diffusers --format safetensors", "ours", "neutral", "neutral2ms.safetensors",
             _ours("neutral", "neutral2ms", "IN", "--naming", "mindone-diffusers", "--format", "safetensors", "-o", "OUT")),
        flux("cp", "floor", "diffusers", "cp.safetensors", _cp("diffusers")),
        flux("ours: pt2neutral (diffusers -> neutral)", "ours", "diffusers", "diffusers2neutral.safetensors",
             _ours("diffusers", "pt2neutral", "IN", "-o", "OUT")),
        flux("cp", "floor", "mindone", "cp.safetensors", _cp("mindone")),
        flux("ours: ms2neutral (MindONE Flux trainer's safetensors -> neutral)", "ours", "mindone",
             "ms2neutral.safetensors", _ours("mindone", "ms2neutral", "IN", "-o", "OUT")),
    ]


@dataclass(frozen=True)
class Bench:
    """One architecture's benchmark: the label of the generated input, the files made of it once (untimed:
    label, made from label, format, write options), the contenders, and how the table and notes name them."""

    source: str
    derived: tuple[tuple[str, str, str, dict], ...]
    contenders: Callable[[], list[Contender]]
    baseline: str  # column header: "<baseline> time / this"
    described: tuple[str, ...]  # "Contenders, exactly" (Markdown list items)


DIFFUSERS_NOTE = ("`python bench/contenders/diffusers_resave.py PIPELINE IN OUTDIR`: `PIPELINE.lora_state_dict(dir, "
                  "weight_name=file)`, split by component prefix, `PIPELINE.save_lora_weights(OUTDIR, "
                  "<component>_lora_layers=..., weight_name='pytorch_lora_weights.safetensors')` (no model instance)")
BENCHES = {
    SDXL.name: Bench("ckpt", (("neutral", "ckpt", "neutral", {}),), _sdxl_contenders, "seed", (
        "`cp IN OUT`; `sh -c 'cp \"$1\" \"$2\" && sync \"$2\"' sh IN OUT`",
        "floors: `python bench/contenders/floor_copy.py HASHES IN OUT`: Python started and numpy imported, the file "
        "copied (`copy_file_range`) in 32 MiB pieces, each flushed (`fdatasync`) by a thread while the next is "
        "copied, as our outputs are, with HASHES sha256 passes over it in threads beside, the output fsynced; "
        "nothing converted or scanned. 2 passes for a conversion to neutral (its source's sha256 "
        "and tensor_sha256), none reading the neutral file (its hash is not verified by default). No converter "
        "doing what ours must can be faster than its floor",
        "seed: `python bench/contenders/seed_ms2pt.py IN.ckpt ms_lora_params.txt pt_lora_params_ordered.txt OUT` "
        "(the seed's `convert_lora_ms2pt.py` steps: `mindspore.load_checkpoint`, names paired by line position "
        "from two lists, `torch.tensor(p.asnumpy())`, `torch.save`; without its `fire` wrapper, and with MindSpore "
        "2.10's guard that refuses a .ckpt larger than *free* memory switched off: with a full page cache it "
        "refuses even the 727 MB input, which the seed's MindSpore did not)",
        f"diffusers: {DIFFUSERS_NOTE.replace('PIPELINE', 'StableDiffusionXLPipeline')} on the neutral file",
        "ours: `python cli.py ms2neutral IN.ckpt -o OUT`, `python cli.py neutral2pt NEUTRAL -o OUT` (diffusers format), "
        "`python cli.py neutral2ms NEUTRAL -o OUT.ckpt` (mindone-sgm), `python cli.py convert NEUTRAL --to kohya -o OUT`",
    )),
    FLUX1.name: Bench("kohya", (("neutral", "kohya", "neutral", {}), ("diffusers", "neutral", "diffusers", {}),
                                ("mindone", "neutral", "mindone-diffusers", {"container": "safetensors"})),
                      _flux_contenders, "diffusers", (
        "`cp IN OUT`; `sh -c 'cp \"$1\" \"$2\" && sync \"$2\"' sh IN OUT`",
        f"diffusers: {DIFFUSERS_NOTE.replace('PIPELINE', 'FluxPipeline')}, on the kohya file (what a diffusers "
        "user runs to turn a kohya Flux LoRA into diffusers': `lora_state_dict` converts it, folding alpha into the "
        "weights, and gives q/k/v one shared `lora_A`, which the script clones, as `save_lora_weights` refuses shared "
        "tensors) and on the neutral file (load and save, no conversion). Rows reading the kohya file are "
        "compared with the first, the others with the second",
        "ours: `python cli.py pt2neutral KOHYA -o OUT`, `python cli.py convert KOHYA --to diffusers -o OUT`, "
        "`python cli.py neutral2pt NEUTRAL -o OUT`, `python cli.py convert NEUTRAL --to kohya -o OUT` (q/k/v and "
        "linear1 merged back), `python cli.py neutral2ms NEUTRAL --naming mindone-diffusers --format safetensors -o OUT` "
        "(what MindONE's Flux trainer saves), `python cli.py pt2neutral DIFFUSERS -o OUT`, "
        "`python cli.py ms2neutral MINDONE -o OUT`",
    )),
}


# ------------------------------------------------------------------------------------------- setup


def prepare(spec: InputSpec, work: Path, regenerate: bool) -> Files:
    """Generate the input, the files made of it and (SDXL) the seed's name lists (all untimed)."""
    from lorabridge.converters import convert

    bench = BENCHES[spec.architecture]
    source = generate(spec, work, regenerate)
    files = Files({bench.source: source}, work / "out" / spec.name)
    for label, made_from, fmt, options in bench.derived:
        plain = label == "neutral" and spec.suffix != ".safetensors"  # SDXL's: name.ckpt -> name.safetensors
        path = work / (f"{spec.name}.safetensors" if plain else f"{spec.name}.{label}.safetensors")
        files.inputs[label] = path
        if regenerate or not path.exists() or path.stat().st_mtime < files.inputs[made_from].stat().st_mtime:
            convert(files.inputs[made_from], path, fmt, force=True, progress=False, **options)
    if bench.baseline == "seed":
        files.ms_names, files.pt_names = work / f"{spec.name}.ms_lora_params.txt", work / f"{spec.name}.pt_lora_params_ordered.txt"
        if regenerate or not files.pt_names.exists() or files.pt_names.stat().st_mtime < source.stat().st_mtime:
            write_name_lists(source, files.ms_names, files.pt_names)
    files.out.mkdir(parents=True, exist_ok=True)
    return files


def write_name_lists(ckpt: Path, ms_list: Path, pt_list: Path) -> None:
    """The seed's two inputs: ``name#shape#dtype`` of every MindSpore tensor in file order, and the
    diffusers name of each at the same line (a fused bigG in_proj keeps its fused name: the seed
    cannot split it, and pairing by position does not care)."""
    from lorabridge.naming.mindone_keys import NAMINGS
    from lorabridge.io.ms_ckpt import MsCheckpointFile

    naming, handle = NAMINGS["sgm"], MsCheckpointFile(ckpt)
    ms_lines, pt_lines = [], []
    for key in handle.keys():
        dtype, shape = handle.header_entry(key)
        module, role = naming.split_key(key)
        names = naming.parse(module)
        pt_module = names[0] if len(names) == 1 else f"text_encoder_2.{module}"
        ms_lines.append(f"{key}#{shape}#{dtype}\n")
        pt_lines.append(f"{pt_module}.{role}#{shape}#{dtype}\n")
    ms_list.write_text("".join(ms_lines))
    pt_list.write_text("".join(pt_lines))


def largest_tensor(files: Files) -> int:
    """Bytes of the largest tensor in any of the input files."""
    from lorabridge.io.ms_ckpt import MsCheckpointFile

    sizes = []
    for path in files.inputs.values():
        tensors = MsCheckpointFile(path).items() if path.suffix == ".ckpt" else SafetensorsFile(path).tensors().items()
        sizes += [t.nbytes for _, t in tensors]
    return max(sizes)


def machine() -> dict[str, str]:
    """CPU model, cores, RAM, the disk the work directory is on, OS and Python."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal"))
    return {"cpu": cpu, "cores": str(os.cpu_count()), "ram": f"{mem / 2**30:.1f} GiB",
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version()}


def disk(path: Path) -> str:
    """Device, filesystem and size of the filesystem holding ``path``, and whether it is rotational."""
    out = subprocess.run(["df", "--output=source,fstype,size", os.fspath(path)], capture_output=True, text=True)
    fields = out.stdout.splitlines()[-1].split() if out.returncode == 0 else ["?", "?", "0"]
    device = Path(fields[0]).name
    rotational = Path(f"/sys/block/{device}/queue/rotational")
    kind = {"0": "non-rotational", "1": "rotational"}.get(rotational.read_text().strip(), "?") if rotational.exists() else "?"
    virtual = " (virtio disk of a VM)" if device.startswith("vd") else ""
    return f"{fields[0]} {fields[1]}, {int(fields[2]) / 2**20:.0f} GiB, {kind}{virtual}"


def versions() -> dict[str, str]:
    found = {}
    for name in VERSIONS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def git_revision() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "lorabridge"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    return f"{head}{' + uncommitted changes in lorabridge/' if dirty else ''}"


# ------------------------------------------------------------------------------------------- running


def remove(out: Path) -> None:
    shutil.rmtree(out) if out.is_dir() else out.unlink(missing_ok=True)


def warm(path: Path) -> None:
    """Read ``path`` into the page cache (a run before may have pushed it out: the seed peaks at 4.7 GB)."""
    with open(path, "rb", buffering=0) as handle:
        while handle.read(8 << 20):
            pass


def make_room(files: Files) -> None:
    """Copy the inputs once and delete the copies, untimed, so that the page cache has that much memory
    free: otherwise the first contender of an input pays for reclaiming what the runs before left cached."""
    for path in files.inputs.values():
        shutil.copyfile(path, files.out / "room")
        (files.out / "room").unlink()


def run_one(launcher: Launcher, argv: list[str], out: Path | None, log: Path, reads: Path | None = None) -> Run:
    """Bring the input into the page cache, flush dirty pages (so no run pays for another's writeback),
    run, note the output's size and remove it (outputs of 2 GiB inputs would otherwise fill the disk)."""
    if reads is not None:
        warm(reads)
    os.sync()
    run = launcher.measure(argv, cwd=REPO, env=ENV, log=log)
    if out is not None:
        run.output_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if out.is_dir() else (
            out.stat().st_size if out.exists() else 0)
        remove(out)
    return run


def startup_commands(files: dict[str, Files]) -> list[tuple[str, list[str]]]:
    commands = [("python -c pass (interpreter alone)", [PY, "-c", "pass"]),
                ("python -c 'import lorabridge.cli' (our start-up)", [PY, "-c", "import lorabridge.cli"]),
                ("python cli.py --help", [PY, "cli.py", "--help"])]
    commands += [(f"python cli.py inspect {f.input('neutral').name}", [PY, "cli.py", "inspect", os.fspath(f.input("neutral"))])
                 for f in files.values()]
    return commands


def heavy_imports(argv: list[str]) -> list[str]:
    """Which of torch / mindspore / diffusers a command imports (from ``python -X importtime``)."""
    out = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], cwd=REPO, env=ENV, capture_output=True, text=True)
    modules = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    return sorted(m for m in modules if m in ("torch", "mindspore", "diffusers"))


def profile(argv: list[str], out: Path, work: Path) -> str:
    """cProfile of one of our commands: the functions with the most own time."""
    stats_file = work / "profile.prof"
    remove(out)
    subprocess.run([argv[0], "-m", "cProfile", "-o", os.fspath(stats_file), *argv[1:]], cwd=REPO, env=ENV,
                   capture_output=True, check=True)
    remove(out)
    text = io.StringIO()
    stats = pstats.Stats(os.fspath(stats_file), stream=text)
    stats.strip_dirs().sort_stats("tottime").print_stats(PROFILE_LINES)
    lines = text.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if "function calls" in line)
    noise = ("Ordered by", "List reduced")
    return "\n".join(line for line in lines[start:] if line.strip() and not any(n in line for n in noise))


def memory_profile(argv: list[str], out: Path) -> str:
    """``bench/memprofile.py``: the allocation sites holding the most Python-allocated memory at the peak."""
    remove(out)
    done = subprocess.run([argv[0], "bench/memprofile.py", *argv[2:]], cwd=REPO, env=ENV, capture_output=True,
                          text=True, check=True)
    remove(out)
    return done.stdout[done.stdout.index("traced peak"):].rstrip()


# ------------------------------------------------------------------------------------------- reporting


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}" if n >= 2**20 else f"{n / 2**20:.3f}"


def median(runs: list[Run]) -> float:
    return statistics.median(r.wall_s for r in runs)


def spread(runs: list[Run]) -> str:
    walls = [r.wall_s for r in runs]
    return f"{statistics.median(walls):.3f}" + (f" ({min(walls):.2f}-{max(walls):.2f})" if len(walls) > 1 else "")


@dataclass
class Row:
    contender: Contender
    runs: list[Run]
    input_bytes: int
    cp: float  # median wall of cp of the same input file
    cp_sync: float | None
    baseline: float | None  # median wall of the baseline this row is compared with (Contender.versus)
    startup: float

    @property
    def wall(self) -> float:
        return median(self.runs)

    @property
    def cpu(self) -> float:
        return statistics.median(r.cpu_s for r in self.runs)

    @property
    def ok(self) -> bool:
        return all(r.returncode == 0 for r in self.runs)

    @property
    def peak_rss(self) -> int:
        return max(r.peak_rss_bytes for r in self.runs)

    @property
    def peak_anon(self) -> int:
        return max(r.peak_anon_bytes for r in self.runs)

    @property
    def peak_file(self) -> int:
        return max(r.peak_file_bytes for r in self.runs)


def input_table(rows: list[Row], baseline: str) -> list[str]:
    head = ("| contender | reads | wall s (median, min-max) | CPU s | MB/s | x cp | x cp+fsync | "
            f"{baseline} time / this | "
            "wall - start-up s | x cp, start-up excluded | peak RSS MiB | RSS / input | peak RssAnon MiB | "
            "peak RssFile MiB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        c = r.contender
        if not r.ok:
            failed = next(run for run in r.runs if run.returncode != 0)
            why = failed.stderr.strip().splitlines()[-1] if failed.stderr.strip() else ""
            lines.append(f"| {c.name} | {c.reads} | FAILED in {sum(run.returncode != 0 for run in r.runs)} of "
                         f"{len(r.runs)} runs (exit {failed.returncode}): {why} |")
            continue
        python = c.kind != "floor"
        net = r.wall - r.startup if c.kind == "ours" else None
        lines.append(
            f"| {c.name} | {c.reads} | {spread(r.runs)} | {r.cpu:.2f} | {r.input_bytes / r.wall / 1e6:,.0f} | "
            f"{r.cp / r.wall:.2f} | "
            f"{f'{r.cp_sync / r.wall:.2f}' if r.cp_sync else ''} | {f'{r.baseline / r.wall:.1f}' if r.baseline else ''} | "
            f"{f'{net:.3f}' if net is not None else ''} | {f'{r.cp / net:.2f}' if net else ''} | "
            f"{mib(r.peak_rss)} | {r.peak_rss / r.input_bytes:.2f} | {mib(r.peak_anon) if python else ''} | "
            f"{mib(r.peak_file) if python else ''} |")
    return lines


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def targets(all_rows: dict[str, list[Row]], largest: dict[str, int], cli_rows: list[tuple[str, list[Run], list[str]]]
            ) -> tuple[list[str], list[tuple[str, Row, str]]]:
    """The issue's targets, each met or missed with its number; and the rows to profile: (input, row,
    "time" or "memory")."""
    lines, misses = [], []
    ours = lambda name: [r for r in all_rows.get(name, []) if r.contender.kind == "ours"]
    if TARGET_INPUT in all_rows:
        lines.append(f"**Throughput >= {TARGET_CP_RATIO}x cp and >= {TARGET_CP_SYNC_RATIO}x cp + fsync on the rank-128 "
                     f"file** (`{TARGET_INPUT}`; issue 14):")
        for r in ours(TARGET_INPUT):
            ratio, sync_ratio = r.cp / r.wall, r.cp_sync / r.wall
            lines.append(f"- {r.contender.name}: {_met(r.ok and ratio >= TARGET_CP_RATIO)} {ratio:.2f}x cp, "
                         f"{_met(r.ok and sync_ratio >= TARGET_CP_SYNC_RATIO)} {sync_ratio:.2f}x cp + fsync "
                         f"({r.wall:.3f} s vs cp {r.cp:.3f} s, cp + fsync {r.cp_sync:.3f} s; "
                         f"start-up excluded {r.cp / (r.wall - r.startup):.2f}x cp)")
            if not (r.ok and ratio >= TARGET_CP_RATIO and sync_ratio >= TARGET_CP_SYNC_RATIO):
                misses.append((TARGET_INPUT, r, "time"))
        for r in all_rows[TARGET_INPUT]:
            if r.ok and r.contender.name.startswith("floor"):
                lines.append(f"- (what no converter goes under) {r.contender.name}: {r.cp / r.wall:.2f}x cp, "
                             f"{r.cp_sync / r.wall:.2f}x cp + fsync ({r.wall:.3f} s)")
    seeded = [name for name in all_rows if any(r.contender.name.startswith("seed") for r in all_rows[name])]
    if seeded:
        lines.append(f"\n**>= {TARGET_SEED_SPEEDUP:g}x faster than the seed's approach** (seed wall / ours, same input):")
    for name in seeded:
        for r in ours(name):
            speedup = r.baseline / r.wall
            lines.append(f"- {name}, {r.contender.name}: {'met' if r.ok and speedup >= TARGET_SEED_SPEEDUP else 'MISSED'}, "
                         f"{speedup:.1f}x ({r.wall:.3f} s vs seed {r.baseline:.3f} s)")
    lines.append(f"{chr(10) if lines else ''}**Peak RSS <= largest tensor + 100 MB** (ru_maxrss; RssAnon in brackets):")
    for name in all_rows:
        limit = largest[name] + TARGET_RSS_SLACK
        for r in ours(name):
            met = r.peak_rss <= limit
            if not met:
                misses.append((name, r, "memory"))
            lines.append(f"- {name}, {r.contender.name}: {'met' if met else 'MISSED'}, {mib(r.peak_rss)} MiB "
                         f"[{mib(r.peak_anon)} MiB anon] vs limit {mib(limit)} MiB "
                         f"(largest tensor {mib(largest[name])} MiB)")
    lines.append(f"\n**`--help` and `inspect` under {TARGET_CLI_S} s, no torch or mindspore import:**")
    for label, runs, heavy in cli_rows:
        if "cli.py" not in label:
            continue
        wall = median(runs)
        met = wall < TARGET_CLI_S and not heavy
        lines.append(f"- `{label}`: {'met' if met else 'MISSED'}, {wall:.3f} s"
                     f"{', imports ' + ', '.join(heavy) if heavy else ', imports neither torch nor mindspore'}")
    return lines, misses


def sections(text: str) -> tuple[dict[str, str], str]:
    """The generated sections of RESULTS.md (architecture name -> text) and the hand-written notes."""
    head, _, notes = text.partition(NOTES_MARKER)
    parts = re.split(r"<!-- section: (\S+) -->\n", head)
    return dict(zip(parts[1::2], parts[2::2])), notes or "\n"


def write_results(args, info: dict, tables: dict[str, list[Row]], specs: dict[str, InputSpec], sizes: dict,
                  largest: dict, cli_rows, profiles: dict[str, str]) -> None:
    """Rewrite the sections of the architectures this run measured; keep the others and the notes."""
    found, notes = sections(RESULTS.read_text() if RESULTS.exists() else "")
    for architecture in dict.fromkeys(spec.architecture for spec in specs.values()):
        mine = [name for name, spec in specs.items() if spec.architecture == architecture]
        found[architecture] = "\n".join(render_section(
            architecture, args, info, {n: tables[n] for n in mine}, {n: specs[n] for n in mine}, sizes, largest,
            cli_rows, {label: text for label, text in profiles.items() if any(f"({n}," in label for n in mine)
                       or "cli.py" in label})) + "\n\n"
    order = [a.name for a in architectures() if a.name in found]
    RESULTS.write_text("".join(SECTION_MARKER.format(a) + "\n" + found[a] for a in order) + NOTES_MARKER + notes)


def render_section(architecture: str, args, info: dict, tables: dict[str, list[Row]], specs: dict[str, InputSpec],
                   sizes: dict, largest: dict, cli_rows, profiles: dict[str, str]) -> list[str]:
    """The Markdown of one architecture's section: machine, method, contenders, inputs, tables, targets, profiles."""
    bench, label = BENCHES[architecture], next(a.label for a in architectures() if a.name == architecture)
    target_lines, _ = targets(tables, largest, cli_rows)
    out = [
        f"# Conversion benchmarks: {label}",
        "",
        f"Written by `{info['command']}` on {info['date']} (git {info['git']}).",
        "",
        "## Machine",
        "",
        f"- CPU: {info['machine']['cpu']}, {info['machine']['cores']} cores; RAM {info['machine']['ram']}",
        f"- Disk (work directory `{info['work']}`): {info['disk']}",
        f"- {info['machine']['os']}, Python {info['machine']['python']}",
        f"- Versions: {', '.join(f'{k} {v}' for k, v in info['versions'].items())}",
        f"- Load average before / after: {info['load_before']} / {info['load_after']} (other work on the machine "
        "shows up as noise; the min-max spread says how much)",
        f"- Repeats: {args.repeat}; figures are medians, peaks the highest of the repeats",
        "",
        "## How it is measured",
        "",
        "Each contender is one process started with `posix_spawn`; wall time runs from the spawn to `wait4`. Peak RSS "
        "is `ru_maxrss` from `wait4`; it includes the pages of memory-mapped input files the process touched "
        "(page cache, not private memory), so peak `RssAnon` and `RssFile` from `/proc/<pid>/status` are sampled "
        f"every 3 ms as well. Commands are spawned from a small launcher process, because the kernel records "
        f"the spawning process's peak RSS into the child's `ru_maxrss` at exec: {mib(info['launcher_rss'])} MiB, "
        "the launcher's, is therefore a floor under every peak RSS below. Before every run the input is read into "
        "the page cache and `sync` flushes dirty pages; after it, its output is removed. `cp` is the floor: GNU "
        "cp copies in the "
        "kernel (`copy_file_range`) and does not fsync; our writers fsync the output before renaming it into place "
        "(crash safety), so `cp + fsync` (`cp a b && sync b`) is shown too. \"x cp\" = cp's wall time / this "
        "wall time on the same input file (= throughput relative to cp). Python start-up is part of every "
        "command's cost; \"wall - start-up\" subtracts the median of a bare `python -c 'import lorabridge.cli'`. "
        "\"CPU s\" is user + system time of the process and all its threads (from `wait4`): less sensitive than "
        "wall time to other work on the machine, and above wall time when threads run on both cores. Commands run "
        "offline (`HF_HUB_OFFLINE=1`) with Python's bytecode cache, compiled beforehand (`compileall`).",
        "",
        "Contenders, exactly:",
        "",
        *(f"- {line}" for line in bench.described),
        "",
        "## Inputs",
        "",
        "| input | what | tensors (neutral file) | files, bytes | largest tensor |",
        "|---|---|---|---|---|",
    ]
    for name, spec in specs.items():
        files = ", ".join(f"{label} {size:,}" for label, size in sizes[name]["files"].items())
        out.append(f"| `{name}` | {spec.description} | {sizes[name]['tensors']} | {files} | {mib(largest[name])} MiB |")
    for name, rows in tables.items():
        out += ["", f"## `{name}`", ""] + input_table(rows, bench.baseline)
    out += ["", "## Start-up, `--help`, `inspect`", "",
            "| command | wall s (median, min-max) | CPU s | peak RSS MiB | imports |", "|---|---|---|---|---|"]
    for label, runs, heavy in cli_rows:
        out.append(f"| `{label}` | {spread(runs)} | {statistics.median(r.cpu_s for r in runs):.3f} | "
                   f"{mib(max(r.peak_rss_bytes for r in runs))} | "
                   f"{', '.join(heavy) or 'no torch, mindspore, diffusers'} |")
    out += ["", "## Targets (issues 7 and 14)", ""] + target_lines
    if profiles:
        out += ["", "## Profiles of the misses", "",
                f"Time: `python -m cProfile` of the command, the {PROFILE_LINES} functions with the most own time (one "
                "run, so times include profiling overhead; time in numpy calls and in page faults on mapped input "
                "counts as the own time of the Python function that made them; threads other than the main one "
                "show as waits in `acquire`). Memory: `bench/memprofile.py`, tracemalloc at the peak (mapped file "
                "pages are not allocations: see RssFile in the tables)."]
        for title, text in profiles.items():
            out += ["", f"### {title}", "", "```", text, "```"]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the two smaller inputs, one repeat")
    parser.add_argument("--repeat", type=int, default=None, help="runs per contender [3; 1 with --quick]")
    parser.add_argument("--inputs", nargs="*", choices=list(INPUTS), default=None, help="inputs to run [all]")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lorabridge-bench",
                        help="where inputs and outputs go (inputs are kept and reused) [%(default)s]")
    parser.add_argument("--regenerate", action="store_true", help="regenerate the inputs even if present")
    parser.add_argument("--no-profile", action="store_true", help="skip the cProfile runs of target misses")
    args = parser.parse_args(argv)
    args.repeat = args.repeat or (1 if args.quick else 3)
    names = args.inputs or (list(INPUTS)[:2] if args.quick else list(INPUTS))
    args.work.mkdir(parents=True, exist_ok=True)
    launcher = Launcher()  # first, while this process is still small (see measure.LAUNCHER)
    specs = {n: INPUTS[n] for n in names}
    python = os.path.relpath(PY, REPO) if Path(PY).is_relative_to(REPO) else PY
    info = {"command": " ".join([python, "bench/convert_bench.py", *(argv if argv is not None else sys.argv[1:])]),
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "git": git_revision(),
            "machine": machine(), "disk": disk(args.work), "versions": versions(), "work": os.fspath(args.work)}
    print(f"preparing inputs in {args.work} ...", flush=True)
    files = {n: prepare(s, args.work, args.regenerate) for n, s in specs.items()}
    sizes = {n: {"files": {label: path.stat().st_size for label, path in f.inputs.items()},
                 "tensors": len(SafetensorsFile(f.input("neutral")))} for n, f in files.items()}
    largest = {n: largest_tensor(f) for n, f in files.items()}
    subprocess.run([PY, "-m", "compileall", "-q", "lorabridge", "bench/contenders"], cwd=REPO, env=ENV, check=True)
    info["load_before"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    contenders = {n: BENCHES[spec.architecture].contenders() for n, spec in specs.items()}
    runs: dict[tuple[str, int], list[Run]] = {}
    cli = startup_commands(files)
    cli_runs: dict[str, list[Run]] = {label: [] for label, _ in cli}
    logs = args.work / "logs"
    logs.mkdir(exist_ok=True)
    for repeat in range(args.repeat):
        for label, command in cli:
            cli_runs[label].append(run_one(launcher, command, None, logs / "cli.out"))
        for name, f in files.items():
            make_room(f)
            for i, c in enumerate(contenders[name]):
                out = f.out / c.output
                run = run_one(launcher, c.argv(f, out), out, logs / f"{name}.{i}.out", f.input(c.reads))
                runs.setdefault((name, i), []).append(run)
                print(f"[{repeat + 1}/{args.repeat}] {name:24s} {c.name[:60]:60s} {run.wall_s:8.3f} s "
                      f"{mib(run.peak_rss_bytes):>9s} MiB rss{'' if run.returncode == 0 else '  FAILED'}", flush=True)
    info["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    info["launcher_rss"] = launcher.own_rss()
    launcher.__exit__()
    startup = median(cli_runs["python -c 'import lorabridge.cli' (our start-up)"])
    tables: dict[str, list[Row]] = {}
    for name, f in files.items():
        walls: dict[tuple[str, str], float] = {}  # (contender name, reads) -> median wall; the first of a name
        baselines: dict[str, float] = {}  # reads -> median wall of the baseline reading it
        for i, c in enumerate(contenders[name]):
            walls.setdefault((c.name, c.reads), median(runs[(name, i)]))
            if c.kind == "baseline":
                baselines.setdefault(c.reads, median(runs[(name, i)]))
        tables[name] = [Row(c, runs[(name, i)], f.input(c.reads).stat().st_size, walls[("cp", c.reads)],
                            walls.get(("cp + fsync", c.reads)), baselines.get(c.versus), startup)
                        for i, c in enumerate(contenders[name])]
    cli_rows = [(label, cli_runs[label], heavy_imports(command)) for label, command in cli]
    profiles = {}
    if not args.no_profile:
        _, misses = targets(tables, largest, cli_rows)
        for name, row, kind in misses:
            out = files[name].out / row.contender.output
            argv = row.contender.argv(files[name], out)
            profiles[f"{row.contender.name} ({name}, {kind})"] = (
                profile(argv, out, args.work) if kind == "time" else memory_profile(argv, out))
        for label, command in cli:
            if "cli.py" in label and median(cli_runs[label]) >= TARGET_CLI_S:
                profiles[label] = profile(command, args.work / "none", args.work)
    write_results(args, info, tables, specs, sizes, largest, cli_rows, profiles)
    (args.work / "results.json").write_text(json.dumps(
        {"info": info, "runs": {f"{n}/{contenders[n][i].name}/{contenders[n][i].reads}": [asdict(r) for r in rs]
                                for (n, i), rs in runs.items()},
         "cli": {label: [asdict(r) for r in rs] for label, rs in cli_runs.items()}}, indent=1))
    print(f"wrote {RESULTS.relative_to(REPO)} (raw numbers: {args.work / 'results.json'})")


if __name__ == "__main__":
    main()
