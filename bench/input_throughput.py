"""Input pipeline throughput (images/s) and the trainer's step time with real loading.

python bench/input_throughput.py loader           # images/s: ArrayRecord 32x32, JPEG folders
python bench/input_throughput.py loader --grain   # ... and the same batches through grain
python bench/input_throughput.py trainer          # step time: real loading vs constant batch

`loader` times the host work of the trainer's batches (`input_pipeline.get_batch`: read,
decode, resize/crop, flip, to float) on generated data, cached in --data:
  cifar32    a CIFAR-10-shaped tfds ArrayRecord dataset (10,000 PNG-encoded 32x32x3 records,
             ~2.3 KB each like CIFAR-10's, written by tfds without TensorFlow), image_size 32;
  folder64   4,000 64x64 JPEGs (quality 90), image_size 64;
  folder256  1,000 256x256 JPEGs, image_size 256, and the same files to image_size 64 (the
             reduced-scale JPEG decode of images.fit).
Each row is timed with 1 and 2 decode threads and through `input_pipeline.Prefetcher` (the
trainer's path: one prefetch thread handing batches over, the decode pool behind it). With
--grain (needs grain: `pip install --no-deps --target /tmp/grain grain==0.2.18 portpicker`,
then PYTHONPATH=/tmp/grain; it is not a project dependency) the
same step-indexed batches also go through grain's `MapDataset.range(steps).map(batch_at)`
with its thread pool (`to_iter_dataset(ReadOptions(num_threads=2))`) and its worker processes
(`mp_prefetch(MultiprocessingOptions(num_workers=2))`), so its numbers compare like for like.
The files are in the page cache after they are written: this measures decoding, not the disk.

`trainer` runs the trainer's own update (`training_loop.train_steps` + `train_lib.loss_fn`,
jitted as the trainer jits it) on the cifar32 data: on one constant batch already on the devices,
and on the batches of `global_batches` built by the Prefetcher while the device computes, from
a source that decodes every image and from one whose cache holds them (after one epoch); the
three alternate, and it prints the median step times and their ratios to the constant batch.
"""

import argparse
import functools
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
from PIL import Image  # noqa: E402

import cpu_runtime  # noqa: E402

ROWS = {  # name: (data fields, batch size)
    "cifar32": (dict(name="cifar10_shaped", image_size=32), 128),
    "folder64": (dict(name="folder", path="folder64", image_size=64), 128),
    "folder256": (dict(name="folder", path="folder256", image_size=256), 32),
    "folder256->64": (dict(name="folder", path="folder256", image_size=64), 128),
}


def _photo(rng, size: int, noise: float) -> np.ndarray:
    """A photo-like image: a smooth random field with fine noise (uint8 [size, size, 3])."""
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC))
    return np.clip(smooth + rng.normal(0, noise, smooth.shape), 0, 255).astype(np.uint8)


