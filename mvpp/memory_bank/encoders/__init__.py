"""Encoders of the memory bank: captioner, text embedder, frame encoder, and their profiles.

Importing this package is cheap: torch, transformers, sentence-transformers and
open_clip are imported only when a model is actually loaded.
"""

from __future__ import annotations

from .base import Captioner, EncoderUnavailableError, FrameEncoder, TextEncoder
from .captioner import BlipCaptioner
from .frames import FRAME_STATS_ID, FrameStatsEncoder, OpenClipFrameEncoder, open_clip_model_id
from .profiles import LITE_TEXT_MODEL, PROFILES, Encoders, EncoderSpec, load_encoders
from .text import SentenceTextEncoder

__all__ = [
    "FRAME_STATS_ID",
    "LITE_TEXT_MODEL",
    "PROFILES",
    "BlipCaptioner",
    "Captioner",
    "EncoderSpec",
    "EncoderUnavailableError",
    "Encoders",
    "FrameEncoder",
    "FrameStatsEncoder",
    "OpenClipFrameEncoder",
    "SentenceTextEncoder",
    "TextEncoder",
    "load_encoders",
    "open_clip_model_id",
]
