"""One DDP rank of ``tests/training/test_ddp_cpu.py``: nnU-Net's own ``run_ddp`` on CPU with the gloo backend.

Started as ``python ddp_cpu_rank.py SPEC.json`` (one process per rank, as ``mp.spawn`` would start them). The
spec names the rank, the world size and the phases: trainings run one after the other in this process, each
with its own nnU-Net folders, settings and process group (a ``file://`` store), each as ``run_ddp`` runs it.
nnU-Net hard-codes CUDA and nccl for ``-num_gpus > 1``; only what that concerns is replaced here, in this process:

- ``run_training.setup_ddp``: ``init_process_group("gloo")`` instead of ``"nccl"``;
- ``torch.cuda.set_device``: a no-op;
- ``nnUNetTrainer.__init__``: the device nnU-Net forces to ``cuda:<rank>`` under DDP is set back to the CPU (and
  the CUDA grad scaler dropped);
- ``DDP(network, device_ids=[rank])``: DDP of a CPU module takes no device ids.

Everything else (trainer lookup, batch split, DDP wrapping, barriers, checkpoints, ``--c``) is nnU-Net's and the
package's own code. Also replaced, for speed or determinism only: ``progress.png`` is not drawn, nnU-Net's final
validation (its own DDP code, with a spawned export pool) is skipped, and every epoch starts from a seed of
(epoch, rank). The rank writes what it saw in each phase to ``<out>/<phase>_rank<r>.pt`` (``RECORD``).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import traceback

import numpy as np
import torch
import torch.distributed as dist

RECORD = {
    # "unlabeled": [{"epoch", "iteration", "keys", "patches" (sha256 per sample)}]  every next_unlabeled_batch
    # "steps": [{"epoch", "step", "student", "teacher", "sam_loss", "sam_valid_fraction"}]  after every train_step
    # "checkpoint_writes": [basename]  files save_checkpoint wrote (atomic_torch_save)
    # "torch_saves": [path]  every torch.save of the process
    # "epochs": [epoch]  epochs started; "loaded": state right after the --c load
    # "pl_writes": [(generation, case)], "pl_publish": [generation], "pl_cleared": [generation]
    # "interrupted": stopped by interrupt_after; "files": the output folder's files at the end
    # "final": end state (student / teacher weights, optimizer momentum, epoch, batch sizes, served maps, ...)
}


class Interrupted(Exception):
    """Raised after the epoch ``interrupt_after`` to stop a run as a kill would (its checkpoints stay)."""


def sha(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def state_sha(module) -> str:
    from nnunetv2_samssl.ssl.ema import unwrap
    state = unwrap(module).state_dict()
    return sha(state[k] for k in sorted(state))


def momentum_sha(optimizer) -> str:
    state = optimizer.state_dict()["state"]
    return sha(state[i]["momentum_buffer"] for i in sorted(state))


def seed(value: int) -> None:
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def install(spec: dict, holder: dict) -> None:
    """The CPU / gloo replacements (module docstring) and the recording wrappers."""
    rank = spec["rank"]
    from nnunetv2.run import run_training as rt
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as nnunet_module
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunetv2_samssl.data.pseudo_label_cache import PseudoLabelCache
    from nnunetv2_samssl.training import nnunet_seam
    from nnunetv2_samssl.training.nnUNetTrainerLabeledSubset import nnUNetTrainerLabeledSubset
    from nnunetv2_samssl.training.nnUNetTrainerCPACSAM import nnUNetTrainerCPACSAM
    from nnunetv2_samssl.training.nnunet_seam import nnUNetSeam
    from nnunetv2_samssl.training.ssl_trainer import nnUNetTrainerSSLBase

    # ---- CUDA / nccl -> CPU / gloo
    rt.setup_ddp = lambda r, world: dist.init_process_group("gloo", init_method=spec["init_method"], rank=r,
                                                            world_size=world)  # spec: of the current phase
    torch.cuda.set_device = lambda *args, **kwargs: None
    nnunet_init = nnUNetTrainer.__init__

    def cpu_init(self, *args, **kwargs):
        nnunet_init(self, *args, **kwargs)
        self.device = torch.device("cpu")
        self.grad_scaler = None

    nnUNetTrainer.__init__ = cpu_init
    nnunet_module.DDP = lambda module, device_ids=None, **kwargs: torch.nn.parallel.DistributedDataParallel(
        module, **kwargs)

    find_trainer = rt.get_trainer_from_args

    def keep_trainer(*args, **kwargs):
        holder["trainer"] = find_trainer(*args, **kwargs)
        return holder["trainer"]

    rt.get_trainer_from_args = keep_trainer

    # ---- every epoch starts from a seed of (epoch, rank): a resumed run draws what an uninterrupted one draws,
    # and the ranks draw independently, as separately started processes do
    on_epoch_start = nnUNetTrainer.on_epoch_start

    def seeded_epoch_start(self):
        RECORD["epochs"].append(self.current_epoch)
        seed(1000 * (self.current_epoch + 1) + 17 * rank)
        on_epoch_start(self)

    nnUNetTrainer.on_epoch_start = seeded_epoch_start

    on_epoch_end = nnUNetTrainer.on_epoch_end

    def maybe_interrupt(self):
        epoch = self.current_epoch
        on_epoch_end(self)
        if spec.get("interrupt_after") is not None and epoch == spec["interrupt_after"]:
            raise Interrupted()

    nnUNetTrainer.on_epoch_end = maybe_interrupt

    # progress.png takes seconds of matplotlib per epoch and has nothing to do with DDP
    from nnunetv2.training.logging.nnunet_logger import MetaLogger
    MetaLogger.plot_progress_png = lambda self, output_folder: None

    # ---- recording
    next_unlabeled = nnUNetTrainerSSLBase.next_unlabeled_batch

    def recording_next_unlabeled(self):
        batch = next_unlabeled(self)
        RECORD["unlabeled"].append({"epoch": self.current_epoch, "iteration": self.iteration_in_epoch,
                                    "keys": list(batch.keys), "patches": [sha([x]) for x in batch.images]})
        return batch

    nnUNetTrainerSSLBase.next_unlabeled_batch = recording_next_unlabeled

    def recorded(train_step):
        def recording_train_step(self, batch):
            out = train_step(self, batch)
            RECORD["steps"].append({
                "epoch": self.current_epoch, "student": state_sha(self.network),
                "step": self.global_step - 1 if hasattr(self, "global_step") else len(RECORD["steps"]),
                "teacher": state_sha(self.teacher.module) if hasattr(self, "teacher") else None,
                "sam": state_sha(self.cpac) if hasattr(self, "cpac") else None,  # CPAC-SAM's trained SAM part
                "optimizer": momentum_sha(self.optimizer), "labeled_batch": int(batch["data"].shape[0]),
                **{k: float(out[k]) for k in ("sam_loss", "sam_valid_fraction", "cpac_cross_loss") if k in out}})
            return out
        return recording_train_step

    nnUNetTrainerSSLBase.train_step = recorded(nnUNetTrainerSSLBase.train_step)
    nnUNetTrainerLabeledSubset.train_step = recorded(nnUNetTrainer.train_step)  # nnU-Net's own step
    nnUNetTrainerCPACSAM.train_step = recorded(nnUNetTrainerCPACSAM.train_step)  # its own step

    atomic_save = nnunet_seam.atomic_torch_save

    def recording_atomic_save(obj, filename):
        RECORD["checkpoint_writes"].append(os.path.basename(filename))
        atomic_save(obj, filename)

    nnunet_seam.atomic_torch_save = recording_atomic_save

    torch_save = torch.save

    def recording_torch_save(obj, f, *args, **kwargs):
        RECORD["torch_saves"].append(str(getattr(f, "name", f)))
        return torch_save(obj, f, *args, **kwargs)

    torch.save = recording_torch_save
    holder["torch_save"] = torch_save

    load_checkpoint = nnUNetSeam.load_checkpoint

    def recording_load(self, filename):
        load_checkpoint(self, filename)
        RECORD["loaded"] = {"epoch": self.current_epoch, "student": state_sha(self.network),
                            "teacher": state_sha(self.teacher.module) if hasattr(self, "teacher") else None,
                            "optimizer": momentum_sha(self.optimizer)}

    nnUNetSeam.load_checkpoint = recording_load

    write_case, publish, clear = PseudoLabelCache.write_case, PseudoLabelCache.publish, \
        PseudoLabelCache.clear_staging

    def recording_write_case(self, name, identifier, *args, **kwargs):
        RECORD["pl_writes"].append((name, identifier))
        return write_case(self, name, identifier, *args, **kwargs)

    def recording_publish(self, name):
        RECORD["pl_publish"].append(name)
        return publish(self, name)

    def recording_clear(self, name):
        RECORD["pl_cleared"].append(name)
        return clear(self, name)

    PseudoLabelCache.write_case = recording_write_case
    PseudoLabelCache.publish = recording_publish
    PseudoLabelCache.clear_staging = recording_clear

    # ---- the tiny random-weight SAM-Med3D of the tests (same weights on every rank, as a checkpoint would give)
    import nnunetv2_samssl.sam.registry as registry
    from nnunetv2_samssl.sam.sam_med3d.promptable import SAMMed3DPromptable

    def tiny_sam(backend, checkpoint, device, **kwargs):
        torch.manual_seed(0)
        return SAMMed3DPromptable.from_checkpoint(None, config="tiny", device=device, random_init=True)

    registry.build_promptable_model = tiny_sam


def final_state(trainer) -> dict:
    from nnunetv2_samssl.ssl.ema import unwrap
    out = {"epoch": trainer.current_epoch, "is_ddp": trainer.is_ddp, "local_rank": trainer.local_rank,
           "device": str(trainer.device), "labeled_batch_size": trainer.batch_size,
           "global_batch_size": trainer.configuration_manager.batch_size,
           "unlabeled_batch_size": getattr(trainer, "unlabeled_batch_size", None),
           "unlabeled_cases": list(trainer.unlabeled_dataset.identifiers) if hasattr(trainer, "unlabeled_dataset")
           else None,
           "student": {k: v.detach().clone() for k, v in unwrap(trainer.network).state_dict().items()},
           "optimizer": {i: s["momentum_buffer"].clone()
                         for i, s in trainer.optimizer.state_dict()["state"].items()},
           "output_folder": trainer.output_folder}
    if hasattr(trainer, "teacher"):
        out["teacher"] = {k: v.detach().clone() for k, v in trainer.teacher.module.state_dict().items()}
    if hasattr(trainer, "cpac"):
        out["sam"] = {k: v.detach().clone() for k, v in trainer.cpac.compact_state_dict().items()}
    source = getattr(trainer, "sam_source", None)
    if source is not None and hasattr(source, "cache"):
        cache = source.cache
        out["generation"] = source.generation
        out["current_generation"] = cache.current_generation()
        dataset = trainer.unlabeled_dataset
        # what this rank's loader reads for every case (its own share and the other rank's)
        out["served_maps"] = {case: sha([torch.from_numpy(np.ascontiguousarray(
            cache.load(case, dataset.load_image(case).shape[1:])[:]))]) for case in dataset.identifiers}
    return out


def run_phase(spec: dict, phase: dict, holder: dict) -> None:
    """One training (``nnUNetv2_train ... -num_gpus 2 [--c]``) of this rank; its record goes to
    ``<out>/<phase>_rank<r>.pt``."""
    from nnunetv2.run.run_training import run_ddp

    rank = spec["rank"]
    for key, value in phase["env"].items():
        os.environ[key] = value
    if phase.get("overrides") is None:
        os.environ.pop("nnUNet_samssl_overrides", None)  # a bare --c
    else:
        os.environ["nnUNet_samssl_overrides"] = phase["overrides"]
    spec["init_method"] = "file://" + os.path.join(spec["out"], f"store_{phase['name']}")
    spec["interrupt_after"] = phase.get("interrupt_after")
    RECORD.clear()
    RECORD.update({key: [] for key in RECORD_KEYS})
    RECORD["interrupted"] = False
    seed(12345 + rank)  # network initialisation: rank 0's is broadcast by DDP
    try:
        run_ddp(rank, spec["dataset"], spec["configuration"], spec["fold"], phase["trainer"], "nnUNetPlans",
                False, phase.get("continue_training", False), False, None, False, False, spec["world_size"])
    except Interrupted:
        RECORD["interrupted"] = True
        dist.destroy_process_group()
    trainer = holder.pop("trainer")
    RECORD["final"] = final_state(trainer)
    RECORD["files"] = sorted(os.listdir(trainer.output_folder))
    holder["torch_save"](dict(RECORD), os.path.join(spec["out"], f"{phase['name']}_rank{rank}.pt"))


def main(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    torch.set_num_threads(1)
    holder: dict = {}
    install(spec, holder)
    for phase in spec["phases"]:
        run_phase(spec, phase, holder)


RECORD_KEYS = ("unlabeled", "steps", "checkpoint_writes", "torch_saves", "epochs", "pl_writes", "pl_publish",
               "pl_cleared")

if __name__ == "__main__":
    try:
        main(sys.argv[1])
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
