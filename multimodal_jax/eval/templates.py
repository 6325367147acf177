"""Zero-shot prompt templates: `--config.templates=openai|FILE`.

`openai` is the set of 80 ImageNet prompt templates that OpenAI's CLIP paper averages its class
embeddings over (a prompt is a template with the class name in place of `{}`). FILE holds one
template per line, each with one `{}`; blank lines and lines starting with `#` are skipped.
"""

from __future__ import annotations

import os

from multimodal_jax.errors import UserError

OPENAI_IMAGENET_TEMPLATES = (
  "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
  "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
  "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
  "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
  "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
  "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
  "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.", "a cropped photo of a {}.",
  "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.",
  "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.",
  "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.", "a photo of a {}.",
  "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
  "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
  "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
  "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.",
  "a sketch of the {}.", "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.",
  "a jpeg corrupted photo of the {}.", "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.",
  "a photo of the small {}.", "a photo of the weird {}.", "the cartoon {}.", "art of the {}.",
  "a drawing of the {}.", "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.",
  "a dark photo of a {}.", "itap of a {}.", "graffiti of the {}.", "a toy {}.",
  "itap of my {}.", "a photo of a cool {}.", "a photo of a small {}.", "a tattoo of the {}.",
)  # fmt: skip


def load_templates(spec: str) -> tuple[str, ...]:
  """The templates named by `spec`: `openai` or the path of a text file (see the module docstring).

  Raises:
    UserError: a missing or unreadable file, a file with no template, or a line without exactly one `{}`.
  """
  if spec == "openai":
    return OPENAI_IMAGENET_TEMPLATES
  path = os.path.expanduser(spec)
  if not os.path.isfile(path):
    raise UserError(f"--config.templates={spec}: no such file; give openai or a file with one template ({{}}) per line")
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f"--config.templates={spec} cannot be read as UTF-8 text ({e}); fix the file") from None
  templates = []
  for number, line in enumerate(lines, 1):
    line = line.strip()
    if not line or line.startswith("#"):
      continue
    if line.count("{}") != 1 or line.replace("{}", "").count("{") or line.replace("{}", "").count("}"):
      raise UserError(
        f"--config.templates={spec}: line {number} ({line!r}) must hold exactly one {{}} where the class name goes"
      )
    templates.append(line)
  if not templates:
    raise UserError(f"--config.templates={spec} holds no template: write one per line, e.g. 'a photo of a {{}}.'")
  return tuple(templates)
