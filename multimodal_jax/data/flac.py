"""A small FLAC decoder in NumPy, for the sonic-pi samples (no FLAC decoder is a dependency).

Format: https://xiph.org/flac/format.html. Rice codes are parsed with vectorised look-ups over the
positions of the 1 bits; the linear predictors of all subframes of a file are run together, one
sample index at a time. `read_flac(path)` -> (float32 `[n, channels]`, sample rate).
"""

import hashlib
import math

import numpy as np

_FIXED_COEFS = ((), (1,), (2, -1), (3, -3, 1), (4, -6, 4, -1))
_MAX_LPC_ORDER = 32


class _Bits:
  """A FLAC file as an array of bits with a read position."""

  def __init__(self, data: bytes):
    self.bits = np.unpackbits(np.frombuffer(data, np.uint8))
    self.ones = np.flatnonzero(self.bits)
    self.pos = 0

  def uint(self, n: int) -> int:
    value = 0
    for b in self.bits[self.pos : self.pos + n].tolist():
      value = (value << 1) | b
    self.pos += n
    return value

  def sint(self, n: int) -> int:
    value = self.uint(n)
    return value - (1 << n) if n and value >> (n - 1) else value

  def sints(self, count: int, n: int) -> np.ndarray:
    """`count` signed `n`-bit integers, int64 `[count]`."""
    if count == 0 or n == 0:
      self.pos += count * n
      return np.zeros(count, np.int64)
    chunk = self.bits[self.pos : self.pos + count * n].reshape(count, n).astype(np.int64)
    self.pos += count * n
    values = chunk @ (1 << np.arange(n - 1, -1, -1, dtype=np.int64))
    return np.where(values >> (n - 1) == 1, values - (1 << n), values)

  def unary(self) -> int:
    start = self.pos
    self.pos = int(self.ones[np.searchsorted(self.ones, start)]) + 1
    return self.pos - 1 - start

  def rice(self, count: int, k: int) -> np.ndarray:
    """`count` Rice-coded signed integers with parameter k, int64 `[count]`."""
    if count == 0:
      return np.zeros(0, np.int64)
    a = int(np.searchsorted(self.ones, self.pos))
    window = self.ones[a : a + count * (k + 1)]
    if k == 0:
      stops = window[:count]
    else:
      # The next stop after a stop is the first 1 past its k remainder bits. Follow that chain
      # from the first stop by doubling: orbit[m:2m] = jump^m(orbit[:m]).
      jump = np.append(np.searchsorted(window, window + 1 + k), len(window))
      index = np.zeros(1, np.int64)
      while len(index) < count:
        index = np.concatenate([index, jump[index]])
        jump = jump[jump]
      stops = window[index[:count]]
    starts = np.concatenate([[self.pos], stops[:-1] + 1 + k])
    quotient = (stops - starts).astype(np.int64)
    if k:
      rest = self.bits[(stops + 1)[:, None] + np.arange(k)].astype(np.int64)
      remainder = rest @ (1 << np.arange(k - 1, -1, -1, dtype=np.int64))
    else:
      remainder = 0
    self.pos = int(stops[-1]) + 1 + k
    folded = (quotient << k) | remainder
    return (folded >> 1) ^ -(folded & 1)


def _residual(bits: _Bits, block: int, order: int) -> np.ndarray:
  method = bits.uint(2)
  param_bits = 4 if method == 0 else 5
  partition_order = bits.uint(4)
  parts = []
  for p in range(1 << partition_order):
    count = (block >> partition_order) - (order if p == 0 else 0)
    k = bits.uint(param_bits)
    if k == (1 << param_bits) - 1:  # Escape: raw signed samples.
      parts.append(bits.sints(count, bits.uint(5)))
    else:
      parts.append(bits.rice(count, k))
  return np.concatenate(parts)


def _predict(warm: list, coefs: list, shifts: list, residuals: list, block: int) -> np.ndarray:
  """Runs the linear predictors of several subframes of one block size together.

  Returns int64 `[len(warm), block]`: sample i >= order is residual + (sum_j coef_j * s[i-1-j] >>
  shift); the first `order` samples are the warm-up samples.
  """
  n = len(warm)
  orders = np.array([len(w) for w in warm])
  c = np.zeros((n, _MAX_LPC_ORDER), np.int64)
  out = np.zeros((n, _MAX_LPC_ORDER + block), np.int64)
  res = np.zeros((n, block), np.int64)
  for r in range(n):
    c[r, : orders[r]] = coefs[r]
    out[r, _MAX_LPC_ORDER : _MAX_LPC_ORDER + orders[r]] = warm[r]
    res[r, orders[r] :] = residuals[r]
  c = c[:, ::-1]  # c[:, -1] multiplies the previous sample.
  shift = np.asarray(shifts, np.int64)
  for i in range(orders.min(), block):
    pred = (out[:, i : i + _MAX_LPC_ORDER] * c).sum(axis=1) >> shift
    value = res[:, i] + pred
    out[:, _MAX_LPC_ORDER + i] = np.where(i >= orders, value, out[:, _MAX_LPC_ORDER + i])
  return out[:, _MAX_LPC_ORDER:]


