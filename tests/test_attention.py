"""Attention implementations agree: values and gradients of `attention.dot_product_attention` and of the
modules built on it, for every implementation the CPU has (cpu, einsum, xla); the Transformer's
options change how it computes, not what."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from multimodal_jax import attention, layers
from multimodal_jax.clip import model as clip
from multimodal_jax.errors import UserError
from multimodal_jax.latent_diffusion import dit

CPU_IMPLEMENTATIONS = ("cpu", "einsum", "xla")
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def _qkv(t=7, s=7, b=2, n=3, h=8, dtype=jnp.float32, seed=0):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(kq, (b, t, n, h), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (b, s, n, h), jnp.float32).astype(dtype)
  v = jax.random.normal(kv, (b, s, n, h), jnp.float32).astype(dtype)
  return q, k, v


def _reference(q, k, v, mask=None, is_causal=False):
  """Float64 numpy attention; rows without a valid key give zeros."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  valid = np.ones(logits.shape, bool)
  if mask is not None:
    valid &= np.asarray(mask)[:, None, None, :] if np.ndim(mask) == 2 else np.asarray(mask)
  if is_causal:
    valid &= np.tril(np.ones(logits.shape[-2:], bool))
  logits = np.where(valid, logits, -np.inf)
  top = np.max(logits, axis=-1, keepdims=True)
  e = np.where(valid, np.exp(logits - np.where(np.isfinite(top), top, 0)), 0)
  probs = e / np.maximum(e.sum(-1, keepdims=True), 1e-300)
  return np.einsum("bnts,bsnh->btnh", probs, v)


def _value_and_grads(impl, q, k, v, **kw):
  def f(q, k, v):
    out = attention.dot_product_attention(q, k, v, implementation=impl, **kw)
    return jnp.sum(out.astype(jnp.float32) * jnp.cos(jnp.arange(out.size).reshape(out.shape))), out

  (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


CASES = {
  "self": {"t": 9, "s": 9},
  "causal": {"t": 9, "s": 9, "is_causal": True},
  "masked": {"t": 9, "s": 9, "mask": True},
  "cross": {"t": 6, "s": 11, "mask": True},
  "cross_causal": {"t": 6, "s": 11, "is_causal": True},
}


# The fast subset keeps the float32 self-attention cases and bfloat16 with padding; the rest are `slow`.
FAST_ATTENTION = {("self", "f32"), ("causal", "f32"), ("masked", "f32"), ("masked", "bf16")}


@pytest.mark.parametrize(
  "case,dtype",
  [
    pytest.param(c, d, marks=() if (c, n) in FAST_ATTENTION else (pytest.mark.slow,), id=f"{c}-{n}")
    for c in CASES
    for d, n in ((jnp.float32, "f32"), (jnp.bfloat16, "bf16"))
  ],
)
def test_implementations_agree_in_values_and_gradients(case, dtype):
  spec = dict(CASES[case])
  q, k, v = _qkv(spec.pop("t"), spec.pop("s"), dtype=dtype)
  kw = {"is_causal": spec.get("is_causal", False)}
  if spec.get("mask"):
    mask = np.ones((q.shape[0], k.shape[1]), bool)
    mask[0, 3:] = False  # padding after three keys
    mask[1, ::2] = False  # holes
    kw["mask"] = jnp.asarray(mask)
  ref = _reference(q, k, v, kw.get("mask"), kw["is_causal"])
  results = {impl: _value_and_grads(impl, q, k, v, **kw) for impl in CPU_IMPLEMENTATIONS}
  tol = TOL[dtype]
  for impl, (out, grads) in results.items():
    assert out.dtype == dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=tol * 4, rtol=tol * 4, err_msg=impl)
    for name, g, g_ref in zip("qkv", grads, results["einsum"][1], strict=True):
      assert np.isfinite(np.asarray(g, np.float32)).all(), (impl, name)
      np.testing.assert_allclose(
        np.asarray(g, np.float32), np.asarray(g_ref, np.float32), atol=tol * 4, rtol=tol * 4, err_msg=f"{impl} d{name}"
      )


