"""Every failure a user can cause ends in one line `error: ...` that names the fix, exit code 1,
no traceback, before anything is compiled: run as a user runs main.py."""

import errno
import os
import re
import shutil
import subprocess

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from cli_runs import REPO, cli, env, run

import checkpointing
import config_lib
import training_loop
from configs import tiny

CIFAR_SHAPE = ("--config.data.name=cifar10", "--config.data.image_size=32",
               "--config.data.num_channels=3")

BAD_COMMANDS = [  # (id, main.py flags, what the one line says)
    ("unprepared_tfds_dataset", CIFAR_SHAPE,
     "data.name='cifar10' is not prepared (as ArrayRecord) in the tfds default data_dir"),
    ("unknown_field", ("--config.train.batchsize=3",),
     "--config.train.batchsize: the config has no field 'batchsize' (did you mean "
     "'batch_size'?). Fix:"),
    ("unknown_section", ("--config.trian.x=1",),
     "--config.trian.x: the config has no field 'trian' (did you mean 'train'?). Fix:"),
    ("value_of_the_wrong_type", ("--config.train.batch_size=abc",),
     "flag --config.train.batch_size=abc: invalid literal for int()"),
    ("missing_config_file", ("--config=configs/no_such_config.py",),
     "--config=configs/no_such_config.py cannot be loaded: No such file or directory. Fix:"),
    ("split_mnist_5k_lacks", ("--config.data.split=validation",),
     "data.split='validation' is not a split of mnist_5k. Fix: use one of"),
    ("negative_seed", ("--config.seed=-1",), "seed=-1 must be a non-negative integer"),
    ("keep_no_checkpoint", ("--config.train.keep_checkpoints=0",),
     "train.keep_checkpoints=0 must be >= 1"),
]


def _one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    err = proc.stderr
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err and "Compiling" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and needle in last, last
    assert "Fix" in last


@pytest.mark.parametrize("flags, needle", [c[1:] for c in BAD_COMMANDS],
                         ids=[c[0] for c in BAD_COMMANDS])
