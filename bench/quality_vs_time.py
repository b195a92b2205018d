"""Sample quality per minute of training: a config trained for fixed wall-clock budgets, each
checkpoint judged as a user sees its digits.

Training: the config (default configs/mnist.py, the demo) with any `--config.x=y` overrides runs
in one workdir and stops when its training time reaches each budget (`--budgets`, minutes of
this machine's wall clock, cumulative). It stops through training_loop's `stop_when`, which saves
a checkpoint at that step; the next budget resumes from it (the data order and keys are functions
of (seed, step), so the checkpoints lie on one uninterrupted run). A budget counts the training
loop only: from the first update of a segment to its last. Building the model, restoring and
compiling the train step (once per segment) are `setup_s`, the final save `save_s`: reported, not
counted. The state is synchronised after every step, so a segment's clock and its step count
agree; a segment ends on the first step past its budget. The config's periodic sample grids and
estimates are turned off (their time is not training); its periodic checkpoints stay, as in the
demo. train.num_steps is only a cap (`--max-steps`): learning-rate warmup and EMA do not depend
on it.

Judging: each checkpoint's EMA parameters sample `--num-samples` (500) digits, labels i mod 10,
with each of `--samplers` (default ancestral 100, DDIM 50, DPM-Solver++(2M) 10 and 20 steps; the
config's sample.spacing for the samplers that take one) at each CFG scale of `--scales` (0 1 2 3),
through sampling_lib as --mode=sample does, and the project's offline judge
(evaluation/digit_quality.py) scores them on uint8: accuracy as asked (the CFG accuracy of that
scale), confident (p >= 0.9), border mean (the 4-pixel frame; real digits ~0.00) and MNIST-FID
against the reference statistics of eval.fid_ref_split (the 4,500 training digits). `--fid-5k`
samples 5,000 and judges them too (the 500 are their first 500: nothing is sampled twice). The
floor: the same judge on the 500 held-out real digits (mnist_5k test); none exists at 5,000.
Judging dominates the run: per checkpoint, samplers x scales runs of --num-samples digits (the
default 4 x 4: 180 sampler steps per scale, CFG doubling the batch), ten times that with --fid-5k;
narrow --samplers and --scales for a 5,000-sample run.

Output: a Markdown table on stdout; <out-dir>/quality_vs_time_<name>.json (CPU model, date,
command, overrides and the whole config, each segment's steps/s, CPU seconds and load average,
every metric per checkpoint, sampler and scale; rewritten after each checkpoint) and
<out-dir>/quality_vs_time_<name>.png (MNIST-FID against training minutes, a panel per sampler,
a line per scale, the floor dashed and 1.5x the floor dotted).

    .venv/bin/python bench/quality_vs_time.py --budgets 2.5 5 10            # configs/mnist.py
    .venv/bin/python bench/quality_vs_time.py --budgets 2.5 5 10 --fid-5k
    .venv/bin/python bench/quality_vs_time.py --budgets 10 --name v_pred \\
        --config.diffusion.prediction=v                                     # a recipe change
    .venv/bin/python bench/quality_vs_time.py --budgets 0.3 --num-samples 50 --scales 0 1 \\
        --out-dir /tmp/qvt --workdir /tmp/qvt/work                          # a smoke test

Judging only: `--judge WORKDIR` trains nothing and judges the newest checkpoint of an existing
workdir (e.g. `make demo`'s) with each sampling seed of `--seeds`: per sampler and scale the mean
and the spread between seeds, which says which differences 500 samples can resolve. The model
and its settings are the checkpoint's; --budgets, --max-steps and --workdir do not apply. It
writes <out-dir>/quality_vs_time_judged_<--name, default the workdir's name>.json (no plot).

    .venv/bin/python bench/quality_vs_time.py --judge workdirs/mnist --seeds 0 1 2 \\
        --samplers ancestral:100 dpm_solver_pp_2m_sde:20 --scales 0 0.5 0.6 --name demo

Run it alone: other jobs' CPU use comes out of the budget (each segment records its CPU seconds
per wall second and the load average). The trainer's progress line counts its ETA to the step cap;
the "budget" lines say where the budget stands.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import checkpointing  # noqa: E402
import config_compat  # noqa: E402
import config_lib  # noqa: E402
import cpu_runtime  # noqa: E402
import input_pipeline  # noqa: E402
import interrupts  # noqa: E402
import metric_logging  # noqa: E402
import sampling_lib  # noqa: E402
import train_lib  # noqa: E402
from diffusion import samplers, schedules  # noqa: E402
from errors import UserError  # noqa: E402
from evaluation import digit_quality, evaluator, mnist_classifier  # noqa: E402

DEFAULT_SAMPLERS = ("ancestral:100", "ddim:50", "dpm_solver_pp_2m:10", "dpm_solver_pp_2m:20")
LARGE = 5000  # --fid-5k
# Turned off in the benchmark: periodic work inside the loop that is not training.
PERIODIC_OFF = {"train.sample_every": 0, "eval.bpd_every": 0, "eval.fid_every": 0}


# --- the command line -------------------------------------------------------------------------

def load_config(path: str, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """The config file with `--config.a.b=value` overrides, parsed by ml_collections as
    main.py parses them."""
    if not os.path.isfile(path):
        raise UserError(f"--config={path}: no such file. Fix: the path of a config file such "
                        f"as configs/mnist.py.")
    argv = ["quality_vs_time", f"--config={path}", *overrides]
    holder = flags.FlagValues()
    config = config_flags.DEFINE_config_file("config", path, flag_values=holder,
                                             lock_config=True, sys_argv=argv)
    try:
        holder(argv)
        config.value.keys()  # the file is loaded lazily: its errors come here
    except flags.Error as e:  # a value of the wrong type
        raise UserError(f"{e}. Fix: a value of the field's type (configs/default.py).") from None
    except (KeyError, AttributeError) as e:  # an override names no field
        inner = e.args[0] if e.args and isinstance(e.args[0], BaseException) else e
        field, *hint = str(inner.args[0] if inner.args else inner).splitlines()
        raise UserError(f"{' '.join(overrides)}: the config has no field {field}"
                        + (f" ({' '.join(hint)})" if hint else "")
                        + ". Fix: spell it as configs/default.py does.") from None
    except SyntaxError as e:
        raise UserError(f"--config={path}, line {e.lineno}: {e.msg}. Fix: correct the config "
                        f"file.") from None
    return config.value


def parse_samplers(specs: Sequence[str]) -> list[tuple[str, int]]:
    """["ddim:50", ...] -> [("ddim", 50), ...]."""
    out = []
    for spec in specs:
        name, _, steps = spec.partition(":")
        if name not in samplers.SAMPLERS or not steps.isdigit() or int(steps) < 1:
            raise UserError(f"--samplers {spec!r} is not SAMPLER:STEPS. Fix: e.g. ddim:50, with "
                            f"a sampler of {tuple(samplers.SAMPLERS)}.")
        out.append((name, int(steps)))
    return out


def check(config: ml_collections.ConfigDict, sampler_steps: Sequence[tuple[str, int]],
          scales: Sequence[float], budgets: Sequence[float], num_samples: int) -> None:
    """Everything the run needs, before anything is built (one line with the fix each)."""
    config_lib.validate(config, num_devices=jax.device_count())
    if config.data.name != input_pipeline.MNIST_5K or config.eval.feature_net != "mnist_classifier":
        raise UserError(f"The judge is the MNIST classifier; the config has data.name="
                        f"{config.data.name!r}, eval.feature_net={config.eval.feature_net!r}. "
                        f"Fix: start from configs/mnist.py.")
    if config.model.num_classes != mnist_classifier.NUM_CLASSES:
        raise UserError(f"model.num_classes={config.model.num_classes}: digits are asked for by "
                        f"label. Fix: --config.model.num_classes={mnist_classifier.NUM_CLASSES}.")
    if any(w > 0 for w in scales) and config.diffusion.p_uncond == 0:
        raise UserError("--scales above 0 need a model trained with the null label. Fix: "
                        "--config.diffusion.p_uncond=0.1, or --scales 0.")
    if any(w < 0 for w in scales):
        raise UserError(f"--scales {list(scales)}: guidance scales are >= 0.")
    if not budgets or any(b <= 0 for b in budgets) or list(budgets) != sorted(set(budgets)):
        raise UserError(f"--budgets {list(budgets)}: give increasing positive minutes, e.g. "
                        f"--budgets 2.5 5 10.")
    if num_samples < 2:
        raise UserError(f"--num-samples {num_samples}: MNIST-FID needs >= 2 samples.")
    for name, steps in sampler_steps:
        if steps > config.diffusion.num_timesteps:
            raise UserError(f"--samplers {name}:{steps}: more steps than diffusion.num_timesteps="
                            f"{config.diffusion.num_timesteps}.")


def prepare(config: ml_collections.ConfigDict, max_steps: int) -> ml_collections.ConfigDict:
    """The config the benchmark trains: periodic grids and estimates off, num_steps a cap."""
    if config.optim.decay_steps:
        raise UserError(
            f"optim.decay_steps={config.optim.decay_steps}: --budgets judges one run at several "
            f"budgets, and a learning rate that decays to a fixed step would be judged in "
            f"mid-decay. Fix: train each length with main.py (decay_steps = its num_steps) and "
            f"judge it with --judge WORKDIR, or --config.optim.decay_steps=0.")
    for field, value in PERIODIC_OFF.items():
        section, name = field.split(".")
        config[section][name] = value
    k = config.train.steps_per_dispatch
    config.train.num_steps = -(-max_steps // k) * k
    return config


def default_name(config_path: str, overrides: Sequence[str]) -> str:
    """The config's file name, plus the overrides when there are any (hashed when long)."""
    name = Path(config_path).stem
    if overrides:
        slug = "-".join(re.sub(r"[^A-Za-z0-9._=]+", "_", o.removeprefix("--config."))
                        for o in overrides)
        if len(slug) > 80:
            slug = slug[:70] + "-" + hashlib.sha1(slug.encode()).hexdigest()[:8]
        name += "-" + slug
    return name


