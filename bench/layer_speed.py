"""Layer-level timings behind the README's "what made the difference" table (CPU, float32).

Each row times this project's layer against the straightforward formulation it replaced, on the
small UNet's shapes (batch 64) unless noted, forward and forward+backward, median of 15 calls:

    .venv/bin/python bench/layer_speed.py            # ~1 minute on 2 cores
    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=+LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION \\
        .venv/bin/python bench/layer_speed.py        # the same with jaxlib's default conv path

The second command shows what `cpu_runtime.py`'s flag buys: XLA_FLAGS that already choose YNN
fusion types are left alone by `cpu_runtime.configure()`. The huge-page malloc restart acts on the
whole process, so it is measured by running a benchmark with and without it:

    .venv/bin/python bench/train_throughput.py --model small --mode train
    GLIBC_TUNABLES=glibc.malloc.hugetlb=0 .venv/bin/python bench/train_throughput.py \
        --model small --mode train                   # opted out: no restart
"""

import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cpu_runtime  # noqa: E402

cpu_runtime.restart_with_huge_page_malloc()  # CPU speed: cpu_runtime.py, section 3
cpu_runtime.configure()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from train_throughput import MODELS, time_calls  # noqa: E402  (bench/ is sys.path[0])

from models import UNet  # noqa: E402
from models.blocks import AttnBlock  # noqa: E402
from models.layers import GroupNorm, UpsampleConv3x3  # noqa: E402


def _median_s(fn, *args, reps: int = 15, compiler_options=None) -> float:
    jitted = jax.jit(fn, compiler_options=compiler_options)
    return statistics.median(time_calls(jitted, *args, reps=reps, iters=1))


def _fwd_and_grad(apply, params, x) -> tuple[float, float]:
    grad = jax.grad(lambda p, x: jnp.sum(apply(p, x) ** 2), (0, 1))
    return _median_s(apply, params, x), _median_s(grad, params, x)


def _conv(x, w, padding=((1, 1), (1, 1))):
    return jax.lax.conv_general_dilated(x, w, (1, 1), padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _weight_grad(x, w, dy):
    return jax.vjp(lambda kernel: _conv(x, kernel), w)[1](dy)[0]


def _input_grad(x, w, dy):
    return jax.vjp(lambda inputs: _conv(inputs, w), x)[1](dy)[0]


def plain_attention(p, x):
    """The AttnBlock as first written: logits scaled after q.k, softmax, then the product."""
    p = p["params"]
    b, hgt, wid, c = x.shape
    h = GroupNorm(8).apply({"params": p["norm"]}, x).reshape(b, hgt * wid, c)
    q, k, v = (h @ p[n]["kernel"] + p[n]["bias"] for n in "qkv")
    logits = jnp.einsum("bic,bjc->bij", q, k, preferred_element_type=jnp.float32)
    w = jax.nn.softmax(logits * c**-0.5, axis=-1)
    out = jnp.einsum("bij,bjc->bic", w, v) @ p["proj_out"]["kernel"] + p["proj_out"]["bias"]
    return x + out.reshape(x.shape)


def rows():
    key = jax.random.key(0)
    for b, hgt, cin, cout in ((64, 28, 32, 32), (64, 28, 96, 32), (64, 14, 64, 64),
                              (16, 32, 128, 128), (16, 16, 256, 256)):
        x = jax.random.normal(key, (b, hgt, hgt, cin))
        w = jax.random.normal(key, (3, 3, cin, cout)) * 0.05
        y = _conv(x, w)
        flops = 2 * b * hgt * hgt * cin * cout * 9
        fwd = _median_s(_conv, x, w)
        wgrad = _median_s(_weight_grad, x, w, y)
        dgrad = _median_s(_input_grad, x, w, y)
        yield (f"conv3x3 {b}x{hgt}x{hgt}x{cin}->{cout} GFLOP/s", "fwd / input grad / weight grad",
               f"{flops / fwd / 1e9:.0f} / {flops / dgrad / 1e9:.0f} / {flops / wgrad / 1e9:.0f}")

    x = jax.random.normal(key, (256, 28, 28, 32)) * 2 + 1
    ours, flax_gn = GroupNorm(8), nn.GroupNorm(num_groups=8, epsilon=1e-6)
    params = ours.init(key, x)
    old = _fwd_and_grad(flax_gn.apply, params, x)
    new = _fwd_and_grad(ours.apply, params, x)
    yield ("GroupNorm(8) 256x28x28x32, ms", "flax.linen.GroupNorm -> ours",
           f"fwd {old[0] * 1e3:.1f} -> {new[0] * 1e3:.1f}, fwd+bwd {old[1] * 1e3:.1f} -> "
           f"{new[1] * 1e3:.1f}")

    x = jax.random.normal(key, (64, 14, 14, 64))
    block = AttnBlock(num_groups=8)
    params = block.init(key, x)
    params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(key, a.shape), params)
    old = _fwd_and_grad(plain_attention, params, x)
    new = _fwd_and_grad(block.apply, params, x)
    yield ("AttnBlock 64x14x14x64, ms", "softmax(q.k * scale) v -> ours",
           f"fwd {old[0] * 1e3:.1f} -> {new[0] * 1e3:.1f}, fwd+bwd {old[1] * 1e3:.1f} -> "
           f"{new[1] * 1e3:.1f}")

    # Forward-only programs: YNN element-wise fusion (cpu_runtime.inference_compiler_options).
    inference = cpu_runtime.inference_compiler_options()
    spec = MODELS["small"]
    model = UNet(out_ch=spec["channels"], **spec["unet"])
    x = jax.random.normal(key, (64, spec["size"], spec["size"], spec["channels"]))
    t = jnp.full((64,), 500, jnp.int32)
    params = model.init(key, x[:1], t[:1], train=False)

    def forward(p, x):
        return model.apply(p, x, t, train=False)

    times = [_median_s(forward, params, x), _median_s(forward, params, x,
                                                     compiler_options=inference)]
    yield ("small UNet forward, batch 64, ms", "global flags -> inference opts",
           " -> ".join(f"{secs * 1e3:.1f}" for secs in times))

    for shape in ((64, 14, 14, 64), (16, 16, 16, 256)):
        x = jax.random.normal(key, shape)
        up = UpsampleConv3x3(shape[-1])
        out_hw = (2 * shape[1], 2 * shape[2])
        params = up.init(key, x, out_hw)

        def direct(p, x):
            u = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            return _conv(u, p["params"]["kernel"]) + p["params"]["bias"]

        old = _fwd_and_grad(direct, params, x)
        new = _fwd_and_grad(lambda p, x, up=up, out_hw=out_hw: up.apply(p, x, out_hw), params, x)
        yield (f"upsample x2 + conv3x3 {'x'.join(map(str, shape))}, ms",
               "repeat + conv -> sub-pixel",
               f"fwd {old[0] * 1e3:.1f} -> {new[0] * 1e3:.1f}, fwd+bwd {old[1] * 1e3:.1f} -> "
               f"{new[1] * 1e3:.1f}")


def main():
    print(f"jax {jax.__version__}, {jax.devices()[0]}, XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}")
    for what, change, numbers in rows():
        print(f"{what:44s} {change:32s} {numbers}", flush=True)


if __name__ == "__main__":
    main()
