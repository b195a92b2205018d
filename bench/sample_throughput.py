"""Sampling throughput of the small benchmark UNet: ancestral (1000 steps) and DDIM (50 steps).

The model is the PyTorch reference's "small" (diffusers UNet2DModel (32, 64, 64)): ch 32,
ch_mult (1, 2, 2), 2 res blocks per level, attention at 14x14, GroupNorm(8), 28x28x1 images,
unconditional, 1,623,169 parameters. Each sampler runs through `sampling_lib.Sampler`, as
--mode=sample does: the whole loop inside one jit, the batch sharded over the local devices.
Compilation is timed on its own (`Sampler.compile`), then --reps timed runs (median reported).

From the repository root:

    .venv/bin/python -m bench.sample_throughput --out /tmp/jax_small28_sample.json
    .venv/bin/python -m bench.sample_throughput --ddpm-steps 4 --ddim-steps 3   # smoke test

The full run takes minutes; on a shared machine run it alone. The PyTorch reference, on the same
machine and one after the other (never two benchmarks at once), writes the same
sample_{ddpm,ddim}_wall_s keys:

    /tmp/torchref/bin/python /work/shared/bench/torch_ddpm.py --model small --size 28 \\
        --in-ch 1 --mode sample --sample-batch 64 --ddpm-steps 1000 --ddim-steps 50 \\
        --out /tmp/torchref/torch_small28_sample.json

(Set-up of /tmp/torchref: /work/shared/bench/README.md.) Compare ratios, not absolute times.
"""

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import cpu_runtime
import sampling_lib
import train_lib
from diffusion import schedules
from models import UNet

SMALL_UNET = dict(ch=32, out_ch=1, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(14,),
                  dropout=0.1, num_groups=8)
SMALL_UNET_PARAMS = 1_623_169
IMAGE_SHAPE = (28, 28, 1)


def time_sampler(model: UNet, params, *, sampler: str, num_steps: int, batch: int,
                 reps: int) -> dict:
    """Compile seconds and wall seconds (median of reps) to draw `batch` images."""
    schedule = schedules.schedule_from_name("linear", 1000)
    s = sampling_lib.Sampler(
        model, schedule, train_lib.make_mesh(), image_shape=IMAGE_SHAPE, batch_size=batch,
        sampler=sampler, num_steps=num_steps, eta=0.0, clip_x0=True, guidance_scale=0.0,
        prediction="eps", var_type="fixed_large")
    compile_s = s.compile(params)
    walls = []
    for rep in range(reps):
        begin = time.perf_counter()
        images = s(params, jax.random.key(rep), None)  # on the host: the run is finished
        walls.append(time.perf_counter() - begin)
    if not np.isfinite(images).all():
        raise FloatingPointError(f"{sampler}: non-finite samples")
    wall = statistics.median(walls)
    return {"steps": num_steps, "compile_s": compile_s, "wall_s": wall, "wall_s_all": walls,
            "s_per_step": wall / num_steps, "img_per_s": batch / wall}


def main(argv=None) -> dict:
    cpu_runtime.restart_with_huge_page_malloc()  # CPU speed: cpu_runtime.py, section 3
    cpu_runtime.configure()  # before jax's first computation
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--ddpm-steps", type=int, default=1000)
    parser.add_argument("--ddim-steps", type=int, default=50)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--out", default="", help="JSON file for the results")
    args = parser.parse_args(argv)

    model = UNet(**SMALL_UNET)
    x = jnp.zeros((1, *IMAGE_SHAPE))
    key = jax.random.key(0, impl="rbg")  # compiles faster than threefry; init values don't matter
    params = jax.jit(lambda: model.init(key, x, jnp.zeros((1,), jnp.int32), train=False))()
    params = params["params"]
    num_params = sum(p.size for p in jax.tree.leaves(params))
    if num_params != SMALL_UNET_PARAMS:
        raise ValueError(f"the small UNet has {num_params:,} parameters, not "
                         f"{SMALL_UNET_PARAMS:,}: the benchmark model changed")

    result = {"model": "small", "params": num_params, "sample_batch": args.batch,
              "devices": jax.device_count(), "platform": jax.devices()[0].platform,
              "jax": jax.__version__, "machine": platform.machine(), "cpus": os.cpu_count()}
    rows = []
    for name, sampler, steps in (("ddpm", "ancestral", args.ddpm_steps),
                                 ("ddim", "ddim", args.ddim_steps)):
        r = time_sampler(model, params, sampler=sampler, num_steps=steps, batch=args.batch,
                         reps=args.reps)
        result.update({f"sample_{name}_{k}": v for k, v in r.items()})
        rows.append((sampler, r))

    print(f"{'sampler':<10} {'steps':>6} {'batch':>6} {'compile s':>10} {'wall s':>9} "
          f"{'s/step':>8} {'img/s':>8}")
    for sampler, r in rows:
        print(f"{sampler:<10} {r['steps']:>6} {args.batch:>6} {r['compile_s']:>10.2f} "
              f"{r['wall_s']:>9.2f} {r['s_per_step']:>8.4f} {r['img_per_s']:>8.3f}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