class Cifar10Shaped(tfds.core.GeneratorBasedBuilder):
    """CIFAR-10-shaped records (PIL images: tfds writes them without TensorFlow)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(32, 32, 3)),
            "label": tfds.features.ClassLabel(num_classes=10)}))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(10_000)}

    def _generate_examples(self, n):
        rng = np.random.default_rng(0)
        for i in range(n):
            yield i, {"image": Image.fromarray(_photo(rng, 32, 12.0)), "label": i % 10}


def make_data(root: Path) -> None:
    Cifar10Shaped(data_dir=str(root / "tfds"), file_format="array_record").download_and_prepare()
    rng = np.random.default_rng(0)
    for name, size, count in (("folder64", 64, 4000), ("folder256", 256, 1000)):
        folder = root / name
        if (folder / "done").exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(_photo(rng, size, 6.0)).save(folder / f"{i:05d}.jpg", quality=90)
        (folder / "done").write_text("")
    for name in ("folder64", "folder256"):
        sizes = [f.stat().st_size for f in (root / name).glob("*.jpg")]
        print(f"{name}: {len(sizes)} JPEGs, mean {np.mean(sizes) / 1024:.1f} KB")


def _config(root: Path, row: str, threads: int):
    from configs import default

    fields, batch = ROWS[row]
    config = default.get_config()
    config.data.update(**fields, decode_threads=threads, random_flip=True)
    config.data.data_dir = str(root / "tfds")
    if config.data.name == "folder":
        config.data.path = str(root / fields["path"])
    config.train.batch_size = batch
    return config


class BatchAt:
    """The host batch of a step (picklable: grain's worker processes rebuild the source)."""

    def __init__(self, root: Path, row: str, threads: int, cache_mb: int):
        self.config = _config(root, row, threads)
        self.config.data.cache_mb = cache_mb
        self._source = None

    def __getstate__(self):
        return {**self.__dict__, "_source": None}

    def source(self):
        import input_pipeline

        if self._source is None:
            self._source = input_pipeline.from_config(self.config.data, "train")
        return self._source

    def __call__(self, step: int):
        import input_pipeline

        return input_pipeline.get_batch(self.source(), seed=0, step=int(step),
                                        batch_size=self.config.train.batch_size,
                                        random_flip=True)


def _rate(batches, batch_size: int, warmup: int = 2) -> tuple[float, float]:
    """(images per second, images per CPU-second of this process) over the batches after the
    first `warmup` of an iterator. The second is what one quiet core would do: on a shared
    machine it moves much less with the other users' load than the first."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    start, cpu, n = time.perf_counter(), time.process_time(), 0
    for _ in it:
        n += batch_size
    return n / (time.perf_counter() - start), n / (time.process_time() - cpu)


def loader(args, root: Path) -> None:
    import input_pipeline

    print(f"{'row':<15}{'batch':>6}{'per CPU-s':>11}{'1 thread':>11}{'2 threads':>11}"
          f"{'prefetch':>11}{'grain thr':>11}{'grain mp':>11}{'cached':>11}   images/s")
    for row in args.rows:
        batch = ROWS[row][1]
        steps = max(8, args.images // batch)
        rates = {}
        for threads in (1, 2):  # decoding every image (no cache)
            make = BatchAt(root, row, threads, cache_mb=0)
            rates[threads], cpu_rate = _rate((make(s) for s in range(steps)), batch)
            if threads == 1:
                rates["cpu"] = cpu_rate
        prefetch = input_pipeline.Prefetcher(BatchAt(root, row, 2, cache_mb=0), range(steps),
                                             depth=2)
        rates["prefetch"], _ = _rate((prefetch.get(s) for s in range(steps)), batch)
        prefetch.close()
        if args.grain:
            import grain
            from absl import flags

            flags.FLAGS.mark_as_parsed()  # grain reads its absl flags' defaults
            for name, workers in (("grain thr", 0), ("grain mp", 2)):
                make = BatchAt(root, row, 1 if workers else 2, cache_mb=0)
                ds = grain.MapDataset.range(steps).map(make)
                it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
                if workers:
                    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
                rates[name], _ = _rate(it, batch)  # (CPU time: the workers' is not counted)
        # Later epochs with data.cache_mb's default: one epoch fills the cache, then time.
        make = BatchAt(root, row, 2, cache_mb=4096)
        epoch = -(-len(make.source()) // batch)
        for s in range(epoch):
            make(s)
        prefetch = input_pipeline.Prefetcher(make, range(epoch, epoch + steps), depth=2)
        rates["cached"], _ = _rate((prefetch.get(s) for s in range(epoch, epoch + steps)),
                                   batch)
        prefetch.close()
        cells = "".join(f"{rates[k]:>11,.0f}" if k in rates else f"{'-':>11}"
                        for k in ("cpu", 1, 2, "prefetch", "grain thr", "grain mp", "cached"))
        print(f"{row:<15}{batch:>6}{cells}", flush=True)


def trainer(args, root: Path) -> None:
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import config_lib
    import input_pipeline
    import train_lib
    import training_loop
    from configs import tiny
    from diffusion import schedules

    config = tiny.get_config()
    config.data.update(name="cifar10_shaped", data_dir=str(root / "tfds"), image_size=32,
                       num_channels=3, random_flip=True)
    config.model.num_classes, config.diffusion.p_uncond = 0, 0.0
    config.diffusion.num_timesteps = 1000
    if args.model == "small":  # bench/train_throughput.py's small UNet, at 32x32x3
        config.model.update(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                            num_groups=8, dropout=0.1)
    config.train.batch_size = args.batch
    sources = {"decoding": dict(cache_mb=0), "cached": dict(cache_mb=4096)}
    for name, fields in sources.items():
        config.data.update(**fields)
        sources[name] = input_pipeline.from_config(config.data, "train")
    epoch = -(-len(sources["cached"]) // args.batch)
    for step in range(epoch):  # one epoch fills the cache
        input_pipeline.get_batch(sources["cached"], seed=0, step=step, batch_size=args.batch,
                                 random_flip=True)
    mesh = train_lib.make_mesh()
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(None, "data"))
    model = train_lib.create_model(config)
    optim = config_lib.optim_args(config)
    optimizer = train_lib.create_optimizer(optim)
    schedule = schedules.schedule_from_name("linear", 1000)
    diffusion = config_lib.diffusion_args(config)
    state = jax.jit(functools.partial(train_lib.init_state, model, optimizer,
                                      image_shape=(32, 32, 3)),
                    out_shardings=replicated)(jax.random.key(0, impl="rbg"))
    update = jax.jit(functools.partial(
        training_loop.train_steps, optimizer=optimizer, ema_decay=0.9999,
        lr_fn=train_lib.learning_rate_fn(optim), base_key=jax.random.key(1),
        loss=lambda p, b, k: train_lib.loss_fn(p, model, schedule, diffusion, b, k)),
        in_shardings=(replicated, split), out_shardings=(replicated, replicated),
        donate_argnums=0)

    def batches_at(source):  # the trainer's host -> device batches (train_lib.train)
        return functools.partial(
            training_loop.global_batches, source, k=1, sharding=split, seed=config.seed,
            batch_size=args.batch, random_flip=config.data.random_flip,
            transform=functools.partial(train_lib.diffusion_batch, model, None, seed=0))

    constant = batches_at(sources["cached"])(0)
    state, _ = update(state, constant)  # compile
    jax.block_until_ready(state)

    def timed(get, steps) -> float:
        nonlocal state
        times = []
        for step in steps:
            start = time.perf_counter()
            state, metrics = update(state, get(step))
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        return statistics.median(times[2:])

    results = {"constant": [], "decoding": [], "cached": []}
    first = epoch  # decoding reads new steps each time; the cached source has seen them all
    for _ in range(args.reps):  # interleaved, so all three see the same machine load
        steps = range(first, first + args.steps)
        results["constant"].append(timed(lambda step: constant, steps))
        for name in ("decoding", "cached"):
            loader = input_pipeline.Prefetcher(batches_at(sources[name]), steps, depth=2)
            results[name].append(timed(loader.get, steps))
            loader.close()
        first += args.steps
    medians = {k: statistics.median(v) for k, v in results.items()}
    print(f"model {args.model} ({sum(x.size for x in jax.tree.leaves(state.params)):,} params), "
          f"batch {args.batch}, {jax.device_count()} devices; median ms/step of {args.reps} "
          f"interleaved runs of {args.steps} steps (each the median of its steps):")
    for name, what in (("constant", "constant batch on the devices"),
                       ("decoding", "loading, every image decoded"),
                       ("cached", "loading, decoded images cached")):
        runs = ", ".join(f"{1e3 * t:.1f}" for t in results[name])
        ratio = medians[name] / medians["constant"]
        print(f"  {what:<32}{1e3 * medians[name]:8.1f} ms  x{ratio:.3f}  (runs: {runs})")


def main():
    cpu_runtime.restart_with_huge_page_malloc()
    cpu_runtime.configure()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["loader", "trainer"])
    ap.add_argument("--data", default="/tmp/ddpm_input_bench", help="generated data (cached)")
    ap.add_argument("--rows", nargs="+", choices=sorted(ROWS), default=list(ROWS))
    ap.add_argument("--images", type=int, default=3072, help="images timed per loader cell")
    ap.add_argument("--grain", action="store_true")
    ap.add_argument("--model", choices=["tiny", "small"], default="small")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    root = Path(args.data)
    make_data(root)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines()
                  if line.startswith("Model name")), "?")
    print(f"CPU: {model}, {os.cpu_count()} cores; load average before: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    (loader if args.what == "loader" else trainer)(args, root)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