@pytest.mark.slow
@pytest.mark.parametrize("impl", CPU_IMPLEMENTATIONS)
def test_a_query_without_valid_keys_gets_zeros_and_zero_gradients(impl):
  q, k, v = _qkv(t=4, s=5)
  mask = np.ones((2, 1, 4, 5), bool)
  mask[0, :, 1] = False  # query 1 of example 0 sees nothing
  out, (dq, dk, _dv) = _value_and_grads(impl, q, k, v, mask=jnp.asarray(mask))
  np.testing.assert_array_equal(np.asarray(out[0, 1]), 0.0)
  np.testing.assert_array_equal(np.asarray(dq[0, 1]), 0.0)
  assert np.abs(np.asarray(out[0, 0])).sum() > 0 and np.isfinite(np.asarray(dk)).all()
  np.testing.assert_allclose(np.asarray(out), _reference(q, k, v, mask), atol=1e-5)


@pytest.mark.slow
def test_self_attention_module_is_the_same_function_under_every_implementation():
  x = jax.random.normal(jax.random.key(1), (2, 10, 32))
  params = attention.SelfAttention(4, causal=True).init(jax.random.key(2), x)
  outs = {
    impl: attention.SelfAttention(4, causal=True, implementation=impl).apply(params, x) for impl in CPU_IMPLEMENTATIONS
  }
  for impl, out in outs.items():
    np.testing.assert_allclose(out, outs["einsum"], atol=2e-5, err_msg=impl)
  mask = jnp.asarray(np.arange(10)[None] < np.array([[10], [6]]))
  masked = {
    impl: attention.SelfAttention(4, implementation=impl).apply(params, x, mask) for impl in CPU_IMPLEMENTATIONS
  }
  for impl, out in masked.items():
    np.testing.assert_allclose(out, masked["einsum"], atol=2e-5, err_msg=impl)
  # a key mask changes the output of the rows it applies to, not of the others
  plain = attention.SelfAttention(4, implementation="einsum").apply(params, x)
  np.testing.assert_allclose(masked["einsum"][0], plain[0], atol=2e-5)
  assert np.abs(np.asarray(masked["einsum"][1] - plain[1])).max() > 1e-3


def test_auto_keeps_the_cpu_kernel_on_cpu():
  assert attention.attention_implementation("auto") == "cpu"
  assert attention.attention_implementation(None, jnp.bfloat16) == "cpu"
  assert attention.attention_implementation("auto", self_attention=False) == "einsum"
  assert attention.attention_implementation("xla") == "xla"


def test_bad_attention_names_are_user_errors():
  with pytest.raises(UserError, match="choose one of"):
    attention.attention_implementation("flash")
  with pytest.raises(UserError, match="needs an NVIDIA GPU"):
    attention.attention_implementation("cudnn")


def _tiny_clip(implementation):
  return clip.CLIP(clip.ClipConfig(attention=implementation))


@pytest.mark.slow
def test_clip_towers_agree_across_implementations():
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  tokens = jnp.asarray([[5, 6, 7, 0] + [0] * 12, [9] * 16], jnp.int32)
  params = jax.jit(_tiny_clip("auto").init)(jax.random.key(1), images, tokens)
  ref = jax.jit(_tiny_clip("einsum").apply)(params, images, tokens)
  for impl in ("auto", "xla"):
    out = jax.jit(_tiny_clip(impl).apply)(params, images, tokens)
    for a, b in zip(out[:2], ref[:2], strict=True):
      np.testing.assert_allclose(a, b, atol=1e-5, err_msg=impl)


