"""Frame captioner: BLIP image captioning through transformers."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .base import (
    EncoderUnavailableError,
    load_local_or_hub,
    resolve_device,
)

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_BLIP", "BlipCaptioner"]

DEFAULT_BLIP = "Salesforce/blip-image-captioning-base"


# Frames per generate call. Greedy decoding launches many small kernels per token, so
# a GPU gains from big batches: BLIP base at 384 px on an H200 captioned 137 frames/s
# at 32, 231 at 128 and 276 at 256 (benchmarks/bench_encoders.py). 128 keeps the
# memory under 5 GiB. On the CPU the batch size barely matters.
CUDA_BATCH_SIZE = 128
CPU_BATCH_SIZE = 32


class BlipCaptioner:
    """BLIP (`BlipForConditionalGeneration`) as a `Captioner`.

    Args:
        model_id_or_path: hub id or a local folder holding both the model and its
            processor (as written by `save_pretrained`).
        device: torch device; default CUDA when available (run in fp16 there), else CPU.
        max_new_tokens: caption length cap.
        batch_size: frames per `generate` call; default 128 on CUDA, 32 on the CPU.
        model_id: id recorded in the bank manifest; defaults to `model_id_or_path`.
    """

    def __init__(
        self,
        model_id_or_path: str | Path = DEFAULT_BLIP,
        device: str | None = None,
        max_new_tokens: int = 20,
        *,
        batch_size: int | None = None,
        model_id: str | None = None,
    ) -> None:
        source = str(model_id_or_path)
        self.model_id: str = model_id or source
        self.device: str = resolve_device(device)
        self.max_new_tokens = max_new_tokens
        if batch_size is None:
            batch_size = CUDA_BATCH_SIZE if self.device.startswith("cuda") else CPU_BATCH_SIZE
        self.batch_size = max(1, batch_size)
        self._processor, self._model = _load_blip(source)

        import torch

        self._dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        self._model.to(device=self.device, dtype=self._dtype)
        self._model.eval()
        logger.info("captioner %s on %s", self.model_id, self.device)

    def __repr__(self) -> str:
        return f"BlipCaptioner(model_id={self.model_id!r}, device={self.device!r})"

    def caption(self, frames: Sequence[np.ndarray]) -> list[str]:
        """One caption per (H, W, 3) uint8 RGB frame, generated greedily in batches."""
        import torch

        frames = [_check_frame(frame, i) for i, frame in enumerate(frames)]
        captions: list[str] = []
        for start in range(0, len(frames), self.batch_size):
            batch = frames[start : start + self.batch_size]
            inputs = self._processor(images=batch, return_tensors="pt")
            pixel_values = inputs["pixel_values"].to(device=self.device, dtype=self._dtype)
            with torch.inference_mode():
                generated = self._model.generate(
                    pixel_values=pixel_values, max_new_tokens=self.max_new_tokens
                )
            texts = self._processor.batch_decode(generated, skip_special_tokens=True)
            captions.extend(" ".join(text.split()) for text in texts)
        return captions


def _check_frame(frame: np.ndarray, index: int) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[-1] != 3:
        raise ValueError(f"frame {index} has shape {frame.shape}, expected (H, W, 3)")
    if frame.dtype != np.uint8:
        raise ValueError(f"frame {index} has dtype {frame.dtype}, expected uint8")
    return frame


def _load_blip(source: str) -> tuple[Any, Any]:
    try:
        from transformers import BlipForConditionalGeneration, BlipProcessor
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise EncoderUnavailableError(source, f"transformers is not installed ({exc})") from exc

    def load(name: str, local_only: bool) -> tuple[Any, Any]:
        processor = BlipProcessor.from_pretrained(name, local_files_only=local_only)
        model = BlipForConditionalGeneration.from_pretrained(name, local_files_only=local_only)
        return processor, model

    return load_local_or_hub(source, load)
