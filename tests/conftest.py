"""Shared fixtures: one tiny planned + preprocessed nnU-Net dataset per test session.

``tiny_dataset`` builds it once (synthetic 3D cases of 16 x 32 x 32 voxels, 6 labeled, 3 unlabeled,
2 test) with nnU-Net's own planning and preprocessing in-process; ``nnunet_env`` gives each test a
private copy of the three nnU-Net folders and points the environment variables at it. ``tiny_dataset_2d`` /
``nnunet_env_2d``: the same with the ``2d`` configuration preprocessed too.
"""
from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def pools_in_threads():
    """nnU-Net's planning and preprocessing (and ``preprocess_unlabeled``) run their work in
    ``multiprocessing.get_context("spawn").Pool``s, and list a dataset's files with a 12-process fork ``Pool``
    (``nnunetv2.utilities.utils``); inside this block such a pool is a thread pool of the same size in this process.
    Same functions, same arguments, same results (every case is computed on its own, with its own seeded random
    state), without starting Python processes that import torch and nnU-Net again (seconds each) or forking this
    one. For building test fixtures only: the code under test keeps its own pools."""
    import multiprocessing
    from multiprocessing.pool import ThreadPool

    import nnunetv2.utilities.utils as nnunet_utils

    real, real_fork_pool = multiprocessing.get_context, nnunet_utils.Pool

    class _Context:
        def __init__(self, context):
            self._context = context

        def Pool(self, processes=None, *args, **kwargs):  # noqa: N802 (multiprocessing's name)
            return ThreadPool(processes, *args, **kwargs)

        def __getattr__(self, name):
            return getattr(self._context, name)

    multiprocessing.get_context = lambda method=None: _Context(real(method))
    nnunet_utils.Pool = ThreadPool
    try:
        yield
    finally:
        multiprocessing.get_context = real
        nnunet_utils.Pool = real_fork_pool


def build_session_dataset(tmp_path_factory, prefix: str, build, env_class=NnunetEnv) -> NnunetEnv:
    """Runs ``build(raw_folder)`` once with the nnU-Net environment variables pointing at a fresh root (they are
    restored afterwards) and returns that root as an ``env_class``. nnU-Net's worker pools run as threads here
    (:func:`pools_in_threads`)."""
    root = str(tmp_path_factory.mktemp(prefix))
    e = env_class(root, os.path.join(root, "raw"), os.path.join(root, "preprocessed"), os.path.join(root, "results"))
    old = {k: os.environ.get(k) for k in e.env()}
    _set_env(e)
    try:
        with pools_in_threads():
            build(e.raw)
        os.makedirs(e.results, exist_ok=True)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return e


def private_copy(base: NnunetEnv, tmp_path, monkeypatch, name: str = "nnunet") -> NnunetEnv:
    """A private, writable copy of ``base``'s raw and preprocessed folders; environment variables point at it."""
    root = str(tmp_path / name)
    for sub in ("raw", "preprocessed"):
        shutil.copytree(os.path.join(base.root, sub), os.path.join(root, sub))
    e = type(base)(root, os.path.join(root, "raw"), os.path.join(root, "preprocessed"), os.path.join(root, "results"))
    os.makedirs(e.results)
    _set_env(e, monkeypatch)
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    return e


def set_network_widths(dataset_pp: str, first: int, widest: int) -> None:
    """The demo's narrowing of the planned U-Nets (``run_demo.set_network_widths``), for the test datasets."""
    from nnunetv2_samssl.demo.run_demo import set_network_widths as narrow
    narrow(dataset_pp, first, widest)


