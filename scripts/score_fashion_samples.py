"""Scores a latent diffusion run trained on Fashion-MNIST captions: does a sample show its prompt's class?

  python -m scripts.score_fashion_samples --workdir W_LD [--template "this is a {}."] [--per_class 20]

Samples `--per_class` images for each class's prompt (`--template` with the class name; by default a
template the captions never used) through `python -m experiments.latent_diffusion --mode=sample`,
trains the library's small CNN classifier (`multimodal_jax.latent_diffusion.evaluate`) on real Fashion-MNIST
training images preprocessed as the run's data were (grey, shorter side resized bicubic to the run's
`image_size`), checks it on the real test images, and prints one JSON line: the classifier's test
accuracy and the fraction of samples it assigns to their prompt's class (chance: 0.1), per class too.
The samples stay where `--mode=sample` writes them (W/samples.png, W/samples/NNNN.png).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np
from PIL import Image

from multimodal_jax.data import image_files
from multimodal_jax.latent_diffusion import evaluate as generative
from multimodal_jax.latent_diffusion import run as latent_diffusion
from scripts import prepare_fashion_mnist as fm


def real_images(split: str, size: int, limit: int, source: str) -> tuple[np.ndarray, np.ndarray]:
  images, labels = fm.load_split(source, split)
  pixels = np.stack([image_files.preprocess_array(x, size, 1) for x in images[:limit]])
  return generative.to_signed_unit(pixels), labels[:limit].astype(np.int32)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="the latent diffusion run")
  parser.add_argument("--template", default=fm.HELDOUT_TEMPLATES[-1])
  parser.add_argument("--per_class", type=int, default=20)
  parser.add_argument("--train_images", type=int, default=20_000, help="real images to train the classifier on")
  parser.add_argument("--source", default=fm.SOURCE)
  args = parser.parse_args(argv)
  prompts = ";".join(args.template.format(name) for name in fm.CLASSES)
  status = latent_diffusion.main(
    ["--workdir", args.workdir, "--mode=sample", f"--config.prompt={prompts}", f"--config.num_samples={args.per_class}"]
  )
  if status:
    return status
  paths = sorted(glob.glob(os.path.join(args.workdir, "samples", "*.png")))
  size = Image.open(paths[0]).size[0]
  samples = np.stack([np.asarray(Image.open(p).convert("L"))[..., None] for p in paths])
  wanted = np.repeat(np.arange(len(fm.CLASSES)), args.per_class)
  train_x, train_y = real_images("train", size, args.train_images, args.source)
  test_x, test_y = real_images("test", size, 10_000, args.source)
  scorer = generative.Scorer(generative.train_classifier(train_x, train_y, generative.ClassifierConfig(steps=1500)))
  predicted = scorer.predict(generative.to_signed_unit(samples))
  result = {
    "classifier_test_accuracy": round(scorer.accuracy(test_x, test_y), 4),
    "samples": len(samples),
    "template": args.template,
    "sample_accuracy": round(float(np.mean(predicted == wanted)), 4),
    "per_class": {name: round(float(np.mean(predicted[wanted == i] == i)), 2) for i, name in enumerate(fm.CLASSES)},
  }
  print(json.dumps(result), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
