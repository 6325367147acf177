"""`hf-hub:ORG/NAME[@REVISION]` read from a local Hugging Face cache (a fake one under tmp, laid out
as huggingface_hub lays it out: refs/, snapshots/<commit>/ links into blobs/), and the open_clip
model config that comes with the weights honoured or refused field by field.

The open_clip checkpoints are random tiny CLIPs of ours written by our exporter (`save_open_clip`:
the files open_clip writes for that architecture); no torch, no network."""

import dataclasses
import hashlib
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from multimodal_jax import init_from, train
from multimodal_jax import sharding as shd
from multimodal_jax.clip import open_clip as oc
from multimodal_jax.clip import weights as clip_weights
from multimodal_jax.clip.model import CLIP, ClipConfig, TextConfig, VisionConfig
from multimodal_jax.config import source_path
from multimodal_jax.convert import hf_hub
from multimodal_jax.errors import UserError

CFG = ClipConfig(
  embed_dim=16,
  vision=VisionConfig(image_size=16, patch_size=8, width=32, layers=1, heads=2, mlp_ratio=2.0),
  text=TextConfig(vocab_size=64, context_length=8, width=32, layers=1, heads=2, mlp_ratio=2.0),
)
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40
PREPROCESS = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}


def _random_tree(shapes, seed):
  """A tree of random float32 arrays of the shapes of `shapes` (a tree of shaped things)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: (0.5 * rng.normal(size=a.shape)).astype(np.float32), shapes)


def _params(cfg=CFG, seed=0):
  """Random params of `CLIP(cfg)` (shapes from `eval_shape`: nothing is initialised)."""
  images, tokens = jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 8), jnp.int32)
  boxed = jax.eval_shape(CLIP(cfg).init, jax.random.key(0), images, tokens)["params"]
  return _random_tree(nn.meta.unbox(boxed), seed)


def _open_clip_files(tmp_path, cfg=CFG, seed=0, **model_cfg_changes):
  """{name: bytes} of a Hub open_clip repo (open_clip_model.safetensors, open_clip_config.json) of a
  random CLIP, written by our exporter; and the weights file as written (with its FILE.json)."""
  path = tmp_path / f"export-{seed}-{len(os.listdir(tmp_path))}" / "model.safetensors"
  path.parent.mkdir()
  oc.save_open_clip(path, _params(cfg, seed), cfg)
  model_cfg = json.loads(path.with_suffix(".json").read_text())["model_cfg"]
  for dotted, value in model_cfg_changes.items():
    *parents, leaf = dotted.split(".")
    node = model_cfg
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  path.with_suffix(".json").write_text(json.dumps({"model_cfg": model_cfg}))
  config = {"model_cfg": model_cfg, "preprocess_cfg": PREPROCESS}
  return {"open_clip_model.safetensors": path.read_bytes(), "open_clip_config.json": json.dumps(config).encode()}, path


def _cache_model(cache, repo, files, commit=COMMIT_A, refs=("main",)):
  """Writes `files` ({relative path: bytes}) as huggingface_hub caches a download of `repo` at
  `commit`: content-addressed blobs, the snapshot's relative links to them, refs naming the commit."""
  folder = cache / ("models--" + repo.replace("/", "--"))
  for name, data in files.items():
    blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = folder / "snapshots" / commit / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
  for ref in refs:
    (folder / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
    (folder / "refs" / ref).write_text(commit)
  return folder / "snapshots" / commit


@pytest.fixture
def cache(tmp_path, monkeypatch):
  root = tmp_path / "hf_cache"
  root.mkdir()
  monkeypatch.setenv("HF_HUB_CACHE", str(root))
  monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
  return root


def _converters(cfg=CFG):
  """The converters `clip.run.converters` gives a CLIP run of model `cfg`."""
  return {"open_clip": clip_weights.open_clip_converter(cfg, "init_from"), "minilm": init_from.outside_params}


def _abstract(cfg=CFG):
  init = lambda rng: CLIP(cfg).init({"params": rng}, jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 8), jnp.int32))["params"]
  return train.abstract_params(init, shd.make_mesh("data:-1"))


def _one_line(excinfo, *needles):
  message = str(excinfo.value)
  assert len(message.splitlines()) == 1, message
  for needle in needles:
    assert needle in message, (needle, message)


