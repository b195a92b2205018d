"""`--mode=figures`: explanatory PNG figures of the diffusion and of a trained run.

    python main.py --config=configs/mnist.py --workdir=DIR --mode=figures   # DIR/figures/*.png

Each figure is one function, callable on its own; all take `path` and `size_px` = (width,
height) in pixels (figsize = size_px / DPI, saved at DPI without tight cropping, so the PNG has
exactly that size):

  forward_process_figure   x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε at ~10 t, linear vs cosine, same ε
  schedules_figure         ᾱ_t, √ᾱ_t and log-SNR log(ᾱ_t/(1-ᾱ_t)) of every schedule
  isotropy_figure          pixel pairs of x_T against N(0, I)'s 1σ/2σ circles, measured stats
  reverse_chain_figure     x_t and x̂_0 along one ancestral and one DDIM run (checkpoint)
  guidance_figure          CFG scales × digits, offline-classifier accuracy per scale (checkpoint)
  training_curves_figure   train/loss and eval bits/dim from the run's TensorBoard events
"""

import functools
import glob
import json
import os
import struct

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from matplotlib.figure import Figure

import config_compat
import config_lib
import cpu_runtime
import input_pipeline
import metric_logging
import sampling_lib
import train_lib
from data_spec import DataSpec, encode_pixels
from diffusion import gaussian, samplers, schedules
from errors import MissingFileError

DPI = 100


def _figure(size_px: tuple[int, int], nrows: int = 1, ncols: int = 1):
    """(fig, axes [nrows, ncols]) of exactly size_px = (width, height) pixels when saved at DPI.

    matplotlib's object API (a `Figure`, no pyplot): no global figure registry or backend state.
    """
    fig = Figure(figsize=(size_px[0] / DPI, size_px[1] / DPI), dpi=DPI)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _save(fig: Figure, path: str) -> str:
    """Writes the figure (process 0 of a multi-host run only); returns path."""
    if metric_logging.writes_files():
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=DPI)  # no bbox_inches="tight": it would change the pixel size
    return path


