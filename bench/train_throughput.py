"""Training and forward throughput of the project's UNet: ms/step, img/s, GFLOP/s, compile time.

The step timed is the trainer's own (`training_loop.train_step`: q_sample, ε-MSE, Adam, EMA),
on random data of the right shape, sharded as the trainer shards each step: state replicated,
batch split over a data-parallel mesh of all devices (on a CPU, two devices: cpu_runtime.py,
section 4).
FLOPs come from XLA's cost analysis of the compiled step (all devices together).

    python bench/train_throughput.py --model small --batch 64 --fwd-batch 256 --out small.json
    python bench/train_throughput.py --model cifar --batch 16 --fwd-batch 64 --out cifar.json
    python bench/train_throughput.py --model cifar --batch 128 --dtype bfloat16   # on a GPU

Side by side with PyTorch on the same machine (run one after the other, never together):

    /tmp/torchref/bin/python ../shared/bench/torch_ddpm.py --model small --size 28 --in-ch 1 \
        --mode flops train forward --train-batch 64 --fwd-batch 256 --out /tmp/torch_small.json

Models (the architectures of ../shared/bench/torch_ddpm.py):
  small: ch 32, ch_mult (1, 2, 2), 2 res blocks, attention at 14x14, GroupNorm 8, 28x28x1
         (1,623,169 params);
  cifar: the DDPM CIFAR-10 model, 32x32x3 (35,746,307 params).
"""

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import cpu_runtime  # noqa: E402
import train_lib  # noqa: E402
import training_loop  # noqa: E402
from diffusion import gaussian, losses, schedules  # noqa: E402
from models import UNet  # noqa: E402

MODELS = {
    "small": dict(size=28, channels=1, unet=dict(
        ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(14,), num_groups=8,
        dropout=0.1)),
    "cifar": dict(size=32, channels=3, unet=dict(
        ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), num_groups=32,
        dropout=0.1)),
}


def time_calls(fn, *args, reps: int, iters: int) -> list[float]:
    """Seconds per call, one median-able sample per rep."""
    out = fn(*args)
    jax.block_until_ready(out)
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / iters)
    return samples


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0]
    # The cost analysis of a sharded program is one device's program: its share of the batch
    # plus the whole (replicated) optimiser update, so this overcounts by that update (~0.2%).
    return float(cost.get("flops", 0.0)) * jax.device_count() if cost else 0.0


def matmul_peak(n: int = 2048) -> float:
    """The machine's practical float32 matmul rate in GFLOP/s (the 'fraction of peak' base)."""
    a = jax.random.normal(jax.random.key(0), (n, n))
    secs = statistics.median(time_calls(jax.jit(jnp.dot), a, a, reps=7, iters=1))
    return 2 * n**3 / secs / 1e9


