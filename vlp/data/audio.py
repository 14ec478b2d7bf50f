"""Audio samples -> log-mel spectrograms: decode, resample, crop/pad, log-mel, SpecAugment.

Shapes: S samples of audio (``seconds * sample_rate``), F = n_fft // 2 + 1 frequency bins,
M = ``n_mels``, T = frames = 1 + S // hop_length (centred STFT, reflect padding).

- decoding: soundfile (wav, flac, ogg; any channel count, mixed down to mono);
- resampling: scipy's polyphase ``resample_poly`` to ``sample_rate``;
- length: a random crop (training) or the centre (eval) of a longer clip; a shorter clip is
  zero-padded, at a random offset in training and at the end in eval;
- features: power spectrogram (``torch.stft``, periodic Hann window) through the HTK mel
  filter bank of ``transformers.audio_utils.mel_filter_bank`` (triangles of height 1),
  ``log(mel + log_offset)``, then ``(x - norm_mean) / norm_std``;
- SpecAugment (training only): ``freq_masks`` bands of up to ``freq_mask_width`` mel bins
  and ``time_masks`` bands of up to ``time_mask_width`` frames, filled with the
  spectrogram's mean.

The transform maps the raw bytes of one sample's audio field to a float tensor (1, M, T),
the batch field ``audio`` (B, 1, M, T) that the audio towers (``vlp.models.audio``) read.
"""
from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch


@dataclass
class AudioConfig:
    sample_rate: int = 16000  # Hz; every clip is resampled to it
    seconds: float = 1.0  # clip length after crop / pad
    n_fft: int = 400  # STFT window and FFT size (25 ms at 16 kHz)
    hop_length: int = 160  # 10 ms at 16 kHz
    n_mels: int = 64  # mel bands M of the (1, M, T) features
    f_min: float = 0.0  # Hz, lowest mel band edge
    f_max: Optional[float] = None  # None: sample_rate / 2
    log_offset: float = 1e-6  # log(mel + log_offset): silence maps to about -13.8
    norm_mean: float = -4.0  # features are (log-mel - norm_mean) / norm_std
    norm_std: float = 4.0  # see norm_mean
    freq_masks: int = 1  # SpecAugment in training; 0 disables
    freq_mask_width: int = 4  # max mel bins per mask
    time_masks: int = 1  # SpecAugment time masks in training; 0 disables
    time_mask_width: int = 10  # max frames per mask

    @property
    def num_samples(self) -> int:
        return int(round(self.seconds * self.sample_rate))

    @property
    def frames(self) -> int:
        return 1 + self.num_samples // self.hop_length

    @property
    def shape(self) -> Tuple[int, int, int]:
        """(1, M, T): one sample's features."""
        return (1, self.n_mels, self.frames)

    def check(self) -> None:
        if self.sample_rate < 1 or self.seconds <= 0:
            raise ValueError(
                f"data.audio needs sample_rate >= 1 and seconds > 0, got {self.sample_rate}, {self.seconds}"
            )
        if self.n_fft < 2 or not 1 <= self.hop_length <= self.n_fft or self.n_mels < 1:
            raise ValueError(
                f"data.audio needs n_fft >= 2, 1 <= hop_length <= n_fft and n_mels >= 1, "
                f"got n_fft={self.n_fft}, hop_length={self.hop_length}, n_mels={self.n_mels}"
            )
        f_max = self.sample_rate / 2 if self.f_max is None else self.f_max
        if not 0 <= self.f_min < f_max <= self.sample_rate / 2:
            raise ValueError(f"data.audio needs 0 <= f_min < f_max <= sample_rate/2, got {self.f_min}, {f_max}")
        if self.num_samples <= self.n_fft // 2:
            raise ValueError(f"data.audio.seconds={self.seconds} is shorter than half an FFT window")
        if self.norm_std <= 0:
            raise ValueError(f"data.audio.norm_std must be > 0, got {self.norm_std}")


def decode(data: bytes) -> Tuple[np.ndarray, int]:
    """(waveform (S,) float32 mono, sample rate) of wav/flac/ogg bytes."""
    import soundfile as sf

    wave, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)  # (S, channels)
    if wave.shape[0] == 0:
        raise ValueError("empty audio")
    return wave.mean(axis=1), int(sr)


