"""`hf-hub:ORG/NAME[@REVISION]`: a Hugging Face Hub model named as open_clip and the Hub tools name it,
read from the local Hugging Face cache, offline (this package never touches the network).

The cache is where huggingface_hub puts it: `HF_HUB_CACHE`, else `HUGGINGFACE_HUB_CACHE`, else
`HF_HOME/hub`, else `XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`. A model
`ORG/NAME` lives in `models--ORG--NAME/`: `refs/main` (or `refs/REVISION`) holds a commit hash and
`snapshots/<hash>/` the files (links into `blobs/`). `@REVISION` is a branch or tag with a ref in the
cache, or a full commit hash with a snapshot there; none given means `main`. huggingface_hub is not
imported (it may not be installed): the layout above is all that is read.

What a snapshot holds decides which reader takes it, among the kinds the config key reads:

  open_clip      open_clip_model.safetensors (else open_clip_pytorch_model.bin) beside open_clip_config.json
  minilm         a sentence-transformers (or plain BERT) folder: config.json, model.safetensors, tokenizer.json
  diffusers_vae  a diffusers AutoencoderKL folder: the `vae/` of a pipeline, or config.json +
                 diffusion_pytorch_model.safetensors at the top

A name that is not in the cache, or whose snapshot holds none of the kinds asked for, is one
UserError line saying so (and how to fetch a model on a machine with network).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence

from multimodal_jax.errors import UserError

PREFIX = "hf-hub:"
KINDS = ("open_clip", "minilm", "diffusers_vae")
# What each kind is, for messages.
WHAT = {
  "open_clip": "an open_clip checkpoint",
  "minilm": "a sentence-transformers (BERT) folder",
  "diffusers_vae": "a diffusers AutoencoderKL folder",
}
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
VAE_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# A repo id: NAME or ORG/NAME, each part of the characters the Hub allows (no "..", no leading "-" or ".").
_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_REPO = re.compile(rf"^(?:{_PART}/)?{_PART}$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def is_hub(source: str) -> bool:
  """Whether `source` names a Hub model (`hf-hub:ORG/NAME[@REVISION]`)."""
  return isinstance(source, str) and source.startswith(PREFIX)


def cache_dir() -> str:
  """The hub cache folder, resolved from the environment as huggingface_hub resolves it."""
  explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
  if explicit:
    return os.path.expandvars(os.path.expanduser(explicit))
  home = os.environ.get("HF_HOME")
  if not home:
    home = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
  return os.path.join(os.path.expandvars(os.path.expanduser(home)), "hub")


def parse(source: str, key: str = "") -> tuple[str, str]:
  """`hf-hub:ORG/NAME[@REVISION]` -> (ORG/NAME, REVISION or "main"); one-line UserError when malformed."""
  name, _, revision = source[len(PREFIX) :].partition("@") if is_hub(source) else (source, "", "")
  revision = revision or "main"
  if not _REPO.match(name) or ".." in name or not _REVISION.match(revision) or ".." in revision:
    raise UserError(f"{_shown(source, key)}: expected hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION")
  return name, revision


def snapshot(source: str, key: str = "") -> str:
  """The local snapshot folder of `hf-hub:ORG/NAME[@REVISION]`; one-line UserError when the cache
  lacks the model or that revision."""
  repo, revision = parse(source, key)
  cache = cache_dir()
  folder_name = "models--" + repo.replace("/", "--")
  folder = os.path.join(cache, folder_name)
  if not os.path.isdir(os.path.join(folder, "snapshots")):
    raise UserError(
      f"{_shown(source, key)}: {repo} is not in the Hugging Face cache {cache} (no {folder_name}); this package "
      f"reads the cache offline: run `huggingface-cli download {repo}` on a machine with network and copy its "
      f"{folder_name} folder into {cache} (or point HF_HUB_CACHE at a copy of that cache)"
    )
  commit = _read_ref(os.path.join(folder, "refs", revision))
  if commit is None and _COMMIT.match(revision):
    commit = revision
  path = os.path.join(folder, "snapshots", commit) if commit else None
  if path is None or not os.path.isdir(path):
    refs = _refs(folder)
    cached = ", ".join(f"{name} -> {c[:12]}" for name, c in refs) or "no refs"
    snapshots = ", ".join(sorted(os.listdir(os.path.join(folder, "snapshots")))) or "none"
    missing = f"revision {revision} ({commit[:12]}) has no snapshot" if commit else f"revision {revision} is not cached"
    raise UserError(
      f"{_shown(source, key)}: {missing} in {folder} (refs: {cached}; snapshots: {snapshots}); give one of those as "
      f"@REVISION, or run `huggingface-cli download {repo} --revision {revision}` on a machine with network and copy "
      "the cache here"
    )
  return path


def contents(folder: str) -> dict[str, str]:
  """{kind: local path} for each kind of `KINDS` that `folder` holds (the weights file for open_clip,
  the model folder for minilm and diffusers_vae)."""
  found: dict[str, str] = {}
  weights = _first_file(folder, OPEN_CLIP_WEIGHTS)
  if weights:
    found["open_clip"] = weights
  if _is_bert_folder(folder):
    found["minilm"] = folder
  for candidate in (os.path.join(folder, "vae"), folder):
    if _is_vae_folder(candidate):
      found["diffusers_vae"] = candidate
      break
  return found


def resolve(source: str, kinds: Sequence[str], key: str = "") -> tuple[str, str]:
  """(kind, local path) of `hf-hub:ORG/NAME[@REVISION]`: the first of `kinds` (the kinds the config key
  reads, in its order of preference) that the snapshot holds. One-line UserError when the model is
  not cached or its snapshot holds none of them."""
  folder = snapshot(source, key)
  found = contents(folder)
  for kind in kinds:
    if kind in found:
      return kind, found[kind]
  wanted = " or ".join(WHAT.get(k, k) for k in kinds) or "nothing"
  held = ", ".join(WHAT[k] for k in found) or _describe(folder)
  raise UserError(f"{_shown(source, key)}: the snapshot {folder} holds {held}, and this key reads {wanted}")


def path_of(source: str, kind: str, key: str = "") -> str | None:
  """The local path of `kind` in `hf-hub:ORG/NAME[@REVISION]`'s snapshot, or None when the snapshot
  holds other things (`config.source_path`'s answer for a Hub name); UserError when not cached."""
  return contents(snapshot(source, key)).get(kind)


def local_path(path: str | os.PathLike, kind: str, key: str = "") -> str:
  """`path` itself, or for a Hub name (`KIND:hf-hub:ORG/NAME` gives a reader `hf-hub:ORG/NAME`) the
  local path of its `kind`: what a reader of `kind` calls before opening its PATH."""
  path = os.fspath(path)
  if not is_hub(path):
    return path
  return resolve(path, (kind,), key)[1]


def _shown(source: str, key: str) -> str:
  return f"{key}={source}" if key else source


def _read_ref(path: str) -> str | None:
  """The commit hash in a refs file (None when absent or not a hash)."""
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    commit = f.read().strip()
  return commit if _COMMIT.match(commit) else None


def _refs(folder: str) -> list[tuple[str, str]]:
  root = os.path.join(folder, "refs")
  out = []
  for parent, _, files in os.walk(root):
    for name in files:
      commit = _read_ref(os.path.join(parent, name))
      if commit:
        out.append((os.path.relpath(os.path.join(parent, name), root), commit))
  return sorted(out)


def _first_file(folder: str, names: Sequence[str]) -> str | None:
  """The first of `names` that is a file in `folder` (a link into blobs/ whose blob is missing is not)."""
  return next((os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))), None)


