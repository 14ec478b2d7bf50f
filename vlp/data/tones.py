"""The built-in audio-text dataset: telephone DTMF digit tones as WebDataset shards.

Each key of a telephone keypad sounds two sines at once, a row and a column frequency
(ITU-T Q.23)::

             1209 Hz  1336 Hz  1477 Hz
    697 Hz      1        2        3
    770 Hz      4        5        6
    852 Hz      7        8        9
    941 Hz               0

Every clip draws its duration, loudness, the two tones' relative level ("twist"), their
phases, a small frequency offset (within the ±1.5 % a DTMF receiver accepts) and white
noise (a random SNR), so no two samples are equal and the held-out split is new audio.
Layout (as ``vlp data digits``, clip_benchmark's webdataset one)::

    out/train/0.tar ... nshards.txt  training split
    out/val/0.tar ... nshards.txt    held-out clips, every class equally often
    out/classnames.txt               "zero" ... "nine", one per line (label order)
    out/zeroshot_classification_templates.txt   prompts with a {c} placeholder

Each sample: ``__key__`` ``tones-train-000123``, ``flac`` (16-bit mono at 8 kHz, the
telephone rate), ``txt`` (a caption, words and numerals mixed), ``cls`` (the digit).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Dict, Iterator, Tuple

import numpy as np

from vlp.data.digits import CLASSNAMES
from vlp.data.shards import write_split

ROWS = (697.0, 770.0, 852.0, 941.0)  # Hz
COLUMNS = (1209.0, 1336.0, 1477.0)  # Hz
KEYPAD = {1: (0, 0), 2: (0, 1), 3: (0, 2), 4: (1, 0), 5: (1, 1), 6: (1, 2), 7: (2, 0), 8: (2, 1), 9: (2, 2), 0: (3, 1)}

SAMPLE_RATE = 8000  # Hz: telephone audio; the highest DTMF tone (1477 Hz) is far below Nyquist

CAPTIONS = [
    "the tone of digit {w}",
    "a telephone keypad tone for {w}",
    "the dial tone of the number {n}",
    "the sound of pressing {n} on a phone",
    "a beep for the digit {w}",
    "the touch tone of key {n}",
    "someone dialing {w}",
    "the keypad sound of the number {w}",
]

ZEROSHOT_TEMPLATES = [
    "the tone of digit {c}.",
    "a telephone keypad tone for {c}.",
    "the sound of pressing {c} on a phone.",
    "a beep for the digit {c}.",
    "the keypad sound of the number {c}.",
]


def dtmf_frequencies(digit: int) -> Tuple[float, float]:
    """(row, column) frequencies in Hz of ``digit``'s key."""
    if digit not in KEYPAD:
        raise ValueError(f"DTMF digits are 0..9, got {digit}")
    row, col = KEYPAD[digit]
    return ROWS[row], COLUMNS[col]


def dtmf_tone(
    digit: int,
    rng: np.random.Generator,
    sample_rate: int = SAMPLE_RATE,
    duration: Tuple[float, float] = (0.25, 0.9),
    amplitude: Tuple[float, float] = (0.1, 0.6),
    jitter: float = 0.015,
    snr_db: Tuple[float, float] = (10.0, 30.0),
) -> Tuple[np.ndarray, Dict[str, float]]:
    """One noisy tone of ``digit``: (waveform (S,) float32 in [-1, 1], the drawn parameters)."""
    row, col = dtmf_frequencies(digit)
    f_row = row * (1 + rng.uniform(-jitter, jitter))
    f_col = col * (1 + rng.uniform(-jitter, jitter))
    n = int(rng.uniform(*duration) * sample_rate)
    t = np.arange(n) / sample_rate  # (S,) seconds
    amp = rng.uniform(*amplitude)
    twist = rng.uniform(0.7, 1.0, size=2)  # relative level of the two tones
    wave = amp * (twist[0] * np.sin(2 * np.pi * f_row * t + rng.uniform(0, 2 * np.pi))
                  + twist[1] * np.sin(2 * np.pi * f_col * t + rng.uniform(0, 2 * np.pi))) / 2
    ramp = min(n // 2, int(0.005 * sample_rate))  # 5 ms fade in/out: no click at the edges
    if ramp:
        fade = np.linspace(0.0, 1.0, ramp)
        wave[:ramp] *= fade
        wave[n - ramp :] *= fade[::-1]
    snr = rng.uniform(*snr_db)
    noise_std = np.sqrt(np.mean(wave**2)) / 10 ** (snr / 20)
    wave = wave + rng.normal(0.0, noise_std, size=n)
    info = {"row_hz": f_row, "col_hz": f_col, "seconds": n / sample_rate, "amplitude": amp, "snr_db": snr}
    return np.clip(wave, -1.0, 1.0).astype(np.float32), info


def write_tones(
    out: str | Path, train_per_class: int = 150, val_per_class: int = 40, seed: int = 0, shard_size: int = 250
) -> Dict[str, int]:
    """Write the tones shards and zero-shot files under ``out``; returns sample and shard counts."""
    if train_per_class < 1 or val_per_class < 1:
        raise ValueError(f"need at least one clip per class, got {train_per_class} train, {val_per_class} val")
    out = Path(out)
    counts = {}
    for i, (split, per_class) in enumerate((("train", train_per_class), ("val", val_per_class))):
        rng = np.random.default_rng([seed, i])  # the val clips are drawn from their own stream
        shards = write_split(out / split, _samples(split, per_class, rng), shard_size)
        counts[split], counts[f"{split}_shards"] = 10 * per_class, len(shards)
    (out / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    (out / "zeroshot_classification_templates.txt").write_text("\n".join(ZEROSHOT_TEMPLATES) + "\n")
    return counts


def _samples(split: str, per_class: int, rng: np.random.Generator) -> Iterator[Dict]:
    labels = rng.permutation(np.repeat(np.arange(10), per_class))  # classes interleaved across shards
    for i, label in enumerate(labels):
        wave, _ = dtmf_tone(int(label), rng)
        caption = CAPTIONS[rng.integers(len(CAPTIONS))].format(w=CLASSNAMES[label], n=int(label))
        yield {"__key__": f"tones-{split}-{i:06d}", "flac": audio_bytes(wave, SAMPLE_RATE), "txt": caption,
               "cls": int(label)}


def audio_bytes(wave: np.ndarray, sample_rate: int, fmt: str = "FLAC") -> bytes:
    """(S,) float waveform in [-1, 1] -> 16-bit FLAC (or ``fmt="WAV"``) file bytes."""
    import soundfile as sf

    pcm = np.round(np.clip(wave, -1.0, 1.0) * 32767).astype(np.int16)  # quantised here: every format stores these
    buf = io.BytesIO()
    sf.write(buf, pcm, sample_rate, format=fmt, subtype="PCM_16")
    return buf.getvalue()
