"""espeak-ng speech with phoneme timings: the synthesised half of AV-speech's clean speech.

espeak-ng (`libespeak-ng.so.1` of the Debian package `espeak-ng`, loaded through ctypes) speaks
clauses of the Asterisk prompt transcripts in the voice's language (`sentences`) and reports the
start of every phoneme (synthesis events); `lips.py` renders the mouth from those phonemes.
Utterances are trimmed, resampled to 16 kHz and scaled like the recordings of `speech_sources`.
`synth_espeak` speaks in a fresh child process (`python -m multimodal_jax.datasets.espeak`), so that a
rebuild gives identical audio.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import os
import re
import subprocess
import sys
import tempfile

import numpy as np

from multimodal_jax.audio import SAMPLE_RATE
from multimodal_jax.datasets.speech_sources import (
  MAX_SECONDS,
  MIN_SECONDS,
  Utterance,
  active_range,
  asterisk_transcripts,
  normalize,
  to_16k,
)

ESPEAK_LIBRARY = "libespeak-ng.so.1"
# espeak language -> Asterisk transcript language giving its sentences.
ESPEAK_LANGUAGES = {"en-us": "en", "es": "es", "fr": "fr", "it": "it", "ru": "ru"}


def espeak_library_path() -> str | None:
  """The espeak-ng shared library if it can be loaded, else None."""
  for name in (ESPEAK_LIBRARY, ctypes.util.find_library("espeak-ng")):
    if not name:
      continue
    try:
      ctypes.CDLL(name)
      return name
    except OSError:
      continue
  return None


def missing_packages() -> list[tuple[str, str]]:
  """[('espeak-ng', what it gives)] when the library cannot be loaded, else []."""
  if espeak_library_path() is None:
    return [("espeak-ng", "synthesised speech with phoneme timings")]
  return []


# ---------------------------------------------------------------- the library through ctypes


class _EventId(ctypes.Union):
  _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
  """espeak_EVENT of speak_lib.h."""

  _fields_ = [
    ("type", ctypes.c_int),
    ("unique_identifier", ctypes.c_uint),
    ("text_position", ctypes.c_int),
    ("length", ctypes.c_int),
    ("audio_position", ctypes.c_int),  # ms
    ("sample", ctypes.c_int),  # samples since the start of the synthesis
    ("user_data", ctypes.c_void_p),
    ("id", _EventId),
  ]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))
_EVENT_PHONEME = 7
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_PHONEME_EVENTS = 1
_RATE, _PITCH = 1, 3
_CHARS_UTF8, _POS_CHARACTER = 1, 1


class Espeak:
  """espeak-ng through ctypes, synchronous synthesis with phoneme events (one per process)."""

  def __init__(self):
    path = espeak_library_path()
    if path is None:
      raise FileNotFoundError(ESPEAK_LIBRARY)
    self._lib = ctypes.CDLL(path)
    self._lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    self.rate = self._lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, None, _INITIALIZE_PHONEME_EVENTS)
    if self.rate <= 0:
      raise RuntimeError("espeak_Initialize failed")
    self._chunks: list[np.ndarray] = []
    self._events: list[tuple[int, str]] = []
    self._callback = _CALLBACK(self._on_synth)  # Kept referenced while the library may call it.
    self._lib.espeak_SetSynthCallback(self._callback)

  def _on_synth(self, wav, count, events) -> int:
    if wav and count > 0:
      self._chunks.append(np.ctypeslib.as_array(wav, (count,)).copy())
    i = 0
    while events[i].type != 0:
      if events[i].type == _EVENT_PHONEME:
        self._events.append((events[i].sample, events[i].id.string.decode("ascii", "replace")))
      i += 1
    return 0

  def synth(self, text: str, voice: str, speed: int, pitch: int) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Speaks `text`.

    Args:
      text: UTF-8 text.
      voice: e.g. 'it+m3'.
      speed: words per minute.
      pitch: 0-99.

    Returns:
      float32 `[n]` at `self.rate` (22,050 Hz) and the phonemes as (start sample, name); language
      switch markers like '(en)' are left out.
    """
    if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
      raise ValueError(f"espeak-ng has no voice {voice!r}")
    self._lib.espeak_SetParameter(_RATE, speed, 0)
    self._lib.espeak_SetParameter(_PITCH, pitch, 0)
    self._chunks, self._events = [], []
    data = text.encode("utf-8")
    buffer = ctypes.create_string_buffer(data)
    self._lib.espeak_Synth(buffer, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
    self._lib.espeak_Synchronize()
    audio = np.concatenate(self._chunks).astype(np.float32) / 32768.0 if self._chunks else np.zeros(0, np.float32)
    return audio, [(s, name) for s, name in self._events if not name.startswith("(")]


@functools.cache
def engine() -> Espeak:
  """The process's espeak-ng instance (the library keeps global state)."""
  return Espeak()


# ---------------------------------------------------------------- utterances


def sentences(language: str, min_words: int = 2, max_words: int = 12) -> list[str]:
  """Clauses of the Asterisk transcripts of `language` (split at punctuation), deduplicated, sorted."""
  clauses = set()
  for text in asterisk_transcripts(language).values():
    for clause in re.split(r"[.;:!?()\[\]\"]+|,\s", text):
      clause = " ".join(clause.replace("...", " ").split()).strip(" ,-")
      if min_words <= len(clause.split()) <= max_words:
        clauses.add(clause)
  return sorted(clauses)


def synth_utterance(text: str, voice: str, speed: int, pitch: int) -> Utterance | None:
  """espeak-ng speaks `text`; trimmed, at 16 kHz, phoneme times moved with the trim.

  Returns None when the result is shorter than MIN_SECONDS or longer than MAX_SECONDS.
  """
  synthesizer = engine()
  audio, events = synthesizer.synth(text, voice, speed, pitch)
  audio = to_16k(audio, synthesizer.rate)
  start, stop = active_range(audio)
  if not MIN_SECONDS * SAMPLE_RATE <= stop - start <= MAX_SECONDS * SAMPLE_RATE:
    return None
  scale = SAMPLE_RATE / synthesizer.rate
  phonemes = tuple((round(s * scale) - start, name) for s, name in events)
  return Utterance(normalize(audio[start:stop]), f"espeak/{voice}", text, phonemes)


def synth_espeak(languages: tuple[str, ...], variants: tuple[str, ...], count: int, seed: int) -> list[Utterance]:
  """`count` espeak-ng utterances, each a random voice (language+variant), sentence, speed (130-200
  wpm) and pitch (25-75), from `sentences(language)`; deterministic for a seed.

  espeak-ng keeps synthesis state across utterances (pitch flutter and random-noise positions), so
  the same text sounds slightly different after other synthesis. For identical rebuilds the
  utterances are made in a fresh process, by one library that has spoken nothing before.
  """
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "utterances.npz")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    args = json.dumps([list(languages), list(variants), count, seed, out])
    subprocess.run([sys.executable, "-m", __name__, args], check=True, env=env)
    with np.load(out) as data:
      meta = json.loads(str(data["meta"]))
      pieces = np.split(data["audio"], np.cumsum([m["length"] for m in meta])[:-1])
  return [
    Utterance(audio, m["speaker"], m["text"], tuple((int(s), str(n)) for s, n in m["phonemes"]))
    for audio, m in zip(pieces, meta)
  ]


