"""Metadata features for the predictor's metadata expert (M).

Sources, all fitted on the training split only:
- numeric metadata columns (creator followers, music uses, duration written as mm:ss...):
  log1p when every training value is non-negative (counts), then standardised with the
  training mean and std, and also given as a piecewise-linear encoding over the training
  quantiles (`bins` pieces: an MLP then fits non-monotone effects easily); values beyond
  the training range saturate instead of extrapolating, as in a tree (the value itself is
  clipped to the training range, the pieces are 0 or 1 there);
- categorical metadata columns (creator id, music id, any text value): a vocabulary of
  the training values seen at least `min_count` times; id 0 is the unknown bucket that
  takes unseen, rare and missing values;
- derived from the item itself: the video's duration from its file (log1p seconds), the
  post's age when its counts were observed (log1p hours, observed - published), the post
  hour (sin / cos of the hour of day of the stored time) and the weekday (a categorical).

A missing value is never a zero in disguise: numeric features come with a mask (False =
missing) and the model drops masked entries; a missing category is bucket 0.
The featurizer is a plain JSON dict in the run's config.json (no pickles).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from mvpp.memory_bank.metadata import category_key

FORMAT = 1

#: Derived numeric sources (besides "meta", a metadata column).
DURATION = "duration"
AGE = "age"
HOUR_SIN = "hour_sin"
HOUR_COS = "hour_cos"
#: Derived categorical source.
WEEKDAY = "weekday"
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")

# A column is numeric when at least this share of its non-missing training values are numbers.
NUMERIC_SHARE = 0.9
# Standardised values are clipped to this many standard deviations.
CLIP = 10.0
DEFAULT_MIN_COUNT = 2
DEFAULT_BINS = 8


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _number(v: Any) -> float:
    """The value as a float, NaN when it is missing or not a number."""
    if _is_number(v):
        return float(v)
    return math.nan


@dataclass
class NumericFeature:
    """One numeric input of the metadata expert."""

    name: str
    source: str  # "meta" (a metadata column) or one of the derived sources
    log1p: bool
    mean: float = 0.0
    std: float = 1.0
    # Quantile edges of the standardised training values; k + 1 edges give k encoded pieces.
    edges: list[float] = field(default_factory=list)
    # Range of the standardised training values that later values are clipped to, so that
    # the value column saturates like the pieces (None: not clipped; runs saved before).
    lo: float | None = None
    hi: float | None = None

    @property
    def width(self) -> int:
        """Columns of this feature: the standardised value, then one per piece."""
        return 1 + max(0, len(self.edges) - 1)


@dataclass
class CategoricalFeature:
    """One categorical input; category id = position in `vocab` + 1, 0 = unknown."""

    name: str
    source: str  # "meta" or "weekday"
    vocab: list[str] = field(default_factory=list)

    @property
    def cardinality(self) -> int:
        return len(self.vocab)


def hour_of_day(ts: np.ndarray) -> np.ndarray:
    """Fractional hour (0-24) of unix seconds, on the clock the time was stored in."""
    return np.mod(ts, 86400.0) / 3600.0


def weekday(ts: np.ndarray) -> np.ndarray:
    """Monday = 0 .. Sunday = 6 of unix seconds (1970-01-01 was a Thursday); NaN stays NaN."""
    return np.mod(np.floor(ts / 86400.0) + 3.0, 7.0)


def _as_array(values: Sequence[float | None] | np.ndarray | None, n: int) -> np.ndarray:
    if values is None:
        return np.full(n, np.nan, np.float64)
    arr = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    if arr.shape != (n,):
        raise ValueError(f"expected {n} values, got shape {arr.shape}")
    return arr


def _raw_derived(
    source: str, duration_s: np.ndarray, published: np.ndarray, observed: np.ndarray
) -> np.ndarray:
    """Derived feature values before log1p / standardisation (NaN = missing)."""
    with np.errstate(invalid="ignore"):
        if source == DURATION:
            return np.where(duration_s >= 0, duration_s, np.nan)
        if source == AGE:
            age_h = (observed - published) / 3600.0
            # observed before published is a data error, not a negative age: clip to 0
            return np.maximum(age_h, 0.0)
        if source == HOUR_SIN:
            return np.sin(2 * np.pi * hour_of_day(published) / 24.0)
        if source == HOUR_COS:
            return np.cos(2 * np.pi * hour_of_day(published) / 24.0)
    raise ValueError(f"unknown derived feature {source!r}")


@dataclass
class MetaFeaturizer:
    """Turns items' metadata, duration and times into the metadata expert's inputs.

    Fit on the training split with `fit` (or `fit_snapshot`), then `transform` any items:
    (numeric (N, M) float32, numeric_mask (N, M) bool, categorical (N, C) int64).
    """

    numeric: list[NumericFeature] = field(default_factory=list)
    categorical: list[CategoricalFeature] = field(default_factory=list)
    min_count: int = DEFAULT_MIN_COUNT
    bins: int = DEFAULT_BINS

    # -- sizes -----------------------------------------------------------------------

    @property
    def n_numeric(self) -> int:
        """Columns of the numeric output (each feature's value and its encoded pieces)."""
        return sum(f.width for f in self.numeric)

    @property
    def value_columns(self) -> list[int]:
        """Positions in the numeric output of each feature's standardised value."""
        widths = [f.width for f in self.numeric]
        return [int(c) for c in np.cumsum(widths) - widths] if widths else []

    @property
    def cardinalities(self) -> list[int]:
        return [c.cardinality for c in self.categorical]

    @property
    def n_features(self) -> int:
        return len(self.numeric) + len(self.categorical)

    @property
    def columns(self) -> list[str]:
        """The metadata columns read (derived features not included), in feature order."""
        out: list[str] = []
        for f in [*self.numeric, *self.categorical]:
            if f.source == "meta" and f.name not in out:
                out.append(f.name)
        return out

    @property
    def feature_names(self) -> list[str]:
        """The features (one name per metadata input, not per output column)."""
        return [f.name for f in self.numeric] + [c.name for c in self.categorical]

    @property
    def numeric_columns(self) -> list[str]:
        """Names of the numeric output columns: NAME, then NAME#1.. for the pieces."""
        return [f.name if t == 0 else f"{f.name}#{t}" for f in self.numeric for t in range(f.width)]

    # -- fitting ---------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        metadata: Sequence[dict[str, Any]],
        duration_s: Sequence[float | None] | np.ndarray | None = None,
        published_ts: Sequence[float | None] | np.ndarray | None = None,
        observed_ts: Sequence[float | None] | np.ndarray | None = None,
        *,
        columns: Sequence[str] | None = None,
        categorical: Sequence[str] = (),
        min_count: int = DEFAULT_MIN_COUNT,
        derived: bool = True,
        bins: int = DEFAULT_BINS,
        clip_range: bool = True,
    ) -> MetaFeaturizer:
        """Fit on training items.

        columns: metadata columns to use (default: every column found in `metadata`).
        categorical: columns to treat as categories even when their values are numbers
        (e.g. a numeric creator id); other columns are numeric when at least 90% of their
        non-missing values are numbers. A column without any training value is left out,
        and so is a categorical column without any category seen `min_count` times.
        derived: add duration, age, post hour and weekday where the data has them.
        bins: pieces of the quantile encoding of numeric features (0: values only).
        clip_range: clip later values to the training range. Under a time split the
        newest posts lie outside it (the age at observation above all), and an MLP would
        extrapolate a linear trend there; clipped, they read as the nearest training
        values, as in a tree.
        """
        if min_count < 1:
            raise ValueError("min_count must be >= 1")
        n = len(metadata)
        if columns is None:
            seen: dict[str, None] = {}
            for m in metadata:
                for key in m:
                    seen.setdefault(key, None)
            columns = list(seen)
        forced = set(categorical)
        numeric: list[NumericFeature] = []
        cats: list[CategoricalFeature] = []
        for col in columns:
            values = [m.get(col) for m in metadata]
            present = [v for v in values if category_key(v) is not None]
            if not present:
                continue
            n_num = sum(_is_number(v) for v in present)
            if col not in forced and n_num >= NUMERIC_SHARE * len(present):
                x = np.array([_number(v) for v in values], np.float64)
                x = x[np.isfinite(x)]
                feat = NumericFeature(col, "meta", log1p=bool((x >= 0).all()))
                numeric.append(_standardise(feat, x, bins, clip_range))
            else:
                counts = Counter(k for k in map(category_key, values) if k is not None)
                vocab = sorted(k for k, c in counts.items() if c >= min_count)
                if vocab:
                    cats.append(CategoricalFeature(col, "meta", vocab))
        if derived:
            dur = _as_array(duration_s, n)
            pub = _as_array(published_ts, n)
            obs = _as_array(observed_ts, n)
            for name, source, log in (
                ("duration_s", DURATION, True),
                ("age_h", AGE, True),
                ("hour_sin", HOUR_SIN, False),
                ("hour_cos", HOUR_COS, False),
            ):
                x = _raw_derived(source, dur, pub, obs)
                x = x[np.isfinite(x)]
                if len(x):
                    # the hour is periodic already (sin, cos): no pieces
                    pieces = 0 if source in (HOUR_SIN, HOUR_COS) else bins
                    numeric.append(_standardise(NumericFeature(name, source, log), x, pieces, clip_range))
            if np.isfinite(pub).any():
                cats.append(CategoricalFeature("weekday", WEEKDAY, list(WEEKDAYS)))
        return cls(numeric, cats, min_count, bins)

    @classmethod
    def fit_snapshot(cls, snapshot: Any, idx: np.ndarray, **kwargs: Any) -> MetaFeaturizer:
        """Fit on the items `idx` (the training split) of a BankSnapshot."""
        return cls.fit(
            [snapshot.metadata[i] for i in idx] if snapshot.metadata else [{} for _ in idx],
            _snapshot_array(snapshot, "duration_s")[idx],
            snapshot.published_ts[idx],
            _snapshot_array(snapshot, "observed_ts")[idx],
            **kwargs,
        )

    # -- transforming ------------------------------------------------------------------

    def transform(
        self,
        metadata: Sequence[dict[str, Any] | None],
        duration_s: Sequence[float | None] | np.ndarray | None = None,
        published_ts: Sequence[float | None] | np.ndarray | None = None,
        observed_ts: Sequence[float | None] | np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(numeric (N, M) float32, numeric_mask (N, M) bool, categorical (N, C) int64).

        Masked numeric entries hold 0; unknown, unseen, rare and missing categories are 0.
        """
        n = len(metadata)
        metas = [m or {} for m in metadata]
        dur = _as_array(duration_s, n)
        pub = _as_array(published_ts, n)
        obs = _as_array(observed_ts, n)
        numeric = np.zeros((n, self.n_numeric), np.float32)
        mask = np.zeros((n, self.n_numeric), bool)
        for j, f in zip(self.value_columns, self.numeric, strict=True):
            if f.source == "meta":
                x = np.array([_number(m.get(f.name)) for m in metas], np.float64)
            else:
                x = _raw_derived(f.source, dur, pub, obs)
            with np.errstate(invalid="ignore", divide="ignore"):
                if f.log1p:
                    x = np.log1p(np.maximum(x, 0.0))
                z = np.clip((x - f.mean) / f.std, -CLIP, CLIP)
                if f.lo is not None and f.hi is not None:
                    z = np.clip(z, f.lo, f.hi)
            ok = np.isfinite(z)
            numeric[:, j] = np.where(ok, z, 0.0)
            mask[:, j] = ok
            for t in range(1, f.width):
                lo, hi = f.edges[t - 1], f.edges[t]
                piece = np.clip((z - lo) / (hi - lo), 0.0, 1.0)
                numeric[:, j + t] = np.where(ok, piece, 0.0)
                mask[:, j + t] = ok
        categorical = np.zeros((n, len(self.categorical)), np.int64)
        for j, c in enumerate(self.categorical):
            if c.source == WEEKDAY:
                wd = weekday(pub)
                ok = np.isfinite(wd)
                categorical[ok, j] = wd[ok].astype(np.int64) + 1
            else:
                ids = {v: i + 1 for i, v in enumerate(c.vocab)}
                categorical[:, j] = [ids.get(category_key(m.get(c.name)), 0) for m in metas]
        return numeric, mask, categorical

    def transform_snapshot(
        self, snapshot: Any, idx: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Features of the items `idx` of a BankSnapshot (default: all of them)."""
        idx = np.arange(len(snapshot)) if idx is None else np.asarray(idx)
        metas = [snapshot.metadata[i] for i in idx] if snapshot.metadata else [{} for _ in idx]
        return self.transform(
            metas,
            _snapshot_array(snapshot, "duration_s")[idx],
            snapshot.published_ts[idx],
            _snapshot_array(snapshot, "observed_ts")[idx],
        )

    # -- persistence -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "min_count": self.min_count,
            "bins": self.bins,
            "numeric": [asdict(f) for f in self.numeric],
            "categorical": [asdict(c) for c in self.categorical],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MetaFeaturizer:
        if data.get("format") != FORMAT:
            raise ValueError(f"metadata features format {data.get('format')} is not supported")
        return cls(
            numeric=[NumericFeature(**f) for f in data["numeric"]],
            categorical=[CategoricalFeature(**c) for c in data["categorical"]],
            min_count=int(data["min_count"]),
            bins=int(data.get("bins", 0)),
        )


def _standardise(feat: NumericFeature, x: np.ndarray, bins: int = 0, clip_range: bool = False) -> NumericFeature:
    """Training mean and std of the (log1p'd) finite values `x`, `bins` quantile pieces,
    and with `clip_range` the range of the standardised values."""
    if feat.log1p:
        x = np.log1p(np.maximum(x, 0.0))
    if len(x):
        feat.mean = float(np.mean(x))
        std = float(np.std(x))
        feat.std = std if std > 1e-12 else 1.0
        if clip_range:
            z_all = np.clip((x - feat.mean) / feat.std, -CLIP, CLIP)
            feat.lo, feat.hi = float(z_all.min()), float(z_all.max())
        if bins > 1:
            z = np.clip((x - feat.mean) / feat.std, -CLIP, CLIP)
            edges = np.unique(np.quantile(z, np.linspace(0.0, 1.0, bins + 1)))
            # fewer than two pieces say nothing the value does not
            feat.edges = [float(e) for e in edges] if len(edges) >= 3 else []
    return feat


def _snapshot_array(snapshot: Any, name: str) -> np.ndarray:
    arr = getattr(snapshot, name, None)
    if arr is None:
        return np.full(len(snapshot), np.nan, np.float64)
    return np.asarray(arr, np.float64)
