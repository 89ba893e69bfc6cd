"""Running the stock console scripts in subprocesses, the way a user runs them."""
import os
import subprocess
import sys

BIN = os.path.dirname(sys.executable)


def cli_env(paths, **extra) -> dict:
    """The current environment without this package's settings variables, the nnU-Net folders of ``paths`` (an
    environment object with ``env()`` or a dict), single-process data loading (``nnUNet_n_proc_DA=0``: nnU-Net's
    SingleThreadedAugmenter, no worker processes to start), and ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_samssl")}
    env.update(paths.env() if hasattr(paths, "env") else paths)
    env.update({"nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1", "nnUNet_compile": "0", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def run_cli(args, env, timeout=600) -> str:
    """Runs console script ``args[0]`` of this environment; asserts success and returns stdout + stderr."""
    r = subprocess.run([os.path.join(BIN, args[0]), *args[1:]], env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"{args} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


def train_until_killed(args, env, fold_folder, log_path, epoch: int = 1, timeout: float = 400) -> str:
    """Starts console script ``args[0]``, waits until ``checkpoint_latest.pth`` exists and ``Epoch {epoch}`` has
    started, then SIGKILLs its whole process group mid-epoch (as a crash or an out-of-memory kill would).
    Returns the log; fails if training ended before it could be killed."""
    import signal
    import time

    with open(log_path, "w") as log:
        proc = subprocess.Popen([os.path.join(BIN, args[0]), *args[1:]], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None:
            if os.path.isfile(os.path.join(fold_folder, "checkpoint_latest.pth")) \
                    and f"Epoch {epoch}" in open(log_path).read():
                break
            time.sleep(0.1)
        assert proc.poll() is None, "training ended before it could be killed:\n" + open(log_path).read()[-3000:]
        time.sleep(0.3)  # into the epoch's first steps
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return open(log_path).read()