def _show(ax, image: np.ndarray, title: str = "") -> None:
    """An image in [-1, 1] ([H, W, 1] or [H, W]) in grey, clipped to the data range, no ticks."""
    image = np.asarray(image, np.float32)
    if image.ndim == 3:
        image = image[..., 0]
    ax.imshow(np.clip(image, -1, 1), cmap="gray", vmin=-1, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def load_image(image_path: str | None = None, index: int = 0) -> np.ndarray:
    """float32 [28, 28, 1] in [-1, 1]: mnist_5k train[index], or the image at image_path
    (converted to greyscale and resized to 28x28)."""
    if image_path is None:
        image = input_pipeline.load("mnist_5k", "train").images[index]
    else:
        from PIL import Image

        with Image.open(image_path) as im:
            image = np.asarray(im.convert("L").resize((28, 28)))[..., None]
    return encode_pixels(image)


def _log_snr(name: str, num_timesteps: int) -> tuple[np.ndarray, np.ndarray]:
    """(ᾱ_t, log SNR_t = log(ᾱ_t / (1 - ᾱ_t))), float64 [T]."""
    alpha_bar = np.cumprod(1.0 - schedules.get_betas(name, num_timesteps))
    return alpha_bar, np.log(alpha_bar) - np.log1p(-alpha_bar)


# --- 1. the forward process ----------------------------------------------------------------------

def forward_process_figure(path: str, image: np.ndarray | str | None = None, *,
                           num_timesteps: int = 1000, num_steps: int = 10, seed: int = 0,
                           schedule_names: tuple[str, ...] = ("linear", "cosine"),
                           size_px: tuple[int, int] = (1200, 300)) -> str:
    """q_sample of one image at num_steps evenly spaced t of 0..T-1, one row per schedule, the
    same ε in every cell. image: [H, W, C] in [-1, 1], a path (see `load_image`), or None for
    mnist_5k train[0]."""
    if image is None or isinstance(image, str):
        image = load_image(image)
    x0 = jnp.asarray(image, jnp.float32)
    ts = np.round(np.linspace(0, num_timesteps - 1, num_steps)).astype(np.int32)  # [K]
    noise = jax.random.normal(jax.random.key(seed), x0.shape, jnp.float32)
    x0s, noises = jnp.broadcast_to(x0, (num_steps, *x0.shape)), jnp.broadcast_to(
        noise, (num_steps, *x0.shape))
    fig, axes = _figure(size_px, len(schedule_names), num_steps)
    for row, name in enumerate(schedule_names):
        schedule = schedules.schedule_from_name(name, num_timesteps)
        x_t = np.asarray(gaussian.q_sample(schedule, x0s, jnp.asarray(ts), noises))  # [K, H, W, C]
        alpha_bar = np.asarray(schedule.alphas_cumprod)[ts]
        for col in range(num_steps):
            _show(axes[row, col], x_t[col], f"t={ts[col]}  ᾱ={alpha_bar[col]:.2f}")
        axes[row, 0].set_ylabel(name)
    fig.suptitle(f"forward process q(x_t | x_0), T = {num_timesteps}, same ε in every cell")
    fig.tight_layout()
    return _save(fig, path)


# --- 2. the schedules ----------------------------------------------------------------------------

def schedules_figure(path: str, *, num_timesteps: int = 1000,
                     size_px: tuple[int, int] = (1500, 450)) -> str:
    """ᾱ_t, √ᾱ_t and log-SNR vs t for every schedule in schedules.SCHEDULES."""
    fig, axes = _figure(size_px, 1, 3)
    t = np.arange(num_timesteps)
    for name in schedules.SCHEDULES:
        alpha_bar, log_snr = _log_snr(name, num_timesteps)
        for ax, y in zip(axes[0], (alpha_bar, np.sqrt(alpha_bar), log_snr), strict=True):
            ax.plot(t, y, label=name)
    for ax, title in zip(axes[0], ("ᾱ_t", "√ᾱ_t (signal scale)", "log SNR = log ᾱ/(1-ᾱ)"),
                         strict=True):
        ax.set_title(title)
        ax.set_xlabel(f"t (T = {num_timesteps})")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return _save(fig, path)


# --- 3. x_T is close to N(0, I) -------------------------------------------------------------------

def isotropy_stats(points: np.ndarray) -> dict[str, float]:
    """Mean, variance of each coordinate and their correlation of points [N, 2]."""
    p = np.asarray(points, np.float64)
    return {"n": int(p.shape[0]), "mean_a": float(p[:, 0].mean()), "mean_b": float(p[:, 1].mean()),
            "var_a": float(p[:, 0].var()), "var_b": float(p[:, 1].var()),
            "corr": float(np.corrcoef(p[:, 0], p[:, 1])[0, 1])}


def isotropy_figure(path: str, images: np.ndarray | None = None, *, schedule_name: str = "linear",
                    num_timesteps: int = 1000, seed: int = 0,
                    size_px: tuple[int, int] = (600, 600)) -> tuple[str, dict, str]:
    """Pixel pairs (x_T[i, p_i], x_T[i, q_i]) of x_T = q_sample(x_0, T-1) against N(0, I).

    images: x_0, float [N, H, W, C] in [-1, 1] (default: all mnist_5k train digits); each image
    gives one pair of distinct random pixel positions. The mean, variance and correlation drawn
    on the figure are measured on these points. Returns (path, stats, the text drawn).
    """
    x0 = (encode_pixels(input_pipeline.load("mnist_5k", "train").images)
          if images is None else np.asarray(images, np.float32))
    schedule = schedules.schedule_from_name(schedule_name, num_timesteps)
    n = x0.shape[0]
    t = jnp.full((n,), num_timesteps - 1, jnp.int32)
    noise = jax.random.normal(jax.random.key(seed), x0.shape, jnp.float32)
    flat = np.asarray(gaussian.q_sample(schedule, jnp.asarray(x0), t, noise)).reshape(n, -1)
    rng = np.random.default_rng(seed)
    p = rng.integers(flat.shape[1], size=n)                              # [N]
    q = (p + rng.integers(1, flat.shape[1], size=n)) % flat.shape[1]     # [N], q != p
    points = np.stack([flat[np.arange(n), p], flat[np.arange(n), q]], axis=1)  # [N, 2]
    stats = isotropy_stats(points)
    text = (f"n = {stats['n']} pairs\n"
            f"mean = ({stats['mean_a']:.3f}, {stats['mean_b']:.3f})\n"
            f"var = ({stats['var_a']:.3f}, {stats['var_b']:.3f})\n"
            f"corr = {stats['corr']:.3f}")

    fig, axes = _figure(size_px)
    ax = axes[0, 0]
    ax.scatter(points[:, 0], points[:, 1], s=2, alpha=0.3, label="x_T pixel pairs")
    angle = np.linspace(0, 2 * np.pi, 200)
    for r in (1, 2):
        ax.plot(r * np.cos(angle), r * np.sin(angle), "k--" if r == 2 else "k-", lw=1,
                label=f"N(0, I) {r}σ")
    lim = max(3.5, float(np.abs(points).max()) * 1.05)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.text(0.02, 0.98, text, transform=ax.transAxes, va="top", fontsize=9, family="monospace",
            bbox={"facecolor": "white", "alpha": 0.8})
    ax.legend(loc="lower right", fontsize=8)
    ax_bar = float(np.asarray(schedule.alphas_cumprod)[-1])
    ax.set_title(f"x_T, t = T-1 = {num_timesteps - 1} ({schedule_name}), ᾱ_T-1 = {ax_bar:.1e}")
    ax.set_xlabel("pixel p")
    ax.set_ylabel("pixel q")
    fig.tight_layout()
    return _save(fig, path), stats, text


# --- 4. the reverse chain ------------------------------------------------------------------------

def reverse_chain(model_fn: samplers.ModelFn, schedule: schedules.Schedule,
                  shape: tuple[int, ...], key: jax.Array,
                  spec: samplers.SamplerSpec | None = None, *, num_snapshots: int = 10,
                  **spec_fields) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(t [S], x_t [S, B, ...], x̂_0 [S, B, ...]) at S = num_snapshots iterations of one run.

    The run is that of samplers.sample(model_fn, schedule, shape, key, spec): the same x_T and
    step keys, its loop (samplers.sample_steps, a fori_loop) jitted once with traced bounds and
    run in chunks that stop only to read the state. Snapshot s is the input x_t of loop iteration
    j_s (j_0 = 0 is x_T, the last is the final step) and the x̂_0 predicted there; t is the
    original timestep of that iteration, from the sampler's own respacing. spec_fields: as in
    samplers.as_spec.
    """
    spec = samplers.as_spec(spec, **spec_fields)
    num = spec.loop_length(schedule.num_timesteps)
    timestep_map = np.asarray(samplers.respaced_for(schedule, spec)[1])
    init_key, loop_key = jax.random.split(key)  # as samplers.sample splits it
    state = samplers.init_state(jax.random.normal(init_key, shape, jnp.float32), spec)

    @functools.partial(jax.jit, compiler_options=cpu_runtime.inference_compiler_options())
    def run(state, start, stop):
        return samplers.sample_steps(model_fn, schedule, state, loop_key, start, stop, spec)

    iterations = np.unique(np.round(np.linspace(0, num - 1, num_snapshots)).astype(int))
    xs, x0s, done = [], [], 0
    for j in iterations:
        state = run(state, done, int(j))
        xs.append(np.asarray(state.x))
        state = run(state, int(j), int(j) + 1)
        x0s.append(np.asarray(state.pred_x0))
        done = int(j) + 1
    return timestep_map[num - 1 - iterations], np.stack(xs), np.stack(x0s)


def _tile(images: np.ndarray, spec: DataSpec) -> np.ndarray:
    """Model-space [B, ...] -> one image in [-1, 1] with the B decoded images side by side."""
    return encode_pixels(metric_logging.make_grid(spec.decode(images), len(images)))


def _host_params(params):
    """Params on the host: the figures run unsharded, on whatever the default device is."""
    return jax.tree.map(np.asarray, jax.device_get(params))


def _figure_cond(num_images: int, num_classes: int) -> dict | None:
    """Labels 0, 1, ... of a class-conditional model."""
    if not num_classes:
        return None
    return {"label": np.arange(num_images, dtype=np.int32) % num_classes}


def _restore(config: ml_collections.ConfigDict, workdir: str):
    """(model, params, step) of the latest checkpoint, EMA params when config.sample.use_ema."""
    return train_lib.restore_params(config, workdir, use_ema=config.sample.use_ema)


def reverse_chain_figure(path: str, config: ml_collections.ConfigDict, workdir: str, *,
                         num_images: int = 1, ancestral_steps: int = 100, ddim_steps: int = 50,
                         num_snapshots: int = 10, seed: int = 0,
                         size_px: tuple[int, int] = (1200, 520), restored=None) -> str:
    """Rows: ancestral x_t, ancestral x̂_0, DDIM x_t, DDIM x̂_0, at num_snapshots steps of one
    run each from the latest checkpoint (same key, hence the same x_T). Class-conditional models
    get labels 0, 1, ... and config.sample.guidance_scale; the steps are capped at T.
    `restored` is an already restored (model, params, step) of that checkpoint, if any."""
    model, params, step = restored or _restore(config, workdir)
    schedule = schedules.schedule_from_name(config.diffusion.schedule,
                                            config.diffusion.num_timesteps)
    data = config_lib.data_args(config)
    shape = (num_images, *data.spec.shape)
    model_fn = sampling_lib.guided_model_fn(model, _host_params(params),
                                            _figure_cond(num_images, model.num_classes),
                                            config.sample.guidance_scale)
    key = jax.random.key(seed)
    T = schedule.num_timesteps
    runs = [("ancestral", min(ancestral_steps, T)), ("ddim", min(ddim_steps, T))]
    fig, axes = _figure(size_px, 4, num_snapshots)
    for r, (sampler, num_steps) in enumerate(runs):
        spec = config_lib.sampler_spec(config, sampler=sampler, num_steps=num_steps)
        ts, xs, x0s = reverse_chain(model_fn, schedule, shape, key, spec,
                                    num_snapshots=num_snapshots)
        for col in range(num_snapshots):
            for k, (name, images) in enumerate((("x_t", xs), ("x̂_0", x0s))):
                ax = axes[2 * r + k, col]
                if col < len(ts):
                    _show(ax, _tile(images[col], data.spec), f"t={ts[col]}" if k == 0 else "")
                else:
                    ax.axis("off")
                if col == 0:
                    ax.set_ylabel(f"{sampler} {num_steps}\n{name}", fontsize=8)
    fig.suptitle(f"reverse process, checkpoint step {step}, seed {seed}")
    fig.tight_layout()
    return _save(fig, path)


# --- 5. classifier-free guidance ---------------------------------------------------------------

def guidance_figure(path: str, config: ml_collections.ConfigDict, workdir: str, *,
                    scales: tuple[float, ...] = (0.0, 1.0, 3.0, 5.0), per_class: int = 1,
                    num_steps: int = 100, seed: int = 0,
                    size_px: tuple[int, int] = (1000, 480),
                    restored=None) -> tuple[str, dict]:
    """CFG scales (rows) × classes (columns) from the latest checkpoint, per_class samples each.

    Each row is labelled with the offline MNIST classifier's accuracy on the samples shown and,
    when <workdir>/guidance_sweep.json has that scale, the sweep's accuracy (more samples).
    `restored` as in reverse_chain_figure. Returns (path, {"shown": {scale: acc}, "sweep":
    {scale: acc}}).
    """
    from evaluation import mnist_classifier  # only this figure needs the weights

    model, params, step = restored or _restore(config, workdir)
    if not model.num_classes:
        raise ValueError("guidance_figure needs a class-conditional model (model.num_classes).")
    schedule = schedules.schedule_from_name(config.diffusion.schedule,
                                            config.diffusion.num_timesteps)
    mesh = train_lib.make_mesh()
    labels = np.repeat(np.arange(model.num_classes, dtype=np.int32), per_class)  # [N]
    batch = -(-len(labels) // jax.device_count()) * jax.device_count()
    apply_fn, classifier_params = mnist_classifier.load_classifier()
    sweep_path = os.path.join(workdir, "guidance_sweep.json")
    sweep = {}
    if os.path.exists(sweep_path):
        with open(sweep_path) as f:
            sweep = json.load(f)
    accuracy = {"shown": {}, "sweep": {}}
    sample, data = config_lib.sample_args(config), config_lib.data_args(config)
    fig, axes = _figure(size_px, len(scales), 1)
    sampler = sampling_lib.make_sampler(  # one program for every w != 0
        sample, model, schedule, mesh, image_shape=data.spec.shape, batch_size=batch,
        num_steps=min(num_steps, schedule.num_timesteps))
    for row, scale in enumerate(scales):
        images = sampling_lib.sample_many(sampler, params, num_samples=len(labels),
                                          cond={"label": labels}, seed=seed,
                                          guidance_scale=scale, log_progress=False)
        # Judged as shown: quantised to uint8, as guidance_sweep judges what it writes.
        uint8 = data.spec.decode(images)
        predicted = np.argmax(np.asarray(apply_fn(classifier_params, encode_pixels(uint8))), -1)
        acc = float(np.mean(predicted == labels))
        accuracy["shown"][scale] = acc
        text = f"w = {scale:g}\nshown: {acc:.0%} of {len(labels)}"
        swept = sweep.get("accuracy", {}).get(f"{scale:g}")
        if swept is not None:
            accuracy["sweep"][scale] = swept
            text += f"\nsweep json: {swept:.1%} ({sweep.get('per_class')}/class)"
        ax = axes[row, 0]
        _show(ax, encode_pixels(metric_logging.make_grid(uint8, len(labels)))[..., 0])
        ax.set_ylabel(text, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(f"classifier-free guidance w (rows) × class {labels[0]}..{labels[-1]} "
                 f"(columns), checkpoint step {step}, {num_steps}-step {config.sample.sampler}; "
                 f"accuracy: offline MNIST classifier", fontsize=10)
    fig.tight_layout()
    return _save(fig, path), accuracy


# --- 6. training curves --------------------------------------------------------------------------

def _tfrecords(path: str):
    """The data of each record of a TFRecord file: u64 length, u32 crc, data, u32 crc."""
    with open(path, "rb") as f:
        while header := f.read(12):
            if len(header) < 12:
                return  # a record being written: stop at the last complete one
            (length,) = struct.unpack("<Q", header[:8])
            data = f.read(length)
            if len(f.read(4)) < 4 or len(data) < length:
                return
            yield data


def read_scalars(logdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{tag: (steps int64 [N], values float64 [N])} from every event file in logdir, by step;
    a step written twice (a resumed run) keeps its last value."""
    from tensorboardX.proto import event_pb2

    files = sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*")))
    if not files:
        raise MissingFileError(
            f"No TensorBoard event files in {logdir}. Fix: train first (--mode=train), or point "
            f"--workdir at a trained run.")
    series: dict[str, dict[int, float]] = {}
    for path in sorted(files, key=os.path.getmtime):
        for record in _tfrecords(path):
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    v = value.simple_value
                elif value.HasField("tensor") and value.tensor.float_val:
                    v = value.tensor.float_val[0]
                else:
                    continue  # images, text, hparams
                series.setdefault(value.tag, {})[int(event.step)] = float(v)
    return {tag: (np.asarray(sorted(s), np.int64), np.asarray([s[k] for k in sorted(s)]))
            for tag, s in series.items()}


def training_curves_figure(path: str, workdir: str, *,
                           size_px: tuple[int, int] = (1000, 400)) -> tuple[str, list[str]]:
    """train/loss and any eval bits/dim (eval/*bpd*, not stderr) vs step, from
    <workdir>/tensorboard. Returns (path, the tags plotted)."""
    scalars = read_scalars(os.path.join(workdir, "tensorboard"))
    bpd_tags = sorted(t for t in scalars if t.startswith("eval/") and "bpd" in t
                      and "stderr" not in t)
    fig, axes = _figure(size_px, 1, 2 if bpd_tags else 1)
    plotted = []
    if "train/loss" in scalars:
        steps, values = scalars["train/loss"]
        axes[0, 0].plot(steps, values, ".-" if len(steps) < 50 else "-")
        plotted.append("train/loss")
    axes[0, 0].set_title("train/loss")
    for tag in bpd_tags:
        steps, values = scalars[tag]
        axes[0, 1].plot(steps, values, "o-", label=tag)
        plotted.append(tag)
    if bpd_tags:
        axes[0, 1].set_title("eval bits/dim")
        axes[0, 1].legend(fontsize=8)
    for ax in axes[0]:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path), plotted


