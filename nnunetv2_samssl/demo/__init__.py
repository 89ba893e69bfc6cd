"""Dataset builders for the demo and the few-label benchmark, written as nnU-Net v2 raw datasets.

- :func:`make_demo_dataset` (``nnUNetv2_samssl_make_demo``): synthetic 3D organ + lesion volumes with
  labeled, unlabeled (``imagesUnlabeled``) and held-out test (``imagesTs`` + ``labelsTs``) cases; with
  ``shifted=True`` the labeled source-site cases differ from the unlabeled and test cases of three other sites.
- :func:`make_fewlabel_dataset` (``nnUNetv2_samssl_make_fewlabel_dataset``): real MR anatomy (caudate,
  putamen, thalamus of the Colin 27 brain with AAL labels, Debian package ``mricron-data``) under random
  realistic shape and acquisition variation.

``labelsTs`` is this project's convention for the reference labels of ``imagesTs``; nnU-Net never reads it.
"""
__all__ = ["make_demo_dataset", "make_fewlabel_dataset"]

_EXPORTS = {"make_demo_dataset": "nnunetv2_samssl.demo.synthetic",
            "make_fewlabel_dataset": "nnunetv2_samssl.demo.real_anatomy"}


def __getattr__(name):
    # imported on first use so that `python -m nnunetv2_samssl.demo.synthetic` runs its module only once
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
