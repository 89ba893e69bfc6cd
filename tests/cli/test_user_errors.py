"""A settings or data error that ends ``nnUNetv2_train`` is printed as its message, without a traceback."""
import os
import subprocess
import sys

from conftest import DATASET_ID
from nnunetv2_samssl.config.schema import ConfigError
from nnunetv2_samssl.errors import UserError, _report


def test_user_errors_are_one_message(capsys):
    _report(ConfigError, ConfigError("ema_decay must lie in [0, 1)"), None)
    err = capsys.readouterr().err
    assert err.startswith("ERROR: ema_decay must lie in [0, 1)") and "Traceback" not in err
    seen = []
    _report(KeyError, KeyError("x"), None, previous=lambda *a: seen.append(a))
    assert seen  # any other exception: the previous hook's full report


def test_bad_setting_through_the_stock_cli(nnunet_env):
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_samssl")}
    env.update(nnunet_env.env())
    env.update({"nnUNet_samssl_overrides": "ema_decay=2.0", "nnUNet_compile": "0"})
    r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "nnUNetv2_train"), str(DATASET_ID),
                        "3d_fullres", "0", "-tr", "nnUNetTrainerMeanTeacher", "-device", "cpu"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("ERROR: ")]
    assert len(errors) == 1 and "ema_decay" in errors[0], r.stderr[-3000:]
    r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "nnUNetv2_train"), str(DATASET_ID),
                        "3d_fullres", "0", "-tr", "nnUNetTrainerMeanTeacher", "-device", "cpu"],
                       env={**env, "SAMSSL_TRACEBACK": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" in r.stderr
    assert issubclass(ConfigError, UserError)
