"""CLIP's config resolved once (`clip.settings.resolve` -> the frozen `ClipSettings`): the auto-value table,
explicit keys winning, the caller's config untouched, the recorded config complete and resolving to the same
settings, and the one-line errors. Fast: no data is opened, no model initialised."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from multimodal_jax.clip import config as clip_config
from multimodal_jax.clip import settings as clip_settings
from multimodal_jax.config import apply_overrides
from multimodal_jax.data import image_files
from multimodal_jax.datasets import captioned_digits as cd
from multimodal_jax.errors import UserError
from multimodal_jax.eval.templates import OPENAI_IMAGENET_TEMPLATES

CSV = "dataset=csv:pairs.tsv"  # never opened: resolving reads no data
AUTO_KEYS = ("model", "image_tower", "tokenizer", "context_length", "image_size", "channels", "image_mean", "image_std")


def config_of(*overrides: str):
  return apply_overrides(clip_config.get_config(), list(overrides))


def test_the_embedded_digits_auto_values():
  # catches a digits default drifting (the run would train another tokenizer, image shape or normalization
  # than the README's numbers were measured with)
  s = clip_settings.resolve(config_of())
  assert s.embedded and not s.from_open_clip and s.minilm_dir is None
  assert (s.model_name, s.image_tower, s.tokenizer, s.context_length) == ("tiny", "resnet", "words", 16)
  assert (s.image_size, s.channels, s.templates) == (32, 1, "")
  assert s.normalization() == ((0.1307,), (0.3081,))
  assert s.zero_shot_templates(digits=True) == cd.HELD_OUT_TEMPLATES
  assert s.zero_shot_templates(digits=False) == OPENAI_IMAGENET_TEMPLATES  # the digits' run on another eval set


def test_a_spec_dataset_auto_values():
  # catches the digits' own defaults (words, 1 channel, MNIST statistics) leaking into a run on other data
  s = clip_settings.resolve(config_of(CSV))
  assert not s.embedded and (s.tokenizer, s.context_length, s.channels, s.templates) == ("clip_bpe", 77, 3, "openai")
  assert s.normalization() == image_files.normalization("openai", "openai", 3)
  assert s.zero_shot_templates(digits=True) == OPENAI_IMAGENET_TEMPLATES


def test_the_model_config_is_built_from_the_resolved_values():
  # catches a ClipConfig that disagrees with the settings the data pipeline reads (a shape mismatch at init),
  # or the sigmoid loss without SigLIP's logit scale and bias
  s = clip_settings.resolve(config_of("loss=sigmoid"))
  assert s.model.vision.channels == 1 and s.model.vision.image_size == 32 and s.model.vision.tower == "resnet"
  tokenizer = s.text_tokenizer()
  assert (s.model.text.context_length, s.model.text.vocab_size) == (16, tokenizer.vocab_size)
  assert s.model.text.pad_id == tokenizer.pad_id and s.model.text_tower == "transformer"
  assert s.model.init_logit_bias == -10.0 and s.model.init_logit_scale == pytest.approx(math.log(10.0))
  assert (s.data.image_size, s.data.channels) == (32, 1)


def test_explicit_keys_win():
  # catches an auto rule that overrides what the user set
  config = config_of(
    "tokenizer=clip_bpe", "context_length=20", "channels=3", "image_size=48", "image_mean=imagenet",
    "image_std=imagenet", "templates=openai", "image_tower=vit", "model=tiny",
  )  # fmt: skip
  s = clip_settings.resolve(config)
  assert (s.tokenizer, s.context_length, s.channels, s.image_size, s.image_tower) == ("clip_bpe", 20, 3, 48, "vit")
  assert s.normalization() == image_files.normalization("imagenet", "imagenet", 3)
  assert s.zero_shot_templates(digits=True) == OPENAI_IMAGENET_TEMPLATES
  assert (s.model.vision.image_size, s.model.vision.tower, s.data.image_size, s.data.channels) == (48, "vit", 48, 3)


def test_the_settings_are_frozen():
  # catches a reader that changes a resolved value under the other readers' feet
  s = clip_settings.resolve(config_of())
  with pytest.raises(dataclasses.FrozenInstanceError):
    s.channels = 3  # type: ignore[misc]


@pytest.mark.parametrize("overrides", [(), (CSV,), (CSV, "image_mean=dataset", "image_std=dataset")])
def test_resolving_leaves_the_config_and_the_record_resolves_to_the_same_settings(overrides):
  # catches resolve writing into the user's config (the old in-place resolve), a recorded config with an auto key
  # left empty (evaluation would follow today's defaults instead of what training did), and a record that does not
  # read back as the same run (e.g. the mean/std numbers not round-tripping through their text form)
  config = config_of(*overrides)
  before = config.to_dict()
  s = clip_settings.resolve(config)
  if "image_mean=dataset" in overrides:
    assert s.image_mean is None
    images = [np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8) for i in range(4)]
    s = s.with_training_images(config, lambda: images)
    assert clip_settings.resolve(config, lambda: images) == s  # the one-step form agrees with the two-step one
  recorded = s.recorded(config)
  assert config.to_dict() == before and recorded is not config
  assert all(recorded[k] for k in AUTO_KEYS), {k: recorded[k] for k in AUTO_KEYS}
  assert recorded.image_mean == ",".join(repr(v) for v in s.image_mean)
  assert recorded.templates == ("openai" if overrides else "")  # the digits keep their own held-out templates
  assert {k: v for k, v in recorded.to_dict().items() if k not in (*AUTO_KEYS, "templates")} == {
    k: v for k, v in before.items() if k not in (*AUTO_KEYS, "templates")
  }
  assert clip_settings.resolve(recorded) == s
  assert recorded.to_dict() == s.recorded(recorded).to_dict()


def test_known_statistics_do_not_read_the_training_images():
  # catches a run that reads every training image for statistics it does not use
  s = clip_settings.resolve(config_of(CSV))
  assert s.with_training_images(config_of(CSV), lambda: pytest.fail("read the training images")) is s


def test_dataset_statistics_are_needed_before_use():
  # catches a run that would normalize (or record) with no numbers when image_mean=dataset was not computed
  s = clip_settings.resolve(config_of(CSV, "image_mean=dataset"))
  for use in (s.normalization, s.normalizer, lambda: s.recorded(config_of(CSV))):
    with pytest.raises(ValueError, match="image_mean/std=dataset needs the training images"):
      use()


@pytest.mark.parametrize(
  "overrides, message",
  [
    (("model=nope",), "model='nope': choose one of tiny, "),
    (("model=init_from",), "--config.model=init_from takes the architecture of --config.init_from=open_clip:FILE"),
    (("image_tower=cnn",), "image_tower='cnn': choose vit or resnet"),
    (("loss=hinge",), "loss='hinge', loss_impl='gather': choose softmax|sigmoid and gather|chunked"),
    ((CSV, "tokenizer=words"), "--config.tokenizer=words knows only the embedded captions' words: use clip_bpe"),
    ((CSV, "image_mean=0.1,0.2"), "--config.image_mean has 2 values for 3-channel images: give 1 or 3"),
  ],
)
def test_a_bad_value_is_one_line(overrides, message):
  # catches a resolution error that is a traceback, or whose message changed from the one users know
  config = config_of()
  for override in overrides:  # set directly: the command line's rules would stop some of these earlier
    key, _, value = override.partition("=")
    config[key] = value
  with pytest.raises(UserError) as excinfo:
    clip_settings.resolve(config)
  assert message in str(excinfo.value) and "\n" not in str(excinfo.value)
