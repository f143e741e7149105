"""Text encoder on top of sentence-transformers.

One forward pass gives both outputs the bank stores per item: the pooled
sentence vector (the retrieval vector, pooled exactly as the model's own
sentence-transformers pipeline pools) and the contextual token embeddings of
the text (the predictor's token features).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .base import (
    EncoderUnavailableError,
    load_cache_first,
    looks_like_local_path,
    require_cached_when_offline,
    resolve_device,
)
from .packing import PackedBert

logger = logging.getLogger(__name__)

__all__ = [
    "TEXT_PRECISIONS",
    "SentenceTextEncoder",
    "check_text_precision",
    "bfloat16_rows_invariant",
    "native_bfloat16",
    "native_int8",
    "plan_batches",
]

# Titles and frame captions are short; a cap keeps the cost of the odd very long
# description bounded (UAE-Large-V1 would otherwise accept 512 tokens).
DEFAULT_MAX_SEQ_LENGTH = 256

# Most texts per transformer call. On the CPU a call costs a fixed amount whatever it
# holds (MiniLM on 2 cores: 11 ms for one 8-token title, about 0.17 ms per further token
# position: the weights are read once per call), so calls are filled. A BERT encoder runs
# them packed (`packing.PackedBert`: no padding, attention per group of equal length);
# MicroLens titles (median 15 tokens, 10% above 30, one of 153), 2 cores, three
# alternating rounds: 318 against 180 titles/s padded in calls of 16 (a service's batch),
# 365 against 254 in calls of 64, 346 against 309 in calls of 256 (a build's), 90 against
# 73 one title at a time; calls larger than 64 gained nothing. Other models pad a call's
# texts to the longest of them, so the CPU groups those by token count (`plan_batches`),
# trading the fixed cost, expressed in token positions of work, against the padding
# (taken as 60, 120 or 200 positions: no difference beyond the noise; BERT-large, UAE's
# shape, costs about 40 positions a call, so the unit holds across model sizes). A GPU
# fills its calls (sorted by length) to the larger cap.
CPU_BATCH_SIZE = 64
CPU_CALL_COST_TOKENS = 100.0
CUDA_BATCH_SIZE = 128

# Arithmetic of the transformer on the CPU. "float32" is exact to float noise: a text
# encodes to the same vectors (within 1e-6) whatever else shares its batch, so an item
# scored as a new upload gets the prediction evaluation gave it. "bfloat16" runs the
# matrix products in bfloat16 (autocast; weights, layer norms and softmax stay float32):
# 1.5-1.7x the titles per second on a CPU with bfloat16 instructions, vectors within a
# cosine of 0.9999 of float32's. Packed (a BERT encoder) a text's bfloat16 vectors do not
# depend on its batch either where the CPU's bfloat16 kernels sum a row alike in calls of
# any size (`bfloat16_rows_invariant`; not on x86 with AMX, where they move by bfloat16
# rounding); padded (other models) they do, because the padding changes the kernels'
# blocking: about 1e-3 on the pooled vector, 1e-2 on a token. On CUDA the
# model runs in float16 under either. "int8" codes the transformer's linear layers and
# their inputs in 8 bits, one scale per weight row and per token, and sums the products
# exactly in integers (`int8.Int8Linear`): about 2x the titles per second of float32 on a
# CPU with 8-bit dot products (x86 VNNI), pooled vectors within a cosine of about 0.997
# (benchmarks/README.md, "Text precision: 8-bit integer products"). A token's products
# do not depend on its call, so a text encodes alike in any batch; CUDA sums the same
# integers in float64 (exact) and keeps the rest of the model in float32.
TEXT_PRECISIONS: tuple[str, ...] = ("float32", "bfloat16", "int8")


class SentenceTextEncoder:
    """A sentence-transformers model as a `TextEncoder`.

    Args:
        model_id_or_path: hub id (e.g. "WhereIsAI/UAE-Large-V1") or a local folder
            saved by `SentenceTransformer.save`.
        device: torch device; default CUDA when available (run in fp16 there), else CPU.
        model_id: the id recorded in the bank manifest; defaults to `model_id_or_path`.
            Give a stable name when the path differs between machines.
        max_seq_length: cap on the transformer's input length (tokens).
        batch_size: most texts per transformer call; default 128 on CUDA, 64 on the CPU
            (where a BERT model's calls are packed and other models' are sized by
            `plan_batches`).
        precision: "float32", "bfloat16" or "int8", the transformer's arithmetic (see
            `TEXT_PRECISIONS`); a bank records it so that every path encodes alike.
    """

    def __init__(
        self,
        model_id_or_path: str | Path,
        device: str | None = None,
        *,
        model_id: str | None = None,
        max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH,
        batch_size: int | None = None,
        precision: str = "float32",
    ) -> None:
        self.precision = precision = check_text_precision(precision)
        source = str(model_id_or_path)
        self.model_id: str = model_id or source
        self.device: str = resolve_device(device)
        if batch_size is None:
            batch_size = CUDA_BATCH_SIZE if self.device.startswith("cuda") else CPU_BATCH_SIZE
        self.batch_size = max(1, batch_size)
        self._model = _load_sentence_transformer(source, self.device)

        import torch

        self._on_cpu = self.device.split(":")[0] == "cpu"
        if precision == "bfloat16" and self._on_cpu and not native_bfloat16():
            logger.warning(
                "this CPU has no bfloat16 instructions: the bank's bfloat16 text encoder is "
                "emulated and may run slower than float32 would"
            )
        if precision == "int8" and self._on_cpu and not native_int8():
            logger.warning(
                "this CPU has no 8-bit dot-product instructions (VNNI): the bank's int8 text "
                "encoder may run no faster than float32 would"
            )

        if precision == "int8":
            self._quantize()
        elif self.device.startswith("cuda"):
            self._model.half()
        replaced = self._prepack() if precision == "float32" and self._on_cpu else []
        # a GPU's calls are full and sorted already: packing would only add kernel launches
        self._packed = PackedBert.wrap(self._model) if self._on_cpu else None
        current = self._model.max_seq_length
        if current is None or current > max_seq_length:
            self._model.max_seq_length = max_seq_length
        self.max_seq_length: int | None = self._model.max_seq_length

        tokenizer = self._model.tokenizer
        # [UNK] stands for a real word of the text, so it stays; [CLS]/[SEP]/<s>/</s>/[PAD] go.
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        special.discard(getattr(tokenizer, "unk_token_id", None))
        self._special_ids = torch.tensor(sorted(special), dtype=torch.long)

        try:
            pooled, tokens = self._probe(replaced)
        except Exception as exc:
            raise EncoderUnavailableError(
                source, f"model loaded but a test encode failed: {exc}"
            ) from exc
        del replaced  # the unpacked weights are no longer needed
        self.dim: int = int(pooled.shape[1])
        self.token_dim: int = int(tokens[0].shape[1])
        logger.info(
            "text encoder %s on %s: dim=%d token_dim=%d max_seq_length=%s",
            self.model_id,
            self.device,
            self.dim,
            self.token_dim,
            self.max_seq_length,
        )

    def __repr__(self) -> str:
        return (
            f"SentenceTextEncoder(model_id={self.model_id!r}, dim={self.dim}, device={self.device!r}, "
            f"precision={self.precision!r})"
        )

    def _transformer(self) -> Any:
        """The pipeline's transformers model (its first module's `auto_model`), or None."""
        return getattr(self._model[0], "auto_model", None) if len(self._model) else None

    def _quantize(self) -> None:
        """The transformer's linear layers in 8-bit integers (the "int8" precision)."""
        from .int8 import quantize_linears

        transformer = self._transformer()
        count = quantize_linears(transformer) if transformer is not None else 0
        if count == 0:
            raise ValueError(
                f"text precision 'int8' needs a transformer with linear layers, and {self.model_id} "
                "has none; build with --text-precision float32"
            )
        logger.info("text encoder %s: %d linear layers in int8", self.model_id, count)

    def _prepack(self) -> list[Any]:
        """The transformer's float32 linear layers with weights laid out for oneDNN (faster
        on a CPU, the same arithmetic); returns the layers replaced."""
        from mvpp.onednn import prepack_linears

        transformer = self._transformer()
        replaced = prepack_linears(transformer) if transformer is not None else []
        logger.debug("text encoder %s: %d linear layers packed for oneDNN", self.model_id, len(replaced))
        return replaced

    def _probe(self, replaced: list[Any]) -> tuple[np.ndarray, list[np.ndarray]]:
        """A first encode (the widths); where it fails with packed layers (a model whose
        code reads its layers' weights itself), again with the model's own layers."""
        try:
            return self._run(["dimension probe"], max_tokens=1, batch_size=1)
        except Exception as exc:
            if not replaced:
                raise
            from mvpp.onednn import restore_linears

            logger.info("text encoder %s: packed linear layers failed (%s); using the model's own",
                        self.model_id, exc)
            restore_linears(replaced)
            return self._run(["dimension probe"], max_tokens=1, batch_size=1)

    @contextlib.contextmanager
    def _arithmetic(self) -> Iterator[None]:
        import torch

        if self.precision == "bfloat16" and self._on_cpu:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                yield
        else:
            yield

    def encode(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """Pooled sentence vectors, (B, dim) float32, L2-normalised."""
        texts = _check_texts(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        # the same calls as `encode_both`: padded under bfloat16, a text's vector depends on its call
        return self._run(texts, max_tokens=0, batch_size=batch_size or self.batch_size, with_tokens=False)[0]

    def encode_tokens(
        self, texts: Sequence[str], max_tokens: int = 32, batch_size: int | None = None
    ) -> list[np.ndarray]:
        """Per text the (n_i, token_dim) float32 output token embeddings.

        Special tokens and padding are dropped and at most the first `max_tokens`
        tokens are kept; an empty text gives a (0, token_dim) array.
        """
        return self.encode_both(texts, max_tokens=max_tokens, batch_size=batch_size)[1]

    def encode_both(
        self, texts: Sequence[str], max_tokens: int = 32, batch_size: int | None = None
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """`encode(texts)` and `encode_tokens(texts, max_tokens)` from one transformer pass."""
        texts = _check_texts(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32), []
        return self._run(texts, max_tokens=max_tokens, batch_size=batch_size or self.batch_size)

    def _run(
        self, texts: list[str], max_tokens: int, batch_size: int, with_tokens: bool = True
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        import torch

        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        # output_value=None returns every output of the pipeline per text (token
        # embeddings, input ids, attention mask and the pooled vector) from one pass.
        with self._arithmetic():
            outputs = (
                self._packed.encode(texts, max_texts=batch_size)
                if self._packed is not None
                else self._run_padded(texts, batch_size)
            )
        pooled = torch.stack([out["sentence_embedding"] for out in outputs]).float()
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1).cpu().numpy()

        tokens: list[np.ndarray] = []
        for out in outputs if with_tokens else ():
            ids = out["input_ids"].cpu()
            keep = out["attention_mask"].cpu().bool() & ~torch.isin(ids, self._special_ids)
            emb = out["token_embeddings"].float().cpu()[keep][:max_tokens]
            tokens.append(np.ascontiguousarray(emb.numpy(), dtype=np.float32))
        return pooled.astype(np.float32, copy=False), tokens

    def _run_padded(self, texts: list[str], batch_size: int) -> list[dict[str, Any]]:
        """The pipeline's own `encode`, per call of texts grouped by `plan_batches`."""
        outputs: list[dict[str, Any]] = [{} for _ in texts]
        call_cost = CPU_CALL_COST_TOKENS if self._on_cpu else None
        # a GPU's full calls need only an order: characters, as sentence-transformers sorts,
        # spare it a second tokenisation
        lengths = self._token_counts(texts) if call_cost is not None else [len(t) for t in texts]
        for call in plan_batches(lengths, batch_size, call_cost):
            done = self._model.encode(
                [texts[i] for i in call], batch_size=len(call), output_value=None, show_progress_bar=False
            )
            for i, out in zip(call, done, strict=True):
                outputs[i] = out
        return outputs

    def _token_counts(self, texts: list[str]) -> list[int]:
        """Tokens per text as the model will see it (special tokens in, truncated)."""
        tokenizer = getattr(self._model, "tokenizer", None)
        if tokenizer is None:  # a pipeline without one: characters are the next best guide
            return [len(t) for t in texts]
        cap = self.max_seq_length or sys.maxsize
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            # The fast tokenizer's own engine, read as it stands: calling the tokenizer
            # with settings other than the model's would switch the engine's padding back
            # and forth, which races with a model call in another thread (a service
            # scores in several).
            return [min(sum(enc.attention_mask), cap) for enc in backend.encode_batch(texts)]
        ids = tokenizer(texts, truncation=True, max_length=self.max_seq_length)["input_ids"]
        return [len(row) for row in ids]


def plan_batches(lengths: Sequence[int], max_batch: int, call_cost: float | None) -> list[list[int]]:
    """Which texts go into which transformer call: positions into `lengths` (token counts),
    each call at most `max_batch` texts of similar length.

    With `call_cost` (the fixed cost of a call, in token positions of work) the calls
    minimise the total of their fixed costs and their padded sizes (texts x longest text),
    solved exactly over the texts sorted by length. Without it, the sorted texts are cut
    into full calls of `max_batch`, longest first (what a GPU wants).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if not order:
        return []
    max_batch = max(1, max_batch)
    if call_cost is None:
        return [order[lo : lo + max_batch] for lo in range(0, len(order), max_batch)]
    order.reverse()  # shortest first: a call's padded width is its last text's length
    sizes = np.asarray([lengths[i] for i in order], dtype=np.float64)
    n = len(order)
    best = np.zeros(n + 1)  # best[j]: the cheapest calls for the j shortest texts
    start = np.zeros(n + 1, dtype=np.int64)  # where the last of those calls begins
    for j in range(1, n + 1):
        first = np.arange(max(0, j - max_batch), j)
        cost = best[first] + call_cost + (j - first) * sizes[j - 1]
        pick = int(np.argmin(cost))
        best[j], start[j] = cost[pick], first[pick]
    calls: list[list[int]] = []
    j = n
    while j > 0:
        calls.append(order[int(start[j]) : j])
        j = int(start[j])
    return calls[::-1]


def check_text_precision(value: str) -> str:
    """`value` as one of `TEXT_PRECISIONS` (case and spaces ignored), else ValueError."""
    name = str(value).strip().lower()
    if name not in TEXT_PRECISIONS:
        raise ValueError(f"text precision must be one of {', '.join(TEXT_PRECISIONS)}, got {value!r}")
    return name


def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (x86 AVX512-BF16 or AMX, Arm BF16);
    False where /proc/cpuinfo cannot tell."""
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


# The probe of `bfloat16_rows_invariant`: a BERT feed-forward output layer's shape (the
# longest sum of the model's products), products of 1 row and of calls of these sizes.
_PROBE_SHAPE = (1536, 384)
_PROBE_ROWS = (8, 48, 200)
_rows_invariant: bool | None = None


def bfloat16_rows_invariant() -> bool:
    """Whether this CPU's bfloat16 matrix products give a row the same bits whatever the
    number of rows of its call (probed once, then remembered).

    The kernels oneDNN picks depend on the CPU and the call's shape: on some CPUs every
    call sums a row's products in one order, on others (seen on x86 with AMX, whose
    kernels block the sum differently for calls of more than about 32 rows) the order
    changes with the call, and a few outputs of a row round to a neighbouring bfloat16.
    Where it does, a text's packed bfloat16 vectors move by bfloat16 rounding (about 1e-4
    on a pooled vector) with the other texts of its call; float32 and int8 never do.
    """
    global _rows_invariant
    if _rows_invariant is None:
        import torch

        k, n = _PROBE_SHAPE
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(max(_PROBE_ROWS), k, generator=gen).bfloat16()
        w = torch.randn(n, k, generator=gen).bfloat16()
        with torch.inference_mode():
            alone = torch.cat([torch.nn.functional.linear(x[i : i + 1], w) for i in range(len(x))])
            _rows_invariant = all(
                torch.equal(torch.nn.functional.linear(x[:rows], w), alone[:rows]) for rows in _PROBE_ROWS
            )
    return _rows_invariant


def native_int8() -> bool:
    """Whether this CPU has 8-bit dot-product instructions (x86 VNNI or AMX, Arm dot
    product), which the int8 text precision's integer products need to run fast;
    False where /proc/cpuinfo cannot tell."""
    return bool(_cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"})


def _cpu_flags() -> set[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (empty where it is absent)."""
    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return set()
    for line in info.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in {"flags", "features"}:
            return set(value.split())
    return set()


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("expected a list of texts, got a single string")
    checked: list[str] = []
    for i, text in enumerate(texts):
        if text is None:
            checked.append("")
        elif isinstance(text, str):
            checked.append(text)
        else:
            raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")
    return checked


def _load_sentence_transformer(source: str, device: str) -> Any:
    path = Path(source).expanduser()
    if not path.is_dir() and not looks_like_local_path(source):
        require_cached_when_offline(source)
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise EncoderUnavailableError(
            source, f"sentence-transformers is not installed ({exc})"
        ) from exc

    if path.is_dir():
        try:
            return SentenceTransformer(str(path), device=device, local_files_only=True)
        except Exception as exc:
            raise EncoderUnavailableError(
                source, f"cannot load the local model folder ({exc})"
            ) from exc
    if looks_like_local_path(source):
        what = "is not a model folder" if path.exists() else "does not exist"
        raise EncoderUnavailableError(source, f"local path {path} {what}")
    return load_cache_first(
        source,
        lambda local_only: SentenceTransformer(source, device=device, local_files_only=local_only),
    )
