"""open_clip -> multimodal_jax CLIP weight import: parity with open_clip on random small models, the
file formats, and the errors for mismatched or unsupported state dicts."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from multimodal_jax.clip import open_clip as convert
from multimodal_jax.clip.model import CLIP, ClipConfig, TextConfig, VisionConfig

try:  # the reference implementation, for the parity tests only
  import open_clip
  import torch
except ImportError:
  open_clip = torch = None

# Per test, not for the module: a module-level importorskip hid the converter's error tests, which
# need no PyTorch (their state dicts come from our own export, `_exported_state_dict`).
needs_open_clip = pytest.mark.skipif(
  torch is None, reason="the parity tests need PyTorch and open_clip (pip install torch open_clip_torch)"
)

EOT = 49407  # OpenAI tokenizer: start-of-text 49406, end-of-text 49407 (the largest id), pad 0
# Parity with open_clip: 10x the errors the README states (embeddings within 1.3e-6 relative error, loss
# gradients within 2.6e-6); 1e-4 let a slip of up to ~80x the stated error pass.
EMBED_TOL, GRAD_TOL = 1.3e-5, 2.6e-5
# `_torch_clip()`'s architecture, in our terms: the same tensor names and shapes without torch.
SMALL = ClipConfig(
  embed_dim=64,
  vision=VisionConfig(image_size=32, patch_size=8, width=128, layers=2, heads=2),
  text=TextConfig(vocab_size=49408, context_length=16, width=128, layers=2, heads=2),
)


def _torch_clip(quick_gelu=False, vision_head_width=64, text_heads=2, seed=0):
  """A small random open_clip ViT CLIP (OpenAI vocabulary), every parameter perturbed so that
  biases, LayerNorm gains and the logit scale are not at their initial values."""
  torch.manual_seed(seed)
  model = open_clip.model.CLIP(
    embed_dim=64,
    vision_cfg={"image_size": 32, "patch_size": 8, "width": 128, "layers": 2, "head_width": vision_head_width},
    text_cfg={"context_length": 16, "vocab_size": 49408, "width": 128, "heads": text_heads, "layers": 2},
    quick_gelu=quick_gelu,
  ).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model


@functools.cache
@functools.cache
def _small_state_dict() -> dict:
  """Built once a session (jitted init: eager Flax init of the two towers takes many seconds on CPU);
  callers copy it before they edit it."""
  init = jax.jit(lambda key: CLIP(SMALL).init(key, jnp.zeros((1, 32, 32, 3)), jnp.ones((1, 16), jnp.int32)))
  params = init(jax.random.key(0))["params"]
  unboxed = jax.tree.map(lambda b: b.value if hasattr(b, "names") else b, params, is_leaf=lambda x: hasattr(x, "names"))
  return convert.export_state_dict(unboxed, SMALL)


def _exported_state_dict() -> dict:
  """An open_clip-named state dict of `_torch_clip()`'s architecture (random init), built by our export:
  for the tests of the converter's errors, which need no PyTorch. A fresh dict each call (tests edit it)."""
  return dict(_small_state_dict())


def _inputs(batch=4, seed=0):
  """images `[b, 32, 32, 3]`; tokens `[b, 16]`: ids below 49406, then EOT, then zero padding."""
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(batch, 32, 32, 3)).astype(np.float32)
  tokens = np.zeros((batch, 16), np.int64)
  for i, n in enumerate([16, 2, 9, 5][:batch]):
    tokens[i, : n - 1] = rng.integers(1, 49406, n - 1)
    tokens[i, n - 1] = EOT
  return images, tokens


def _reference(model, images, tokens):
  with torch.no_grad():
    img = model.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2)), normalize=True).numpy()
    txt = model.encode_text(torch.from_numpy(tokens), normalize=True).numpy()
    return img, txt, float(model.logit_scale.exp())


def _ours(cfg, params, images, tokens):
  img, txt, scale, bias = CLIP(cfg).apply({"params": params}, jnp.asarray(images), jnp.asarray(tokens, jnp.int32))
  return np.asarray(img), np.asarray(txt), float(scale), bias


def _rel_err(ours, ref):
  return float(np.max(np.linalg.norm(ours - ref, axis=-1) / np.linalg.norm(ref, axis=-1)))


