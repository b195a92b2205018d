"""What a run shows: TensorBoard events, a progress line, PNG sample grids, JSON results.

Every process of a multi-host run computes the same results; only process 0 writes them
(`writes_files`): TensorBoard, samples, figures and JSON files.
"""

import json
import logging as logging_std
import os
import time

import jax
import numpy as np
from absl import logging
from PIL import Image, ImageDraw, ImageFont

import data_spec


def writes_files() -> bool:
    """Whether this process writes a run's output files: process 0 only."""
    return jax.process_index() == 0


def write_json(path: str, content) -> str:
    """Writes `content` as indented JSON to path (process 0 only); returns path.

    Atomic: the text goes to a temporary file beside it, synced, then renamed over path, so a
    crash, a full disk or a value JSON cannot hold leaves the previous file (or none), never a
    truncated one (text_eval.json keeps the scales of earlier sweeps, the benchmark its finished
    checkpoints)."""
    if writes_files():
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        text = json.dumps(content, indent=1)  # a value JSON cannot hold fails here, first
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return path


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Images in [-1, 1] -> uint8 [0, 255] (rounded, clipped): `data_spec.decode_pixels`."""
    return data_spec.decode_pixels(x)


def make_grid(images: np.ndarray, ncols: int, pad: int = 2) -> np.ndarray:
    """uint8 [N, H, W, C] -> one uint8 [rows*(H+pad)+pad, ncols*(W+pad)+pad, C] image."""
    n, h, w, c = images.shape
    nrows = -(-n // ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y:y + h, x:x + w] = images[i]
    return grid


def save_png(path: str, image: np.ndarray, scale: int = 1) -> None:
    """Writes uint8 [H, W, C] (C = 1 or 3) as PNG, enlarged `scale` times (nearest)."""
    if scale > 1:
        image = image.repeat(scale, axis=0).repeat(scale, axis=1)
    if image.shape[-1] == 1:
        image = image[..., 0]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(image).save(path)


def label_rows(image: np.ndarray, labels: list[str], *, row_height: int, pad: int = 2,
               width: int = 260) -> np.ndarray:
    """A grid image uint8 [H, W, C] with a white margin of `width` px on the left in which row
    i's label is written (PIL's built-in font: nothing to download). Rows are row_height + pad
    tall, as make_grid lays them out."""
    h, w, c = image.shape
    canvas = Image.new("L", (width, h), 255)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(10, min(row_height // 3, 18)))
    for i, text in enumerate(labels):
        y = pad + i * (row_height + pad) + row_height // 2
        draw.text((4, y), text if len(text) <= 40 else text[:39] + "…", fill=0, font=font,
                  anchor="lm")
    margin = np.repeat(np.asarray(canvas, np.uint8)[..., None], c, axis=-1)
    return np.concatenate([margin, image], axis=1)


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
    """Steps/s, images/s and ETA between calls of `update`."""

    def __init__(self, start_step: int, total_steps: int, batch_size: int):
        self.total_steps = total_steps
        self.batch_size = batch_size
        self._last_step = start_step
        self._last_time = time.perf_counter()

    def update(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        steps_per_sec = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        return {"steps_per_sec": steps_per_sec,
                "images_per_sec": steps_per_sec * self.batch_size,
                "eta_sec": (self.total_steps - step) / max(steps_per_sec, 1e-9)}

    def line(self, step: int, scalars: dict[str, float], rates: dict[str, float]) -> str:
        parts = [f"step {step}/{self.total_steps}"]
        parts += [f"{k} {v:.4g}" for k, v in scalars.items()]
        parts += [f"{rates['steps_per_sec']:.2f} steps/s",
                  f"{rates['images_per_sec']:.1f} img/s",
                  f"ETA {format_duration(rates['eta_sec'])}"]
        return " | ".join(parts)


class Writer:
    """TensorBoard event files under `workdir/tensorboard`; a no-op on processes other than 0."""

    def __init__(self, workdir: str, *, enabled: bool):
        self._writer = None
        if enabled:
            from tensorboardX import SummaryWriter  # only process 0 needs it

            self._writer = SummaryWriter(logdir=os.path.join(workdir, "tensorboard"))

    def scalars(self, step: int, scalars: dict[str, float]) -> None:
        if self._writer:
            for name, value in scalars.items():
                self._writer.add_scalar(name, float(value), step)

    def image(self, step: int, name: str, image: np.ndarray) -> None:
        """uint8 [H, W, C]."""
        if self._writer:
            self._writer.add_image(name, image, step, dataformats="HWC")

    def hparams(self, flat_config: dict, config_json: str) -> None:
        if self._writer:
            self._writer.add_text("config", f"```\n{config_json}\n```", 0)
            hparams = {k: (v if isinstance(v, int | float | str | bool) else str(v))
                       for k, v in flat_config.items()}
            self._writer.add_hparams(hparams, {}, name="hparams")

    def flush(self) -> None:
        if self._writer:
            self._writer.flush()

    def close(self) -> None:
        if self._writer:
            self._writer.close()


def log_line(message: str) -> None:
    logging.info(message)


def quiet_libraries(record: logging_std.LogRecord) -> bool:
    """A log filter that keeps the progress readable: orbax and tfds INFO lines are dropped,
    warnings kept, but not orbax's notes that a read-only checkpoint manager (sampling and
    evaluation open the checkpoints so on purpose) saves nothing; nor jax's INFO line about
    a backend it could not start (libtpu on a machine without a TPU). Library errors keep
    their line but not their traceback: orbax re-raises them to us, and main.py prints a
    user's error as one line and anything else with its traceback, once."""
    message = str(record.msg)
    if "exception was never retrieved" in message:
        return False  # asyncio, for the sibling reads of a failed orbax restore: raised once
    if ("/jax/" in record.pathname and record.levelno < logging_std.WARNING
            and "Unable to initialize backend" in message):
        return False  # (a backend that was asked for and fails raises an error instead)
    if any(n in record.pathname for n in ("/orbax/", "/tensorflow_datasets/")):
        if record.levelno < logging_std.WARNING or "is read only" in message:
            return False
        record.exc_info = record.exc_text = None
    return True


def log_to_stderr() -> None:
    """INFO lines to stderr through `quiet_libraries`, for a tool run without main.py (a
    library may have configured the root logger on import: its handlers get the filter)."""
    root = logging_std.getLogger()
    if not root.handlers:
        root.addHandler(logging_std.StreamHandler())
    for handler in root.handlers:
        handler.addFilter(quiet_libraries)
    logging.set_verbosity(logging.INFO)
