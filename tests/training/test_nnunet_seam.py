"""The nnU-Net seam: pinned copies, nnU-Net's own deep-supervision rule, trainable parts in checkpoints."""
import os

import nnunetv2
import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from trainer_helpers import make_trainer, run_iterations, seed_everything
from nnunetv2_samssl.training.nnunet_seam import PINNED_SOURCES, source_digest
from nnunetv2_samssl.training.nnUNetTrainerLabeledSubset import nnUNetTrainerLabeledSubset
from nnunetv2_samssl.training.nnUNetTrainerMeanTeacher import nnUNetTrainerMeanTeacher
from nnunetv2_samssl.training.ssl_trainer import nnUNetTrainerSSLBase


def test_copied_nnunet_methods_are_pinned_to_the_installed_version():
    version = nnunetv2.__version__ if hasattr(nnunetv2, "__version__") else \
        __import__("importlib.metadata").metadata.version("nnunetv2")
    assert version in PINNED_SOURCES, (f"nnU-Net {version} is not a supported version: compare "
                                       f"nnunet_seam.py's copies with its nnUNetTrainer and add its digests")
    for name, digest in PINNED_SOURCES[version].items():
        method = getattr(nnUNetTrainer, name.split(".")[1])
        assert source_digest(method) == digest, (f"nnU-Net {version} changed {name}: update the copy in "
                                                 f"training/nnunet_seam.py, then its digest")


def test_a_changed_nnunet_method_fails_the_pin():
    def save_checkpoint(self, filename):  # a stand-in for an upgraded nnU-Net method
        pass
    assert source_digest(save_checkpoint) != PINNED_SOURCES["2.8.1"]["nnUNetTrainer.save_checkpoint"]


@pytest.mark.parametrize("ddp", [False, True])
def test_deep_supervision_weights_follow_nnunets_rule(nnunet_env, ddp):
    trainer = make_trainer(nnUNetTrainerMeanTeacher, nnunet_env)
    trainer.initialize()
    trainer.is_ddp = ddp  # nnU-Net's rule: the lowest scale gets 1e-6 under DDP without compile, else 0
    trainer.loss = trainer._build_loss()
    weights = trainer.deep_supervision_weights()
    assert weights == pytest.approx(list(trainer.loss.weight_factors))
    n = len(trainer._get_deep_supervision_scales())
    raw = [1 / 2 ** i for i in range(n)]
    raw[-1] = 1e-6 if ddp else 0.0
    assert weights == pytest.approx([w / sum(raw) for w in raw], rel=1e-12, abs=0)
    assert (weights[-1] > 0) == ddp


def test_labeled_subset_baseline_is_plain_nnunet_plus_the_mixin():
    assert not issubclass(nnUNetTrainerLabeledSubset, nnUNetTrainerSSLBase)
    assert nnUNetTrainerLabeledSubset.train_step is nnUNetTrainer.train_step
    # nnU-Net's loaders through super(), restarted with seeded workers only when training_seed is set
    import inspect
    from nnunetv2_samssl.training.labeled_subset import LabeledSubsetMixin
    assert nnUNetTrainerLabeledSubset.get_dataloaders is LabeledSubsetMixin.get_dataloaders
    source = inspect.getsource(LabeledSubsetMixin.get_dataloaders)
    assert "super().get_dataloaders()" in source and "if self.settings.seeding.training_seed is not None:" in source


