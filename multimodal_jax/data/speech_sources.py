"""Clean speech for AVDCNN at 16 kHz: real recordings and espeak-ng sentences with phoneme timings.

Nothing here downloads anything; the speech comes from installed Debian packages:

* Asterisk prompts (`asterisk-core-sounds-{en,es,fr,it,ru}-wav`): studio recordings of 4 speakers
  (Allison en + es, June fr, Carlo it, IvrvoiceRU ru) at 8 kHz, upsampled to 16 kHz, so they are
  band-limited to 4 kHz. Transcripts come from `asterisk-core-sounds-<lang>` when installed.
* pocketsphinx test utterances (`pocketsphinx-testdata`): 16 kHz recordings with transcripts.
* espeak-ng (`libespeak-ng.so.1` through ctypes): sentences from the Asterisk transcripts of the
  voice's language, with the phoneme start of every phoneme (synthesis events), used to render lips.

Long recordings are cut at their quietest 10 ms frame into pieces of at most `MAX_SECONDS`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile

import numpy as np

from multimodal_jax import audio as audio_lib
from multimodal_jax.data import digit_sources

SAMPLE_RATE = audio_lib.SAMPLE_RATE
MIN_SECONDS, MAX_SECONDS = 0.5, 3.0
TRIM_DB = -35.0  # Frames quieter than this (relative to the loudest) are trimmed at both ends.
PEAK = 0.5  # Clean utterances are scaled to this peak (headroom for the noise).
ASTERISK_SOUNDS_DIR = digit_sources.ASTERISK_SOUNDS_DIR
ASTERISK_DOC_DIR = "/usr/share/doc"
POCKETSPHINX_DIR = "/usr/share/pocketsphinx/test/data"
ESPEAK_LIBRARY = "libespeak-ng.so.1"
# (Debian package, voice folder, espeak language of its transcripts).
ASTERISK_VOICES = (
  ("asterisk-core-sounds-en-wav", "en_US_f_Allison", "en"),
  ("asterisk-core-sounds-es-wav", "es_MX_f_Allison", "es"),
  ("asterisk-core-sounds-fr-wav", "fr_CA_f_June", "fr"),
  ("asterisk-core-sounds-it-wav", "it_IT_m_Carlo", "it"),
  ("asterisk-core-sounds-ru-wav", "ru_RU_f_IvrvoiceRU", "ru"),
)
ASTERISK_NON_SPEECH = ("ascending-2tone", "descending-2tone", "beep", "beeperr", "tt-monkeys")  # Prompt names.
# espeak language -> Asterisk transcript language giving its sentences.
ESPEAK_LANGUAGES = {"en-us": "en", "es": "es", "fr": "fr", "it": "it", "ru": "ru"}


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
  """The missing Debian packages for clean speech, as (package, what it gives)."""
  missing = []
  for package, folder, language in ASTERISK_VOICES:
    if not os.path.isfile(os.path.join(_asterisk_folder(folder), "digits", "1.wav")):
      missing.append((package, "real speech recordings"))
    if not os.path.isfile(_transcripts_path(language)):
      missing.append((f"asterisk-core-sounds-{language}", "transcripts, the sentences espeak-ng speaks"))
  if not os.path.isdir(os.path.join(POCKETSPHINX_DIR, "librivox")):
    missing.append(("pocketsphinx-testdata", "real 16 kHz speech"))
  if espeak_library_path() is None:
    missing.append(("espeak-ng", "synthesised speech with phoneme timings"))
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


# ---------------------------------------------------------------- espeak-ng


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
def espeak() -> Espeak:
  """The process's espeak-ng instance (the library keeps global state)."""
  return Espeak()


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
  engine = espeak()
  audio, events = engine.synth(text, voice, speed, pitch)
  audio = to_16k(audio, engine.rate)
  start, stop = active_range(audio)
  if not MIN_SECONDS * SAMPLE_RATE <= stop - start <= MAX_SECONDS * SAMPLE_RATE:
    return None
  scale = SAMPLE_RATE / engine.rate
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