def machine() -> dict:
    """What the numbers were measured on."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        lscpu = ""
    model = re.search(r"^Model name:\s*(.+)$", lscpu, re.M)
    cpu_flags = set()
    if os.path.exists("/proc/cpuinfo"):
        found = re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu_flags = set(found.group(1).split()) if found else set()
    return {"cpu": model.group(1).strip() if model else platform.processor(),
            "cores": os.cpu_count(), "avx512f": "avx512f" in cpu_flags,
            "avx2": "avx2" in cpu_flags, "jax": jax.__version__,
            "devices": f"{jax.device_count()} x {jax.devices()[0].platform}",
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "host": platform.node()}


# --- training for budgets ---------------------------------------------------------------------

class BudgetClock:
    """training_loop's stop_when for one segment: True once `seconds` of training have passed
    since its first call (the loop's start, before the first update). The state is synchronised
    at every call, so the time measured is that of the steps counted."""

    def __init__(self, seconds: float, label: str, report_every_s: float = 30.0):
        self.seconds, self.label, self.report_every_s = seconds, label, report_every_s
        self.first_step = self.step = 0
        self.start = self.cpu_start = self.last_report = None
        self.wall_s = self.cpu_s = 0.0

    def __call__(self, step: int, state) -> bool:
        jax.block_until_ready(state)
        now = time.perf_counter()
        if self.start is None:
            self.start, self.cpu_start, self.last_report = now, time.process_time(), now
            self.first_step = step
        self.step, self.wall_s = step, now - self.start
        self.cpu_s = time.process_time() - self.cpu_start
        if now - self.last_report >= self.report_every_s:
            self.last_report = now
            rate = (step - self.first_step) / max(self.wall_s, 1e-9)
            logging.info("budget %s: %s of %s trained, step %d, %.2f steps/s, ETA %s",
                         self.label, metric_logging.format_duration(self.wall_s),
                         metric_logging.format_duration(self.seconds), step, rate,
                         metric_logging.format_duration(self.seconds - self.wall_s))
        return self.wall_s >= self.seconds


def train_for_budgets(config: ml_collections.ConfigDict, workdir: str,
                      budgets_min: Sequence[float]) -> Iterator[tuple[dict, train_lib.TrainState]]:
    """Trains in workdir until each cumulative budget (minutes); yields (segment record, the
    state at the budget) after each, so it can be judged before training goes on."""
    trained_s = 0.0
    for budget in budgets_min:
        clock = BudgetClock(budget * 60 - trained_s, f"{budget:g} min")
        load_before, begin = os.getloadavg()[0], time.perf_counter()
        state = train_lib.train(config, workdir, stop_when=clock)
        end = time.perf_counter()
        interrupts.STOP.raise_if_requested()  # a Ctrl-C in the loop saved, then returned
        trained_s += clock.wall_s
        steps = clock.step - clock.first_step
        capped = clock.step >= config.train.num_steps
        segment = {
            "budget_min": budget, "step": clock.step, "trained_min": trained_s / 60,
            "segment_steps": steps, "segment_wall_s": clock.wall_s,
            "steps_per_s": steps / max(clock.wall_s, 1e-9),
            "cpu_s_per_wall_s": clock.cpu_s / max(clock.wall_s, 1e-9),
            "setup_s": (clock.start or end) - begin,
            "save_s": end - (clock.start or end) - clock.wall_s,
            "stopped_by": "max_steps" if capped else "budget",
            "loadavg_1min": [load_before, os.getloadavg()[0]]}
        logging.info("Trained %d steps in %s (%.2f steps/s; setup %.1f s not counted): step %d "
                     "at %.2f min.", steps, metric_logging.format_duration(clock.wall_s),
                     segment["steps_per_s"], segment["setup_s"], clock.step, trained_s / 60)
        yield segment, state
        if capped:
            logging.warning("Reached the step cap %d: no later budgets. Fix: a larger "
                            "--max-steps.", config.train.num_steps)
            return


# --- judging ------------------------------------------------------------------------------------

def sampler_label(name: str, steps: int) -> str:
    return f"{name}-{steps}"


class Judge:
    """Every (sampler, steps, scale) of the benchmark, compiled once and reused for each
    checkpoint, with the offline MNIST judge, its reference statistics and the real floor."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str,
                 sampler_steps: Sequence[tuple[str, int]], scales: Sequence[float],
                 sizes: Sequence[int]):
        e, data = config_lib.eval_args(config), config_lib.data_args(config)
        mesh = train_lib.make_mesh()
        self.sizes, self.scales, self.seed = sorted(sizes), list(scales), config.sample.seed
        self.net = evaluator.feature_net(e, mesh)
        self.real = evaluator.reference_stats(e, data, self.net, workdir)
        model = train_lib.create_model(config)
        schedule = schedules.schedule_from_name(config.diffusion.schedule,
                                                config.diffusion.num_timesteps)
        self.labels = (np.arange(max(sizes)) % model.num_classes).astype(np.int32)
        base = config_lib.sample_args(config)
        self.samplers, self.spacing, self.cost = {}, {}, {}
        for name, steps in sampler_steps:
            # A sampler with its own timesteps (DPM-Solver++) takes only the default spacing.
            spacing = (base.spec.spacing if samplers.SAMPLERS[name].spacing is None
                       else samplers.DEFAULT_SPACING)
            spec = dataclasses.replace(base.spec, sampler=name, num_steps=steps, spacing=spacing)
            self.spacing[sampler_label(name, steps)] = spacing
            sampler = sampling_lib.make_sampler(  # every scale: w is an input of its programs
                dataclasses.replace(base, spec=spec), model, schedule, mesh,
                image_shape=data.spec.shape, batch_size=base.batch_size, num_steps=steps,
                sampler=name)
            for w in self.scales:
                self.samplers[(sampler_label(name, steps), w)] = sampler
                # Network evaluations per image, CFG doubling the batch: for the ETA.
                self.cost[(sampler_label(name, steps), w)] = (
                    spec.model_evaluations(schedule.num_timesteps) * (2 if w > 0 else 1))
        self.reference = {"split": e.fid_ref_split, "count": self.real.count}

    def floor(self) -> dict[str, dict[str, float]]:
        """The judge on real held-out digits (a fixed random subset of each size it has)."""
        test = input_pipeline.load(input_pipeline.MNIST_5K, "test")
        order = np.random.default_rng(0).permutation(len(test))
        out = {}
        for n in self.sizes:
            if n <= len(test):
                images, labels = test.get(order[:n])
                out[str(n)] = digit_quality.judge(self.net, images, labels, real=self.real)
        return out

    def __call__(self, params, label: str, seed: int | None = None) -> tuple[dict, float]:
        """({sampler: {scale: {num_samples: metrics}}}, seconds) of one checkpoint, sampled
        from `seed` (default: the config's sample.seed)."""
        seed = self.seed if seed is None else seed
        results: dict = {}
        total, done = sum(self.cost.values()), 0
        begin = time.perf_counter()
        for (sampler, w), s in self.samplers.items():
            start = time.perf_counter()
            images = sampling_lib.sample_many(s, params, num_samples=max(self.sizes),
                                              cond={"label": self.labels}, seed=seed,
                                              guidance_scale=w)
            uint8 = metric_logging.to_uint8(images)
            row = {str(n): digit_quality.judge(self.net, uint8[:n], self.labels[:n],
                                               real=self.real) for n in self.sizes}
            row["sample_s"] = time.perf_counter() - start
            results.setdefault(sampler, {})[f"{w:g}"] = row
            done += self.cost[(sampler, w)]
            elapsed = time.perf_counter() - begin
            m = row[str(self.sizes[0])]
            logging.info("%s: %s w=%g: MNIST-FID %.2f, accuracy %.3f, confident %.3f, border "
                         "%.3f (%d samples; %.0f s). Judging ETA %s.", label, sampler, w,
                         m["fid"], m["accuracy"], m["confident"], m["border"], self.sizes[0],
                         row["sample_s"], metric_logging.format_duration(
                             elapsed * (total - done) / done))
        return results, time.perf_counter() - begin