def test_a_bad_command_gives_one_line(tmp_path, flags, needle):
    empty_tfds = tmp_path / "tfds"  # so that no prepared cifar10 of this machine is found
    empty_tfds.mkdir()
    proc = run(tmp_path / "w", *flags, check=False, environment=env(TFDS_DATA_DIR=str(empty_tfds)))
    _one_line_error(proc, needle)
    assert not (tmp_path / "w" / "tensorboard").exists()  # nothing written before the check
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_a_config_file_with_a_syntax_error_gives_one_line(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    proc = subprocess.run(cli(tmp_path / "w", config=str(broken)), env=env(), cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    _one_line_error(proc, f"--config={broken}: {broken}, line 1: invalid syntax. Fix:")


def test_a_workdir_under_a_file_gives_one_line(tmp_path):
    (tmp_path / "a_file").write_text("")
    proc = run(tmp_path / "a_file" / "w", check=False)
    _one_line_error(proc, f"--workdir={tmp_path / 'a_file' / 'w'} cannot be written: Not a "
                          f"directory")


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory this process cannot write: chmod for a user, chattr +i for root (which
    ignores permissions); skipped where neither holds."""
    path = tmp_path / "ro"
    path.mkdir()
    path.chmod(0o555)
    immutable = False
    if os.access(path, os.W_OK) and os.geteuid() == 0 and shutil.which("chattr"):
        immutable = subprocess.run(["chattr", "+i", str(path)]).returncode == 0
    try:
        (path / "probe").write_text("")
        (path / "probe").unlink()
        writable = True
    except OSError:
        writable = False
    try:
        if writable:
            pytest.skip("cannot make a read-only directory here")
        yield path
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(0o755)


def test_a_read_only_workdir_gives_one_line(read_only_dir):
    proc = run(read_only_dir, check=False)
    _one_line_error(proc, f"--workdir={read_only_dir} cannot be written: ")


def test_evaluation_settings_are_checked_only_where_they_are_used():
    """configs/tiny.py made cifar10-shaped keeps eval.feature_net='mnist_classifier' (28x28x1
    only): training without evaluations must not be refused for it; --mode=eval must."""
    config = tiny.get_config()
    config.data.name, config.data.image_size, config.data.num_channels = "cifar10", 32, 3
    assert config.eval.feature_net == "mnist_classifier"
    config_lib.validate(config, num_devices=8)
    with pytest.raises(config_lib.ConfigError, match="eval.feature_net='mnist_classifier'"):
        config_lib.validate(config, num_devices=8, evaluating=True)
    config.eval.fid_every = 2  # a periodic FID during training uses it too
    with pytest.raises(config_lib.ConfigError, match="eval.feature_net='mnist_classifier'"):
        config_lib.validate(config, num_devices=8)


@pytest.mark.parametrize("last_checkpoint, says", [
    (None, "No checkpoint was saved before it."),
    (4, "The last checkpoint before it (step 4) is intact."),
])
def test_the_nan_message_says_what_is_kept(last_checkpoint, says):
    history = [(4, {"loss": np.array([0.5, np.nan]), "grad_norm": np.array([1.0, 1.0])})]
    with pytest.raises(training_loop.NonFiniteLossError) as info:
        training_loop.check_finite(history, last_checkpoint)
    assert "train/loss is nan at step 6" in str(info.value) and says in str(info.value)


def _tmp_dirs(workdir):
    return list((workdir / "checkpoints").glob("*.orbax-checkpoint-tmp*"))


def test_a_full_disk_stops_with_one_line_and_removes_the_incomplete_save(tmp_path, monkeypatch):
    """OSError(ENOSPC) injected into orbax's writer of the meta item, in its background thread
    (where a real full disk shows up first); the run stops with the path and the fix."""
    ckpt = checkpointing.Checkpointer(str(tmp_path), max_to_keep=3)
    state = {"w": jnp.arange(4.0)}
    ckpt.save(1, state, {"step": 1}, force=True)
    ckpt.wait_until_finished()

    async def no_space(self, item, directory):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "metadata"))

    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", no_space)
    ckpt.save(2, state, {"step": 2}, force=True)
    with pytest.raises(checkpointing.CheckpointWriteError) as info:
        ckpt.wait_until_finished()
    message = str(info.value)
    assert message.startswith(f"Saving checkpoint 2 in {tmp_path / 'checkpoints'} failed: No "
                              f"space left on device.")
    assert "latest: 1" in message and "Fix: free space on that disk" in message
    assert "\n" not in message
    assert not _tmp_dirs(tmp_path)
    ckpt.close()
    assert checkpointing.Checkpointer(str(tmp_path), max_to_keep=3,
                                      read_only=True).all_steps() == [1]


def test_a_save_that_cannot_fit_stops_before_writing(tmp_path, monkeypatch):
    ckpt = checkpointing.Checkpointer(str(tmp_path), max_to_keep=3)
    state = {"w": jnp.zeros(2**20 // 4)}  # 1 MiB
    ckpt.save(1, state, {"step": 1}, force=True)
    ckpt.wait_until_finished()
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpointing.shutil, "disk_usage",
                        lambda path: usage._replace(free=2**19))
    with pytest.raises(checkpointing.CheckpointWriteError) as info:
        ckpt.save(2, state, {"step": 2}, force=True)
    assert "failed: No space left on device (1.0 MiB needed, 0.5 MiB free)" in str(info.value)
    assert "latest: 1" in str(info.value)
    assert not _tmp_dirs(tmp_path)
    monkeypatch.undo()
    assert ckpt.save(2, state, {"step": 2}, force=True)  # room again: saves
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [1, 2]
    ckpt.close()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 2.5 MB tmpfs (room for one tiny checkpoint, not two): root only."""
    path = tmp_path / "disk"
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2500k", "tmpfs", str(path)],
            capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_a_real_full_disk_gives_one_line(small_tmpfs):
    """The disk has 256 KiB left: the first save stops before orbax writes (checkpointing's
    room check); a disk that fills during the write is the test above."""
    free = shutil.disk_usage(small_tmpfs).free
    (small_tmpfs / "ballast").write_bytes(b"\0" * (free - 256 * 1024))
    proc = run(small_tmpfs / "w", "--config.train.num_steps=6", check=False)
    err = proc.stderr
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: Saving checkpoint 2 in {small_tmpfs / 'w' / 'checkpoints'} "
                        rf"failed: No space left on device \(.* MiB needed, .* MiB free\)\. "
                        rf".*Fix: free space on that disk.*",
                        last), last
    assert not _tmp_dirs(small_tmpfs / "w")
    assert len(err.splitlines()) < 20  # not 843 lines of tracebacks
