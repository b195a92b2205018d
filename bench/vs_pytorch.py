"""Side-by-side with the PyTorch reference: one command per row of the README's benchmark table.

Each row runs the PyTorch reference script torch_ddpm.py (diffusers' UNet2DModel, PyTorch CPU) and
then this project's benchmark on the same architecture, batch and machine, one after the other in
the same invocation (never both at once: on 2 cores they would slow each other down), and reports
the ratio JAX / PyTorch in throughput (> 1 means JAX is faster):

    .venv/bin/python bench/vs_pytorch.py small    # small UNet: train b64, forward b256
    .venv/bin/python bench/vs_pytorch.py cifar    # CIFAR-10 UNet: train b16, forward b64
    .venv/bin/python bench/vs_pytorch.py sample   # small UNet, 64 images: DDPM-1000, DDIM-50

The reference script is not part of this repository: pass its path with --torch-bench PATH
(default ../shared/bench/torch_ddpm.py beside the checkout; contention.py must sit beside it). The
PyTorch venv is --torch-python, default /tmp/torchref/bin/python, made with
`python3 -m venv /tmp/torchref && /tmp/torchref/bin/pip install torch==2.13.0 diffusers==0.42.1
numpy` (never the project's venv). Results go to bench/results/cpu_vs_pytorch_<row>.json (both
raw JSONs and the ratios). `sample` takes ~9 minutes on 2 cores, `cifar` ~4, `small` ~2.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCH_BENCH = ROOT.parent / "shared" / "bench" / "torch_ddpm.py"

ROWS = {
    "small": dict(
        torch=["--model", "small", "--size", "28", "--in-ch", "1", "--mode", "flops", "train",
               "forward", "--train-batch", "64", "--fwd-batch", "256"],
        jax=["bench/train_throughput.py", "--model", "small", "--batch", "64",
             "--fwd-batch", "256"],
    ),
    "cifar": dict(
        torch=["--model", "cifar", "--size", "32", "--in-ch", "3", "--mode", "flops", "train",
               "forward", "--train-batch", "16", "--fwd-batch", "64"],
        jax=["bench/train_throughput.py", "--model", "cifar", "--batch", "16",
             "--fwd-batch", "64"],
    ),
    "sample": dict(
        torch=["--model", "small", "--size", "28", "--in-ch", "1", "--mode", "sample",
               "--sample-batch", "64"],
        jax=["-m", "bench.sample_throughput", "--batch", "64"],
    ),
}


def _run(cmd: list[str], out: str) -> dict:
    print("$", " ".join(cmd + ["--out", out]), flush=True)
    subprocess.run(cmd + ["--out", out], check=True, cwd=ROOT)
    with open(out) as f:
        return json.load(f)


def ratios(row: str, torch: dict, jax: dict) -> list[tuple[str, float, float, str]]:
    """(what, PyTorch value, JAX value, unit) rows; the ratio is always JAX speed / PyTorch's."""
    if row == "sample":
        return [(f"{name.upper()}-{jax[f'sample_{name}_steps']} sampling, 64 images",
                 torch[f"sample_{name}_wall_s"], jax[f"sample_{name}_wall_s"], "s")
                for name in ("ddpm", "ddim")]
    return [(f"train step, batch {jax['train']['batch']}", torch["train_img_s"],
             jax["train"]["img_per_s"], "img/s"),
            (f"forward, batch {jax['forward']['batch']}", torch["fwd_img_s"],
             jax["forward"]["img_per_s"], "img/s")]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("row", choices=sorted(ROWS))
    ap.add_argument("--torch-python", default="/tmp/torchref/bin/python")
    ap.add_argument("--torch-bench", default=str(TORCH_BENCH),
                    help="path of the PyTorch reference script torch_ddpm.py (not in this repo)")
    ap.add_argument("--steps", type=int, nargs=2, metavar=("DDPM", "DDIM"), default=(1000, 50),
                    help="sampling steps (row `sample`); e.g. 4 3 for a smoke test")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not Path(args.torch_bench).is_file():
        sys.exit(f"--torch-bench {args.torch_bench} is not a file: the PyTorch reference script "
                 f"torch_ddpm.py is not part of this repository. Fix: pass its path with "
                 f"--torch-bench PATH.")
    if not Path(args.torch_python).exists():
        sys.exit(f"--torch-python {args.torch_python} does not exist. Fix: python3 -m venv "
                 f"/tmp/torchref && /tmp/torchref/bin/pip install torch==2.13.0 "
                 f"diffusers==0.42.1 numpy, or pass --torch-python PATH.")
    spec = ROWS[args.row]
    extra = (["--ddpm-steps", str(args.steps[0]), "--ddim-steps", str(args.steps[1])]
             if args.row == "sample" else [])
    with tempfile.TemporaryDirectory() as tmp:
        torch = _run([args.torch_python, args.torch_bench, *spec["torch"], *extra],
                     os.path.join(tmp, "torch.json"))
        jax = _run([sys.executable, *spec["jax"], *extra], os.path.join(tmp, "jax.json"))
    table = ratios(args.row, torch, jax)
    print(f"\n{'':38s} {'PyTorch':>14s} {'JAX':>14s} {'JAX speed-up':>13s}")
    result = {"row": args.row, "torch": torch, "jax": jax, "ratios": {}}
    for what, t, j, unit in table:
        speedup = t / j if unit == "s" else j / t
        result["ratios"][what] = speedup
        print(f"{what:38s} {t:>8.2f} {unit:<5s} {j:>8.2f} {unit:<5s} {speedup:>12.2f}x")
    out = args.out or str(ROOT / "bench" / "results" / f"cpu_vs_pytorch_{args.row}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