def _build_tiny(raw: str) -> None:
    from nnunetv2_samssl.demo.synthetic import make_demo_dataset
    make_demo_dataset(raw, DATASET_ID, "SamsslTiny", num_labeled=6, num_unlabeled=3, num_test=2,
                      shape=(16, 32, 32), spacing=(2.0, 1.0, 1.0), seed=3)
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                      preprocess)
    extract_fingerprints([DATASET_ID], num_processes=1, check_dataset_integrity=True, clean=True, verbose=False)
    plan_experiments([DATASET_ID])
    # 8 .. 64 features per stage instead of nnU-Net's 32 .. 256: a CPU step takes a fraction of the time
    set_network_widths(os.path.join(os.environ["nnUNet_preprocessed"], DATASET_NAME), 8, 64)
    preprocess([DATASET_ID], configurations=(CONFIG,), num_processes=(1,), verbose=False)
    from nnunetv2_samssl.data.unlabeled_preprocessing import preprocess_unlabeled
    preprocess_unlabeled(DATASET_ID, CONFIG, num_processes=1, verbose=False)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> NnunetEnv:
    return build_session_dataset(tmp_path_factory, "nnunet_tiny", _build_tiny)


@pytest.fixture
def nnunet_env(tiny_dataset, tmp_path, monkeypatch) -> NnunetEnv:
    """A private, writable copy of the tiny dataset's folders; environment variables point at it."""
    return private_copy(tiny_dataset, tmp_path, monkeypatch)


@pytest.fixture(scope="session")
def tiny_dataset_2d(tiny_dataset, tmp_path_factory) -> NnunetEnv:
    """The tiny dataset with its ``2d`` configuration preprocessed as well (nnU-Net's ``preprocess``, what
    ``nnUNetv2_preprocess -d 977 -c 2d`` runs), once per session. Its unlabeled images are preprocessed for
    3d_fullres only, as in ``tiny_dataset``."""
    def build(raw: str) -> None:
        root = os.path.dirname(raw)
        for sub in ("raw", "preprocessed"):
            shutil.copytree(os.path.join(tiny_dataset.root, sub), os.path.join(root, sub))
        from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess
        preprocess([DATASET_ID], configurations=("2d",), num_processes=(1,), verbose=False)

    return build_session_dataset(tmp_path_factory, "nnunet_tiny_2d", build)


@pytest.fixture
def nnunet_env_2d(tiny_dataset_2d, tmp_path, monkeypatch) -> NnunetEnv:
    """A private, writable copy of ``tiny_dataset_2d``'s folders; environment variables point at it."""
    return private_copy(tiny_dataset_2d, tmp_path, monkeypatch)


class OtherDatasetEnv(NnunetEnv):
    """An environment whose dataset is ``dataset_name`` (a class attribute) instead of the tiny one."""
    dataset_name = DATASET_NAME

    @property
    def dataset_raw(self) -> str:
        return os.path.join(self.raw, self.dataset_name)

    @property
    def dataset_pp(self) -> str:
        return os.path.join(self.preprocessed, self.dataset_name)


class BratsEnv(OtherDatasetEnv):
    dataset_name = "Dataset978_BratsLike"


class SparseEnv(OtherDatasetEnv):
    dataset_name = "Dataset979_SparseLike"


@pytest.fixture(scope="session")
def brats_dataset(tmp_path_factory) -> BratsEnv:
    """The BraTS-like dataset of ``brats_like.py``, planned and preprocessed once per session."""
    from brats_like import build_preprocessed
    return build_session_dataset(tmp_path_factory, "nnunet_brats", build_preprocessed, BratsEnv)


@pytest.fixture
def brats_env(brats_dataset, tmp_path, monkeypatch) -> BratsEnv:
    return private_copy(brats_dataset, tmp_path, monkeypatch, "nnunet_brats")


@pytest.fixture(scope="session")
def sparse_dataset(tmp_path_factory) -> SparseEnv:
    """The sparsely annotated (ignore label) dataset of ``sparse_like.py``, planned and preprocessed once."""
    from sparse_like import build_preprocessed
    return build_session_dataset(tmp_path_factory, "nnunet_sparse", build_preprocessed, SparseEnv)


@pytest.fixture
def sparse_env(sparse_dataset, tmp_path, monkeypatch) -> SparseEnv:
    return private_copy(sparse_dataset, tmp_path, monkeypatch, "nnunet_sparse")