def test_hub_name_imports_exactly_as_the_file(tmp_path, cache):
  # catches: the Hub name resolving to another file than the checkpoint, or the model config beside
  # the snapshot's link not being found (looked up beside the blob)
  files, path = _open_clip_files(tmp_path)
  _cache_model(cache, "org/tiny-clip", files)
  abstract = _abstract()
  from_file = init_from.initial_params(f"open_clip:{path}", abstract, _converters())
  for source in ("hf-hub:org/tiny-clip", "open_clip:hf-hub:org/tiny-clip"):
    from_hub = init_from.initial_params(source, abstract, _converters())
    jax.tree.map(np.testing.assert_array_equal, from_hub, from_file)
  assert clip_weights.open_clip_architecture("hf-hub:org/tiny-clip") == clip_weights.open_clip_architecture(str(path))
  assert clip_weights.open_clip_preprocess("hf-hub:org/tiny-clip") == PREPROCESS


def test_a_name_not_in_the_cache_is_one_line(cache):
  # catches: a missing model surfacing as a traceback (or a download attempt) instead of how to fetch it
  with pytest.raises(UserError) as excinfo:
    init_from.initial_params("hf-hub:org/absent", _abstract(), _converters())
  _one_line(excinfo, "init_from=hf-hub:org/absent", "not in the Hugging Face cache", str(cache))
  _one_line(excinfo, "huggingface-cli download org/absent", "models--org--absent")
  with pytest.raises(UserError) as excinfo:
    hf_hub.snapshot("hf-hub:../etc")
  _one_line(excinfo, "expected hf-hub:ORG/NAME")


def test_refs_main_and_revisions(tmp_path, cache):
  # catches: taking whichever snapshot is there instead of the one refs/main (or @REVISION) names
  files_a, path_a = _open_clip_files(tmp_path, seed=1)
  files_b, path_b = _open_clip_files(tmp_path, seed=2)
  _cache_model(cache, "org/clip", files_a, COMMIT_A, refs=("main",))
  _cache_model(cache, "org/clip", files_b, COMMIT_B, refs=("v1.0",))
  abstract = _abstract()
  expected = {p: init_from.initial_params(f"open_clip:{p}", abstract, _converters()) for p in (path_a, path_b)}
  for source, path in [
    ("hf-hub:org/clip", path_a),
    ("hf-hub:org/clip@main", path_a),
    ("hf-hub:org/clip@v1.0", path_b),
    (f"hf-hub:org/clip@{COMMIT_B}", path_b),
  ]:
    got = init_from.initial_params(source, abstract, _converters())
    jax.tree.map(np.testing.assert_array_equal, got, expected[path])
  with pytest.raises(UserError) as excinfo:
    init_from.initial_params("hf-hub:org/clip@v2", abstract, _converters())
  _one_line(excinfo, "revision v2 is not cached", "main -> aaaaaaaaaaaa", "v1.0 -> bbbbbbbbbbbb")


def test_cache_location_follows_huggingface_hub(tmp_path, monkeypatch):
  # catches: looking in another cache than the one huggingface-cli downloaded into
  for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
    monkeypatch.delenv(name, raising=False)
  settings = [
    {},
    {"XDG_CACHE_HOME": str(tmp_path / "xdg")},
    {"XDG_CACHE_HOME": str(tmp_path / "xdg"), "HF_HOME": str(tmp_path / "home")},
    {"HF_HOME": str(tmp_path / "home"), "HUGGINGFACE_HUB_CACHE": str(tmp_path / "old")},
    {"HUGGINGFACE_HUB_CACHE": str(tmp_path / "old"), "HF_HUB_CACHE": str(tmp_path / "new")},
  ]
  expected = [
    os.path.expanduser("~/.cache/huggingface/hub"),
    str(tmp_path / "xdg" / "huggingface" / "hub"),
    str(tmp_path / "home" / "hub"),
    str(tmp_path / "old"),
    str(tmp_path / "new"),
  ]
  for env, want in zip(settings, expected, strict=True):
    with monkeypatch.context() as m:
      for k, v in env.items():
        m.setenv(k, v)
      assert hf_hub.cache_dir() == want, env


