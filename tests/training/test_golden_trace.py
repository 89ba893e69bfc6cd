"""Golden trace: the per-step losses of the first 20 training steps of every trainer, kept across refactors.

CPU, fixed seeds, no augmentation workers, the tiny synthetic demo dataset, a tiny random-weight SAM-Med3D.
A change that alters these numbers on purpose regenerates the file in the same commit and says so:

    SAMSSL_WRITE_GOLDEN=1 bash scripts/run_tests.sh tests/training/test_golden_trace.py
"""
import json
import math
import os

import pytest
import torch

from trainer_helpers import SAM, tiny_sam  # noqa: F401  (tiny_sam: an autouse fixture)
from trainer_helpers import make_trainer, seed_everything
from nnunetv2_samssl.training.nnUNetTrainerLabeledSubset import nnUNetTrainerLabeledSubset
from nnunetv2_samssl.training.nnUNetTrainerMeanTeacher import nnUNetTrainerMeanTeacher
from nnunetv2_samssl.training.nnUNetTrainerSemiSAM import nnUNetTrainerSemiSAM

GOLDEN = os.path.join(os.path.dirname(__file__), "golden_trace.json")
EPOCHS, ITERATIONS = 4, 5  # 20 steps
KEYS = ("loss", "sup_loss", "consistency_loss", "sam_loss", "consistency_weight", "sam_weight")
EXACT_KEYS = ("consistency_weight", "sam_weight")  # schedules of the step count: the same on every machine
SCHEDULE = dict(num_epochs=EPOCHS, num_iterations_per_epoch=ITERATIONS, num_labeled=2)

RUNS = {
    "LabeledSubset": (nnUNetTrainerLabeledSubset, {}),
    "MeanTeacher": (nnUNetTrainerMeanTeacher, {}),
    "SemiSAM_online": (nnUNetTrainerSemiSAM, dict(SAM, sam_diagnostics=False)),
    "SemiSAM_cached": (nnUNetTrainerSemiSAM, dict(SAM, sam_pseudo_labels="cached", sam_cache_refresh_epochs=1,
                                                  sam_diagnostics=False)),
}


def trace(trainer_class, env, **settings):
    """Runs nnU-Net's own training loop and returns the listed per-step values of every step."""
    seed_everything(0)
    trainer = make_trainer(trainer_class, env, **SCHEDULE, **settings)
    steps = []
    train_step = trainer.train_step

    def recording(batch):
        out = train_step(batch)
        steps.append({k: float(out[k]) for k in KEYS if k in out})
        return out

    trainer.train_step = recording
    torch.use_deterministic_algorithms(True)
    try:
        trainer.run_training()
    finally:
        torch.use_deterministic_algorithms(False)
    assert len(steps) == EPOCHS * ITERATIONS
    return steps


# The first steps are compared tightly: a changed loss, target, weight, teacher or batch shows there at once. Later
# steps drift between CPUs (other SIMD kernels sum in another order and the difference grows with training:
# measured up to 4e-7 relative in steps 0-2 and 6e-3 by step 17 between two machines), so the rest of the trajectory
# is held to 2 %. A changed loss weight or schedule moves these 20 steps by less than that (consistency weight 0.12
# instead of 0.1: 2e-3), so the weights themselves are traced and compared exactly.
STRICT_STEPS = 3


def _close(a: float, b: float, step: int, key: str) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if step < STRICT_STEPS or key in EXACT_KEYS:
        return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7)
    return math.isclose(a, b, rel_tol=2e-2, abs_tol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_first_20_steps_match_the_golden_trace(nnunet_env, name):
    trainer_class, settings = RUNS[name]
    steps = trace(trainer_class, nnunet_env, **settings)
    golden = json.load(open(GOLDEN)) if os.path.isfile(GOLDEN) else {}
    if os.environ.get("SAMSSL_WRITE_GOLDEN") == "1":
        golden[name] = steps
        with open(GOLDEN, "w") as f:
            json.dump(golden, f, indent=1, sort_keys=True)
        pytest.skip(f"golden trace of {name} written")
    assert name in golden, f"no golden trace for {name}: regenerate it (see this module's docstring)"
    expected = golden[name]
    assert [sorted(s) for s in steps] == [sorted(s) for s in expected]
    for i, (got, want) in enumerate(zip(steps, expected)):
        for key in want:
            assert _close(got[key], want[key], i, key), f"{name} step {i} {key}: {got[key]!r} != golden {want[key]!r}"