# --- output -----------------------------------------------------------------------------------

def cpu_text(m: dict) -> str:
    """The machine of a result (`machine()`) as the tables name it."""
    return f"{m['cpu']} ({m['cores']} cores, AVX-512 {'yes' if m['avx512f'] else 'no'})"


def markdown(result: dict) -> str:
    """The tables of a result (as written to the JSON)."""
    m, sizes = result["machine"], result["num_samples"]
    small = str(sizes[0])
    lines = [f"### quality_vs_time {result['name']}: {result['config_file']} "
             f"{' '.join(result['overrides'])}".rstrip(), "",
             f"CPU: {cpu_text(m)}, "
             f"{m['devices']}, {m['date']}. Training time: the loop only (setup and compile "
             f"not counted).", "",
             "| budget (min) | step | trained (min) | steps/s | CPU-s per s | setup s | "
             "load avg |", "|---|---|---|---|---|---|---|"]
    for c in result["checkpoints"]:
        lines.append(f"| {c['budget_min']:g} | {c['step']} | {c['trained_min']:.2f} | "
                     f"{c['steps_per_s']:.2f} | {c['cpu_s_per_wall_s']:.2f} | "
                     f"{c['setup_s']:.0f} | {c['loadavg_1min'][0]:.1f} → "
                     f"{c['loadavg_1min'][1]:.1f} |")
    floor = result["floor"].get(small)
    header = ["trained (min)", "step", "sampler", "w", f"MNIST-FID {small}", "× floor",
              "accuracy", "confident", "border"]
    header += [f"MNIST-FID {n}" for n in sizes[1:]]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    if floor:
        lines.append(f"| real held-out digits | | | | {floor['fid']:.2f} | 1.00 | "
                     f"{floor['accuracy']:.3f} | {floor['confident']:.3f} | "
                     f"{floor['border']:.3f} |" + " |" * (len(sizes) - 1))
    for c in result["checkpoints"]:
        for sampler, by_scale in c["results"].items():
            for w, row in by_scale.items():
                r = row[small]
                ratio = f"{r['fid'] / floor['fid']:.2f}" if floor else ""
                cells = [f"{c['trained_min']:.2f}", str(c["step"]), sampler, w,
                         f"{r['fid']:.2f}", ratio, f"{r['accuracy']:.3f}",
                         f"{r['confident']:.3f}", f"{r['border']:.3f}"]
                cells += [f"{row[str(n)]['fid']:.2f}" for n in sizes[1:]]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: str) -> str:
    """MNIST-FID against training minutes: a panel per sampler, a line per scale."""
    from matplotlib.figure import Figure

    checkpoints = result["checkpoints"]
    names = list(checkpoints[0]["results"]) if checkpoints else []
    small = str(result["num_samples"][0])
    fig = Figure(figsize=(3.2 * max(len(names), 1), 3.4), dpi=100)
    axes = fig.subplots(1, max(len(names), 1), squeeze=False, sharey=True)[0]
    minutes = [c["trained_min"] for c in checkpoints]
    floor = result["floor"].get(small, {}).get("fid")
    for ax, sampler in zip(axes, names, strict=False):
        for w in checkpoints[0]["results"][sampler]:
            ax.plot(minutes, [c["results"][sampler][w][small]["fid"] for c in checkpoints],
                    "o-", label=f"w = {w}")
        if floor:
            ax.axhline(floor, color="grey", ls="--", lw=1, label="real digits")
            ax.axhline(1.5 * floor, color="grey", ls=":", lw=1, label="1.5 × real")
        ax.set_title(sampler, fontsize=9)
        ax.set_xlabel("training time (min)")
        ax.set_xlim(left=0)
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel(f"MNIST-FID ({small} samples)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{result['name']} on {result['machine']['cpu']}", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    return path


# --- the run ------------------------------------------------------------------------------------

def run(config: ml_collections.ConfigDict, workdir: str, *, budgets: Sequence[float],
        sampler_steps: Sequence[tuple[str, int]], scales: Sequence[float],
        sizes: Sequence[int], out_json: str, about: dict) -> dict:
    """Trains for each budget and judges each checkpoint; the result is rewritten to out_json
    after every checkpoint. about: name, config_file, overrides, command (copied in)."""
    if os.path.isdir(os.path.join(workdir, "checkpoints")) and os.listdir(
            os.path.join(workdir, "checkpoints")):
        raise UserError(f"--workdir={workdir} already has checkpoints; the budgets are measured "
                        f"from step 0. Fix: another --workdir, or delete it.")
    judge = Judge(config, workdir, sampler_steps, scales, sizes)
    result = {**about, "machine": machine(), "num_samples": sorted(sizes),
              "samplers": [sampler_label(*s) for s in sampler_steps], "spacing": judge.spacing,
              "scales": list(scales), "params": "ema", "reference": judge.reference,
              "clock": "training loop wall time, state synchronised each step; setup (model, "
                       "restore, train-step compile: once per segment) and the final save "
                       "reported apart, not counted",
              "turned_off": PERIODIC_OFF, "max_steps": config.train.num_steps,
              "config": json.loads(checkpointing.config_to_json(config)),
              "floor": judge.floor(), "checkpoints": []}
    logging.info("Real held-out digits: %s", result["floor"])
    for segment, state in train_for_budgets(config, workdir, budgets):
        label = f"checkpoint {len(result['checkpoints']) + 1}/{len(budgets)} (step " \
                f"{segment['step']})"
        params = state.ema_params if config.sample.use_ema else state.params
        segment["results"], segment["judge_s"] = judge(params, label)
        result["checkpoints"].append(segment)
        metric_logging.write_json(out_json, result)
    return result


def judge_workdir(config: ml_collections.ConfigDict, workdir: str, *,
                  sampler_steps: Sequence[tuple[str, int]], scales: Sequence[float],
                  sizes: Sequence[int], seeds: Sequence[int], out_json: str,
                  about: dict) -> dict:
    """Judges the newest checkpoint of `workdir` once per sampling seed (`--judge`); the model has
    the settings it was trained with (config_compat), whatever `config` says."""
    config = config_compat.trained_config(config, workdir)
    _, params, step = train_lib.restore_params(config, workdir, use_ema=config.sample.use_ema)
    judge = Judge(config, workdir, sampler_steps, scales, sizes)
    result = {**about, "mode": "judge", "workdir": workdir, "step": step,
              "machine": machine(), "num_samples": sorted(sizes),
              "samplers": [sampler_label(*s) for s in sampler_steps], "spacing": judge.spacing,
              "scales": list(scales), "seeds": list(seeds),
              "params": "ema" if config.sample.use_ema else "raw", "reference": judge.reference,
              "config": json.loads(checkpointing.config_to_json(config)),
              "floor": judge.floor(), "by_seed": {}}
    for seed in seeds:
        result["by_seed"][str(seed)], _ = judge(params, f"step {step}, seed {seed}", seed)
        metric_logging.write_json(out_json, result)
    return result


def markdown_judged(result: dict) -> str:
    """The table of a `--judge` result: per sampler and scale, mean ± standard deviation over the
    seeds (n - 1 in the denominator; no ± for one seed)."""
    m, small = result["machine"], str(result["num_samples"][0])
    seeds = list(result["by_seed"])
    lines = [f"### quality_vs_time --judge {result['workdir']} (step {result['step']}), "
             f"{small} samples, seeds {' '.join(seeds)}", "",
             f"CPU: {cpu_text(m)}, "
             f"{m['date']}.", "",
             "| sampler | w | MNIST-FID | × floor | accuracy | confident | border | "
             "MNIST-FID per seed |", "|---|---|---|---|---|---|---|---|"]
    floor = result["floor"].get(small)
    if floor:
        lines.append(f"| real held-out digits | | {floor['fid']:.2f} | 1.00 | "
                     f"{floor['accuracy']:.3f} | {floor['confident']:.3f} | "
                     f"{floor['border']:.3f} | |")

    def cell(values, digits):
        mean = f"{np.mean(values):.{digits}f}"
        return mean if len(values) < 2 else f"{mean} ± {np.std(values, ddof=1):.{digits}f}"

    first = result["by_seed"][seeds[0]]
    for sampler, by_scale in first.items():
        for w in by_scale:
            rows = [result["by_seed"][seed][sampler][w][small] for seed in seeds]
            fids = [r["fid"] for r in rows]
            ratio = f"{np.mean(fids) / floor['fid']:.2f}" if floor else ""
            lines.append(f"| {sampler} | {w} | {cell(fids, 2)} | {ratio} | "
                         + " | ".join(cell([r[k] for r in rows], 3)
                                      for k in ("accuracy", "confident", "border"))
                         + f" | {' '.join(f'{v:.2f}' for v in fids)} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    cpu_runtime.restart_with_huge_page_malloc()  # CPU speed: cpu_runtime.py, section 3
    cpu_runtime.configure()  # before jax's first computation
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="Other arguments: --config.FIELD=VALUE overrides.")
    ap.add_argument("--config", default=str(ROOT / "configs" / "mnist.py"))
    ap.add_argument("--budgets", type=float, nargs="+", default=[2.5, 5.0, 10.0],
                    help="cumulative training minutes at which to stop and judge")
    ap.add_argument("--num-samples", type=int, default=500)
    ap.add_argument("--fid-5k", action="store_true", help=f"also judge {LARGE} samples")
    ap.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0])
    ap.add_argument("--samplers", nargs="+", default=list(DEFAULT_SAMPLERS),
                    help="SAMPLER:STEPS each")
    ap.add_argument("--max-steps", type=int, default=1_000_000, help="train.num_steps cap")
    ap.add_argument("--name", default="", help="default: the config's name and overrides")
    ap.add_argument("--workdir", default="", help="default: workdirs/quality_vs_time/<name>")
    ap.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--judge", default="", metavar="WORKDIR",
                    help="train nothing: judge the newest checkpoint of WORKDIR")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="sampling seeds (--judge only; default: the config's sample.seed)")
    args, overrides = ap.parse_known_args(argv)
    if args.seeds is not None and not args.judge:
        ap.error("--seeds goes with --judge WORKDIR")
    if args.seeds is not None and len(set(args.seeds)) != len(args.seeds):
        ap.error(f"--seeds {' '.join(map(str, args.seeds))}: each seed once")
    if unknown := [a for a in overrides if not a.startswith("--config.")]:
        ap.error(f"unrecognized arguments: {' '.join(unknown)}")
    metric_logging.log_to_stderr()
    interrupts.STOP.install()  # a Ctrl-C while training saves; anywhere else it stops at once
    try:
        with interrupts.STOP.raising():
            config = load_config(args.config, overrides)
            sampler_steps = parse_samplers(args.samplers)
            check(config, sampler_steps, args.scales, args.budgets, args.num_samples)
            if not args.judge:  # a judged run keeps its own settings (config_compat)
                config = prepare(config, args.max_steps)
            name = args.name or default_name(args.config, overrides)
            workdir = args.workdir or str(ROOT / "workdirs" / "quality_vs_time" / name)
            out = os.path.join(args.out_dir, f"quality_vs_time_{name}")
            sizes = {args.num_samples} | ({LARGE} if args.fid_5k else set())
            config_file = Path(args.config).resolve()
            if config_file.is_relative_to(ROOT):
                config_file = config_file.relative_to(ROOT)
            about = {"name": name, "config_file": str(config_file), "overrides": overrides,
                     "command": " ".join(sys.argv)}
            if args.judge:
                out = os.path.join(args.out_dir, "quality_vs_time_judged_" + (
                    args.name or os.path.basename(os.path.abspath(args.judge))))
                result = judge_workdir(
                    config, args.judge, sampler_steps=sampler_steps, scales=args.scales,
                    sizes=sizes, seeds=args.seeds or [config.sample.seed],
                    out_json=out + ".json", about=about)
            else:
                result = run(config, workdir, budgets=args.budgets, sampler_steps=sampler_steps,
                             scales=args.scales, sizes=sizes, out_json=out + ".json",
                             about=about)
    except UserError as e:
        sys.exit(f"error: {e}")
    except interrupts.Stopped as stop:
        sys.exit(f"{stop.signal_name} received: stopped (finished checkpoints are in the JSON).")
    if args.judge:
        print(markdown_judged(result))
        print(f"\nWrote {out}.json")
        return result
    print(markdown(result))
    print(f"\nWrote {out}.json and {plot(result, out + '.png')}")
    return result


if __name__ == "__main__":
    main()