def read_flac(path: str, verify: bool = False, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
  """Decodes a FLAC file.

  Args:
    path: the file.
    verify: check the decoded samples against the MD5 signature of the stream header.
    max_seconds: stop after the frame that reaches this duration (the result may be a little
      longer); None decodes everything. Cannot be combined with verify.

  Returns:
    float32 `[n, channels]` in [-1, 1) and the sample rate.
  """
  with open(path, "rb") as f:
    data = f.read()
  if data[:4] != b"fLaC":
    raise ValueError(f"{path}: not a FLAC file")
  pos, last = 4, False
  while not last:
    last, kind, length = data[pos] >> 7, data[pos] & 0x7F, int.from_bytes(data[pos + 1 : pos + 4], "big")
    if kind == 0:
      info = int.from_bytes(data[pos + 4 : pos + 4 + 34], "big")
      rate = (info >> 172) & 0xFFFFF
      depth = ((info >> 164) & 0x1F) + 1
      md5 = data[pos + 4 + 18 : pos + 4 + 34]
    pos += 4 + length
  bits = _Bits(data)
  bits.pos = pos * 8
  frames, groups = [], {}  # groups: block size -> ([warm], [coefs], [shift], [residual], [(frame, channel)])
  end = len(data) * 8
  limit, decoded = (math.inf if max_seconds is None else max_seconds * rate), 0
  while bits.pos + 16 < end and decoded < limit:
    if bits.uint(14) != 0x3FFE:
      raise ValueError(f"{path}: lost frame sync at byte {bits.pos // 8}")
    bits.uint(2)
    block_code, rate_code, assignment, size_code = bits.uint(4), bits.uint(4), bits.uint(4), bits.uint(3)
    bits.uint(1)
    first = bits.uint(8)  # UTF-8 coded frame number: skip its continuation bytes.
    bits.uint(8 * (max(0, bin(first).index("0", 2) - 3) if first >= 0xC0 else 0))
    if block_code == 1:
      block = 192
    elif 2 <= block_code <= 5:
      block = 576 << (block_code - 2)
    elif block_code == 6:
      block = bits.uint(8) + 1
    elif block_code == 7:
      block = bits.uint(16) + 1
    else:
      block = 256 << (block_code - 8)
    bits.uint({12: 8, 13: 16, 14: 16}.get(rate_code, 0))
    bits.uint(8)  # CRC-8
    bps = {0: depth, 1: 8, 2: 12, 4: 16, 5: 20, 6: 24, 7: 32}[size_code]
    n_channels = assignment + 1 if assignment < 8 else 2
    subframes = []
    for ch in range(n_channels):
      width = bps + (1 if (assignment in (8, 10) and ch == 1) or (assignment == 9 and ch == 0) else 0)
      bits.uint(1)
      kind = bits.uint(6)
      wasted = bits.unary() + 1 if bits.uint(1) else 0
      width -= wasted
      if kind == 0:
        subframes.append((np.full(block, bits.sint(width), np.int64), wasted))
      elif kind == 1:
        subframes.append((bits.sints(block, width), wasted))
      else:
        if 8 <= kind <= 12:
          order = kind - 8
          warm = bits.sints(order, width)
          coefs, shift = _FIXED_COEFS[order], 0
        elif kind >= 32:
          order = kind - 31
          warm = bits.sints(order, width)
          precision = bits.uint(4) + 1
          shift = bits.sint(5)
          coefs = bits.sints(order, precision).tolist()
        else:
          raise ValueError(f"{path}: reserved subframe type {kind}")
        group = groups.setdefault(block, ([], [], [], [], []))
        for store, value in zip(group, (warm, coefs, shift, _residual(bits, block, order), (len(frames), ch))):
          store.append(value)
        subframes.append((None, wasted))
    bits.pos = (bits.pos + 7) // 8 * 8 + 16  # Byte padding, CRC-16.
    frames.append((assignment, subframes))
    decoded += block
  for block, (warm, coefs, shifts, residuals, where) in groups.items():
    for samples, (f, ch) in zip(_predict(warm, coefs, shifts, residuals, block), where):
      frames[f][1][ch] = (samples, frames[f][1][ch][1])
  out = []
  for assignment, subframes in frames:
    a, b = (s << w for s, w in subframes[:2]) if assignment >= 8 else (None, None)
    if assignment == 8:
      chans = [a, a - b]
    elif assignment == 9:
      chans = [a + b, b]
    elif assignment == 10:
      mid = (a << 1) | (b & 1)
      chans = [(mid + b) >> 1, (mid - b) >> 1]
    else:
      chans = [s << w for s, w in subframes]
    out.append(np.stack(chans, axis=1))
  samples = np.concatenate(out)
  if verify:
    if max_seconds is not None:
      raise ValueError("verify needs the whole file: leave max_seconds at None")

    width = (depth + 7) // 8
    raw = samples.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :width].tobytes()
    if hashlib.md5(raw).digest() != md5:
      raise ValueError(f"{path}: decoded samples do not match the MD5 signature")
  return (samples / float(1 << (depth - 1))).astype(np.float32), rate
