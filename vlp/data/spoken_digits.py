"""Spoken digits: the words "zero" ... "nine" synthesized by espeak-ng, as WebDataset shards.

Needs the ``espeak-ng`` program on PATH (``apt-get install espeak-ng``); nothing else is
downloaded. Each word is spoken in every combination of ``VOICES`` x ``SPEEDS`` x
``PITCHES``; the held-out split is the ``VAL_PITCH`` renditions (a pitch never heard in
training), so zero-shot keyword classification is scored on unseen speech. Layout as
``vlp data tones`` (``train/``, ``val/``, ``classnames.txt``, templates); each sample:
``__key__``, ``wav`` (espeak-ng's 22.05 kHz mono output), ``txt``, ``cls``.
"""
from __future__ import annotations

import itertools
import random
import shutil
import subprocess
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple

from vlp.data.digits import CLASSNAMES
from vlp.data.shards import write_split

VOICES = ("en", "en-us", "en+f3", "en+m3", "en+f4", "en-gb-scotland")
SPEEDS = (120, 150, 180, 210)  # words per minute
PITCHES = (25, 40, 55, 70)  # espeak-ng pitch 0..99
VAL_PITCH = 55

CAPTIONS = [
    "someone saying {w}",
    "the spoken word {w}",
    "a voice saying the number {n}",
    "a recording of the digit {w} spoken aloud",
    "the word {w}",
]

ZEROSHOT_TEMPLATES = [
    "someone saying {c}.",
    "the spoken word {c}.",
    "a voice saying the number {c}.",
    "a recording of the digit {c} spoken aloud.",
]


def espeak(word: str, voice: str, speed: int, pitch: int, program: str = "espeak-ng") -> bytes:
    """WAV bytes of ``word`` spoken by espeak-ng."""
    proc = subprocess.run([program, "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", word],
                          capture_output=True, check=False, timeout=60)
    if proc.returncode != 0 or not proc.stdout:
        raise ValueError(f"espeak-ng failed for voice {voice!r}: {proc.stderr.decode(errors='replace').strip()[:200]}")
    return proc.stdout


def write_spoken_digits(
    out: str | Path, seed: int = 0, shard_size: int = 250, voices: Sequence[str] = VOICES,
    speeds: Sequence[int] = SPEEDS, pitches: Sequence[int] = PITCHES, val_pitch: int = VAL_PITCH,
) -> Dict[str, int]:
    """Write the spoken-digits shards and zero-shot files under ``out``; returns sample and shard counts."""
    program = shutil.which("espeak-ng")
    if program is None:
        raise FileNotFoundError("vlp data spoken-digits needs espeak-ng on PATH (e.g. apt-get install espeak-ng)")
    if val_pitch not in pitches or len(set(pitches)) < 2:
        raise ValueError(f"val_pitch {val_pitch} must be one of several pitches, got {list(pitches)}")
    renditions = list(itertools.product(range(10), voices, speeds, pitches))
    out = Path(out)
    counts = {}
    for split in ("train", "val"):
        chosen = [r for r in renditions if (r[3] == val_pitch) == (split == "val")]
        random.Random(f"{seed}-{split}").shuffle(chosen)  # classes interleaved across shards
        shards = write_split(out / split, _samples(split, chosen, program, random.Random(seed)), shard_size)
        counts[split], counts[f"{split}_shards"] = len(chosen), len(shards)
    (out / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    (out / "zeroshot_classification_templates.txt").write_text("\n".join(ZEROSHOT_TEMPLATES) + "\n")
    return counts


def _samples(split: str, renditions: List[Tuple[int, str, int, int]], program: str, rng: random.Random) -> Iterator:
    from tqdm import tqdm

    for i, (label, voice, speed, pitch) in enumerate(tqdm(renditions, desc=f"espeak-ng {split}", unit="clip")):
        yield {
            "__key__": f"spoken-{split}-{i:06d}",
            "wav": espeak(CLASSNAMES[label], voice, speed, pitch, program),
            "txt": rng.choice(CAPTIONS).format(w=CLASSNAMES[label], n=label),
            "cls": label,
        }
