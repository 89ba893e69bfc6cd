"""``training_seed``: a seeded run repeats itself, and trainers given one seed start from the same weights and see
the same labeled patches (loader workers seeded per stream, ``nnUNet_n_proc_DA=1`` as in real runs)."""
import pytest
import torch

from trainer_helpers import make_trainer, run_iterations, seed_everything, student_state
from nnunetv2_samssl.training.nnUNetTrainerLabeledSubset import nnUNetTrainerLabeledSubset
from nnunetv2_samssl.training.nnUNetTrainerMeanTeacher import nnUNetTrainerMeanTeacher

LS, MT = nnUNetTrainerLabeledSubset, nnUNetTrainerMeanTeacher


@pytest.fixture
def workers(monkeypatch):
    monkeypatch.setenv("nnUNet_n_proc_DA", "1")  # one background worker per loader, as on a real machine


def _stop(trainer):
    for loader in (trainer.dataloader_train, trainer.dataloader_val, getattr(trainer, "unlabeled_loader", None)):
        if hasattr(loader, "_finish"):
            loader._finish()


def _start(cls, env, seed, ambient, n=3):
    """Initial weights, the first ``n`` labeled batches and (Mean Teacher) 2 unlabeled batches; ``ambient`` seeds
    the global generators first, so only ``training_seed`` can make two starts agree."""
    seed_everything(ambient)
    trainer = make_trainer(cls, env, num_labeled=2, training_seed=seed)
    trainer.on_train_start()
    weights = student_state(trainer)
    batches = [next(trainer.dataloader_train) for _ in range(n)]
    unlabeled = [trainer.next_unlabeled_batch().images.clone() for _ in range(2)] if cls is MT else []
    _stop(trainer)
    return weights, batches, unlabeled


def _same_weights(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def _same_batches(a, b):
    return all(x["keys"].tolist() == y["keys"].tolist() and torch.equal(x["data"], y["data"]) and
               all(torch.equal(s, t) for s, t in zip(x["target"], y["target"])) for x, y in zip(a, b))


def test_one_seed_repeats_the_start_and_the_patches(nnunet_env, workers):
    w1, b1, _ = _start(LS, nnunet_env, 7, ambient=1)
    w2, b2, _ = _start(LS, nnunet_env, 7, ambient=2)
    assert _same_weights(w1, w2) and _same_batches(b1, b2)
    w3, b3, _ = _start(LS, nnunet_env, 8, ambient=1)
    assert not _same_weights(w1, w3) and not _same_batches(b1, b3)
    # unseeded (null, the default): nnU-Net's behaviour, every start differs
    w4, b4, _ = _start(LS, nnunet_env, None, ambient=1)
    w5, b5, _ = _start(LS, nnunet_env, None, ambient=2)
    assert not _same_weights(w4, w5) and not _same_batches(b4, b5)


def test_trainers_given_one_seed_share_the_start_and_the_labeled_patches(nnunet_env, workers):
    """The supervised baseline and Mean Teacher with one seed differ only by what the unlabeled cases add: same
    initial weights, same labeled batches (their own stream, whatever the unlabeled stream draws)."""
    w_ls, b_ls, _ = _start(LS, nnunet_env, 7, ambient=1)
    w_mt, b_mt, u1 = _start(MT, nnunet_env, 7, ambient=2)
    assert _same_weights(w_ls, w_mt) and _same_batches(b_ls, b_mt)
    _, _, u2 = _start(MT, nnunet_env, 7, ambient=3)
    assert all(torch.equal(a, b) for a, b in zip(u1, u2))


def test_seeded_training_steps_repeat(nnunet_env, workers):
    """Two seeded Mean Teacher runs of 3 iterations end with the same student and teacher (teacher noise and
    every loader included)."""
    states = []
    for ambient in (1, 2):
        seed_everything(ambient)
        trainer = make_trainer(MT, nnunet_env, num_labeled=2, training_seed=11)
        run_iterations(trainer, 3)
        states.append((student_state(trainer), {k: v.clone() for k, v in trainer.teacher.state_dict().items()}))
        _stop(trainer)
    assert _same_weights(states[0][0], states[1][0]) and _same_weights(states[0][1], states[1][1])
