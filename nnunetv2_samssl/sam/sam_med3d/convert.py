"""``nnUNetv2_samssl_convert_sam_med3d``: official SAM-Med3D checkpoint -> tensors-only weights file.

    nnUNetv2_samssl_convert_sam_med3d -i sam_med3d_turbo.pth -o sam_med3d_turbo_weights.pth

The input is opened with pickle (it needs ``torch.load(weights_only=False)``), which executes code
stored in the file: run this only on files from a source you trust. The output holds nothing but the
model tensors, checked strictly against the architecture, and loads with ``weights_only=True``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from .build import SAM_MED3D_CONFIGS
from .checkpoint import (CHECKPOINT_SETTING, SAMCheckpointError, check_state_dict, load_sam_med3d_state_dict)


def convert_sam_med3d_checkpoint(src: os.PathLike, dst: os.PathLike, config: str = "vit_b_ori") -> int:
    """Extract, validate and write the weights of ``src`` to ``dst`` (atomically). Returns the tensor count."""
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if not src.is_file():
        raise FileNotFoundError(f"input checkpoint not found: {src}")
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise SAMCheckpointError(f"output {dst} is the input file; choose another output path")
    state_dict = load_sam_med3d_state_dict(src, allow_pickle=True)
    check_state_dict(state_dict, config, source=str(src))
    # clone views so that each tensor is stored alone, not with the storage it may share
    tensors = {k: (v.detach().clone() if v.untyped_storage().nbytes() != v.numel() * v.element_size()
                   else v.detach().contiguous()) for k, v in state_dict.items()}
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    try:
        torch.save(tensors, tmp)
        torch.load(tmp, map_location="cpu", weights_only=True)  # the result must load safely
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    return len(tensors)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nnUNetv2_samssl_convert_sam_med3d",
        description="Convert an official SAM-Med3D checkpoint (sam_med3d.pth, sam_med3d_turbo.pth) into a "
                    "tensors-only weights file that loads without pickle. WARNING: the input is read with "
                    "torch.load(weights_only=False), which executes code stored in the file; convert only "
                    "files from a source you trust. The weights are checked strictly (every key and shape) "
                    f"against the architecture. Point the setting '{CHECKPOINT_SETTING}' at the output.")
    parser.add_argument("-i", "--input", required=True, help="official checkpoint (pickled; trusted source only)")
    parser.add_argument("-o", "--output", required=True, help="tensors-only weights file to write")
    parser.add_argument("-c", "--config", default="vit_b_ori", choices=sorted(SAM_MED3D_CONFIGS),
                        help="architecture to validate against (default: vit_b_ori, the released models)")
    args = parser.parse_args(argv)
    try:
        n = convert_sam_med3d_checkpoint(args.input, args.output, args.config)
    except (SAMCheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {n} tensors ({args.config}) to {args.output}; set '{CHECKPOINT_SETTING}: {args.output}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