def test_extra_trainable_part_is_trained_checkpointed_resumed_and_kept_out_of_prediction(nnunet_env):
    """A method's second model (here a stand-in head on the student's output) gets gradients and optimizer
    steps through backward_and_step, is saved under samssl.parts with its optimizer, is restored on resume,
    and never reaches network_weights."""
    seed_everything(0)

    def with_extra_part(trainer):
        trainer.initialize()
        extra = torch.nn.Conv3d(3, 3, 1)
        optimizer = torch.optim.AdamW(extra.parameters(), lr=1e-2)
        trainer.extra = trainer.parts.add("extra", extra, optimizer)
        terms = trainer.consistency_terms

        def consistency_terms(outputs, masks=None):  # the extra part takes part in the loss
            out = terms(outputs, masks)
            head = outputs.student[0] if isinstance(outputs.student, list) else outputs.student
            out["extra_term"] = trainer.extra(head.detach()).pow(2).mean()
            return out
        trainer.consistency_terms = consistency_terms
        return trainer

    trainer = with_extra_part(make_trainer(nnUNetTrainerMeanTeacher, nnunet_env))
    before = {k: v.clone() for k, v in trainer.extra.state_dict().items()}
    run_iterations(trainer, 2)
    assert any(not torch.equal(before[k], v) for k, v in trainer.extra.state_dict().items())
    assert trainer.parts["extra"].optimizer.state_dict()["state"]  # AdamW moments exist: it was stepped
    path = os.path.join(trainer.output_folder, "checkpoint_latest.pth")
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    assert set(ckpt["samssl"]["parts"]) == {"student", "teacher", "extra"}
    assert not any(k.startswith("weight") or k.startswith("bias") for k in ckpt["network_weights"])
    assert set(ckpt["network_weights"]) == set(ckpt["samssl"]["parts"]["student"]["weights"])
    trainer.on_train_end()

    resumed = with_extra_part(make_trainer(nnUNetTrainerMeanTeacher, nnunet_env, continue_training=True))
    resumed.load_checkpoint(path)
    for k, v in trainer.extra.state_dict().items():
        assert torch.equal(resumed.extra.state_dict()[k], v)
    saved_opt, loaded_opt = trainer.parts["extra"].optimizer.state_dict(), resumed.parts["extra"].optimizer.state_dict()
    for idx, state in saved_opt["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(loaded_opt["state"][idx][key]), torch.as_tensor(value)), key

    # a checkpoint without the part (another trainer / setting) is refused with a clear message
    plain = make_trainer(nnUNetTrainerMeanTeacher, nnunet_env, continue_training=True)
    with pytest.raises(RuntimeError, match="unexpected: \\['extra'\\]"):
        plain.load_checkpoint(path)


def test_trainable_parts_are_wrapped_for_ddp_and_saved_unwrapped(tmp_path):
    import torch.distributed as dist
    from nnunetv2_samssl.training.parts import TrainableParts

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", world_size=1, rank=0)
    try:
        parts = TrainableParts()
        decoder = torch.nn.Linear(4, 2)
        wrapped = parts.add("decoder", decoder, torch.optim.SGD(decoder.parameters(), lr=0.1), ddp=True)
        frozen = parts.add("teacher", torch.nn.Linear(4, 2), ddp=True)
        assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
        assert not isinstance(frozen, torch.nn.parallel.DistributedDataParallel)  # not trained: no DDP
        state = parts.state_dict()
        assert set(state["decoder"]["weights"]) == {"weight", "bias"}  # no "module." prefix
        assert "optimizer" in state["decoder"] and "optimizer" not in state["teacher"]
    finally:
        dist.destroy_process_group()


def _augment_ball(transforms, seeds):
    """Foreground voxel count and intensity range of a bright ball (radius 8 in 32^3) after each draw."""
    import numpy as np
    from trainer_helpers import seed_everything as seed

    grid = torch.stack(torch.meshgrid(*[torch.arange(32.0)] * 3, indexing="ij"))
    ball = ((grid - 15.5) ** 2).sum(0) <= 64
    counts, low, high = [], [], []
    for s in seeds:
        seed(s)
        out = transforms(image=ball[None].float().clone(), segmentation=ball[None].to(torch.int16).clone())
        counts.append(int((out["segmentation"] == 1).sum()))
        low.append(float(out["image"].min()))
        high.append(float(out["image"].max()))
    return np.array(counts), min(low), max(high)


def test_geometry_only_view_keeps_the_scale_and_the_intensities():
    """nnU-Net zooms patches by 0.7-1.4 and changes their intensities: SAM would see a wrong physical scale.
    The view for promptable models keeps crop, rotation and mirroring only."""
    import numpy as np
    from nnunetv2_samssl.training.nnunet_seam import geometry_only_view

    full = nnUNetTrainer.get_training_transforms((32, 32, 32), (-0.5, 0.5), None, (0, 1, 2), False)
    weak = geometry_only_view(full)
    counts_full, low_full, high_full = _augment_ball(full, range(60))
    counts_weak, low_weak, high_weak = _augment_ball(weak, range(60))
    volume = counts_weak.mean()
    assert np.all(np.abs(counts_weak - volume) < 0.06 * volume)  # no zoom: rotation only changes the voxelisation
    assert counts_full.max() > 1.5 * counts_full.min()  # nnU-Net's zoom changes the object's size
    assert 0.0 <= low_weak and high_weak <= 1.0 + 1e-6  # interpolated, never brightened or noised
    assert low_full < 0.0 or high_full > 1.0
    # the input transform list is left as it was
    assert any(type(getattr(t, "transform", t)).__name__ == "GaussianNoiseTransform" for t in full.transforms)
