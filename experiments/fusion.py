"""AV-digits fusion: handwritten digits (degraded) + spoken digits (noisy), fused early, late or jointly.

  python -m experiments.fusion --workdir /tmp/fusion                 # train (resumes if DIR has a checkpoint)
  python -m experiments.fusion --workdir /tmp/fusion --mode=eval     # evaluate the latest checkpoint

Any TFDS dataset with several features and a ClassLabel, prepared as array_record (docs/data.md):

  python -m experiments.fusion --workdir /tmp/f --config.dataset=tfds:NAME --config.data_dir=DIR \
    --config.modalities=photo:image,sensors:readings --config.label_key=label

Each modality NAME:FEATURE_KEY gets an encoder chosen by its feature's rank: `[H, W, C]` a CNN,
`[T, F]` 1-D convolutions over T, a vector (or scalar) an MLP; uint8 features are scaled to [0, 1].
The classes come from the label's ClassLabel; training reads `train_split`, evaluation `eval_split`.

  python -m experiments.fusion --workdir /tmp/f --config.modalities=image   # the image-only baseline
  python -m experiments.fusion --help                                # every key: default, rule, help

AV-digits' encoders are CNNs for both modalities (its spectrograms are read as images). Results of
the default config: README.md. The method lives in `multimodal_jax.fusion` (config, data, encoders,
model, losses, evaluate, run); this module is its command line.
"""

from __future__ import annotations

import sys

from multimodal_jax.fusion.run import main

if __name__ == "__main__":
  sys.exit(main())
