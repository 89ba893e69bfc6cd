"""nnUNetTrainerCPACSAM in-process on the tiny 3D dataset with a tiny random SAM-Med3D: label leaks, gradients,
the warm-up, checkpoints and what nnU-Net's inference sees."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from test_mean_teacher_trainer import _corrupt_labels
from trainer_helpers import make_trainer, run_iterations, seed_everything, student_state, tiny_sam  # noqa: F401

from nnunetv2_samssl.sam.trainable import trainable_parameter_names
from nnunetv2_samssl.training.nnUNetTrainerCPACSAM import nnUNetTrainerCPACSAM

CPAC = dict(sam_backend="sam_med3d", sam_random_init=True, cpac_warmup=0.0, num_labeled=2,
            use_unlabeled_folder=False)


def sam_state(trainer):
    return {k: v.detach().clone() for k, v in trainer.cpac.compact_state_dict().items()}


def _train(env, n=2, seed=5, **overrides):
    seed_everything(seed)
    trainer = make_trainer(nnUNetTrainerCPACSAM, env, **{**CPAC, **overrides})
    trainer.initialize()
    outs = run_iterations(trainer, n)
    return trainer, outs


def test_labels_of_unlabeled_cases_never_used(nnunet_env):
    """Corrupting the hidden labels of the demoted cases leaves both branches, the promptable model and the
    prototypes bit-identical (they feed a logged Dice only); corrupting a labeled case's labels does not."""
    trainer, outs = _train(nnunet_env)
    assert np.isfinite(float(outs[-1]["cpac_cross_loss"]))  # the cross terms ran
    a, sam_a = student_state(trainer), sam_state(trainer)
    _corrupt_labels(nnunet_env, trainer.demoted_cases)
    trainer_b, _ = _train(nnunet_env)
    b, sam_b = student_state(trainer_b), sam_state(trainer_b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    differ = {k: float((sam_a[k].float() - sam_b[k].float()).abs().max()) for k in sam_a
              if not torch.equal(sam_a[k], sam_b[k])}
    assert not differ, differ
    _corrupt_labels(nnunet_env, trainer.labeled_cases[:1])
    trainer_c, _ = _train(nnunet_env)
    c = student_state(trainer_c)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def _grads(module):
    return {n: p.grad for n, p in module.named_parameters()}


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_gradients_reach_the_trained_parts_only(nnunet_env, lora_rank):
    """The supervised prompted loss and the prompt consistency each give a gradient to every trained part of the
    promptable model (LoRA included when on) and none to a frozen one."""
    seed_everything(0)
    trainer = make_trainer(nnUNetTrainerCPACSAM, nnunet_env, **CPAC, cpac_lora_rank=lora_rank)
    trainer.initialize()
    run_iterations(trainer, 1)  # prototypes exist now
    batch = next(trainer.dataloader_train)
    unlabeled = trainer.next_unlabeled_batch()
    cpac = trainer.cpac
    trained = set(trainable_parameter_names(cpac.segmenter))
    assert any("lora" in n for n in trained) == (lora_rank > 0)
    assert {"class_point_embed", "no_mask_embed"} <= trained and any(n.startswith("decoder.") for n in trained)

    labels = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
    probs = torch.softmax(torch.randn(unlabeled.images.shape[0], 3, *unlabeled.images.shape[2:]), 1)
    terms = {"supervised": lambda: cpac.labeled(batch["data"], labels, generator=trainer.prompt_generator)[0],
             "consistency": lambda: cpac.unlabeled(unlabeled.images, probs, probs.flip(1),
                                                   generator=trainer.prompt_generator).consistency}
    for name, term in terms.items():
        cpac.zero_grad(set_to_none=True)
        term().backward()
        for n, g in _grads(cpac.segmenter).items():
            if n in trained and "iou" not in n:
                assert g is not None and torch.isfinite(g).all(), (name, n)
            if n not in trained:
                assert g is None, (name, n)
        grads = _grads(cpac.segmenter)
        reached = [n for n in trained if grads[n] is not None and grads[n].abs().sum() > 0]
        assert "class_point_embed" in reached and (lora_rank == 0 or any("lora_B" in n for n in reached)), name


def test_warm_up_gates_the_cross_terms_and_the_step_loss_adds_up(nnunet_env):
    """Before cpac_warmup x T the cross and consistency terms are off (NaN logged); after it they enter with the
    settings' weights."""
    seed_everything(0)
    trainer = make_trainer(nnUNetTrainerCPACSAM, nnunet_env, **{**CPAC, "cpac_warmup": 0.5})
    trainer.initialize()
    trainer.on_train_start()
    outs = []
    for epoch in range(2):
        trainer.current_epoch = epoch
        trainer.on_train_epoch_start()
        outs += [trainer.train_step(next(trainer.dataloader_train)) for _ in range(2)]
    assert trainer.total_steps == 4
    assert [float(o["cpac_cross_weight"]) for o in outs] == pytest.approx([0.0, 0.0, 0.4, 0.4])
    assert [float(o["cpac_consistency_weight"]) for o in outs] == pytest.approx([0.0, 0.0, 0.005, 0.005])
    assert all(math.isnan(float(o["cpac_cross_loss"])) for o in outs[:2])
    for o in outs[2:]:
        assert np.isfinite(float(o["cpac_cross_loss"])) and float(o["cpac_consistency_loss"]) > 0
        expected = (float(o["sup_loss"]) + float(o["cpac_sam_sup_loss"]) + 0.4 * float(o["cpac_cross_loss"])
                    + 0.005 * float(o["cpac_consistency_loss"]))
        assert float(o["loss"]) == pytest.approx(expected, rel=1e-4)


def test_checkpoint_holds_the_trained_state_and_predicts_with_both_branches(nnunet_env, tmp_path):
    """The promptable model's trained tensors, prototypes and AdamW state are saved and restored (its frozen
    weights are not saved); network_weights hold only the two-branch nnU-Net network, whose forward is the mean
    of the branches."""
    trainer, _ = _train(nnunet_env, n=2)
    path = str(tmp_path / "checkpoint.pth")
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)
    assert all(k.split(".")[0] in ("encoder", "decoder", "decoder_b") for k in saved["network_weights"])
    sam = saved["samssl"]["parts"]["sam"]
    assert set(sam["weights"]) == {f"segmenter.{n}" for n in trainable_parameter_names(trainer.cpac.segmenter)} \
        | {"prototypes.sam.prototypes", "prototypes.sam.seen"}
    assert sam["optimizer"]["state"]

    fresh = make_trainer(nnUNetTrainerCPACSAM, nnunet_env, **CPAC)
    fresh.initialize()
    assert not torch.equal(fresh.cpac.prototypes["sam"].seen, trainer.cpac.prototypes["sam"].seen)
    fresh.load_checkpoint(path)
    a, b = sam_state(trainer), sam_state(fresh)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert fresh.parts["sam"].optimizer.state_dict()["state"].keys() == sam["optimizer"]["state"].keys()

    network = fresh.network
    network.eval()
    network.decoder.deep_supervision = False
    x = torch.randn(1, 1, *fresh.configuration_manager.patch_size)
    with torch.no_grad():
        a_out, b_out = network(x, branches=True)
        assert torch.allclose(network(x), 0.5 * (a_out + b_out)) and not torch.allclose(a_out, b_out)


def test_network_feature_prototypes_one_per_branch(nnunet_env):
    """cpac_feature_source: network keeps one prototype set per branch, on the feature map each decoder feeds its
    segmentation layer, and the reliable region of each branch's prompts comes from its own prototypes."""
    trainer, outs = _train(nnunet_env, n=2, cpac_feature_source="network")
    prototypes = trainer.cpac.prototypes
    assert set(prototypes) == {"a", "b"}
    width = trainer.network.decoder.stages[-1].output_channels if hasattr(trainer.network.decoder.stages[-1],
                                                                          "output_channels") else None
    for name in ("a", "b"):
        assert prototypes[name].seen.any() and prototypes[name].prototypes.shape[0] == 3
        if width is not None:
            assert prototypes[name].prototypes.shape[1] == width
    assert not torch.equal(prototypes["a"].prototypes, prototypes["b"].prototypes)
    assert 0.0 < float(outs[-1]["cpac_reliable_fraction_a"]) <= 1.0
