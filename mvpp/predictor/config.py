"""Hyper-parameters and ablation switches of the popularity predictor."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

#: Names of the PoE experts, in the order the model stacks them.
EXPERT_ORDER: tuple[str, ...] = ("V", "T", "V_r", "T_r", "L_r", "M", "A", "A_r")

#: Label-interaction pairs (target representation, retrieved representation).
INTERACTION_PAIRS: tuple[tuple[str, str], ...] = (
    ("V", "V_r"),
    ("V", "T_r"),
    ("T", "V_r"),
    ("T", "T_r"),
    ("V", "L_r"),
    ("T", "L_r"),
    ("A", "A_r"),
)

#: `mvpp train --ablate NAME`: the ModelConfig switch each name turns off.
ABLATIONS: dict[str, str] = {
    "retrieval": "use_retrieval",
    "poe": "use_poe",
    "interaction": "use_label_interaction",
    "positive": "use_positive_attention",
    "negative": "use_negative_attention",
    "frames": "use_frames",
    "text": "use_text",
    "meta": "use_meta",
    "audio": "use_audio",
    "word-prior": "use_word_prior",
    "label-embedding": "use_label_embedding",
    "neighbour-prior": "use_neighbour_prior",
    "neighbour-summary": "use_neighbour_summary",
    "wide-neighbourhood": "use_wide_neighbourhood",
}

# Options earlier versions had and measured without a win (benchmarks/README.md, "Removed
# options"), with the value that means "off". A saved config holding the off value
# still loads; one that switched an option on names it.
REMOVED_OPTIONS: dict[str, Any] = {
    "meta_numeric_embedding": "linear",
    "meta_periodic_frequencies": None,  # any value: only read with "periodic"
    "meta_periodic_sigma": None,
    "meta_to_decoder": False,
    "meta_interactions": False,
    "use_lexicon": False,
    "word_dropout": None,  # only read with the lexicon token
    "alpha_learnable": False,
}


def drop_removed(section: str, data: dict[str, Any], removed: dict[str, Any]) -> dict[str, Any]:
    """`data` without the options a config may still hold from an earlier version,
    provided they are off; an error naming those that are on."""
    on = [k for k, off in removed.items() if k in data and off is not None and data[k] != off]
    if on:
        raise ValueError(
            f"{section} config switches on option(s) this version no longer has: "
            f"{', '.join(f'{k}={data[k]!r}' for k in on)} (see benchmarks/README.md, \"Removed options\")"
        )
    return {k: v for k, v in data.items() if k not in removed}


def check_keys(section: str, data: dict[str, Any], cls: type) -> None:
    """Unknown keys are an error that names them (a typo must not pass silently)."""
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"unknown {section} config key(s): {', '.join(unknown)}")


@dataclass
class InputSizes:
    """Sizes of the model's inputs: set from the bank and the run's features, never tuned."""

    d_frame: int = 512
    d_token: int = 384
    n_targets: int = 1
    n_meta_numeric: int = 0
    # Categorical metadata: category ids are 1..cardinality, 0 is the unknown bucket.
    meta_cardinalities: list[int] = field(default_factory=list)
    # Title vocabulary (predictor.lexicon) of the word prior; 0: no word prior.
    lexicon_size: int = 0
    # Width of the sound's segment vectors (memory_bank.encoders.audio).
    d_audio: int = 1

    def __post_init__(self) -> None:
        self.meta_cardinalities = [int(c) for c in self.meta_cardinalities]
        for name in ("d_frame", "d_token", "n_targets", "d_audio"):
            if getattr(self, name) <= 0:
                raise ValueError(f"InputSizes.{name} must be positive, got {getattr(self, name)}")
        if self.lexicon_size < 0 or self.n_meta_numeric < 0:
            raise ValueError("InputSizes.lexicon_size and n_meta_numeric must be >= 0")
        if any(c <= 0 for c in self.meta_cardinalities):
            raise ValueError("InputSizes.meta_cardinalities must all be positive")


@dataclass
class ModelConfig:
    """Every hyper-parameter of `PopularityModel`; the model has no other constants."""

    inputs: InputSizes = field(default_factory=InputSizes)
    # Widths.
    d_model: int = 128
    d_z: int = 64
    expert_hidden: int = 128
    decoder_hidden: int = 128
    decoder_layers: int = 2
    meta_embed_dim: int = 16
    # Bipolar attention: positive scale alpha, negative scale -(1 - alpha).
    alpha: float = 0.5
    # Retrieval softmax temperature. Neighbour scores usually span a few tenths, so 0.1
    # makes the weights neither uniform nor one-hot.
    tau_init: float = 0.1
    tau_learnable: bool = True
    dropout: float = 0.2
    # Log-variance ranges (min, max) of the experts and of the decoder: clamping keeps
    # precisions and the NLL finite.
    expert_logvar_range: tuple[float, float] = (-6.0, 6.0)
    logvar_range: tuple[float, float] = (-7.0, 5.0)
    # Ablation switches (`mvpp train --ablate`, see ABLATIONS).
    use_retrieval: bool = True
    use_positive_attention: bool = True
    use_negative_attention: bool = True
    use_poe: bool = True
    use_label_interaction: bool = True
    use_frames: bool = True
    use_text: bool = True
    use_meta: bool = True
    # The sound: its segments pooled to an acoustic expert A, the neighbours' to A_r.
    use_audio: bool = True
    # The word prior (predictor.word_prior): a cross-fitted ridge's estimate from the
    # title's bag of words, one more decoder input (the decoder learns how far to trust
    # it; adding it to the mean through a learnt gain did worse on MicroLens).
    use_word_prior: bool = True
    use_label_embedding: bool = True
    # Neighbour statistics beside z, as decoder inputs: through the PoE latent the
    # neighbourhood arrives only blurred by the KL term, and the label embedding's
    # softmax weights are relative. The retrieval-weighted label average (the k-NN
    # estimate), and unweighted statistics (neighbours.neighbour_summary). Together
    # worth 0.0035 nMSE on MicroLens (benchmarks/README.md).
    use_neighbour_prior: bool = True
    use_neighbour_summary: bool = True
    # Wider neighbourhoods beside z: for each n in `wide_neighbourhood`, the mean label
    # (per target) and the mean score of the best n by the dense ranking. An average over
    # dozens of similar items is a smoother estimate than the k the attention reads, and
    # the trees of the boosted member use it most (neighbours.wide_summary).
    use_wide_neighbourhood: bool = True
    wide_neighbourhood: tuple[int, ...] = (25, 100)
    # The label embedding also sees each neighbour's score (how far to trust its label).
    label_similarity: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.inputs, dict):
            self.inputs = InputSizes(**self.inputs)
        self.expert_logvar_range = tuple(float(v) for v in self.expert_logvar_range)  # type: ignore[assignment]
        self.logvar_range = tuple(float(v) for v in self.logvar_range)  # type: ignore[assignment]
        self.wide_neighbourhood = tuple(int(n) for n in self.wide_neighbourhood)
        if any(n <= 0 for n in self.wide_neighbourhood):
            raise ValueError(f"ModelConfig.wide_neighbourhood must hold positive sizes, got {self.wide_neighbourhood}")
        for name in ("d_model", "d_z", "expert_hidden", "decoder_hidden", "meta_embed_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.decoder_layers < 0:
            raise ValueError("ModelConfig.decoder_layers must be >= 0")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"ModelConfig.alpha must lie in [0, 1], got {self.alpha}")
        if self.tau_init <= 0.0:
            raise ValueError(f"ModelConfig.tau_init must be positive, got {self.tau_init}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout must lie in [0, 1), got {self.dropout}")
        for name in ("expert_logvar_range", "logvar_range"):
            lo, hi = getattr(self, name)
            if lo >= hi:
                raise ValueError(f"ModelConfig.{name} must have min < max, got {(lo, hi)}")
        if not self.expert_names:
            raise ValueError("ModelConfig switches leave no representation to encode")

    @property
    def has_meta(self) -> bool:
        """Whether a metadata expert exists (configured and switched on)."""
        return self.use_meta and (self.inputs.n_meta_numeric > 0 or len(self.inputs.meta_cardinalities) > 0)

    @property
    def wide_widths(self) -> tuple[int, ...]:
        """The wider neighbourhoods the model reads (none when switched off)."""
        return self.wide_neighbourhood if self.use_wide_neighbourhood and self.use_retrieval else ()

    @property
    def has_word_prior(self) -> bool:
        """Whether the decoder gets the word prior (text on, vocabulary non-empty)."""
        return self.use_text and self.use_word_prior and self.inputs.lexicon_size > 0

    @property
    def expert_names(self) -> list[str]:
        """Representations the model builds, in `EXPERT_ORDER`."""
        on = {
            "V": self.use_frames,
            "T": self.use_text,
            "V_r": self.use_retrieval and self.use_frames,
            "T_r": self.use_retrieval and self.use_text,
            "L_r": self.use_retrieval and self.use_label_embedding,
            "M": self.has_meta,
            "A": self.use_audio,
            "A_r": self.use_retrieval and self.use_audio,
        }
        return [name for name in EXPERT_ORDER if on[name]]

    @property
    def interaction_pairs(self) -> list[tuple[str, str]]:
        """Label-interaction pairs whose two sides both exist."""
        if not self.use_label_interaction:
            return []
        names = set(self.expert_names)
        return [(a, b) for a, b in INTERACTION_PAIRS if a in names and b in names]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of `to_dict`. Unknown keys are an error that names them; configs of
        earlier versions load (input sizes at the top level, options since removed left
        off, switches that did not exist then set as they were)."""
        data_in, data = data, dict(data)
        size_keys = [f.name for f in dataclasses.fields(InputSizes)]
        # a run saved by an earlier version: input sizes at the top level
        legacy = "inputs" not in data and any(k in data for k in size_keys)
        # a run saved before sound features existed has no audio width, and no audio expert
        before_audio = legacy or ("inputs" in data and "d_audio" not in data["inputs"])
        inputs = {**{k: data.pop(k) for k in size_keys if k in data}, **data.pop("inputs", {})}
        for old, new in (("expert_logvar", "expert_logvar_range"), ("logvar", "logvar_range")):
            if f"{old}_min" in data or f"{old}_max" in data:
                default = getattr(cls(), new)
                data[new] = (data.pop(f"{old}_min", default[0]), data.pop(f"{old}_max", default[1]))
        data = drop_removed("model", data, REMOVED_OPTIONS)
        if legacy:  # runs saved before these switches existed were built without them
            data = {"label_similarity": False, "use_word_prior": False, "use_neighbour_prior": False,
                    "use_neighbour_summary": False, **data}
        if before_audio:
            data = {"use_audio": False, **data}
        if legacy or ("inputs" in data_in and "use_wide_neighbourhood" not in data_in):
            data = {"use_wide_neighbourhood": False, **data}  # saved before wider neighbourhoods
        check_keys("model", data, cls)
        return cls(inputs=InputSizes(**inputs), **data)