def resample(wave: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Polyphase resampling (anti-aliased) from ``sr_in`` to ``sr_out`` Hz."""
    if sr_in == sr_out:
        return wave
    from scipy.signal import resample_poly

    g = math.gcd(sr_in, sr_out)
    return resample_poly(wave, sr_out // g, sr_in // g).astype(np.float32)


def crop_or_pad(wave: np.ndarray, n: int, rng: Optional[random.Random] = None) -> np.ndarray:
    """Exactly ``n`` samples: random crop / random-offset padding with ``rng``, else centre crop / pad at the end."""
    if len(wave) > n:
        start = rng.randint(0, len(wave) - n) if rng is not None else (len(wave) - n) // 2
        return wave[start : start + n]
    if len(wave) < n:
        start = rng.randint(0, n - len(wave)) if rng is not None else 0
        out = np.zeros(n, dtype=np.float32)
        out[start : start + len(wave)] = wave
        return out
    return wave


def mel_filters(cfg: AudioConfig) -> torch.Tensor:
    """(F, M) HTK mel filter bank, triangles of height 1 (transformers' ``mel_filter_bank``)."""
    from transformers.audio_utils import mel_filter_bank

    fb = mel_filter_bank(
        num_frequency_bins=cfg.n_fft // 2 + 1,
        num_mel_filters=cfg.n_mels,
        min_frequency=cfg.f_min,
        max_frequency=cfg.sample_rate / 2 if cfg.f_max is None else cfg.f_max,
        sampling_rate=cfg.sample_rate,
        norm=None,
        mel_scale="htk",
    )
    return torch.from_numpy(fb).float()


def log_mel(wave: torch.Tensor, cfg: AudioConfig, filters: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(..., S) waveform -> (..., M, T) normalised log-mel features."""
    filters = mel_filters(cfg) if filters is None else filters  # (F, M)
    window = torch.hann_window(cfg.n_fft, periodic=True, dtype=wave.dtype, device=wave.device)
    spec = torch.stft(wave, cfg.n_fft, cfg.hop_length, window=window, center=True, pad_mode="reflect",
                      return_complex=True)  # (..., F, T)
    mel = filters.to(wave.dtype).T @ spec.abs().pow(2)  # (..., M, T)
    return (torch.log(mel + cfg.log_offset) - cfg.norm_mean) / cfg.norm_std


def spec_augment(x: torch.Tensor, cfg: AudioConfig, rng: random.Random) -> torch.Tensor:
    """SpecAugment (Park et al. 2019) frequency and time masking of (1, M, T) features, filled with their mean."""
    x = x.clone()
    fill = float(x.mean())
    _, m, t = x.shape
    masks = ((cfg.freq_masks, cfg.freq_mask_width, m, 1), (cfg.time_masks, cfg.time_mask_width, t, 2))
    for n, width, size, axis in masks:
        for _ in range(n):
            w = rng.randint(0, min(width, size))
            start = rng.randint(0, size - w)
            x.narrow(axis, start, w).fill_(fill)
    return x


class AudioTransform:
    """Audio bytes -> (1, M, T) features; ``train`` adds the random crop and SpecAugment.

    Python's ``random`` drives the augmentation: the data loader seeds it per worker."""

    def __init__(self, cfg: AudioConfig, train: bool):
        cfg.check()
        self.cfg = cfg
        self.train = train
        self.filters = mel_filters(cfg)  # (F, M), computed once

    def __call__(self, data: bytes) -> torch.Tensor:
        cfg = self.cfg
        wave, sr = decode(data)
        rng = random if self.train else None
        wave = crop_or_pad(resample(wave, sr, cfg.sample_rate), cfg.num_samples, rng)  # (S,)
        x = log_mel(torch.from_numpy(np.ascontiguousarray(wave)), cfg, self.filters)[None]  # (1, M, T)
        if self.train and (cfg.freq_masks or cfg.time_masks):
            x = spec_augment(x, cfg, random)
        return x
