"""multimodal_jax: multimodal learning in JAX/Flax (fusion, AVDCNN, latent diffusion, CLIP)."""

__version__ = "0.1.0"
