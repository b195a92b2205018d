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
"""

import cpu_runtime

if __name__ == "__main__":  # first, so the restart (cpu_runtime.py, section 3) costs no imports
    cpu_runtime.restart_with_huge_page_malloc()

import logging as logging_std
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

import classifier_training
import evaluate
import figures
import generate
import text_eval
import train_lib
from errors import UserError

# --mode -> what it runs, each called as fn(config, workdir).
MODES = {
    "train": train_lib.train,
    "sample": generate.generate,
    "eval": evaluate.evaluate,
    "train_classifier": classifier_training.train_classifier,
    "guidance_sweep": generate.guidance_sweep,
    "figures": figures.make_figures,
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


def _quiet_libraries(record: logging_std.LogRecord) -> bool:
    """Keeps the progress readable: orbax and tfds INFO lines are dropped, warnings kept."""
    noisy = ("/orbax/", "/tensorflow_datasets/")
    return record.levelno >= logging_std.WARNING or not any(n in record.pathname for n in noisy)


def main(argv):
    del argv
    # Before jax's first computation (cpu_runtime.py); processes of a multihost run keep XLA's
    # device count, so that processes sharing a machine do not each split it.
    cpu_runtime.configure(split_cpu=not FLAGS.multihost)
    logging.get_absl_handler().addFilter(_quiet_libraries)
    if FLAGS.multihost:
        # Cross-process collectives between CPU devices go through gloo (no effect on GPU/TPU).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                                   FLAGS.process_id)
    logging.info("JAX %s: process %d/%d, %d devices (%s).", jax.__version__, jax.process_index(),
                 jax.process_count(), jax.device_count(), jax.devices()[0].platform)
    try:
        MODES[FLAGS.mode](FLAGS.config, FLAGS.workdir)
    except (UserError, train_lib.NonFiniteLossError, FileNotFoundError) as e:
        # The message already names the bad value and the fix; a traceback would bury it.
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
