"""The noise types of AV-speech (and GRID's mixtures): which types each split has and how each is made.

Every type is float32 `[n]` at 16 kHz, unit RMS before mixing. Train and test types never overlap,
and no test sample file is used in training, so test noise is unseen, as in the AVDCNN paper.

* train (TRAIN_NOISES, 18 types): synthetic white, pink, brown; coloured (random spectral tilt and
  resonances); modulated (white, pink or coloured noise under a slow random envelope); hum (a
  harmonic machine tone); siren (a swept alarm tone); talker (one other training talker); babble
  (3-7 of them); music (the 5 music-on-hold tracks, 8 kHz); sonic-pi ambient (`ambi_*` textures),
  tabla (hits on a 70-130 bpm grid), bass (`bass_*` hits), guitar (`guit_*` textures), percussion
  (`perc_*` and `misc_*` one-shots: bells, doors, impacts, snaps), vinyl (`vinyl_*` hiss and
  scratches), loops (the non-drum `loop_*` files: 3d printer, drone, compus, electric, garzul, mika,
  safari, weirdo); mixed (two of the others, -6 to +6 dB apart).
* test (TEST_NOISES): drums (sonic-pi drum, kick and snare hits and break loops, 90-160 bpm);
  electronic (sonic-pi `elec_*` / `glitch_*` hits); street (synthetic rumble, passing cars, horns);
  cafe (babble of 6-10 test talkers, pink room tone, synthetic cutlery clinks). The drum breaks,
  `elec_*`, `glitch_*` and the `mehackit_*` synth sounds stay out of training.

The building blocks (synthetic noises, sample sequencing, the package files) are in
`noise_sources`; `for_split` swaps the whole bank for the user's noise files.
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np

from multimodal_jax.audio import SAMPLE_RATE
from multimodal_jax.datasets import digit_sources, noise_sources, speech_sources

TRAIN_NOISES = (
  "white",
  "pink",
  "brown",
  "coloured",
  "modulated",
  "hum",
  "siren",
  "talker",
  "babble",
  "music",
  "ambient",
  "tabla",
  "bass",
  "guitar",
  "percussion",
  "vinyl",
  "loops",
  "mixed",
)
TEST_NOISES = ("drums", "electronic", "street", "cafe")
# sonic-pi sample groups (file name prefixes) per noise type.
SONIC_PI_GROUPS = {
  "ambient": ("ambi_",),
  "tabla": ("tabla_", "loop_tabla"),
  "bass": ("bass_",),
  "guitar": ("guit_",),
  "percussion": ("perc_", "misc_"),
  "vinyl": ("vinyl_",),
  "loops": tuple(
    f"loop_{name}" for name in ("3d_printer", "compus", "drone", "electric", "garzul", "mika", "safari", "weirdo")
  ),
  "drums": ("drum_", "bd_", "sn_", "loop_amen", "loop_breakbeat"),
  "electronic": ("elec_", "glitch_"),
}
TEXTURES = ("ambient", "guitar", "vinyl", "loops")  # Long clips, played as overlaid loops (up to 8 s each).
BABBLE_TALKERS = (3, 7)


class NoiseSizes(Protocol):
  """How much of the packages' noise a config uses (`av_speech.Sizes` is one).

  Attributes:
    sonic_pi_files: per noise type, use only this many sonic-pi samples (None: all).
    music_tracks: how many music-on-hold tracks the 'music' noise uses.
  """

  sonic_pi_files: int | None
  music_tracks: int


def missing_packages() -> list[tuple[str, str]]:
  """The missing Debian packages of the bank's noise, as (package, what it gives)."""
  missing = []
  if not all(os.path.isfile(f) for f in noise_sources.music_files()):
    missing.append(("asterisk-moh-opsound-wav", "real music noise"))
  if not noise_sources.sonic_pi_files(SONIC_PI_GROUPS["drums"]):
    missing.append(("sonic-pi-samples", "real noise samples"))
  return missing