@needs_open_clip
@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("quick_gelu", [False, True])
def test_embeddings_match_open_clip(scan, quick_gelu):
  model = _torch_clip(quick_gelu=quick_gelu)
  images, tokens = _inputs()
  cfg, params = convert.load_open_clip(model.state_dict(), quick_gelu=quick_gelu, scan=scan)
  v, t = cfg.vision, cfg.text
  assert (v.width, v.layers, v.heads, v.patch_size, v.image_size) == (128, 2, 2, 8, 32)
  assert (t.width, t.layers, t.heads, t.context_length, t.vocab_size) == (128, 2, 2, 16, 49408)
  assert cfg.embed_dim == 64 and cfg.scan == scan
  img, txt, scale, bias = _ours(cfg, params, images, tokens)
  ref_img, ref_txt, ref_scale = _reference(model, images, tokens)
  # catches an import slip (a transposed projection, a LayerNorm eps, the wrong GELU) worth more than rounding
  assert _rel_err(img, ref_img) < EMBED_TOL
  assert _rel_err(txt, ref_txt) < EMBED_TOL
  assert scale == pytest.approx(ref_scale, rel=1e-6) and bias is None
  if quick_gelu:  # the activation is not in the shapes: the wrong one shows
    cfg_wrong, _ = convert.load_open_clip(model.state_dict(), quick_gelu=False, scan=scan)
    assert _rel_err(_ours(cfg_wrong, params, images, tokens)[0], ref_img) > 1e-3


@needs_open_clip
def test_heads_other_than_width_over_64_and_init_matches_our_param_tree():
  model = _torch_clip(vision_head_width=32, text_heads=4, seed=1)
  images, tokens = _inputs(seed=1)
  cfg, params = convert.load_open_clip(model.state_dict(), vision_heads=4, text_heads=4)
  ours_tree = jax.eval_shape(
    lambda: CLIP(cfg).init(jax.random.key(0), jnp.asarray(images[:1]), jnp.asarray(tokens[:1], jnp.int32))
  )["params"]
  from flax import linen as nn

  shapes = lambda tree: jax.tree.map(lambda x: tuple(x.shape), tree)
  assert shapes(nn.meta.unbox(ours_tree)) == shapes(params)
  img, txt, _, _ = _ours(cfg, params, images, tokens)
  ref_img, ref_txt, _ = _reference(model, images, tokens)
  # catches an import slip worth more than rounding (10x the README's 1.3e-6, was 1e-4)
  assert _rel_err(img, ref_img) < EMBED_TOL and _rel_err(txt, ref_txt) < EMBED_TOL
  # Inferring width // 64 heads from the same tensors gives another (wrong) model: heads matter.
  cfg2, params2 = convert.load_open_clip(model.state_dict())
  assert cfg2.vision.heads == 2 and _rel_err(_ours(cfg2, params2, images, tokens)[0], ref_img) > 1e-3


@needs_open_clip
@pytest.mark.parametrize("fmt", ["safetensors", "pt", "training_checkpoint"])
def test_checkpoint_files(tmp_path, fmt):
  model = _torch_clip()
  sd = model.state_dict()
  if fmt == "safetensors":
    from safetensors.numpy import save_file

    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.numpy() for k, v in sd.items()}, str(path))
  elif fmt == "pt":
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(sd, path)
  else:  # what open_clip's trainer writes under DistributedDataParallel
    path = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "name": "run", "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
  cfg, params = convert.load_open_clip(path)
  images, tokens = _inputs()
  img, txt, scale, _ = _ours(cfg, params, images, tokens)
  ref_img, ref_txt, ref_scale = _reference(model, images, tokens)
  # catches an import slip worth more than rounding (10x the README's 1.3e-6, was 1e-4)
  assert _rel_err(img, ref_img) < EMBED_TOL and _rel_err(txt, ref_txt) < EMBED_TOL
  assert scale == pytest.approx(ref_scale, rel=1e-6)


@pytest.mark.slow  # ~45 s under load: two whole-model conversions and applies
def test_openai_marker_entries_select_quick_gelu_and_are_ignored():
  # catches quick_gelu inferred from anything but OpenAI's marker entries (the tensors are the same)
  sd = _exported_state_dict()
  assert convert.load_open_clip(dict(sd))[0].activation != "quick_gelu"
  sd.update(input_resolution=np.int64(32), context_length=np.int64(16), vocab_size=np.int64(49408))
  cfg, _ = convert.load_open_clip(sd)
  assert cfg.activation == "quick_gelu"


@pytest.mark.slow
def test_logit_bias_is_imported():
  sd = _exported_state_dict()
  sd["logit_bias"] = np.float32(-10.0)
  cfg, params = convert.load_open_clip(sd)
  assert cfg.init_logit_bias == -10.0
  images, tokens = _inputs()
  assert float(_ours(cfg, params, images, tokens)[3]) == -10.0


