"""ddpm-jax: train, resume and sample denoising diffusion models.

    python main.py --config=configs/mnist.py --workdir=workdirs/mnist            # train/resume
    python main.py --config=configs/mnist.py --workdir=workdirs/mnist --mode=sample
    python main.py --config=configs/mnist.py --workdir=workdirs/mnist --mode=eval   # bpd, FID
    python main.py --config=configs/mnist.py --workdir=workdirs/mnist --mode=guidance_sweep
    python main.py --config=configs/mnist.py --workdir=workdirs/mnist --mode=figures   # PNGs
    python main.py --config=configs/mnist_classifier.py --workdir=workdirs/mnist \
        --mode=train_classifier                       # then --mode=sample: classifier guidance
    python main.py --config=configs/cifar.py --workdir=DIR --config.optim.lr=1e-4  # overrides

Multi-host (TPU pods, GPU clusters): launch the same command on every host with --multihost;
jax.distributed.initialize() reads the cluster from the environment.

A mistake of the user's (a bad flag, config file or value, an unprepared dataset, a busy or
unwritable workdir, a full disk: errors.UserError) ends with one line `error: ...` that names
the fix, and exit code 1; anything else is a bug and keeps its traceback. SIGTERM and Ctrl-C:
interrupts.py (training saves and exits 0).
"""

import cpu_runtime

if __name__ == "__main__":
    cpu_runtime.restart_with_huge_page_malloc()  # first, so the restart costs no imports
    import interrupts

    interrupts.STOP.install()  # next: a SIGTERM or Ctrl-C from here on is handled

import os
import re
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

import classifier_training
import evaluate
import generate
import interrupts
import metric_logging
import text_eval
import train_lib
from errors import UserError


def make_figures(config, workdir):
    import figures  # and matplotlib: imported by the one mode that draws, not at every start

    return figures.make_figures(config, workdir)


# --mode -> what it runs, each called as fn(config, workdir).
MODES = {
    "train": train_lib.train,
    "sample": generate.generate,
    "eval": evaluate.evaluate,
    "train_classifier": classifier_training.train_classifier,
    "guidance_sweep": generate.guidance_sweep,
    "figures": make_figures,
    "text_eval": text_eval.text_eval,
}

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard logs and samples go here.")
flags.DEFINE_enum("mode", "train", list(MODES), "What to do.")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 (multihost only; else detected from the cluster).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multihost only).")
flags.DEFINE_integer("process_id", None, "This process's index (multihost only).")
flags.mark_flags_as_required(["config", "workdir"])
TRAINING_MODES = ("train", "train_classifier")  # a stop there exits 0: what there was is saved


def _fail(message: str, code: int = 1):
    """One line, no traceback: the message names the bad value and the fix."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _flag_value(argv: list[str], name: str) -> str:
    """The value of --name in argv (the last one given, as absl takes it)."""
    for i, arg in reversed(list(enumerate(argv))):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return "?"


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with the errors a user's --config can cause as one line each."""
    try:
        remaining = FLAGS(argv)
        FLAGS.config.keys()  # ml_collections loads the config file lazily: here, not later
        return remaining
    except flags.Error as e:  # a missing flag, or a value of the wrong type
        _fail(f"{e}. Fix: see --helpfull, or the field's comment in configs/default.py.")
    except (KeyError, AttributeError) as e:  # ml_collections: an override names no field
        inner = e.args[0] if e.args and isinstance(e.args[0], BaseException) else e
        text = str(inner.args[0] if inner.args else inner)
        field = text.splitlines()[0].strip("'\"") if text else "?"
        guess = re.search(r'Did you mean "([^"]+)"', text)
        flag = next((a.split("=")[0] for a in argv if a.startswith("--config.")
                     and field in a.split("=")[0].split(".")), "--config.?")
        _fail(f"{flag}: the config has no field {field!r}"
              + (f" (did you mean {guess.group(1)!r}?)" if guess else "")
              + ". Fix: spell it as configs/default.py does.")
    except SyntaxError as e:  # the config file is not Python
        _fail(f"--config={_flag_value(argv, 'config')}: {e.filename}, line {e.lineno}: "
              f"{e.msg}. Fix: correct the config file.")
    except OSError as e:  # the config file cannot be read (ml_collections wraps the cause)
        reason = re.search(r"\[Errno \d+\] ([^:'\n]+)", str(e))
        _fail(f"--config={_flag_value(argv, 'config')} cannot be loaded: "
              f"{reason.group(1) if reason else str(e).splitlines()[0]}. Fix: pass the path of "
              f"a config file such as configs/mnist.py.")


def _exit_stopped(stop: interrupts.Stopped):
    """After a stop with nothing (more) to save: one line, then exit at once. os._exit, because
    XLA may still be compiling in a worker thread (interrupts.run_interruptibly), and an
    interpreter shutdown under it aborts."""
    training = FLAGS.mode in TRAINING_MODES
    print(f"{stop.signal_name} received: stopped "
          + ("before this run's first step: nothing new to save." if training
             else f"--mode={FLAGS.mode} did not finish."), file=sys.stderr)
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if training else 128 + stop.signum)


def main(argv):
    del argv
    try:
        with interrupts.handled():  # a stop received since start-up raises here
            _main()
    except interrupts.Stopped as stop:
        _exit_stopped(stop)


def _main():
    # Before jax's first computation (cpu_runtime.py); processes of a multihost run keep XLA's
    # device count, so that processes sharing a machine do not each split it.
    cpu_runtime.configure(split_cpu=not FLAGS.multihost)
    logging.get_absl_handler().addFilter(metric_logging.quiet_libraries)
    if FLAGS.multihost:
        # Cross-process collectives between CPU devices go through gloo (no effect on GPU/TPU).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                                   FLAGS.process_id)
    logging.info("JAX %s: process %d/%d, %d devices (%s).", jax.__version__, jax.process_index(),
                 jax.process_count(), jax.device_count(), jax.devices()[0].platform)
    try:
        MODES[FLAGS.mode](FLAGS.config, FLAGS.workdir)
    except UserError as e:  # the message names the bad value and the fix: no traceback
        _fail(str(e))


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
