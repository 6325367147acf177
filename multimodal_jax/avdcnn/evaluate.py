"""Speech-quality scores of an enhanced (or noisy) signal against the clean reference.

- `pesq`: ITU-T P.862 through the `pesq` package; wide-band (P.862.2) at 16 kHz, narrow-band at
  8 kHz (`mode="nb"`, or any 8 kHz input). Scores are MOS-LQO (wide-band about 1.04-4.64).
  `score` at 16 kHz also gives `pesq_nb`, narrow-band P.862 of the same 16 kHz pair (the PESQ of
  most speech-enhancement papers before wide-band, AVDCNN's included as far as its scores tell).
- `stoi`: short-time objective intelligibility through `pystoi` (0-1; it resamples to 10 kHz itself).
- `sdi`: speech distortion index `Σ (s - ŝ)² / Σ s²` (0 is perfect).
- `segmental_snr`: mean over 32 ms frames (50% overlap) of the per-frame SNR in dB, each clamped
  to [-10, 35] dB as usual.

`evaluate` scores an enhancer on a test split (enhanced, noisy, and with a fixed mouth) overall,
per SNR and per noise type; `plot_spectrograms` draws noisy / enhanced / clean side by side.

Imports only numpy, pesq and pystoi (no JAX), so `score_utterances` can fan out over processes.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence

import numpy as np

SNR_RANGE_DB = (-10.0, 35.0)
PESQ_RATES = {16000: "wb", 8000: "nb"}


class ScoreInputError(ValueError):
  """Signals that cannot be scored together (rate, length, shape); the message says which."""


def _pair(ref, deg, rate: int, name: str) -> tuple[np.ndarray, np.ndarray]:
  ref = np.asarray(ref, np.float64)
  deg = np.asarray(deg, np.float64)
  if ref.ndim != 1 or deg.ndim != 1:
    raise ScoreInputError(f"{name}: expected two 1-D signals, got shapes {ref.shape} and {deg.shape}")
  if ref.shape != deg.shape:
    raise ScoreInputError(
      f"{name}: reference and degraded signals differ in length ({len(ref)} vs {len(deg)} samples); "
      "trim or pad them to the same length"
    )
  if not len(ref):
    raise ScoreInputError(f"{name}: empty signals")
  if not isinstance(rate, (int, np.integer)) or rate <= 0:
    raise ScoreInputError(f"{name}: the sample rate must be a positive integer, got {rate!r}")
  return ref, deg


def pesq(ref, deg, rate: int, mode: str | None = None) -> float:
  """PESQ of `deg` against `ref` (1-D, same length). rate 16000 -> wide-band, 8000 -> narrow-band
  (`mode="nb"`: narrow-band at either rate). Raises ScoreInputError for other rates and `pesq.NoUtterancesError` when
  the reference holds no speech the algorithm can find."""
  import pesq as pesq_lib

  ref, deg = _pair(ref, deg, rate, "pesq")
  if rate not in PESQ_RATES:
    raise ScoreInputError(f"pesq: sample rate {rate} Hz is not supported; resample to 16000 (wide-band) or 8000 Hz")
  mode = mode or PESQ_RATES[rate]
  if mode not in ("wb", "nb") or (mode == "wb" and rate != 16000):
    raise ScoreInputError(f"pesq: mode {mode!r} at {rate} Hz: wide-band needs 16000 Hz; use 'nb' at 8000 or 16000 Hz")
  return float(pesq_lib.pesq(rate, ref, deg, mode))


def stoi(ref, deg, rate: int, extended: bool = False) -> float:
  """STOI (or extended STOI) of `deg` against `ref` (1-D, same length, rate >= 8000 Hz)."""
  import pystoi

  ref, deg = _pair(ref, deg, rate, "stoi")
  if rate < 8000:
    raise ScoreInputError(f"stoi: sample rate {rate} Hz is too low; STOI needs at least 8000 Hz")
  return float(pystoi.stoi(ref, deg, rate, extended=extended))


def sdi(ref, deg, rate: int | None = None) -> float:
  """Speech distortion index `Σ (ref - deg)² / Σ ref²` (NaN for an all-zero reference)."""
  ref, deg = _pair(ref, deg, rate or 1, "sdi")
  energy = np.sum(ref**2)
  return float(np.sum((ref - deg) ** 2) / energy) if energy > 0 else float("nan")


def segmental_snr(ref, deg, rate: int, frame_ms: float = 32.0) -> float:
  """Mean per-frame SNR in dB (frames of `frame_ms`, 50% overlap, each clamped to [-10, 35] dB)."""
  ref, deg = _pair(ref, deg, rate, "segmental_snr")
  frame = max(round(rate * frame_ms / 1000), 1)
  hop = max(frame // 2, 1)
  if len(ref) < frame:
    raise ScoreInputError(f"segmental_snr: {len(ref)} samples are shorter than one {frame_ms:g} ms frame")
  starts = np.arange(0, len(ref) - frame + 1, hop)
  index = starts[:, None] + np.arange(frame)[None, :]
  signal = np.sum(ref[index] ** 2, axis=1)
  noise = np.sum((ref[index] - deg[index]) ** 2, axis=1)
  eps = 1e-12
  snr = 10.0 * np.log10((signal + eps) / (noise + eps))
  return float(np.mean(np.clip(snr, *SNR_RANGE_DB)))


def score(ref, deg, rate: int) -> dict:
  """All scores of one pair (`pesq_nb` too at 16 kHz); a PESQ score is NaN (and `pesq_error` says why)
  when PESQ finds no utterance."""
  import pesq as pesq_lib

  result = {"stoi": stoi(ref, deg, rate), "sdi": sdi(ref, deg, rate), "ssnr": segmental_snr(ref, deg, rate)}
  modes = {"pesq": None, "pesq_nb": "nb"} if rate == 16000 else {"pesq": None}
  for key, mode in modes.items():
    try:
      result[key] = pesq(ref, deg, rate, mode)
    except pesq_lib.PesqError as e:  # e.g. NoUtterancesError on a (near) silent reference
      result[key] = float("nan")
      result["pesq_error"] = f"{type(e).__name__}: {e}"
  return result


def _score_args(args) -> dict:
  return score(*args)


def score_utterances(pairs: Sequence[tuple[np.ndarray, np.ndarray]], rate: int, processes: int = 2) -> list[dict]:
  """`score(ref, deg, rate)` for every pair, in order, over `processes` worker processes (spawned,
  so the caller's JAX state is never forked); `processes <= 1` scores in this process."""
  args = [(np.asarray(r, np.float32), np.asarray(d, np.float32), rate) for r, d in pairs]
  if processes <= 1 or len(args) < 2:
    return [score(*a) for a in args]
  with multiprocessing.get_context("spawn").Pool(processes) as pool:
    return pool.map(_score_args, args, chunksize=max(1, len(args) // (4 * processes)))


def mean_scores(rows: Sequence[dict], keys: Sequence[str] = ("pesq", "pesq_nb", "stoi", "sdi", "ssnr")) -> dict:
  """Means of `keys` over rows (those the rows have), ignoring NaN (PESQ failures); `pesq_failures`
  counts those."""
  out = {}
  for k in [k for k in keys if all(k in r for r in rows)]:
    values = np.asarray([r[k] for r in rows], np.float64)
    finite = values[np.isfinite(values)]
    out[k] = float(finite.mean()) if len(finite) else float("nan")
  out["pesq_failures"] = int(sum("pesq_error" in r for r in rows))
  return out


# --- Test-set evaluation of an enhancer ---------------------------------------------------------------------------

VARIANTS = ("enhanced", "noisy", "fixed_lips")  # what `evaluate` scores; fixed_lips only PESQ and STOI


def summary(rows: list[dict]) -> dict:
  """Mean scores of scored rows (`{"enhanced": scores, "noisy": scores, ...}` each): keys `pesq`, ...
  for the enhanced signal, `pesq_noisy`, ... for the others, with the PESQ failure counts."""
  out = {"utterances": len(rows)}
  for variant in [k for k in VARIANTS if k in rows[0]]:
    means = mean_scores([r[variant] for r in rows])
    suffix = "" if variant == "enhanced" else f"_{variant}"
    for name in ("pesq", "pesq_nb", "stoi", "sdi", "ssnr"):
      if name in means and (variant != "fixed_lips" or name in ("pesq", "pesq_nb", "stoi")):
        out[name + suffix] = means[name]
    out["pesq_failures" + suffix] = means["pesq_failures"]
  return out


def table(rows: list[dict], key: str) -> dict:
  """`summary` of the rows of each value of `key` (e.g. snr, noise), in sorted order."""
  groups: dict = {}
  for r in rows:
    groups.setdefault(r[key], []).append(r)
  return {str(k): summary(v) for k, v in sorted(groups.items())}


def evaluate(
  enhance: Callable,
  test,
  rate: int,
  limit: int = 0,
  processes: int = 2,
  fixed_lips: Callable[[int], np.ndarray] | None = None,
) -> dict:
  """Scores of `enhance(noisy, lips) -> enhanced` on the first `limit` (0: all) examples of `test`
  (dicts with float `clean`, `noisy`, `lips`, `snr`, str `noise`): the enhanced and the noisy
  signals and, with `fixed_lips(frames)` (a constant mouth), the enhanced signal without the real
  lips. Overall (`summary`), `per_snr` and `per_noise`."""
  count = len(test) if not limit else min(limit, len(test))
  pairs, rows = [], []
  for i in range(count):
    ex = test[i]
    clean, noisy = np.asarray(ex["clean"], np.float32), np.asarray(ex["noisy"], np.float32)
    variants = {"enhanced": enhance(noisy, ex["lips"]), "noisy": noisy}
    if fixed_lips is not None:
      variants["fixed_lips"] = enhance(noisy, fixed_lips(len(ex["lips"])))
    pairs += [(clean, deg) for deg in variants.values()]
    rows.append({"snr": float(np.asarray(ex["snr"])), "noise": str(ex["noise"]), "variants": list(variants)})
  scores = iter(score_utterances(pairs, rate, processes))
  for row in rows:
    row.update({name: next(scores) for name in row.pop("variants")})
  return {**summary(rows), "per_snr": table(rows, "snr"), "per_noise": table(rows, "noise")}


def plot_spectrograms(signals: dict[str, np.ndarray], log_power: dict[str, np.ndarray], rate: int, title: str, path):
  """Writes the log spectrograms (`log_power[name]` `[frames, bins]`, natural log) of `signals` one
  above the other to an image at `path`, each titled with its PESQ and STOI against `signals["clean"]`."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  specs = {k: np.asarray(v) / np.log(10) * 10 for k, v in log_power.items()}
  top = max(v.max() for v in specs.values())
  clean = signals["clean"]
  fig, axes = plt.subplots(len(specs), 1, figsize=(8, 7), sharex=True, constrained_layout=True)
  seconds = len(clean) / rate
  for ax, (name, spec) in zip(axes, specs.items(), strict=True):
    extent = (0, seconds, 0, rate / 2000)
    image = ax.imshow(spec.T, origin="lower", aspect="auto", extent=extent, vmin=top - 80, vmax=top)
    scores = None if name == "clean" else score(clean, signals[name], rate)
    ax.set_title(name + (f"  (PESQ {scores['pesq']:.2f}, STOI {scores['stoi']:.2f})" if scores else ""), fontsize=10)
    ax.set_ylabel("kHz")
  axes[-1].set_xlabel("seconds")
  fig.colorbar(image, ax=axes, label="dB")
  fig.suptitle(title)
  fig.savefig(path, dpi=100)
