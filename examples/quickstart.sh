#!/usr/bin/env bash
# The built-in demo: installs what is needed (once), builds a small labeled + unlabeled dataset whose
# unlabeled and test images come from other "sites" than the few labeled ones, plans and preprocesses it,
# preprocesses the unlabeled images, trains labeled-only nnU-Net, nnUNetTrainerMeanTeacher and
# nnUNetTrainerSemiSAM (real LiteMedSAM weights) briefly on CPU, predicts the held-out cases, prints their
# Dice and what SAM made of the SemiSAM predictions, and writes a picture. Work folder: ./samssl_demo (or $1).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(bash "$repo/scripts/setup_env.sh")"
"$venv/bin/nnUNetv2_samssl_demo" --workdir "${1:-$PWD/samssl_demo}"
