"""CLIP: contrastive image-text training, zero-shot evaluation, retrieval; weights in and out.

  python -m experiments.clip --workdir /tmp/clip                  # train (resumes if DIR has a checkpoint)
  python -m experiments.clip --workdir /tmp/clip --mode=eval      # zero-shot + retrieval from the checkpoint
  python -m experiments.clip --workdir W --config.dataset=csv:PAIRS.tsv --config.image_size=32   # your pairs
  python -m experiments.clip --workdir W --mode=eval --config.init_from=open_clip:M.safetensors \\
      --config.eval_dataset=folder:DIR --config.templates=openai   # an imported model, no training
  python -m experiments.clip --workdir /tmp/clip --mode=export --config.export_to=open_clip:OUT.safetensors

  python -m experiments.clip --workdir /tmp/clip --config=my_config.py --config.steps=100   # a config file + a key
  python -m experiments.clip --help                               # every key: default, rule, help

Empty (auto) keys resolve once, at the start of a run, into multimodal_jax.clip.settings.ClipSettings. Evaluation of the embedded digits
(multimodal_jax.clip.evaluate): zero-shot accuracy with held-out templates, retrieval recall@k among the
distinct test captions, a linear probe; of other sets multimodal_jax.clip.evaluate; both write
WORKDIR/predictions.jsonl. Results: README.md and docs/results/clip.md.
"""

from __future__ import annotations

import sys

from multimodal_jax.clip.run import main

if __name__ == "__main__":
  sys.exit(main())