def test_cache_location_agrees_with_huggingface_hub(tmp_path):
  # catches: a drift between our reading of the environment and huggingface_hub's own (where installed)
  pytest.importorskip("huggingface_hub", reason="the comparison needs huggingface_hub")
  base = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME")}
  for env in ({"HF_HOME": str(tmp_path / "home")}, {"HUGGINGFACE_HUB_CACHE": str(tmp_path / "old")}):
    code = "import huggingface_hub.constants as c; print(c.HF_HUB_CACHE)"
    theirs = subprocess.run(
      [sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, check=False
    )
    assert theirs.returncode == 0, theirs.stderr
    old = dict(os.environ)
    try:
      os.environ.clear()
      os.environ.update({**base, **env})
      ours = hf_hub.cache_dir()
    finally:
      os.environ.clear()
      os.environ.update(old)
    assert ours == theirs.stdout.strip(), env


@pytest.mark.parametrize(
  "field, value",
  [
    ("vision_cfg.pool_type", "avg"),
    ("text_cfg.no_causal_mask", True),
    ("text_cfg.pool_type", "last"),
    ("text_cfg.proj_bias", True),
    ("vision_cfg.no_ln_pre", True),
    ("custom_text", True),
    ("text_cfg.act_kwargs", {"approximate": "tanh"}),  # one tower only: our towers share one activation
    ("vision_cfg.norm_kwargs", {"eps": 1e-6}),
    ("vision_cfg.a_newer_option", 1),
  ],
)
def test_model_config_options_that_change_the_features_are_refused(tmp_path, cache, field, value):
  # catches: an open_clip_config.json asking for other math (average pooling, no causal mask, last-token
  # pooling, ...) importing silently and giving other features than open_clip
  files, _ = _open_clip_files(tmp_path, **{field: value})
  _cache_model(cache, "org/other-math", files)
  with pytest.raises(UserError) as excinfo:
    init_from.initial_params("hf-hub:org/other-math", _abstract(), _converters())
  _one_line(excinfo, f"{field}={value!r}", "open_clip_config.json")


@pytest.mark.slow
def test_model_config_options_that_keep_the_features_are_honoured(tmp_path, cache):
  # catches: refusing fields that change nothing here, or ignoring GELU's tanh form set by act_kwargs
  tanh = {"approximate": "tanh"}
  changes = {
    "vision_cfg.act_kwargs": tanh,
    "text_cfg.act_kwargs": tanh,
    "vision_cfg.final_ln_after_pool": True,  # the identity where the class token is pooled
    "vision_cfg.output_tokens": True,
    "vision_cfg.patch_dropout": 0.5,  # training only
    "text_cfg.eos_id": 49407,
    "text_cfg.pad_id": 0,
    "nonscalar_logit_scale": True,
  }
  files, _ = _open_clip_files(tmp_path, **changes)
  _cache_model(cache, "org/tanh", files)
  arch = clip_weights.open_clip_architecture("hf-hub:org/tanh")
  assert arch == dataclasses.replace(CFG, activation="gelu_tanh", scan=arch.scan)
  params = init_from.initial_params("hf-hub:org/tanh", _abstract(arch), _converters(arch))
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
  tokens = jnp.asarray([[5, 6, 63, 0, 0, 0, 0, 0], [7, 63, 0, 0, 0, 0, 0, 0]], jnp.int32)
  features = {
    act: CLIP(dataclasses.replace(arch, activation=act)).apply({"params": params}, images, tokens)[:2]
    for act in ("gelu_tanh", "gelu")
  }
  assert np.abs(features["gelu_tanh"][0] - features["gelu"][0]).max() > 1e-6  # the option matters (~1e-4 here)


def test_a_file_without_model_config_imports_as_before(tmp_path):
  # catches: the model-config checks demanding a JSON that plain open_clip:FILE imports never had
  _, path = _open_clip_files(tmp_path)
  path.with_suffix(".json").unlink()
  cfg, _ = oc.load_open_clip(path)
  heads = dataclasses.replace(CFG.vision, heads=1), dataclasses.replace(CFG.text, heads=1)  # width // 64, as before
  assert (cfg.vision, cfg.text, cfg.activation) == (*heads, "gelu")


def _tiny_bert_files():
  """{name: bytes} of a sentence-transformers repo of a random 1-layer BERT with its own tiny WordPiece
  tokenizer.json (as sentence-transformers/all-MiniLM-L6-v2 is laid out)."""
  import tempfile

  from safetensors.numpy import save_file
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

  from multimodal_jax.text import minilm

  words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "photo", "of", "digit", "zero", "one", "two", "##s"]
  vocab = {w: i for i, w in enumerate(words)}
  tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.post_processor = processors.TemplateProcessing(
    single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
  )
  hf = {"model_type": "bert", "vocab_size": len(words), "hidden_size": 16, "num_hidden_layers": 1}
  hf.update(num_attention_heads=2, intermediate_size=24, max_position_embeddings=16)
  rng = np.random.default_rng(0)
  state = {
    k: rng.normal(0, 0.2, shape).astype(np.float32) for k, shape, _, _ in minilm._mapping(minilm.config_from_hf(hf))
  }
  with tempfile.TemporaryDirectory() as folder:
    tok.save(os.path.join(folder, "tokenizer.json"))
    save_file(state, os.path.join(folder, "model.safetensors"))
    files = {n: pathlib.Path(folder, n).read_bytes() for n in ("tokenizer.json", "model.safetensors")}
  files["config.json"] = json.dumps(hf).encode()
  files["sentence_bert_config.json"] = json.dumps({"max_seq_length": 12}).encode()
  modules = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
  ]
  files["modules.json"] = json.dumps(modules).encode()
  files["1_Pooling/config.json"] = json.dumps({"pooling_mode_mean_tokens": True}).encode()
  return files


