"""Audio tower: waveform -> log-mel (torch.stft, so it runs on the accelerator) -> timm backbone.

Hand-written because open_clip has no audio tower and no torchaudio build matches our torch.
"""

from __future__ import annotations

import math

import timm
import torch
import torch.nn.functional as F
from torch import nn


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int, f_min: float = 0.0, f_max: float | None = None):
    """Triangular HTK-mel filters, shape (n_fft // 2 + 1, n_mels)."""
    f_max = f_max or sample_rate / 2

    def hz_to_mel(f):
        return 2595.0 * math.log10(1.0 + f / 700.0)

    mel_points = torch.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2, dtype=torch.float64)
    hz_points = 700.0 * (10.0 ** (mel_points / 2595.0) - 1.0)
    bin_freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    lower, centre, upper = hz_points[:-2], hz_points[1:-1], hz_points[2:]
    rising = (bin_freqs[:, None] - lower) / (centre - lower)
    falling = (upper - bin_freqs[:, None]) / (upper - centre)
    return torch.clamp(torch.minimum(rising, falling), min=0.0).float()


class LogMel(nn.Module):
    """(b, T) waveform -> (b, 1, n_mels, frames) per-utterance normalised log-mel spectrogram,
    channels-last strided (CPU and cuDNN convolutions run faster on NHWC)."""

    def __init__(self, sample_rate: int, n_fft: int, hop_length: int, n_mels: int):
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.register_buffer("filters", mel_filterbank(n_fft, n_mels, sample_rate), persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        # stft and the log need float32 even when the backbone runs in bf16: float32 out
        spec = torch.stft(
            wave.float(), self.n_fft, self.hop_length, window=self.window.float(), return_complex=True
        )
        power = spec.abs().pow(2).transpose(1, 2)  # (b, frames, freq)
        mel = torch.log(power @ self.filters.float() + 1e-6).transpose(1, 2)  # (b, n_mels, frames)
        mel = (mel - mel.mean(dim=(1, 2), keepdim=True)) / (mel.std(dim=(1, 2), keepdim=True) + 1e-5)
        return mel.unsqueeze(1).contiguous(memory_format=torch.channels_last)


class AudioTower(nn.Module):
    """(b, T) waveform -> (b, embed_dim) L2-normalised embedding."""

    def __init__(
        self,
        embed_dim: int,
        backbone: str,
        sample_rate: int,
        n_fft: int,
        hop_length: int,
        n_mels: int,
        backbone_kwargs: dict | None = None,
    ):
        super().__init__()
        self.frontend = LogMel(sample_rate, n_fft, hop_length, n_mels)
        # pretrained=False: nothing may download weights at run time.
        self.backbone = timm.create_model(
            backbone, pretrained=False, in_chans=1, num_classes=0, **(backbone_kwargs or {})
        )
        self.proj = nn.Linear(self.backbone.num_features, embed_dim, bias=False)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def forward(self, wave: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        mel = self.frontend(wave).to(self.proj.weight.dtype)  # bf16 weights (DeepSpeed bf16) take bf16
        features = self.proj(self.backbone(mel))
        return F.normalize(features, dim=-1) if normalize else features
