"""``make demo``: the whole job on the built-in tiny SDXL, offline, with the commands a user would type.

    python -m lorabridge.demo OUTDIR

1. ``make-tiny --arch sdxl`` builds a tiny random SDXL and a MindONE-style LoRA checkpoint for it
   (SGM names, as MindONE's SDXL trainer saves them);
2. ``ms2neutral`` converts the checkpoint to one neutral ``.safetensors`` file;
3. ``infer --backend torch`` (diffusers) and ``infer --backend mindspore`` (mindone.diffusers,
   on CPU through the op adapter) generate from that same file and the same initial noise,
   the seed's consistency procedure; a base-model image shows what the LoRA changes;
4. ``compare`` measures the torch/mindspore difference (MAE on 0..255) and draws it.

Each command runs in its own process, as on a command line, and is printed before it runs.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

PROMPT = "a photo of a cat"
STEPS = "4"


def lorabridge(*args: str | Path, capture: bool = False) -> str:
    """Run one lorabridge command in a fresh Python, echoing it; exit with its status if it fails."""
    argv = [str(a) for a in args]
    print("$ lorabridge " + " ".join(shlex.quote(a) for a in argv), flush=True)
    proc = subprocess.run([sys.executable, "-c", "from lorabridge.cli import main; main()", *argv],
                          stdout=subprocess.PIPE if capture else None, text=True)
    if proc.returncode not in (0, 1) or (proc.returncode == 1 and args[0] != "compare"):
        sys.exit(f"demo failed at: lorabridge {' '.join(argv)}")
    return proc.stdout or ""


def run(outdir: Path) -> dict:
    """The demo in ``outdir`` (created; earlier demo files there are replaced); returns the numbers."""
    outdir.mkdir(parents=True, exist_ok=True)
    base, ckpt, neutral = outdir / "tiny-sdxl", outdir / "tiny_lora_mindone.ckpt", outdir / "tiny_lora.safetensors"
    noise = outdir / "init_latents.npy"
    lorabridge("make-tiny", base, "--arch", "sdxl", "--make-lora", ckpt, "--force")
    lorabridge("ms2neutral", ckpt, "-o", neutral, "--force")
    common = ("--base", base, "--lora", neutral, "--prompt", PROMPT, "--steps", STEPS, "--scheduler", "euler",
              "--dtype", "fp32", "--force")
    lorabridge("infer", "--backend", "torch", *common, "--save-latents", noise, "-o", outdir / "torch-images")
    lorabridge("infer", "--backend", "mindspore", *common, "--init-latents", noise, "-o", outdir / "mindspore-images")
    lorabridge("infer", "--backend", "torch", "--base", base, "--prompt", PROMPT, "--steps", STEPS, "--dtype", "fp32",
               "--init-latents", noise, "-o", outdir / "base-images", "--force")
    parity = json.loads(lorabridge("compare", outdir / "torch-images", outdir / "mindspore-images", "-o",
                                   outdir / "diff-images", "--max-mae", "0.5", "--force", "--json", capture=True))
    effect = json.loads(lorabridge("compare", outdir / "base-images", outdir / "torch-images", "--json", capture=True))
    return {"parity": parity["pairs"][0], "lora_effect": effect["pairs"][0], "passed": parity["passed"]}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.exit("usage: python -m lorabridge.demo OUTDIR")
    result = run(Path(args[0]))
    parity, effect = result["parity"], result["lora_effect"]
    print()
    print(f"torch image:      {parity['a']}")
    print(f"mindspore image:  {parity['b']}")
    print(f"side by side:     {parity['diff']}  (torch | mindspore | heat map of the difference)")
    print(f"torch vs mindspore: MAE {parity['mae']:.4f} on 0..255 (max {parity['max_error']}); MindONE's SDXL LoRA consistency bar is 5")
    print(f"LoRA vs base model: MAE {effect['mae']:.2f} (what the LoRA changes, same noise)")
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