def test_sentence_transformers_snapshot_resolves_for_minilm(cache):
  # catches: minilm sources not taking Hub names, or a sentence-transformers snapshot taken for another kind
  from multimodal_jax.text import minilm

  snapshot = _cache_model(cache, "sentence-transformers/tiny-minilm", _tiny_bert_files())
  source = "hf-hub:sentence-transformers/tiny-minilm"
  assert hf_hub.resolve(source, ("open_clip", "minilm")) == ("minilm", str(snapshot))
  minilm.check_pooling(source)
  cfg, params, tokenizer = minilm.load_minilm(source)
  cfg_dir, params_dir, _ = minilm.load_minilm(str(snapshot))
  assert cfg == cfg_dir and cfg.hidden == 16 and tokenizer.context_length == 12
  jax.tree.map(np.testing.assert_array_equal, params, params_dir)
  # init_from=hf-hub:... of a CLIP run: the locked MiniLM is read by the experiment from
  # config.source_path; where that takes no Hub names, the run is refused rather than silently
  # reading the package's MiniLM
  if source_path(source, "minilm") is None:
    with pytest.raises(UserError) as excinfo:
      init_from.initial_params(source, _abstract(), _converters())
    _one_line(excinfo, f"--config.init_from=minilm:{source}")
  else:
    assert init_from.initial_params(source, _abstract(), _converters()) is None


def test_diffusers_pipeline_snapshot_resolves_its_vae(tmp_path, cache):
  # catches: a pipeline repo not resolving to its vae/ folder for diffusers_vae sources
  from multimodal_jax.latent_diffusion import diffusers_vae
  from multimodal_jax.latent_diffusion.autoencoder_kl import PRESETS

  config = PRESETS["digits"]
  params = {}
  for path, shape in diffusers_vae.expected_shapes(config).items():  # random params of the VAE's shapes
    node = params
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = jax.ShapeDtypeStruct(shape, np.float32)
  params = _random_tree(params, 0)
  diffusers_vae.save_diffusers_vae(tmp_path / "vae", params, config)
  files = {f"vae/{n}": (tmp_path / "vae" / n).read_bytes() for n in os.listdir(tmp_path / "vae")}
  files["model_index.json"] = json.dumps({"_class_name": "StableDiffusionPipeline"}).encode()
  snapshot = _cache_model(cache, "org/tiny-pipeline", files)
  assert hf_hub.resolve("hf-hub:org/tiny-pipeline", ("diffusers_vae",)) == ("diffusers_vae", str(snapshot / "vae"))
  loaded_config, loaded = diffusers_vae.load_diffusers_vae("hf-hub:org/tiny-pipeline")
  assert loaded_config == config
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  # the same snapshot given to CLIP's init_from: one line naming what it holds and what the key reads
  with pytest.raises(UserError) as excinfo:
    init_from.initial_params("hf-hub:org/tiny-pipeline", _abstract(), _converters())
  _one_line(excinfo, "holds a diffusers AutoencoderKL folder", "reads an open_clip checkpoint or")


def test_bare_hub_name_is_the_run_architecture(tmp_path, cache):
  # catches: a bare `init_from=hf-hub:ORG/NAME` of a CLIP run not taken as open_clip weights (the run would
  # train the preset from scratch, or read its architecture from the wrong place)
  from multimodal_jax.clip import config as clip_config
  from multimodal_jax.clip import settings as clip_settings
  from multimodal_jax.config import apply_overrides

  files, path = _open_clip_files(tmp_path)
  _cache_model(cache, "org/tiny-clip", files)
  config = apply_overrides(clip_config.get_config(), ["init_from=hf-hub:org/tiny-clip", "dataset=csv:x.tsv"])
  settings = clip_settings.resolve(config)
  assert settings.from_open_clip and settings.model_name == "init_from" and settings.image_tower == "vit"
  architecture = clip_weights.open_clip_architecture(str(path))
  assert clip_weights.open_clip_architecture(settings.open_clip_file) == architecture
  assert settings.model.vision == architecture.vision and settings.context_length == architecture.text.context_length
