"""Noise for AV-digits and AVDCNN: real music and samples, synthetic white, pink, babble, street noise.

Real music: the 8 kHz on-hold music tracks of the Debian package
`asterisk-moh-opsound-wav` (`/usr/share/asterisk/moh/*.wav`); real samples
(ambient textures, drums, tabla, electronic sounds): the 44.1 kHz FLAC files of
the Debian package `sonic-pi-samples`, read by the NumPy FLAC decoder below.
The AV-digits helpers work at 8 kHz; white, pink, babble and the AVDCNN helpers
at any rate.
"""

import hashlib
import math
import os

import numpy as np
from scipy import signal

from multimodal_jax import audio as audio_lib
from multimodal_jax.data import digit_sources

ASTERISK_MOH_DIR = "/usr/share/asterisk/moh"
MUSIC_TRACKS = (
  "macroform-cold_day",
  "macroform-robot_dity",
  "macroform-the_simplicity",
  "manolo_camp-morning_coffee",
  "reno_project-system",
)


def music_files() -> tuple[str, ...]:
  """Paths of the music tracks (they may not exist)."""
  return tuple(os.path.join(ASTERISK_MOH_DIR, f"{t}.wav") for t in MUSIC_TRACKS)


def load_music(tracks: tuple[str, ...]) -> np.ndarray:
  """Concatenates the named tracks (names from MUSIC_TRACKS).

  Returns:
    float32 `[n]` at 8 kHz, zero mean, unit RMS.
  """
  parts = [digit_sources.read_wav(os.path.join(ASTERISK_MOH_DIR, f"{t}.wav")) for t in tracks]
  x = np.concatenate(parts)
  x = x - x.mean()
  return (x / (x.std() + 1e-9)).astype(np.float32)


def white_noise(rng: np.random.Generator, n: int) -> np.ndarray:
  """Gaussian white noise, float32 `[n]`, unit RMS."""
  return rng.standard_normal(n).astype(np.float32)


def pink_noise(rng: np.random.Generator, n: int) -> np.ndarray:
  """1/f (pink) noise by spectral shaping, float32 `[n]`, unit RMS."""
  spectrum = np.fft.rfft(rng.standard_normal(n))
  f = np.arange(len(spectrum), dtype=np.float64)
  f[0] = 1.0
  x = np.fft.irfft(spectrum / np.sqrt(f), n)
  x -= x.mean()
  return (x / (x.std() + 1e-9)).astype(np.float32)


def babble(rng: np.random.Generator, talkers: list[np.ndarray], n: int) -> np.ndarray:
  """Sum of several speech clips at random offsets (crowd-like noise).

  Args:
    rng: random generator.
    talkers: float `[m_i]` clips, each placed (cyclically) at a random offset.
    n: output length in samples.

  Returns:
    float32 `[n]`, unit RMS.
  """
  out = np.zeros(n, np.float64)
  for clip in talkers:
    clip = rng.uniform(0.5, 1.0) * clip[:n]
    start = int(rng.integers(0, n))
    head = min(len(clip), n - start)
    out[start : start + head] += clip[:head]
    out[: len(clip) - head] += clip[head:]
  return (out / (out.std() + 1e-9)).astype(np.float32)


def random_segment(rng: np.random.Generator, source: np.ndarray, n: int) -> np.ndarray:
  """A random length-n window of `source` (float `[m]`, m >= n), unit RMS."""
  start = int(rng.integers(0, len(source) - n + 1))
  x = source[start : start + n]
  return (x / (x.std() + 1e-9)).astype(np.float32)


def mix_at_snr(speech: np.ndarray, noise: np.ndarray, snr_db: float, active_only: bool = True) -> np.ndarray:
  """Adds `noise` to `speech` (both float `[n]`) at the given SNR.

  Speech power is measured over the non-zero samples, so the zero padding
  around a clip does not count; with active_only=False over all samples (the
  SNR of the whole signal).

  Returns:
    float32 `[n]`.
  """
  active = speech != 0 if active_only else np.ones(speech.shape, bool)
  p_speech = np.mean(speech[active] ** 2) if active.any() else 1.0
  p_noise = np.mean(noise**2) + 1e-12
  gain = np.sqrt(p_speech / (p_noise * 10 ** (snr_db / 10)))
  return (speech + gain * noise).astype(np.float32)


# ---------------------------------------------------------------- FLAC (sonic-pi samples)
#
# The sonic-pi samples are FLAC files and no FLAC decoder is a dependency, so here is a small
# one in NumPy (format: https://xiph.org/flac/format.html). Rice codes are parsed with vectorised
# look-ups over the positions of the 1 bits; the linear predictors of all subframes of a file are
# run together, one sample index at a time.

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


# ---------------------------------------------------------------- noise for AVDCNN (any sample rate)

SONIC_PI_DIR = "/usr/share/sonic-pi/samples"


