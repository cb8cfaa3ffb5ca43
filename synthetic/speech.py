"""Speech for the demo corpus, synthesised with espeak-ng: voices, a small vocabulary, short sentences.

Words are digits, colours, animals, commands and things; sentences are made of them, so a probe can
ask which word was spoken. Every voice is an espeak-ng language with an optional variant and a
base speed and pitch that the corpus plan varies per utterance.

Example::

    >>> x = synth_speech("seven", "en-us", 150, 55)   # doctest: +SKIP
    >>> x.dtype, x.ndim                                # 22.05 kHz mono (ESPEAK_RATE)   # doctest: +SKIP
    (dtype('float64'), 1)
"""

from __future__ import annotations

import io
import shutil
import subprocess
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

#: The vocabulary of single-word clips (and of the sentences below).
WORDS: tuple[str, ...] = (
    # digits
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    # colours
    "red", "green", "blue", "yellow", "black", "white", "orange", "purple",
    # animals
    "cat", "dog", "bird", "horse", "cow", "fish", "mouse", "sheep",
    # commands
    "yes", "no", "up", "down", "left", "right", "stop", "go", "on", "off",
    # things
    "house", "water", "music", "light", "door", "tree", "car", "book",
)

#: Short sentences, mostly of :data:`WORDS`.
SENTENCES: tuple[str, ...] = (
    "the red cat is up",
    "go left then stop",
    "seven black birds in a tree",
    "turn the light off",
    "the dog ran down the road",
    "open the door and go right",
    "two green fish and one blue fish",
    "yes the music is on",
    "no the car is not white",
    "the horse and the cow are in the house",
    "put the book on the yellow chair",
    "nine purple mice ran left",
    "stop the music now",
    "the water is cold and blue",
    "three sheep and a dog",
    "go up the tree little bird",
    "eight orange cars went down",
    "the white mouse is on the book",
    "turn right at the green door",
    "zero four six five",
)


@dataclass(frozen=True)
class Speaker:
    """An espeak-ng voice (language + optional variant) with its base speed (wpm) and pitch (0-99)."""

    voice: str
    speed: int
    pitch: int


SPEAKERS: tuple[Speaker, ...] = (
    Speaker("en", 160, 45),
    Speaker("en-us+f2", 165, 70),
    Speaker("en+m3", 145, 30),
    Speaker("en-us", 150, 55),
    Speaker("en+f3", 155, 60),
    Speaker("en-gb-scotland", 140, 40),
    Speaker("en-029", 170, 50),
    Speaker("en-gb-x-rp+f4", 150, 65),
    Speaker("de+m2", 140, 40),
)

#: The sample rate of espeak-ng's output (and of :func:`synth_speech`).
ESPEAK_RATE = 22050


class EspeakNotFoundError(RuntimeError):
    """espeak-ng is not installed (the demo corpus synthesises its speech with it)."""


def espeak_binary() -> str:
    """The espeak-ng executable on PATH; :class:`EspeakNotFoundError` says how to install it."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise EspeakNotFoundError(
            "espeak-ng was not found on PATH: the demo corpus synthesises its speech with it. "
            "Install it with `apt-get install espeak-ng` (Debian/Ubuntu) or your system's package manager.")
    return exe


def synth_speech(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """espeak-ng's rendering of ``text`` (22.05 kHz mono float64), leading/trailing silence trimmed."""
    proc = subprocess.run([espeak_binary(), "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
                          capture_output=True, check=False)
    if proc.returncode != 0 or len(proc.stdout) <= 44:
        raise RuntimeError(f"espeak-ng failed for voice {voice!r}: {proc.stderr.decode(errors='replace').strip()}")
    x, sr = sf.read(io.BytesIO(proc.stdout), dtype="float64", always_2d=False)
    if sr != ESPEAK_RATE:
        x = soxr.resample(x, sr, ESPEAK_RATE)
    loud = np.flatnonzero(np.abs(x) > 0.01 * np.abs(x).max())
    margin = int(0.02 * ESPEAK_RATE)
    return x[max(0, loud[0] - margin): loud[-1] + margin] if len(loud) else x

