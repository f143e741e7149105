"""The retrieval-augmented popularity model, one module per idea:

- batch: what goes in (ModelBatch) and comes out (ModelOutput, Prediction);
- encoder: projections, bipolar cross-modal attention, attentive pooling;
- neighbours: similarity-weighted aggregation, neighbourhood statistics, label interaction;
- experts: Gaussian experts, their product, the metadata representation;
- decoder: the word prior and the decoder MLP;
- loss: the training loss and the predictive distribution;
- popularity: PopularityModel, the parts wired together.
"""

from mvpp.predictor.model.batch import ModelBatch, ModelOutput, Prediction, masked_softmax
from mvpp.predictor.model.decoder import Decoder, WordPrior
from mvpp.predictor.model.encoder import AttentivePooling, BipolarCrossModalAttention, Projection
from mvpp.predictor.model.experts import ConcatFusion, ExpertHead, MetadataEncoder, ProductOfExperts
from mvpp.predictor.model.loss import LOSSES, popularity_loss, predictive
from mvpp.predictor.model.neighbours import (
    LabelInteraction,
    NeighbourAggregator,
    neighbour_summary,
    wide_summary,
)
from mvpp.predictor.model.popularity import Encoding, PopularityModel

__all__ = [
    "LOSSES",
    "AttentivePooling",
    "BipolarCrossModalAttention",
    "ConcatFusion",
    "Decoder",
    "Encoding",
    "ExpertHead",
    "LabelInteraction",
    "MetadataEncoder",
    "ModelBatch",
    "ModelOutput",
    "NeighbourAggregator",
    "PopularityModel",
    "Prediction",
    "ProductOfExperts",
    "Projection",
    "WordPrior",
    "masked_softmax",
    "neighbour_summary",
    "wide_summary",
    "popularity_loss",
    "predictive",
]
