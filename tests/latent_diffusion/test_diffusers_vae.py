"""Export of the autoencoder to a diffusers AutoencoderKL folder: ours -> folder -> ours is the
identity, and (with the parity extra) diffusers loads the folder and decodes as we do."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from multimodal_jax.latent_diffusion import diffusers_vae
from multimodal_jax.latent_diffusion.autoencoder_kl import PRESETS, AutoencoderKL

CONFIG = dataclasses.replace(PRESETS["digits"], scaling_factor=0.7, shift_factor=0.1)


def _params(seed=0):
  x = jnp.zeros((1, 8, 8, CONFIG.in_channels))
  params = jax.tree.map(np.asarray, jax.jit(AutoencoderKL(CONFIG).init)(jax.random.key(seed), x)["params"])
  params = jax.tree.map(lambda b: b.value if hasattr(b, "names") else b, params, is_leaf=lambda b: hasattr(b, "names"))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: (a + 0.05 * rng.normal(size=a.shape)).astype(np.float32), params)


@pytest.mark.slow  # ~85 s under load: a diffusers-layout save and load of a whole VAE
def test_save_then_load_is_the_identity(tmp_path):
  params = _params()
  diffusers_vae.save_diffusers_vae(tmp_path / "vae", params, CONFIG)
  config, loaded = diffusers_vae.load_diffusers_vae(tmp_path / "vae")
  assert config == CONFIG
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_diffusers_decodes_the_exported_folder_as_we_do(tmp_path):
  torch = pytest.importorskip("torch", reason="the comparison with diffusers needs the parity extra")
  diffusers = pytest.importorskip("diffusers", reason="the comparison with diffusers needs the parity extra")
  params = _params()
  diffusers_vae.save_diffusers_vae(tmp_path / "vae", params, CONFIG)
  model = diffusers.AutoencoderKL.from_pretrained(str(tmp_path / "vae")).eval()
  z = np.random.default_rng(1).normal(size=(2, 4, 4, CONFIG.latent_channels)).astype(np.float32)
  with torch.no_grad():
    ref = model.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample.numpy().transpose(0, 2, 3, 1)
  ours = AutoencoderKL(CONFIG).apply({"params": params}, jnp.asarray(z), method=AutoencoderKL.decode)
  np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-4)
