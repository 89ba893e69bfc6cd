"""After ``pip install .`` and ``pip install -e .`` nnU-Net's own trainer lookup finds our trainers with no
manual export, a user's ``nnUNet_extTrainer`` is kept, and ``pip uninstall`` leaves nothing behind.

Each case installs the package into a throwaway virtual environment whose other packages (torch,
nnU-Net, ...) are borrowed from the test interpreter's site-packages, minus this package.
"""
import os
import subprocess
import sys
import sysconfig
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OWN = ("nnunetv2_samssl", "__editable__.nnunetv2_samssl", "__editable___nnunetv2_samssl")


def _make_env(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    borrowed = tmp_path / "borrowed"
    borrowed.mkdir()
    here = sysconfig.get_paths()["purelib"]
    for name in os.listdir(here):
        if not name.startswith(OWN) and not name.endswith(".pth"):
            os.symlink(os.path.join(here, name), borrowed / name)
    with open(os.path.join(site, "_borrowed.pth"), "w") as f:
        f.write(str(borrowed) + "\n")
    return py, site


def _pip(py, *args):
    r = subprocess.run([sys.executable, "-m", "pip", "--python", py, *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


LOOKUP = textwrap.dedent("""
    import os, sys
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find
    print("EXT=" + os.environ.get("nnUNet_extTrainer", ""))
    for name in sys.argv[1:]:
        cls = find(name)
        print("FOUND=" + cls.__module__ + "." + cls.__name__)
""")


def _lookup(py, *names, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}
    env.update(env_extra or {})
    r = subprocess.run([py, "-c", LOOKUP, *names], capture_output=True, text=True, env=env, cwd="/")
    return r


@pytest.mark.slow
@pytest.mark.parametrize("editable", [False, True], ids=["pip-install", "pip-install-e"])
def test_stock_lookup_finds_trainers_and_uninstall_cleans_up(tmp_path, editable):
    py, site = _make_env(tmp_path)
    _pip(py, "install", "--no-deps", "--no-build-isolation", *(["-e"] if editable else []), REPO)
    assert os.path.isfile(os.path.join(site, "nnunetv2_samssl_trainers.pth"))

    r = _lookup(py, "nnUNetTrainerMeanTeacher")
    assert r.returncode == 0, r.stdout + r.stderr
    expected_folder = os.path.join(REPO if editable else site, "nnunetv2_samssl", "trainer_shims")
    assert f"EXT={expected_folder}" in r.stdout
    assert "FOUND=nnunetv2_samssl.training.nnUNetTrainerMeanTeacher.nnUNetTrainerMeanTeacher" in r.stdout

    # a user's own external trainer folder is kept (ours is appended) and both kinds of trainer are found
    user = tmp_path / "user_trainers"
    user.mkdir()
    (user / "my_trainers.py").write_text(
        "from nnunetv2_samssl.training.nnUNetTrainerMeanTeacher import nnUNetTrainerMeanTeacher\n"
        "class nnUNetTrainerMeanTeacherUser(nnUNetTrainerMeanTeacher):\n    pass\n")
    r = _lookup(py, "nnUNetTrainerMeanTeacherUser", "nnUNetTrainerMeanTeacher",
                env_extra={"nnUNet_extTrainer": str(user)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"EXT={user}{os.pathsep}{expected_folder}" in r.stdout
    assert r.stdout.count("FOUND=") == 2

    _pip(py, "uninstall", "-y", "nnunetv2-samssl")
    leftovers = [f for f in os.listdir(site) if f.startswith(OWN) or "samssl" in f]
    assert leftovers == []
    r = _lookup(py, "nnUNetTrainerMeanTeacher")
    assert r.returncode != 0 and "EXT=\n" in r.stdout
