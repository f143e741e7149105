"""Retrieval-augmented popularity predictor: the parts wired together (DESIGN.md, "The
predictor"; shapes in model.batch)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mvpp.predictor.config import ModelConfig
from mvpp.predictor.model.batch import ModelBatch, ModelOutput, Prediction, zero_invalid
from mvpp.predictor.model.decoder import Decoder, WordPrior
from mvpp.predictor.model.encoder import (
    AttentivePooling,
    BipolarCrossModalAttention,
    Projection,
    encode_pair,
)
from mvpp.predictor.model.experts import ConcatFusion, ExpertHead, MetadataEncoder, ProductOfExperts
from mvpp.predictor.model.loss import popularity_loss, predictive
from mvpp.predictor.model.neighbours import LabelInteraction, NeighbourAggregator


@dataclass
class Encoding:
    """Everything the decoder reads: the posterior over z and the inputs beside it."""

    z_mu: Tensor  # (B, d_z)
    z_logvar: Tensor  # (B, d_z)
    interactions: Tensor  # (B, P * d)
    # word prior (B, T), neighbour label average (B, 2T), neighbour summary (B, 4T + 2),
    # wider neighbourhoods (B, W (T + 1)), each when switched on; (B, 0) when none is
    scalars: Tensor
    expert_mask: Tensor  # (B, E)
    neighbour_weights: Tensor  # (B, k)


class PopularityModel(nn.Module):
    """Retrieval-augmented multimodal popularity predictor with a PoE latent."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = c = config
        sizes = c.inputs
        d = c.d_model
        self.expert_names: list[str] = c.expert_names
        both = c.use_frames and c.use_text

        def attention() -> BipolarCrossModalAttention | None:
            if not both:
                return None
            return BipolarCrossModalAttention(
                d, c.alpha, c.use_positive_attention, c.use_negative_attention, c.dropout
            )

        # Neighbours share the target's projections: retrieved and target features live in one space.
        self.frame_proj = Projection(sizes.d_frame, d) if c.use_frames else None
        self.token_proj = Projection(sizes.d_token, d) if c.use_text else None
        self.audio_proj = Projection(sizes.d_audio, d) if c.use_audio else None
        # dropout on per-item sequences, after aggregation: (B, k, n, d) tensors are too big for it
        self.seq_dropout = nn.Dropout(c.dropout)
        self.target_attention = attention()
        self.pool = nn.ModuleDict(
            {n: AttentivePooling(d) for n in ("V", "T", "V_r", "T_r", "A", "A_r") if n in self.expert_names}
        )
        self.aggregator: NeighbourAggregator | None = None
        self.retrieved_attention: BipolarCrossModalAttention | None = None
        if c.use_retrieval:
            self.aggregator = NeighbourAggregator(
                d, sizes.n_targets, c.tau_init, c.tau_learnable, c.use_label_embedding, c.label_similarity
            )
            self.retrieved_attention = attention()
        self.meta = (
            MetadataEncoder(sizes.n_meta_numeric, sizes.meta_cardinalities, c.meta_embed_dim, d)
            if c.has_meta
            else None
        )
        self.experts = nn.ModuleDict()
        self.poe: ProductOfExperts | None = None
        self.concat_fusion: ConcatFusion | None = None
        if c.use_poe:
            for name in self.expert_names:
                self.experts[name] = ExpertHead(d, c.expert_hidden, c.d_z, c.expert_logvar_range)
            self.poe = ProductOfExperts()
        else:
            self.concat_fusion = ConcatFusion(len(self.expert_names), d, c.d_z)
        self.interaction = LabelInteraction(c.interaction_pairs)
        self.word_prior = WordPrior(sizes.lexicon_size, sizes.n_targets) if c.has_word_prior else None
        self.neighbour_prior = c.use_neighbour_prior and c.use_retrieval
        self.neighbour_summary = c.use_neighbour_summary and c.use_retrieval
        self.wide_widths = c.wide_widths
        t = sizes.n_targets
        scalar_width = (
            (t if self.word_prior is not None else 0)
            + (2 * t if self.neighbour_prior else 0)
            + (4 * t + 2 if self.neighbour_summary else 0)
            + len(self.wide_widths) * (t + 1)
        )
        self.decoder = Decoder(
            c.d_z + len(c.interaction_pairs) * d + scalar_width,
            c.decoder_hidden,
            c.decoder_layers,
            t,
            c.dropout,
            c.logvar_range,
        )

    # ----------------------------------------------------------------- encoder

    def _pools(self, names: tuple[str, str]) -> tuple[AttentivePooling | None, AttentivePooling | None]:
        pools = dict(self.pool.items())
        return pools.get(names[0]), pools.get(names[1])

    def encode(self, batch: ModelBatch) -> Encoding:
        """Everything up to (and including) the posterior over z."""
        bsz = batch.batch_size
        ref = self.decoder.net[-1].weight  # dtype / device of the model
        reps: dict[str, tuple[Tensor, Tensor]] = {}

        # 1, 3: the target item's frames and tokens, fused and pooled to V and T
        frames = tokens = None
        if self.frame_proj is not None:
            m_v = batch.frame_mask.bool()
            frames = (self.seq_dropout(self.frame_proj(batch.frames, m_v)), m_v)  # (B, L, d)
        if self.token_proj is not None:
            m_t = batch.token_mask.bool()
            tokens = (self.seq_dropout(self.token_proj(batch.tokens, m_t)), m_t)  # (B, n, d)
        v, t = encode_pair(self.target_attention, self._pools(("V", "T")), frames, tokens)
        reps.update({name: rep for name, rep in (("V", v), ("T", t)) if rep is not None})
        # the sound: its own expert, pooled over segments (it has no attention partner)
        if self.audio_proj is not None:
            reps["A"] = self._sound(batch.audio, batch.audio_mask, bsz)

        # 2, 3: the neighbours' projected frames and tokens, aggregated, fused and pooled
        k = int(batch.nb_score.shape[1])
        a = torch.zeros(bsz, k, dtype=ref.dtype, device=ref.device)
        lm = batch.nb_label_mask.bool() & batch.nb_mask.bool().unsqueeze(-1)  # (B, k, T)
        if self.aggregator is not None:
            nb_mask = batch.nb_mask.bool()
            a = self.aggregator.weights(batch.nb_score, nb_mask)  # (B, k)
            r_frames = r_tokens = None
            if self.frame_proj is not None:
                nm = batch.nb_frame_mask.bool() & nb_mask.unsqueeze(-1)  # (B, k, L)
                r_v, mr_v = self.aggregator.aggregate(zero_invalid(batch.nb_frames, nm), nm, a)  # (B, L, d)
                r_frames = (self.seq_dropout(r_v), mr_v)
            if self.token_proj is not None:
                nm = batch.nb_token_mask.bool() & nb_mask.unsqueeze(-1)  # (B, k, n)
                r_t, mr_t = self.aggregator.aggregate(zero_invalid(batch.nb_tokens, nm), nm, a)  # (B, n, d)
                r_tokens = (self.seq_dropout(r_t), mr_t)
            v_r, t_r = encode_pair(self.retrieved_attention, self._pools(("V_r", "T_r")), r_frames, r_tokens)
            reps.update({name: rep for name, rep in (("V_r", v_r), ("T_r", t_r)) if rep is not None})
            if self.audio_proj is not None:
                reps["A_r"] = self._retrieved_sound(batch, nb_mask, a)
            if self.config.use_label_embedding:
                reps["L_r"] = self.aggregator.label_embedding(batch.nb_labels, lm, a, batch.nb_score)

        if self.meta is not None:
            reps["M"] = self.meta(batch.meta_numeric, batch.meta_numeric_mask, batch.meta_categorical, bsz)

        # 4: experts fused by the product of experts (or concatenated, the ablation)
        expert_mask = torch.stack([reps[n][1] for n in self.expert_names], dim=1)  # (B, E)
        if self.poe is not None:
            z_mu, z_logvar = self.poe([self.experts[n](reps[n][0]) for n in self.expert_names], expert_mask)
        else:
            assert self.concat_fusion is not None
            z_mu = self.concat_fusion.fuse([reps[n] for n in self.expert_names], expert_mask)
            z_logvar = torch.full_like(z_mu, float("-inf"))

        # 5, 6: label interaction and the numbers beside z
        interactions = (
            self.interaction(reps) if self.interaction.pairs else z_mu.new_zeros(bsz, 0)
        )  # (B, P * d)
        scalars = [z_mu.new_zeros(bsz, 0)]
        if self.word_prior is not None:
            prior = batch.word_prior if batch.word_prior is not None else self.word_prior(batch.words, batch.word_weights, bsz)
            scalars.append(prior.to(z_mu.dtype))  # (B, T)
        if self.neighbour_prior:
            assert self.aggregator is not None
            scalars.append(self.aggregator.label_average(batch.nb_labels, lm, a).to(z_mu.dtype))  # (B, 2T)
        if self.neighbour_summary:
            scalars.append(batch.nb_summary.to(z_mu.dtype))  # (B, 4T + 2)
        if self.wide_widths:
            if batch.nb_wide is None or batch.nb_wide.shape[1] != len(self.wide_widths) * (self.config.inputs.n_targets + 1):
                raise ValueError("the batch lacks the wider neighbourhoods' statistics the model reads")
            scalars.append(batch.nb_wide.to(z_mu.dtype))  # (B, W (T + 1))
        return Encoding(z_mu, z_logvar, interactions, torch.cat(scalars, dim=-1), expert_mask, a)

    def _sound(self, audio: Tensor | None, mask: Tensor | None, bsz: int) -> tuple[Tensor, Tensor]:
        """A: the items' segments projected and pooled; unavailable without sound."""
        assert self.audio_proj is not None
        ref = self.decoder.net[-1].weight
        if audio is None or mask is None or audio.shape[1] == 0:
            return ref.new_zeros(bsz, self.config.d_model), torch.zeros(bsz, dtype=torch.bool, device=ref.device)
        m = mask.bool()
        x = self.seq_dropout(self.audio_proj(audio, m))  # (B, S, d)
        return self.pool["A"](x, m)

    def _retrieved_sound(self, batch: ModelBatch, nb_mask: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        """A_r: the neighbours' projected segments averaged with the retrieval weights, pooled."""
        assert self.aggregator is not None
        bsz = batch.batch_size
        ref = self.decoder.net[-1].weight
        if batch.nb_audio is None or batch.nb_audio_mask is None or batch.nb_audio.shape[2] == 0:
            return ref.new_zeros(bsz, self.config.d_model), torch.zeros(bsz, dtype=torch.bool, device=ref.device)
        nm = batch.nb_audio_mask.bool() & nb_mask.unsqueeze(-1)  # (B, k, S)
        r_a, mr_a = self.aggregator.aggregate(zero_invalid(batch.nb_audio, nm), nm, a)  # (B, S, d)
        return self.pool["A_r"](self.seq_dropout(r_a), mr_a)

    def _projections(self) -> dict[str, Projection | None]:
        return {"frames": self.frame_proj, "tokens": self.token_proj, "audio": self.audio_proj}

    def projected_modalities(self) -> list[str]:
        """The sequences the model projects: of "frames", "tokens", "audio", those on."""
        return [name for name, proj in self._projections().items() if proj is not None]

    @torch.no_grad()
    def project_items(self, sequences: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor | None]:
        """Projected sequences of bank items, the features they bring as neighbours:
        "frames" (N, L, d), "tokens" (N, n, d), "audio" (N, S, d) from their (values, mask);
        None for a switched-off modality (whose values need not be given)."""
        out: dict[str, Tensor | None] = {}
        for name, proj in self._projections().items():
            if proj is None:
                out[name] = None
            else:
                values, mask = sequences[name]
                out[name] = proj(values, mask.bool())
        return out

    # ----------------------------------------------------------------- forward

    def kl(self, z_mu: Tensor, z_logvar: Tensor) -> Tensor:
        """KL(q(z|x) || N(0, I)) per item: (B, d_z) -> (B,); zero without PoE."""
        if self.poe is None:
            return torch.zeros(z_mu.shape[0], dtype=z_mu.dtype, device=z_mu.device)
        return 0.5 * (torch.exp(z_logvar) + z_mu**2 - 1.0 - z_logvar).sum(dim=-1)

    def decode(self, z: Tensor, interactions: Tensor, scalars: Tensor) -> tuple[Tensor, Tensor]:
        """(..., d_z), (..., P * d), (..., S) -> mu_y, logvar_y (..., T)."""
        return self.decoder(torch.cat([z, interactions, scalars], dim=-1))

    def forward(self, batch: ModelBatch) -> ModelOutput:
        enc = self.encode(batch)
        z = enc.z_mu
        if self.training and self.poe is not None:
            z = z + torch.exp(0.5 * enc.z_logvar) * torch.randn_like(z)
        mu_y, logvar_y = self.decode(z, enc.interactions, enc.scalars)
        return ModelOutput(
            mu_y=mu_y,
            logvar_y=logvar_y,
            z_mu=enc.z_mu,
            z_logvar=enc.z_logvar,
            kl=self.kl(enc.z_mu, enc.z_logvar),
            expert_mask=enc.expert_mask,
            neighbour_weights=enc.neighbour_weights,
        )

    @torch.no_grad()
    def predict(
        self,
        batch: ModelBatch,
        n_samples: int = 100,
        quantiles: tuple[float, float] = (0.05, 0.95),
        seed: int = 0,
    ) -> Prediction:
        """Mean and interval in eval mode (see loss.predictive)."""
        was_training = self.training
        if was_training:  # switching walks every submodule: not on each call of a service
            self.eval()
        try:
            enc = self.encode(batch)
            return predictive(
                self.decode, enc.z_mu, enc.z_logvar, enc.interactions, enc.scalars, n_samples, quantiles, seed
            )
        finally:
            if was_training:
                self.train()


__all__ = ["Encoding", "PopularityModel", "popularity_loss"]