def bench(args) -> dict:
    spec = MODELS[args.model]
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    model = UNet(out_ch=spec["channels"], dtype=dtype, **spec["unet"])
    schedule = schedules.schedule_from_name("linear", 1000)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(2e-4))
    shape = (spec["size"], spec["size"], spec["channels"])
    key = jax.random.key(0)
    mesh = train_lib.make_mesh()
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    start = time.perf_counter()
    state = jax.jit(functools.partial(train_lib.init_state, model, optimizer, image_shape=shape),
                    out_shardings=replicated)(jax.random.key(0, impl="rbg"))
    jax.block_until_ready(state)
    result = {"model": args.model, "dtype": args.dtype, "device": str(jax.devices()[0]),
              "devices": jax.device_count(), "backend": jax.default_backend(),
              "jax": jax.__version__,
              "params": sum(x.size for x in jax.tree.leaves(state.params)),
              "init_s": time.perf_counter() - start}

    def loss(params, batch, k):
        x0 = batch["image"]
        k_t, k_n, k_d = jax.random.split(k, 3)
        t = jax.random.randint(k_t, (x0.shape[0],), 0, 1000)
        noise = jax.random.normal(k_n, x0.shape)
        x_t = gaussian.q_sample(schedule, x0, t, noise)
        out = model.apply({"params": params}, x_t, t, train=True, rngs={"dropout": k_d})
        terms = losses.training_losses(schedule, out, x0, x_t, t, noise, prediction="eps",
                                       var_type="fixed_large")
        return jnp.mean(terms["loss"]), {}

    if "train" in args.mode:
        step = jax.jit(functools.partial(
            training_loop.train_step, loss=loss, optimizer=optimizer, ema_decay=0.9999,
            lr_fn=optax.constant_schedule(2e-4), base_key=key), donate_argnums=0,
            out_shardings=(replicated, replicated))
        batch = {"image": jax.device_put(jax.random.normal(key, (args.batch, *shape)), split)}
        start = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        compile_s = time.perf_counter() - start
        holder = {"state": state}

        def run(b):
            holder["state"], metrics = compiled(holder["state"], b)
            return metrics["loss"]

        secs = statistics.median(time_calls(run, batch, reps=args.reps, iters=args.iters))
        flops = _flops(compiled)
        result["train"] = {"batch": args.batch, "ms_per_step": 1e3 * secs,
                           "img_per_s": args.batch / secs, "steps_per_s": 1 / secs,
                           "compile_s": compile_s, "gflop_per_step": flops / 1e9,
                           "gflop_per_s": flops / 1e9 / secs}
        state = holder["state"]

    if "forward" in args.mode:
        fwd = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t, train=False),
                      compiler_options=cpu_runtime.inference_compiler_options())
        x = jax.device_put(jax.random.normal(key, (args.fwd_batch, *shape)), split)
        t = jax.device_put(jnp.full((args.fwd_batch,), 500, jnp.int32), split)
        start = time.perf_counter()
        compiled = fwd.lower(state.params, x, t).compile()
        compile_s = time.perf_counter() - start
        secs = statistics.median(time_calls(compiled, state.params, x, t, reps=args.reps,
                                       iters=args.iters))
        flops = _flops(compiled)
        result["forward"] = {"batch": args.fwd_batch, "ms_per_call": 1e3 * secs,
                             "img_per_s": args.fwd_batch / secs, "compile_s": compile_s,
                             "gflop_per_image": flops / 1e9 / args.fwd_batch,
                             "gflop_per_s": flops / 1e9 / secs}
    return result


def main():
    cpu_runtime.restart_with_huge_page_malloc()  # CPU speed: cpu_runtime.py, section 3
    cpu_runtime.configure()  # before jax's first computation
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="small")
    ap.add_argument("--mode", nargs="+", default=["train", "forward"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--fwd-batch", type=int, default=256)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    for flag, value in (("--batch", args.batch), ("--fwd-batch", args.fwd_batch)):
        if value % jax.device_count():
            ap.error(f"{flag}={value} is not a multiple of the {jax.device_count()} devices")
    result = bench(args)
    result["matmul_peak_gflop_per_s"] = peak = matmul_peak()
    print(f"{'what':<10}{'batch':>7}{'ms':>10}{'img/s':>10}{'GFLOP/s':>10}{'of peak':>9}"
          f"{'compile s':>11}")
    for what in ("train", "forward"):
        if what in result:
            r = result[what]
            r["fraction_of_matmul_peak"] = r["gflop_per_s"] / peak
            ms = r.get("ms_per_step", r.get("ms_per_call"))
            print(f"{what:<10}{r['batch']:>7}{ms:>10.1f}{r['img_per_s']:>10.1f}"
                  f"{r['gflop_per_s']:>10.1f}{r['fraction_of_matmul_peak']:>9.0%}"
                  f"{r['compile_s']:>11.1f}")
    print(f"matmul peak (2048x2048 float32, median of 7): {peak:.0f} GFLOP/s")
    print(f"{result['model']} {result['params']:,} params, {result['dtype']}, "
          f"{result['devices']} x {result['device']}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
