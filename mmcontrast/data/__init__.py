"""Data layer: the demo world, audio decoding and the resumable shard pipeline."""

from mmcontrast.data.audio import AudioDecodeError, decode_audio
from mmcontrast.data.demo import CLASSES, COLORS, SHAPES, class_index, main_demo, write_demo_world
from mmcontrast.data.pipeline import ShardLoader, make_loader

__all__ = [
    "CLASSES",
    "COLORS",
    "SHAPES",
    "AudioDecodeError",
    "ShardLoader",
    "class_index",
    "decode_audio",
    "main_demo",
    "make_loader",
    "write_demo_world",
]