@pytest.mark.slow
def test_dit_self_and_cross_attention_agree_across_implementations():
  cfg = dit.dit_config("tiny", depth=2)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  t = jnp.asarray([3, 500])
  ctx = jax.random.normal(jax.random.key(1), (2, 5, cfg.context_dim))
  cmask = jnp.asarray([[True, True, False, False, False], [False] * 5])
  params = jax.jit(dit.DiT(cfg).init)(jax.random.key(2), x, t, ctx, cmask)
  # adaLN-zero makes the blocks identities at init: perturb every parameter so attention matters
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  params = jax.tree.unflatten(treedef, [p + 0.05 * jax.random.normal(kk, p.shape) for p, kk in zip(leaves, keys)])
  outs = {}
  for impl in ("auto", "einsum", "xla"):
    model = dit.DiT(dit.dit_config("tiny", depth=2, attention=impl))
    outs[impl] = jax.jit(model.apply)(params, x, t, ctx, cmask)
  assert np.abs(np.asarray(outs["einsum"])).max() > 1e-2
  for impl, out in outs.items():
    np.testing.assert_allclose(out, outs["einsum"], atol=2e-5, rtol=1e-4, err_msg=impl)


def _restacked(params, layers_):
  """Scanned Transformer params (`blocks`, leading [layers] axis) as the unscanned `block_{i}` tree."""
  blocks = params["params"]["blocks"]
  return {"params": {f"block_{i}": jax.tree.map(lambda a, i=i: a[i], blocks) for i in range(layers_)}}


@pytest.mark.slow  # ~75 s under load: compiles of every transformer option
def test_transformer_options_change_the_computation_not_the_function():
  x = jax.random.normal(jax.random.key(0), (2, 6, 32))
  options = layers.TransformerOptions(activation="quick_gelu")
  model = layers.Transformer(3, 4, causal=True, options=options)
  params = jax.tree.map(lambda a: a + 0.1, nn.meta.unbox(model.init(jax.random.key(1), x)))  # nonzero biases
  loss = lambda m, p: jnp.mean(m.apply(p, x) ** 2)
  ref, ref_grad = loss(model, params), jax.grad(lambda p: loss(model, p))(params)
  remat = layers.Transformer(3, 4, causal=True, options=layers.TransformerOptions("quick_gelu", remat=True, unroll=1))
  np.testing.assert_allclose(loss(remat, params), ref, rtol=1e-5)
  # a gradient leaf sums over the batch, positions and layers: recomputed in the backward pass (remat), its float32
  # sums differ by ~1e-7 of the leaf's largest |value| (measured 3.2e-6 on 0.18 in a leaf reaching 18), not of each element
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=max(1e-6, 1e-6 * float(np.abs(b).max())))
  jax.tree.map(close, jax.grad(lambda p: loss(remat, p))(params), ref_grad)
  unscanned = layers.Transformer(3, 4, causal=True, options=layers.TransformerOptions("quick_gelu", scan=False))
  flat = _restacked(params, 3)
  assert jax.tree.structure(flat) == jax.tree.structure(nn.meta.unbox(unscanned.init(jax.random.key(1), x)))
  np.testing.assert_allclose(loss(unscanned, flat), ref, rtol=1e-5)
  # the activation is part of the function: another one gives other values
  tanh = layers.Transformer(3, 4, causal=True, options=layers.TransformerOptions("gelu_tanh"))
  assert abs(float(loss(tanh, params) - ref)) > 1e-3 * abs(float(ref))


def test_transformer_dtype_option_computes_projections_in_that_dtype():
  # Catches a dtype option that is dropped (b equal to a) or that changes the params' dtype or tree.
  x = jax.random.normal(jax.random.key(0), (2, 6, 32))
  f32 = layers.Transformer(2, 4)
  bf16 = layers.Transformer(2, 4, options=layers.TransformerOptions(dtype=jnp.bfloat16))
  params = nn.meta.unbox(jax.jit(f32.init)(jax.random.key(1), x))  # jitted: eager Flax is slow on CPU
  bf16_params = nn.meta.unbox(jax.jit(bf16.init)(jax.random.key(1), x))
  assert jax.tree.structure(bf16_params) == jax.tree.structure(params)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(bf16_params))
  a, b = jax.jit(f32.apply)(params, x), jax.jit(bf16.apply)(params, x)
  np.testing.assert_allclose(b.astype(jnp.float32), a, atol=0.1)  # the same function, rounded to bfloat16
  assert not np.allclose(b.astype(jnp.float32), a, atol=1e-4)  # which it was