def test_missing_tensor_is_named():
  sd = _exported_state_dict()
  cfg = convert.config_from_state_dict(sd)
  del sd["visual.transformer.resblocks.1.attn.out_proj.bias"]
  del sd["ln_final.bias"]
  with pytest.raises(ValueError, match=r"'visual\.transformer\.resblocks\.1\.attn\.out_proj\.bias'") as e:
    convert.convert_state_dict(sd, cfg)
  assert "\n" not in str(e.value) and "ln_final" not in str(e.value)


def test_mis_shaped_tensor_is_named_with_both_shapes():
  sd = _exported_state_dict()
  cfg = convert.config_from_state_dict(sd)
  sd["transformer.resblocks.0.mlp.c_fc.weight"] = np.zeros((256, 128), np.float32)
  pattern = r"'transformer\.resblocks\.0\.mlp\.c_fc\.weight' has shape \(256, 128\), expected \(512, 128\)"
  with pytest.raises(ValueError, match=pattern) as e:
    convert.convert_state_dict(sd, cfg)
  assert "\n" not in str(e.value)


def test_state_dict_of_another_config_is_rejected():
  small = _exported_state_dict()
  cfg = convert.config_from_state_dict(small, scan=False)
  bigger = dict(
    small, **{k.replace("resblocks.1.", "resblocks.2."): v for k, v in small.items() if ".resblocks.1." in k}
  )
  with pytest.raises(ValueError, match=r"'visual\.transformer\.resblocks\.2\.ln_1\.weight'.*no place"):
    convert.convert_state_dict(bigger, cfg)


def test_unsupported_towers_say_so():
  with pytest.raises(ValueError, match="ModifiedResNet"):
    convert.config_from_state_dict({"visual.layer1.0.conv1.weight": np.zeros((64, 64, 1, 1)), "logit_scale": 1.0})
  sd = _exported_state_dict()
  sd["visual.transformer.resblocks.0.ls_1.gamma"] = np.ones(128, np.float32)
  with pytest.raises(ValueError, match=r"ls_1\.gamma.*not supported"):
    convert.load_open_clip(sd)


@needs_open_clip
@pytest.mark.parametrize("scan", [True, False])
def test_gradients_match_open_clip(scan):
  """The whole backward pass (custom VJPs of attention, GELU and projections included) against
  torch autograd: the CLIP loss's gradients, mapped by the converter like weights, agree."""
  from open_clip.loss import ClipLoss

  from multimodal_jax.clip import losses

  model = _torch_clip(seed=2)
  images, tokens = _inputs(seed=2)
  model.zero_grad()
  img, txt, scale = model(torch.from_numpy(images.transpose(0, 3, 1, 2)), torch.from_numpy(tokens))
  ClipLoss()(img, txt, scale).backward()
  torch_grads = {k: p.grad for k, p in model.named_parameters()}
  cfg, params = convert.load_open_clip(model.state_dict(), scan=scan)

  def loss_fn(p):
    i, t, s, _ = CLIP(cfg).apply({"params": p}, jnp.asarray(images), jnp.asarray(tokens, jnp.int32))
    return losses.clip_softmax_loss(i, t, s)

  ours = jax.grad(loss_fn)(jax.tree.map(jnp.asarray, params))
  ref = convert.convert_state_dict(torch_grads, cfg)
  errors = jax.tree.map(lambda a, b: float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-12)), ours, ref)
  worst = max(jax.tree.leaves(errors))
  # catches a backward-pass slip (a custom VJP off by a small term): 10x the README's 2.6e-6, was 1e-4
  assert worst < GRAD_TOL, errors


@needs_open_clip
def test_full_size_vit_b_32_architecture():
  """open_clip's own ViT-B-32 config (randomly initialised, nothing downloaded): shapes -> config."""
  model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
  cfg, params = convert.load_open_clip(model.state_dict())
  v, t = cfg.vision, cfg.text
  assert (v.image_size, v.patch_size, v.width, v.layers, v.heads) == (224, 32, 768, 12, 12)
  assert (t.context_length, t.vocab_size, t.width, t.layers, t.heads, cfg.embed_dim) == (77, 49408, 512, 12, 8, 512)
  images = np.random.default_rng(0).normal(size=(2, 224, 224, 3)).astype(np.float32)
  tokens = np.zeros((2, 77), np.int64)
  tokens[0, :5] = [49406, 320, 1125, 539, EOT]
  tokens[1, :4] = [49406, 320, 1929, EOT]
  img, txt, _, _ = _ours(cfg, params, images, tokens)
  ref_img, ref_txt, _ = _reference(model, images, tokens)
  # catches an import slip worth more than rounding (10x the README's 1.3e-6, was 1e-4)
  assert _rel_err(img, ref_img) < EMBED_TOL and _rel_err(txt, ref_txt) < EMBED_TOL
