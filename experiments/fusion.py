"""AV-digits fusion: handwritten digits (degraded) + spoken digits (noisy), fused early, late or jointly.

  python -m experiments.fusion --workdir /tmp/fusion                 # train (resumes if DIR has a checkpoint)
  python -m experiments.fusion --workdir /tmp/fusion --mode=eval     # evaluate the latest checkpoint

Any TFDS dataset with several features and a ClassLabel, prepared as array_record (docs/data.md):

  python -m experiments.fusion --workdir /tmp/f --config.dataset=tfds:NAME --config.data_dir=DIR \
    --config.modalities=photo:image,sensors:readings --config.label_key=label

Each modality NAME:FEATURE_KEY gets an encoder chosen by its feature's rank: `[H, W, C]` a CNN,
`[T, F]` 1-D convolutions over T, a vector (or scalar) an MLP; uint8 features are scaled to [0, 1].
The classes come from the label's ClassLabel; training reads `train_split`, evaluation `eval_split`.

Keys: dataset=av_digits|tfds:NAME[:CONFIG][@VERSION], fusion=early|late|joint|joint_detached (the
seed's joint variant: each encoder learns only from its own modality's loss), modalities=image,audio
(AV-digits' names; one name = the unimodal baseline), steps, batch_size (global), seed, mesh (e.g.
data:4,fsdp:2). AV-digits' encoders are CNNs for both modalities (its spectrograms are read as
images). Results of the default config: README.md.

The method lives in `multimodal_jax.fusion` (config, data, encoders, model, losses, evaluate, run);
this module is its command line. `--help` lists every key.
"""

from __future__ import annotations

import sys

from multimodal_jax.fusion.run import main

if __name__ == "__main__":
  sys.exit(main())