def sonic_pi_files(prefixes: tuple[str, ...]) -> list[str]:
  """Sorted paths of the sonic-pi samples whose names start with one of `prefixes`."""
  if not os.path.isdir(SONIC_PI_DIR):
    return []
  names = sorted(f for f in os.listdir(SONIC_PI_DIR) if f.endswith(".flac") and f.startswith(prefixes))
  return [os.path.join(SONIC_PI_DIR, f) for f in names]


def load_sonic_pi(paths: list[str], rate: int, max_seconds: float = 4.0) -> list[np.ndarray]:
  """The samples (at most max_seconds each) as mono float32 `[n]` at `rate`, peak 1."""
  out = []
  for path in paths:
    audio, native = read_flac(path, max_seconds=max_seconds)
    audio = audio.mean(axis=1)[: int(max_seconds * native)]
    audio = audio_lib.resample(audio, native, rate)
    out.append((audio / (np.abs(audio).max() + 1e-9)).astype(np.float32))
  return out


def sequence(
  rng: np.random.Generator, hits: list[np.ndarray], n: int, rate: int, bpm: tuple[float, float]
) -> np.ndarray:
  """One-shot samples played on a beat grid (random tempo, skipped beats, gains), float32 `[n]`,
  unit RMS: drum patterns and the like."""
  out = np.zeros(n, np.float64)
  step = 60.0 / rng.uniform(*bpm) / 2 * rate  # Eighth notes.
  position = -rng.uniform(0, step)
  while position < n:
    if rng.random() < 0.7:
      hit = hits[int(rng.integers(len(hits)))]
      start = max(0, int(position))
      head = hit[max(0, -int(position)) :][: n - start]
      out[start : start + len(head)] += rng.uniform(0.4, 1.0) * head
    position += step
  out += 1e-4 * rng.standard_normal(n)  # Never all zero.
  return (out / (out.std() + 1e-9)).astype(np.float32)


def texture(rng: np.random.Generator, clips: list[np.ndarray], n: int, layers: int = 2) -> np.ndarray:
  """`layers` overlaid random stretches of long clips (looped), float32 `[n]`, unit RMS: ambient beds."""
  out = np.zeros(n, np.float64)
  for _ in range(layers):
    clip = clips[int(rng.integers(len(clips)))]
    looped = np.tile(clip, n // len(clip) + 2)
    start = int(rng.integers(0, len(clip)))
    out += rng.uniform(0.5, 1.0) * looped[start : start + n]
  return (out / (out.std() + 1e-9)).astype(np.float32)


def _lowpass(rng_noise: np.ndarray, cutoff: float, rate: int) -> np.ndarray:
  b, a = signal.butter(2, cutoff / (rate / 2))
  return signal.lfilter(b, a, rng_noise)


def street(rng: np.random.Generator, n: int, rate: int) -> np.ndarray:
  """Synthetic street noise, float32 `[n]`, unit RMS: low traffic rumble, passing cars (band noise
  with slow swells) and now and then a two-tone car horn."""
  t = np.arange(n) / rate
  rumble = _lowpass(rng.standard_normal(n), 150.0, rate)
  rumble /= rumble.std() + 1e-9
  cars = _lowpass(rng.standard_normal(n), 1200.0, rate)
  cars /= cars.std() + 1e-9
  swell = np.zeros(n)
  for _ in range(int(rng.integers(1, 4))):  # Cars passing: Gaussian swells of 1-2 s.
    centre, width = rng.uniform(-0.5, n / rate + 0.5), rng.uniform(0.5, 1.0)
    swell += np.exp(-0.5 * ((t - centre) / width) ** 2)
  out = rumble + cars * (0.3 + 1.5 * swell)
  if rng.random() < 0.5:
    start, length = rng.uniform(0, n / rate), rng.uniform(0.2, 0.6)
    on = (t >= start) & (t < start + length)
    f0 = rng.uniform(350.0, 500.0)
    horn = sum(np.sign(np.sin(2 * np.pi * f * t)) / (h + 1) for h, f in enumerate((f0, f0 * 1.26)))
    out += 2.0 * on * horn
  return (out / (out.std() + 1e-9)).astype(np.float32)


def clinks(rng: np.random.Generator, n: int, rate: int, per_second: float = 1.5) -> np.ndarray:
  """Cutlery and glass clinks (short decaying high partials at random times), float32 `[n]`."""
  out = np.zeros(n, np.float64)
  t = np.arange(int(0.25 * rate)) / rate
  for _ in range(rng.poisson(per_second * n / rate)):
    partials = rng.uniform(2000.0, min(7000.0, 0.45 * rate), 3)
    sound = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 6.3)) for f in partials) * np.exp(-t * rng.uniform(20, 60))
    start = int(rng.integers(0, n))
    head = sound[: n - start]
    out[start : start + len(head)] += rng.uniform(0.3, 1.0) * head
  return out.astype(np.float32)
