"""Running the stock console scripts in subprocesses, the way a user runs them."""
import os
import subprocess
import sys

BIN = os.path.dirname(sys.executable)


def cli_env(paths, **extra) -> dict:
    """The current environment without this package's settings variables, the nnU-Net folders of ``paths`` (an
    environment object with ``env()`` or a dict), single-process data loading, and ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_samssl")}
    env.update(paths.env() if hasattr(paths, "env") else paths)
    env.update({"nnUNet_n_proc_DA": "1", "nnUNet_def_n_proc": "1", "nnUNet_compile": "0", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def run_cli(args, env, timeout=600) -> str:
    """Runs console script ``args[0]`` of this environment; asserts success and returns stdout + stderr."""
    r = subprocess.run([os.path.join(BIN, args[0]), *args[1:]], env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"{args} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr
