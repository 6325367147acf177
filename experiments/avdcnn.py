"""AVDCNN audio-visual speech enhancement (Hou et al. 2018) on the embedded AV-speech data (or GRID).

  python -m experiments.avdcnn --workdir runs/avdcnn                  # train (resumes if DIR has a checkpoint)
  python -m experiments.avdcnn --workdir runs/avdcnn --mode=eval      # PESQ / STOI / SDI / segSNR, eval.json
  python -m experiments.avdcnn --workdir runs/avdcnn --mode=enhance \\
      --config.input=noisy.wav --config.lips=mouth.npy --config.output=enhanced.wav
  python -m experiments.avdcnn --workdir runs/avdcnn --mode=enhance \\
      --config.input=NOISY_DIR --config.lips=LIPS_DIR --config.output=OUT_DIR   # every audio file, STEM.npy lips
  python -m experiments.avdcnn --workdir runs/avdcnn --mode=spectrogram --config.output=docs/avdcnn_spectrogram.png

  python -m experiments.avdcnn --workdir runs/grid --config.grid_dir=GRID_ROOT   # train and test on GRID
  python -m experiments.avdcnn --help                                 # every key: default, rule, help

The method lives in `multimodal_jax.avdcnn` (config, data, frames, model, losses, enhance, evaluate, run);
results and the recipe's history: docs/results/avdcnn.md.
"""

from __future__ import annotations

import sys

from multimodal_jax.avdcnn.run import main

if __name__ == "__main__":
  sys.exit(main())