def _synth_espeak_here(languages, variants, count: int, seed: int) -> list[Utterance]:
  rng = np.random.default_rng(seed)
  corpus = {lang: sentences(ESPEAK_LANGUAGES[lang]) for lang in languages}
  out, tries = [], 0
  while len(out) < count:
    tries += 1
    if tries > 20 * count + 100:
      raise RuntimeError("espeak-ng produced too few utterances of the allowed length")
    language = languages[int(rng.integers(len(languages)))]
    variant = variants[int(rng.integers(len(variants)))]
    text = corpus[language][int(rng.integers(len(corpus[language])))]
    utterance = synth_utterance(text, f"{language}+{variant}", int(rng.integers(130, 201)), int(rng.integers(25, 76)))
    if utterance is not None:
      out.append(utterance)
  return out


def _main(argv: list[str]) -> None:
  """Child process of synth_espeak: speaks and writes the utterances to an .npz file."""
  languages, variants, count, seed, out = json.loads(argv[1])
  utterances = _synth_espeak_here(tuple(languages), tuple(variants), count, seed)
  meta = [
    {"length": len(u.audio), "speaker": u.speaker, "text": u.text, "phonemes": list(u.phonemes)} for u in utterances
  ]
  audio = np.concatenate([u.audio for u in utterances]) if utterances else np.zeros(0, np.float32)
  np.savez(out, audio=audio, meta=np.asarray(json.dumps(meta)))


if __name__ == "__main__":
  _main(sys.argv)
