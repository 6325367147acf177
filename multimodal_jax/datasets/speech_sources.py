"""Clean speech for AVDCNN at 16 kHz: real recordings, and the utterance type and trimming that the
synthesised speech (`espeak.py`) shares.

Nothing here downloads anything; the speech comes from installed Debian packages:

* Asterisk prompts (`asterisk-core-sounds-{en,es,fr,it,ru}-wav`): studio recordings of 4 speakers
  (Allison en + es, June fr, Carlo it, IvrvoiceRU ru) at 8 kHz, upsampled to 16 kHz, so they are
  band-limited to 4 kHz. Transcripts come from `asterisk-core-sounds-<lang>` when installed; espeak-ng
  speaks clauses of them.
* pocketsphinx test utterances (`pocketsphinx-testdata`): 16 kHz recordings with transcripts.

Long recordings are cut at their quietest 10 ms frame into pieces of at most `MAX_SECONDS`.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import re

import numpy as np

from multimodal_jax import audio as audio_lib
from multimodal_jax.audio import SAMPLE_RATE
from multimodal_jax.datasets import digit_sources

MIN_SECONDS, MAX_SECONDS = 0.5, 3.0
TRIM_DB = -35.0  # Frames quieter than this (relative to the loudest) are trimmed at both ends.
PEAK = 0.5  # Clean utterances are scaled to this peak (headroom for the noise).
ASTERISK_SOUNDS_DIR = digit_sources.ASTERISK_SOUNDS_DIR
ASTERISK_DOC_DIR = "/usr/share/doc"
POCKETSPHINX_DIR = "/usr/share/pocketsphinx/test/data"
# (Debian package, voice folder, espeak language of its transcripts).
ASTERISK_VOICES = (
  ("asterisk-core-sounds-en-wav", "en_US_f_Allison", "en"),
  ("asterisk-core-sounds-es-wav", "es_MX_f_Allison", "es"),
  ("asterisk-core-sounds-fr-wav", "fr_CA_f_June", "fr"),
  ("asterisk-core-sounds-it-wav", "it_IT_m_Carlo", "it"),
  ("asterisk-core-sounds-ru-wav", "ru_RU_f_IvrvoiceRU", "ru"),
)
ASTERISK_NON_SPEECH = ("ascending-2tone", "descending-2tone", "beep", "beeperr", "tt-monkeys")  # Prompt names.


@dataclasses.dataclass(frozen=True)
class Utterance:
  """One clean utterance.

  Attributes:
    audio: float32 `[n]` at 16 kHz, peak PEAK.
    speaker: e.g. 'asterisk/Carlo', 'pocketsphinx/librivox', 'espeak/it+m3'.
    text: transcript, '' when unknown.
    phonemes: for synthesised speech, ((start sample at 16 kHz, espeak phoneme name), ...) in
      order; None for recordings.
  """

  audio: np.ndarray
  speaker: str
  text: str
  phonemes: tuple[tuple[int, str], ...] | None = None


# ---------------------------------------------------------------- packages


def _asterisk_folder(folder: str) -> str:
  return os.path.join(ASTERISK_SOUNDS_DIR, folder)


def missing_packages() -> list[tuple[str, str]]:
  """The missing Debian packages for the recordings and the transcripts, as (package, what it gives);
  espeak-ng's own is `espeak.missing_packages`."""
  missing = []
  for package, folder, language in ASTERISK_VOICES:
    if not os.path.isfile(os.path.join(_asterisk_folder(folder), "digits", "1.wav")):
      missing.append((package, "real speech recordings"))
    if not os.path.isfile(_transcripts_path(language)):
      missing.append((f"asterisk-core-sounds-{language}", "transcripts, the sentences espeak-ng speaks"))
  if not os.path.isdir(os.path.join(POCKETSPHINX_DIR, "librivox")):
    missing.append(("pocketsphinx-testdata", "real 16 kHz speech"))
  return missing


# ---------------------------------------------------------------- audio helpers


read_wav = audio_lib.read_audio  # (float32 mono [n], rate) of a WAV (or any audio) file


def to_16k(audio: np.ndarray, rate: int) -> np.ndarray:
  """Float `[n]` at `rate` -> float32 at 16 kHz."""
  return audio_lib.resample(audio, rate, SAMPLE_RATE)


def active_range(audio: np.ndarray, threshold_db: float = TRIM_DB) -> tuple[int, int]:
  """(start, stop) samples of `audio [n]` (16 kHz) without the quiet 10 ms frames at both ends."""
  frame = SAMPLE_RATE // 100
  n = len(audio) // frame
  if n == 0:
    return 0, 0
  rms = np.sqrt(np.mean(audio[: n * frame].reshape(n, frame) ** 2, axis=1) + 1e-12)
  active = np.flatnonzero(rms > rms.max() * 10 ** (threshold_db / 20))
  return int(active[0] * frame), int((active[-1] + 1) * frame)


