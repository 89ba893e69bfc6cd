"""Shared fixtures: one tiny planned + preprocessed nnU-Net dataset per test session.

``tiny_dataset`` builds it once (synthetic 3D cases of 16 x 32 x 32 voxels, 6 labeled, 3 unlabeled,
2 test) with nnU-Net's own planning and preprocessing in-process; ``nnunet_env`` gives each test a
private copy of the three nnU-Net folders and points the environment variables at it.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import pytest

DATASET_ID = 977
DATASET_NAME = "Dataset977_SamsslTiny"
CONFIG = "3d_fullres"

# never let a test depend on the developer's own settings
for _var in ("nnUNet_samssl_config", "nnUNet_samssl_overrides", "nnUNet_compile"):
    os.environ.pop(_var, None)
os.environ["nnUNet_compile"] = "0"


@dataclass
class NnunetEnv:
    root: str
    raw: str
    preprocessed: str
    results: str

    @property
    def dataset_raw(self) -> str:
        return os.path.join(self.raw, DATASET_NAME)

    @property
    def dataset_pp(self) -> str:
        return os.path.join(self.preprocessed, DATASET_NAME)

    def env(self) -> dict:
        return {"nnUNet_raw": self.raw, "nnUNet_preprocessed": self.preprocessed, "nnUNet_results": self.results}


def _set_env(e: NnunetEnv, monkeypatch=None):
    for k, v in e.env().items():
        if monkeypatch is None:
            os.environ[k] = v
        else:
            monkeypatch.setenv(k, v)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> NnunetEnv:
    from nnunetv2_samssl.demo.synthetic import make_demo_dataset

    root = str(tmp_path_factory.mktemp("nnunet_tiny"))
    e = NnunetEnv(root, os.path.join(root, "raw"), os.path.join(root, "preprocessed"), os.path.join(root, "results"))
    old = {k: os.environ.get(k) for k in e.env()}
    _set_env(e)
    try:
        make_demo_dataset(e.raw, DATASET_ID, "SamsslTiny", num_labeled=6, num_unlabeled=3, num_test=2,
                          shape=(16, 32, 32), spacing=(2.0, 1.0, 1.0), seed=3)
        from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                          preprocess)
        extract_fingerprints([DATASET_ID], num_processes=1, check_dataset_integrity=True, clean=True, verbose=False)
        plan_experiments([DATASET_ID])
        preprocess([DATASET_ID], configurations=(CONFIG,), num_processes=(1,), verbose=False)
        from nnunetv2_samssl.data.unlabeled_preprocessing import preprocess_unlabeled
        preprocess_unlabeled(DATASET_ID, CONFIG, num_processes=1, verbose=False)
        os.makedirs(e.results, exist_ok=True)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return e


@pytest.fixture
def nnunet_env(tiny_dataset, tmp_path, monkeypatch) -> NnunetEnv:
    """A private, writable copy of the tiny dataset's folders; environment variables point at it."""
    root = str(tmp_path / "nnunet")
    for sub in ("raw", "preprocessed"):
        shutil.copytree(os.path.join(tiny_dataset.root, sub), os.path.join(root, sub))
    e = NnunetEnv(root, os.path.join(root, "raw"), os.path.join(root, "preprocessed"), os.path.join(root, "results"))
    os.makedirs(e.results)
    _set_env(e, monkeypatch)
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    return e