# --- all of them ---------------------------------------------------------------------------------

def make_figures(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
    """Every figure into <workdir>/figures/. The data-only figures come first; the reverse
    chain, the guidance grid (class-conditional MNIST models with p_uncond > 0; drawn with
    config.sample's sampler and steps, as --mode=sample draws) and the curves need a trained run
    in workdir (with the settings it was trained with). Returns {name: path}."""
    config = config_compat.trained_config(config, workdir)
    out = os.path.join(workdir, "figures")
    T = config.diffusion.num_timesteps
    paths = {
        "forward_process": forward_process_figure(os.path.join(out, "forward_process.png"),
                                                  num_timesteps=T),
        "schedules": schedules_figure(os.path.join(out, "schedules.png"), num_timesteps=T),
        "isotropy": isotropy_figure(os.path.join(out, "isotropy.png"),
                                    schedule_name=config.diffusion.schedule,
                                    num_timesteps=T)[0],
    }
    logging.info("Wrote %s", ", ".join(paths.values()))
    restored = _restore(config, workdir)  # once, for both checkpoint figures
    paths["reverse_chain"] = reverse_chain_figure(os.path.join(out, "reverse_chain.png"),
                                                  config, workdir, restored=restored)
    shape = config_lib.data_args(config).spec.image.shape
    if config.model.num_classes == 10 and config.diffusion.p_uncond > 0 and shape == (28, 28, 1):
        paths["guidance"] = guidance_figure(os.path.join(out, "guidance.png"), config,
                                            workdir, num_steps=config.sample.num_steps or T,
                                            seed=config.sample.seed, restored=restored)[0]
    else:
        logging.info("Skipped the guidance figure: it needs a class-conditional 28x28x1 model "
                     "with 10 classes trained with p_uncond > 0.")
    paths["training_curves"] = training_curves_figure(os.path.join(out, "training_curves.png"),
                                                      workdir)[0]
    logging.info("Wrote %d figures to %s", len(paths), out)
    return paths