def split_long(audio: np.ndarray, max_seconds: float = MAX_SECONDS) -> list[np.ndarray]:
  """Cuts `audio [n]` into pieces of at most max_seconds, each at the quietest 10 ms frame of the
  last third of the allowed length; pieces are trimmed again."""
  frame, limit = SAMPLE_RATE // 100, int(max_seconds * SAMPLE_RATE)
  pieces = []
  while len(audio) > limit:
    lo, hi = limit * 2 // 3 // frame, limit // frame
    energy = np.array([np.sum(audio[i * frame : (i + 1) * frame] ** 2) for i in range(lo, hi)])
    cut = (lo + int(np.argmin(energy))) * frame + frame // 2
    pieces.append(audio[:cut])
    audio = audio[cut:]
  pieces.append(audio)
  out = []
  for piece in pieces:
    start, stop = active_range(piece)
    out.append(piece[start:stop])
  return out


def normalize(audio: np.ndarray) -> np.ndarray:
  """Scales `audio` to peak PEAK, float32."""
  return (audio * (PEAK / (np.abs(audio).max() + 1e-9))).astype(np.float32)


def _recording_utterances(audio: np.ndarray, speaker: str, text: str) -> list[Utterance]:
  start, stop = active_range(audio)
  pieces = split_long(audio[start:stop])
  whole = len(pieces) == 1
  return [
    Utterance(normalize(p), speaker, text if whole else "") for p in pieces if len(p) >= MIN_SECONDS * SAMPLE_RATE
  ]


# ---------------------------------------------------------------- Asterisk prompts


def _transcripts_path(language: str) -> str:
  return os.path.join(ASTERISK_DOC_DIR, f"asterisk-core-sounds-{language}", f"core-sounds-{language}.txt.gz")


def asterisk_transcripts(language: str) -> dict[str, str]:
  """{prompt name like 'digits/1': transcript} of `asterisk-core-sounds-<language>` ({} if absent).

  Descriptions in brackets (tones, beeps) are left out.
  """
  path = _transcripts_path(language)
  if not os.path.isfile(path):
    return {}
  out = {}
  with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
    for line in f:
      name, sep, text = line.partition(":")
      text = text.strip()
      if not sep or line.startswith(";") or " " in name or not text or text.startswith("["):
        continue
      out[name.strip()] = text
  return out


def asterisk_speakers() -> list[tuple[str, str, str]]:
  """(speaker, voice folder, transcript language) of the Asterisk voices; a speaker may have two."""
  return [(f"asterisk/{folder.split('_')[-1]}", folder, lang) for _, folder, lang in ASTERISK_VOICES]


def load_asterisk(speakers: tuple[str, ...] | None = None, max_files: int | None = None) -> list[Utterance]:
  """Every prompt of the installed Asterisk voices, cut into utterances of at most MAX_SECONDS.

  Args:
    speakers: keep only these (e.g. ('asterisk/Carlo',)); None keeps all.
    max_files: per voice folder, read only the first max_files prompts (sorted by name).

  Returns:
    Utterances at 16 kHz (band-limited to 4 kHz: the prompts are 8 kHz recordings).
  """
  out = []
  for speaker, folder, language in asterisk_speakers():
    if speakers is not None and speaker not in speakers:
      continue
    root = os.path.realpath(_asterisk_folder(folder))
    transcripts = asterisk_transcripts(language)
    names = []
    for directory, _, files in os.walk(root):
      names += [os.path.relpath(os.path.join(directory, f), root) for f in files if f.endswith(".wav")]
    names = sorted(names)[:max_files]
    for name in names:
      key = name[: -len(".wav")]
      if key.split("/")[-1] in ASTERISK_NON_SPEECH:
        continue
      audio, rate = read_wav(os.path.join(root, name))
      out += _recording_utterances(to_16k(audio, rate), speaker, transcripts.get(key, ""))
  return out


# ---------------------------------------------------------------- pocketsphinx


def _pocketsphinx_transcripts(path: str) -> dict[str, str]:
  out = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      m = re.match(r"\s*(?:<s>)?(.*?)(?:</s>)?\s*\((\S+)\)\s*$", line)
      if m:
        out[m.group(2)] = " ".join(m.group(1).split())
  return out


def load_pocketsphinx() -> list[Utterance]:
  """The pocketsphinx test recordings with transcripts (librivox reader, card names), 16 kHz."""
  out = []
  for folder, transcripts in (("librivox", "transcription"), ("cards", "cards.transcription")):
    texts = _pocketsphinx_transcripts(os.path.join(POCKETSPHINX_DIR, folder, transcripts))
    for name, text in sorted(texts.items()):
      path = os.path.join(POCKETSPHINX_DIR, folder, f"{name}.wav")
      if os.path.isfile(path):
        audio, rate = read_wav(path)
        out += _recording_utterances(to_16k(audio, rate), f"pocketsphinx/{folder}", text)
  return out