class NoiseBank:
  """Makes noise of each type of one split; every call takes its randomness from `rng`.

  Args:
    split: 'train' or 'test'.
    talkers: clean utterances of the split (babble of other speakers).
    sizes: how many sonic-pi samples and music tracks to use.
  """

  def __init__(self, split: str, talkers: list[speech_sources.Utterance], sizes: NoiseSizes):
    self.names = TRAIN_NOISES if split == "train" else TEST_NOISES
    self._talkers = talkers
    self._samples = {}
    for name in self.names:
      if name in SONIC_PI_GROUPS:
        paths = noise_sources.sonic_pi_files(SONIC_PI_GROUPS[name])[: sizes.sonic_pi_files]
        self._samples[name] = noise_sources.load_sonic_pi(paths, SAMPLE_RATE, 8.0 if name in TEXTURES else 4.0)
    if "music" in self.names:
      music = noise_sources.load_music(noise_sources.MUSIC_TRACKS[: sizes.music_tracks])
      self._music = speech_sources.to_16k(music, digit_sources.SAMPLE_RATE)

  def _babble(self, rng: np.random.Generator, speaker: str, n: int, talkers: tuple[int, int]) -> np.ndarray:
    others = [u.audio for u in self._talkers if u.speaker != speaker] or [u.audio for u in self._talkers]
    chosen = rng.choice(len(others), int(rng.integers(*talkers, endpoint=True)))
    return noise_sources.babble(rng, [others[i] for i in chosen], n)

  def __call__(self, name: str, rng: np.random.Generator, n: int, speaker: str) -> np.ndarray:
    """Noise `name` of n samples, float32 `[n]` (unit RMS up to the mixtures' small deviations)."""
    if name == "white":
      return noise_sources.white_noise(rng, n)
    if name == "pink":
      return noise_sources.pink_noise(rng, n)
    if name == "brown":
      return noise_sources.brown_noise(rng, n)
    if name == "coloured":
      return noise_sources.coloured_noise(rng, n, SAMPLE_RATE)
    if name == "modulated":
      base = ("white", "pink", "coloured")[int(rng.integers(3))]
      return noise_sources.modulated(rng, self(base, rng, n, speaker), SAMPLE_RATE)
    if name == "hum":
      return noise_sources.hum(rng, n, SAMPLE_RATE)
    if name == "siren":
      return noise_sources.siren(rng, n, SAMPLE_RATE)
    if name == "talker":
      return self._babble(rng, speaker, n, (1, 1))
    if name == "babble":
      return self._babble(rng, speaker, n, BABBLE_TALKERS)
    if name == "music":
      return noise_sources.random_segment(rng, self._music, n)
    if name in TEXTURES:
      return noise_sources.texture(
        rng, self._samples[name], n, layers=int(rng.integers(1, 3)) if name != "ambient" else 2
      )
    if name == "tabla":
      return noise_sources.sequence(rng, self._samples[name], n, SAMPLE_RATE, bpm=(70, 130))
    if name == "bass":
      return noise_sources.sequence(rng, self._samples[name], n, SAMPLE_RATE, bpm=(60, 130))
    if name == "percussion":
      return noise_sources.sequence(rng, self._samples[name], n, SAMPLE_RATE, bpm=(30, 90))
    if name == "mixed":
      first, second = rng.choice(len(TRAIN_NOISES) - 1, 2, replace=False)  # Any two but "mixed" (the last).
      gain = 10 ** (rng.uniform(-6.0, 6.0) / 20)
      out = self(TRAIN_NOISES[first], rng, n, speaker) + gain * self(TRAIN_NOISES[second], rng, n, speaker)
      return (out / (out.std() + 1e-9)).astype(np.float32)
    if name == "drums":
      return noise_sources.sequence(rng, self._samples[name], n, SAMPLE_RATE, bpm=(90, 160))
    if name == "electronic":
      return noise_sources.sequence(rng, self._samples[name], n, SAMPLE_RATE, bpm=(60, 140))
    if name == "street":
      return noise_sources.street(rng, n, SAMPLE_RATE)
    if name == "cafe":
      crowd = self._babble(rng, speaker, n, (6, 10))
      room = noise_sources.pink_noise(rng, n)
      mix = crowd + 0.3 * room + 0.8 * noise_sources.clinks(rng, n, SAMPLE_RATE)
      return (mix / (mix.std() + 1e-9)).astype(np.float32)
    raise ValueError(f"unknown noise {name!r}")


def for_split(split: str, talkers: list[speech_sources.Utterance], sizes: NoiseSizes, noise_dir: str = ""):
  """The noise of a split: a NoiseBank (the noise types of TRAIN_NOISES / TEST_NOISES), or with
  `noise_dir` the split's audio files there (`noise_sources.noise_files`). Either has `names` and is
  called as `bank(name, rng, n, speaker)`."""
  if not noise_dir:
    return NoiseBank(split, talkers, sizes)
  return noise_sources.FileNoises(noise_sources.noise_files(noise_dir)[split], SAMPLE_RATE)