def _read_json(path: str) -> dict | None:
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (OSError, ValueError):
    return None
  return value if isinstance(value, dict) else None


def _is_bert_folder(folder: str) -> bool:
  """A sentence-transformers or Hugging Face BERT folder: a BERT config.json with its weights and a
  tokenizer.json (what `text.minilm.load_minilm` reads)."""
  config = _read_json(os.path.join(folder, "config.json"))
  if config is None or config.get("model_type", "bert") != "bert" or "_class_name" in config:
    return False
  weights = _first_file(folder, ("model.safetensors", "pytorch_model.bin"))
  return weights is not None and os.path.isfile(os.path.join(folder, "tokenizer.json"))


def _is_vae_folder(folder: str) -> bool:
  config = _read_json(os.path.join(folder, "config.json"))
  if config is None or config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
    return False
  return _first_file(folder, VAE_WEIGHTS) is not None


def _describe(folder: str) -> str:
  """What an unrecognised snapshot holds, for the message: its model's class or type, else its files."""
  for where in ("", "vae/"):
    config = _read_json(os.path.join(folder, where, "config.json")) or {}
    name = config.get("_class_name") or config.get("model_type")
    if name:
      return f"a {name} model" + (f" in {where}" if where else "")
  names = sorted(os.listdir(folder))
  return "files " + ", ".join(names[:8]) + (", ..." if len(names) > 8 else "") if names else "no files"
