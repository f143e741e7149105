"""Hyper-parameters and ablation switches of the popularity predictor."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

#: Names of the PoE experts, in the order the model stacks them.
EXPERT_ORDER: tuple[str, ...] = ("V", "T", "V_r", "T_r", "L_r", "M")

#: Label-interaction pairs (target representation, retrieved representation).
INTERACTION_PAIRS: tuple[tuple[str, str], ...] = (
    ("V", "V_r"),
    ("V", "T_r"),
    ("T", "V_r"),
    ("T", "T_r"),
    ("V", "L_r"),
    ("T", "L_r"),
)

#: Extra pairs with the metadata representation (`ModelConfig.meta_interactions`).
META_INTERACTION_PAIRS: tuple[tuple[str, str], ...] = (
    ("M", "V_r"),
    ("M", "T_r"),
    ("M", "L_r"),
)

#: How numeric metadata enters the metadata encoder (`ModelConfig.meta_numeric_embedding`).
META_NUMERIC_EMBEDDINGS: tuple[str, ...] = ("linear", "periodic")


@dataclass
class ModelConfig:
    """Every hyper-parameter of `PopularityModel`; the model has no other constants."""

    # Input feature sizes; set from the bank's manifest.
    d_frame: int = 512
    d_token: int = 384
    # Widths.
    d_model: int = 128
    d_z: int = 64
    expert_hidden: int = 128
    decoder_hidden: int = 128
    decoder_layers: int = 2
    # Targets and metadata.
    n_targets: int = 1
    n_meta_numeric: int = 0
    # Categorical metadata: category ids are 1..cardinality, 0 is the unknown bucket.
    meta_cardinalities: list[int] = field(default_factory=list)
    meta_embed_dim: int = 16
    # "linear": numeric features enter the metadata encoder's first layer as they are;
    # "periodic": each one first becomes its own learnt embedding of sin/cos features at
    # learnt frequencies (numbers such as follower counts act through thresholds that one
    # linear layer cannot draw).
    meta_numeric_embedding: str = "linear"
    meta_periodic_frequencies: int = 16
    meta_periodic_sigma: float = 1.0
    # The metadata representation also goes to the decoder directly (not only through z).
    meta_to_decoder: bool = False
    # Label-interaction pairs of the metadata representation with the retrieved ones.
    meta_interactions: bool = False
    # Title bag of words (predictor.lexicon): vocabulary size, set from the training
    # split; 0 means no lexical text position.
    lexicon_size: int = 0
    # Share of title words dropped at random while training (the bag of words overfits).
    word_dropout: float = 0.0
    # Bipolar attention: positive scale alpha, negative scale -(1 - alpha).
    alpha: float = 0.5
    alpha_learnable: bool = False
    # Retrieval softmax temperature. Cosine similarities of neighbours usually
    # span a few tenths, so 0.1 makes the weights neither uniform nor one-hot.
    tau_init: float = 0.1
    tau_learnable: bool = True
    dropout: float = 0.2
    # Log-variance ranges: clamping keeps precisions and the NLL finite.
    expert_logvar_min: float = -6.0
    expert_logvar_max: float = 6.0
    logvar_min: float = -7.0
    logvar_max: float = 5.0
    # Ablation switches.
    use_retrieval: bool = True
    use_positive_attention: bool = True
    use_negative_attention: bool = True
    use_poe: bool = True
    use_label_interaction: bool = True
    use_frames: bool = True
    use_text: bool = True
    use_meta: bool = True
    # Off by default: on MicroLens the bag of words overfits within a few epochs and
    # has not beaten the sentence features alone yet (see benchmarks/README.md).
    use_lexicon: bool = False
    # The word prior (predictor.word_prior): a cross-fitted ridge's estimate from the
    # title's bag of words, one more decoder input (the decoder learns how far to trust
    # it; adding it to the mean through a learnt gain did worse on MicroLens). Needs a
    # lexicon (lexicon_size > 0).
    use_word_prior: bool = True
    use_label_embedding: bool = True
    # Neighbour statistics beside z, as decoder inputs: through the PoE latent the
    # neighbourhood arrives only blurred by the KL term, and the label embedding's
    # softmax weights are relative, so it cannot tell a tight cluster of near copies
    # from a loose set of weak matches. Together worth 0.0035 nMSE on MicroLens (see
    # benchmarks/README.md).
    # The neighbours' labels averaged with the retrieval weights (the k-NN estimate) and
    # which targets it has.
    use_neighbour_prior: bool = True
    # Unweighted statistics: label mean, std, top-1 label, share of neighbours with a
    # label; largest and mean similarity (NeighbourAggregator.label_summary).
    use_neighbour_summary: bool = True
    # The label embedding also sees each neighbour's similarity (how far to trust its label).
    label_similarity: bool = True

    def __post_init__(self) -> None:
        self.meta_cardinalities = [int(c) for c in self.meta_cardinalities]
        for name in (
            "d_frame",
            "d_token",
            "d_model",
            "d_z",
            "expert_hidden",
            "decoder_hidden",
            "n_targets",
            "meta_embed_dim",
            "meta_periodic_frequencies",
            "meta_periodic_sigma",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.meta_numeric_embedding not in META_NUMERIC_EMBEDDINGS:
            raise ValueError(
                f"ModelConfig.meta_numeric_embedding must be one of {META_NUMERIC_EMBEDDINGS}, "
                f"got {self.meta_numeric_embedding!r}"
            )
        if self.decoder_layers < 0:
            raise ValueError("ModelConfig.decoder_layers must be >= 0")
        if self.lexicon_size < 0:
            raise ValueError("ModelConfig.lexicon_size must be >= 0")
        if self.n_meta_numeric < 0:
            raise ValueError("ModelConfig.n_meta_numeric must be >= 0")
        if any(c <= 0 for c in self.meta_cardinalities):
            raise ValueError("ModelConfig.meta_cardinalities must all be positive")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"ModelConfig.alpha must lie in [0, 1], got {self.alpha}")
        if self.tau_init <= 0.0:
            raise ValueError(f"ModelConfig.tau_init must be positive, got {self.tau_init}")
        if not 0.0 <= self.word_dropout < 1.0:
            raise ValueError(f"ModelConfig.word_dropout must lie in [0, 1), got {self.word_dropout}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout must lie in [0, 1), got {self.dropout}")
        if self.expert_logvar_min >= self.expert_logvar_max or self.logvar_min >= self.logvar_max:
            raise ValueError("ModelConfig log-variance ranges must have min < max")
        if not self.expert_names:
            raise ValueError("ModelConfig switches leave no representation to encode")

    @property
    def has_meta(self) -> bool:
        """Whether a metadata expert exists (configured and switched on)."""
        return self.use_meta and (self.n_meta_numeric > 0 or len(self.meta_cardinalities) > 0)

    @property
    def has_lexicon(self) -> bool:
        """Whether text sequences get the bag-of-words position (text on, vocabulary non-empty)."""
        return self.use_text and self.use_lexicon and self.lexicon_size > 0

    @property
    def has_word_prior(self) -> bool:
        """Whether the decoder gets the word prior (text on, vocabulary non-empty)."""
        return self.use_text and self.use_word_prior and self.lexicon_size > 0

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
        }
        return [name for name in EXPERT_ORDER if on[name]]

    @property
    def interaction_pairs(self) -> list[tuple[str, str]]:
        """Label-interaction pairs whose two sides both exist."""
        if not self.use_label_interaction:
            return []
        names = set(self.expert_names)
        pairs = INTERACTION_PAIRS + (META_INTERACTION_PAIRS if self.meta_interactions else ())
        return [(a, b) for a, b in pairs if a in names and b in names]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of `to_dict`; unknown keys are an error so stale checkpoints fail loudly."""
        # Runs saved before the label embedding saw similarities were built without it.
        # Runs saved before the word prior existed have none (and no weights for it).
        data = {"label_similarity": False, "use_word_prior": False, "use_neighbour_prior": False,
                "use_neighbour_summary": False, **data}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys: {unknown}")
        return cls(**data)
