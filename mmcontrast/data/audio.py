"""Audio bytes -> fixed-length mono waveform.

Decoding uses soundfile (libsndfile: flac, wav, ogg, mp3 with libsndfile >= 1.1). There is no
torchaudio here, so resampling is a small hand-written polyphase windowed-sinc filter in torch
(Hann-windowed, 6 zero crossings, cut-off 0.99 x the lower Nyquist): unlike linear interpolation
it does not alias when downsampling 44.1/48 kHz sources to 16 kHz.
"""

from __future__ import annotations

import functools
import io
import math

import numpy as np
import soundfile as sf
import torch


class AudioDecodeError(ValueError):
    """The bytes are not audio that soundfile can decode."""


_ZERO_CROSSINGS = 6
_ROLLOFF = 0.99


@functools.lru_cache(maxsize=16)
def _sinc_kernel(orig: int, new: int) -> tuple[torch.Tensor, int]:
    """Polyphase kernel (new, 1, 2*width + orig) for reduced rates orig -> new."""
    base = min(orig, new) * _ROLLOFF
    width = math.ceil(_ZERO_CROSSINGS * orig / base)
    i = torch.arange(-width, width + orig, dtype=torch.float64)  # input offsets
    j = torch.arange(new, dtype=torch.float64)[:, None]  # output phases
    t = (j / new - i / orig) * base  # distance in units of the cut-off period
    window = torch.where(t.abs() <= _ZERO_CROSSINGS, torch.cos(t * math.pi / (2 * _ZERO_CROSSINGS)) ** 2, 0.0)
    kernel = torch.sinc(t) * window * (base / orig)
    return kernel.to(torch.float32)[:, None, :], width


def resample(wave: torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
    """Band-limited resampling of a 1-D waveform; output length ceil(len * new / orig)."""
    if orig_sr == new_sr:
        return wave
    g = math.gcd(orig_sr, new_sr)
    orig, new = orig_sr // g, new_sr // g
    kernel, width = _sinc_kernel(orig, new)
    n = wave.shape[-1]
    x = torch.nn.functional.pad(wave.reshape(1, 1, n), (width, width + orig))
    y = torch.nn.functional.conv1d(x, kernel, stride=orig)  # (1, new, n // orig + 1)
    y = y.transpose(1, 2).reshape(-1)
    return y[: math.ceil(n * new / orig)]


def decode_audio(
    data: bytes, target_sr: int, num_samples: int, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Decode audio bytes to a float32 (num_samples,) mono waveform at target_sr.

    Channels are averaged; a longer clip is cropped (a random window drawn from `generator` when
    one is given, as in training; otherwise the start, as in evaluation); a shorter one is
    zero-padded at the end. Raises AudioDecodeError on bytes soundfile cannot read.
    """
    try:
        wave, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as exc:  # libsndfile raises several types (LibsndfileError, RuntimeError, ...)
        raise AudioDecodeError(f"cannot decode {len(data)} bytes of audio: {exc}") from exc
    if wave.shape[0] == 0:
        raise AudioDecodeError(f"audio of {len(data)} bytes decodes to zero frames")
    if not np.isfinite(wave).all():  # one NaN clip would poison every weight it reaches
        raise AudioDecodeError(f"audio of {len(data)} bytes holds NaN or infinite samples")
    mono = torch.from_numpy(wave).mean(dim=1)
    mono = resample(mono, int(sr), int(target_sr))
    n = mono.shape[0]
    if n > num_samples:
        start = 0
        if generator is not None:
            start = int(torch.randint(0, n - num_samples + 1, (1,), generator=generator))
        mono = mono[start : start + num_samples]
    elif n < num_samples:
        mono = torch.nn.functional.pad(mono, (0, num_samples - n))
    return mono.contiguous()
