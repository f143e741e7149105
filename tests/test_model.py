"""Unit tests for the predictor model (fast, CPU, small dims)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from mvpp.predictor.config import InputSizes, ModelConfig
from mvpp.predictor.model import (
    AttentivePooling,
    BipolarCrossModalAttention,
    ModelBatch,
    ModelOutput,
    NeighbourAggregator,
    PopularityModel,
    ProductOfExperts,
    neighbour_summary,
    popularity_loss,
    wide_summary,
)

D_FRAME, D_TOKEN = 12, 10
RETRIEVAL_EXPERTS = ("V_r", "T_r", "L_r")


SIZE_KEYS = {f.name for f in dataclasses.fields(InputSizes)}


def small_config(**overrides: object) -> ModelConfig:
    sizes: dict[str, object] = {
        "d_frame": D_FRAME, "d_token": D_TOKEN, "n_targets": 2, "n_meta_numeric": 3, "meta_cardinalities": [4, 2],
    }
    base: dict[str, object] = {
        "d_model": 16, "d_z": 8, "expert_hidden": 16, "decoder_hidden": 16, "meta_embed_dim": 4, "dropout": 0.1,
    }
    for key, value in overrides.items():
        (sizes if key in SIZE_KEYS else base)[key] = value
    return ModelConfig(inputs=InputSizes(**sizes), **base)  # type: ignore[arg-type]


def summarise(batch: ModelBatch, wide_widths: tuple[int, ...] = ()) -> ModelBatch:
    """The batch with its neighbour statistics computed from its neighbours, as
    dataset.make_batch computes them (its neighbours standing in for the wider
    neighbourhood)."""
    batch.nb_summary = neighbour_summary(batch.nb_labels, batch.nb_label_mask, batch.nb_score, batch.nb_mask.bool())
    if wide_widths:
        mask = batch.nb_label_mask.bool() & batch.nb_mask.bool().unsqueeze(-1)
        batch.nb_wide = wide_summary(batch.nb_labels, mask, batch.nb_score, wide_widths)
    return batch


def make_batch(
    cfg: ModelConfig, b: int = 5, n_frames: int = 4, n_tokens: int = 6, k: int = 3, seed: int = 0
) -> ModelBatch:
    """Random inputs; the neighbours' features are projected ones (width d_model), as the
    feature table gives them."""
    g = torch.Generator().manual_seed(seed)
    t = cfg.inputs.n_targets
    d = cfg.d_model

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    def lengths(total: int, *lead: int) -> torch.Tensor:
        # variable valid lengths, at least one valid position each
        n = torch.randint(1, max(total, 1) + 1, lead, generator=g)
        return torch.arange(total).expand(*lead, total) < n.unsqueeze(-1)

    nb_mask = torch.ones(b, k, dtype=torch.bool)
    if k > 1:
        nb_mask[0, -1] = False  # one item with fewer neighbours
    nb_label_mask = torch.rand(b, k, t, generator=g) > 0.2
    return summarise(ModelBatch(
        frames=rand(b, n_frames, D_FRAME),
        frame_mask=lengths(n_frames, b),
        tokens=rand(b, n_tokens, D_TOKEN),
        token_mask=lengths(n_tokens, b),
        nb_frames=torch.relu(rand(b, k, n_frames, d)),
        nb_frame_mask=lengths(n_frames, b, k),
        nb_tokens=torch.relu(rand(b, k, n_tokens, d)),
        nb_token_mask=lengths(n_tokens, b, k),
        nb_score=torch.rand(b, k, generator=g) * 0.6 + 0.3,
        nb_mask=nb_mask,
        nb_labels=rand(b, k, t) * 2 + 5,
        nb_label_mask=nb_label_mask,
        nb_summary=torch.zeros(b, 4 * t + 2),
        meta_numeric=rand(b, cfg.inputs.n_meta_numeric),
        meta_numeric_mask=torch.rand(b, cfg.inputs.n_meta_numeric, generator=g) > 0.3,
        meta_categorical=torch.randint(0, 3, (b, len(cfg.inputs.meta_cardinalities)), generator=g),
    ), cfg.wide_widths)


def expert_column(model: PopularityModel, name: str) -> int:
    return model.expert_names.index(name)


def assert_finite(*tensors: torch.Tensor) -> None:
    for x in tensors:
        assert torch.isfinite(x).all()


# ------------------------------------------------------------------ config


def test_config_json_round_trip() -> None:
    cfg = small_config(alpha=0.3, use_negative_attention=False, meta_cardinalities=[7])
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig.from_dict({**cfg.to_dict(), "not_a_field": 1})
    with pytest.raises(ValueError):
        small_config(alpha=1.5)


# --------------------------------------------------------- product of experts


def test_poe_matches_closed_form_with_prior() -> None:
    g = torch.Generator().manual_seed(1)
    b, e, dz = 4, 3, 5
    mus = torch.randn(b, e, dz, generator=g, dtype=torch.float64)
    logvars = torch.randn(b, e, dz, generator=g, dtype=torch.float64)
    avail = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 0, 0], [0, 1, 0]], dtype=torch.bool)
    mu, logvar = ProductOfExperts()([(mus[:, i], logvars[:, i]) for i in range(e)], avail)
    for i in range(b):
        for j in range(dz):
            precision = 1.0  # N(0, 1) prior expert
            weighted = 0.0  # prior mean is 0
            for x in range(e):
                if avail[i, x]:
                    p = 1.0 / math.exp(float(logvars[i, x, j]))
                    precision += p
                    weighted += float(mus[i, x, j]) * p
            assert float(mu[i, j]) == pytest.approx(weighted / precision, rel=1e-9, abs=1e-12)
            assert float(logvar[i, j].exp()) == pytest.approx(1.0 / precision, rel=1e-9)
    # an item with no available expert gets the prior exactly
    assert torch.equal(mu[2], torch.zeros(dz, dtype=torch.float64))
    assert torch.equal(logvar[2], torch.zeros(dz, dtype=torch.float64))


def test_poe_dropped_expert_equals_fusing_the_rest() -> None:
    g = torch.Generator().manual_seed(2)
    b, dz = 6, 4
    experts = [(torch.randn(b, dz, generator=g), torch.randn(b, dz, generator=g)) for _ in range(3)]
    # garbage in the dropped expert must not leak
    experts[1] = (torch.full((b, dz), float("nan")), torch.full((b, dz), -float("inf")))
    poe = ProductOfExperts()
    avail = torch.tensor([[True, False, True]]).expand(b, 3)
    mu, logvar = poe(experts, avail)
    mu_ref, logvar_ref = poe([experts[0], experts[2]], torch.ones(b, 2, dtype=torch.bool))
    torch.testing.assert_close(mu, mu_ref)
    torch.testing.assert_close(logvar, logvar_ref)


# ------------------------------------------------------- bipolar attention


def make_attention(alpha: float = 0.5, **kw: bool) -> BipolarCrossModalAttention:
    torch.manual_seed(3)
    return BipolarCrossModalAttention(
        16,
        alpha=alpha,
        use_positive=kw.get("use_positive", True),
        use_negative=kw.get("use_negative", True),
        dropout=0.0,
    )


def test_negative_branch_weights_least_similar_key_most() -> None:
    attn = make_attention(alpha=0.3).eval()
    g = torch.Generator().manual_seed(4)
    x_v, x_t = torch.randn(3, 5, 16, generator=g), torch.randn(3, 7, 16, generator=g)
    m_v = torch.ones(3, 5, dtype=torch.bool)
    m_t = torch.ones(3, 7, dtype=torch.bool)
    m_t[1, 4:] = False
    m_v[2, 3:] = False
    w = attn.attention_weights(x_v, m_v, x_t, m_t)
    s_vt, s_tv = attn.scores(x_v, x_t)
    big = torch.finfo(s_vt.dtype).max
    # frames attending to text
    assert torch.equal(w["text_neg"].argmax(-1), s_vt.masked_fill(~m_t[:, None], big).argmin(-1))
    assert torch.equal(w["text_pos"].argmax(-1), s_vt.masked_fill(~m_t[:, None], -big).argmax(-1))
    # text attending to frames
    assert torch.equal(w["frame_neg"].argmax(-1), s_tv.masked_fill(~m_v[:, None], big).argmin(-1))
    # masked keys get exactly zero weight; rows sum to one
    assert torch.all(w["text_neg"][1, :, 4:] == 0)
    torch.testing.assert_close(w["text_neg"].sum(-1), torch.ones(3, 5))
    # the negative branch is softmax(-(1 - alpha) S), not a rescaled positive branch
    expected = torch.softmax(-(1 - 0.3) * s_vt[0], dim=-1)
    torch.testing.assert_close(w["text_neg"][0], expected)
    assert not torch.allclose(w["text_neg"], -w["text_pos"])


def test_alpha_changes_attention_output() -> None:
    g = torch.Generator().manual_seed(5)
    x_v, x_t = torch.rand(2, 4, 16, generator=g), torch.rand(2, 6, 16, generator=g)
    m_v, m_t = torch.ones(2, 4, dtype=torch.bool), torch.ones(2, 6, dtype=torch.bool)
    low = make_attention(alpha=0.2).eval()
    high = make_attention(alpha=0.8).eval()
    high.load_state_dict({**low.state_dict(), "alpha_fixed": torch.tensor(0.8)})
    v_lo, t_lo = low(x_v, m_v, x_t, m_t)
    v_hi, t_hi = high(x_v, m_v, x_t, m_t)
    assert (v_lo - v_hi).abs().max() > 1e-4
    assert (t_lo - t_hi).abs().max() > 1e-4
    # in the full model too
    cfg = small_config(dropout=0.0)
    batch = make_batch(cfg)
    torch.manual_seed(0)
    m1 = PopularityModel(cfg).eval()
    m2 = PopularityModel(dataclasses.replace(cfg, alpha=0.9)).eval()
    state = m1.state_dict()
    state.update({k: torch.tensor(0.9) for k in state if k.endswith("alpha_fixed")})
    m2.load_state_dict(state)
    assert (m1(batch).mu_y - m2(batch).mu_y).abs().max() > 1e-6


def test_attention_passes_through_when_one_modality_is_absent() -> None:
    attn = make_attention().eval()
    x_v, x_t = torch.rand(2, 4, 16), torch.rand(2, 6, 16)
    m_v = torch.tensor([[True] * 4, [False] * 4])
    m_t = torch.tensor([[False] * 6, [True] * 6])
    v, t = attn(x_v, m_v, x_t, m_t)
    torch.testing.assert_close(v, x_v)
    torch.testing.assert_close(t, x_t)


# -------------------------------------------------- aggregation and pooling


def test_aggregation_renormalises_per_position() -> None:
    agg = NeighbourAggregator(4, 1, tau_init=0.1, tau_learnable=True, use_label_embedding=True)
    x = torch.stack([torch.full((2, 4), 1.0), torch.full((2, 4), 3.0)]).unsqueeze(0)  # (1, 2, 2, 4)
    mask = torch.tensor([[[True, True], [True, False]]])  # neighbour 1 lacks position 1
    a = torch.tensor([[0.25, 0.75]])
    out, valid = agg.aggregate(x, mask, a)
    torch.testing.assert_close(out[0, 0], torch.full((4,), 0.25 * 1 + 0.75 * 3))
    torch.testing.assert_close(out[0, 1], torch.full((4,), 1.0))  # only neighbour 0 has it
    assert valid.all()
    w = agg.weights(torch.tensor([[0.9, 0.5, 0.1]]), torch.tensor([[True, True, False]]))
    expected = torch.softmax(torch.tensor([0.9, 0.5]) / 0.1, dim=0)
    torch.testing.assert_close(w[0, :2], expected)
    assert w[0, 2] == 0
    w.sum().backward()
    assert agg.log_tau.grad is not None and agg.tau > 0


def test_attentive_pooling_ignores_masked_positions() -> None:
    pool = AttentivePooling(8)
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[True, True, False, False, False], [False] * 5])
    out, avail = pool(x, mask)
    ref, _ = pool(x[:1, :2], mask[:1, :2])
    torch.testing.assert_close(out[:1], ref)
    assert avail.tolist() == [True, False]
    assert torch.equal(out[1], torch.zeros(8))


# ------------------------------------------------------------------- model


def pad_batch(batch: ModelBatch, extra_frames: int, extra_tokens: int, extra_nb: int) -> ModelBatch:
    """Append invalid positions and neighbours full of garbage."""
    g = torch.Generator().manual_seed(99)

    def garbage(*shape: int) -> torch.Tensor:
        x = torch.randn(*shape, generator=g) * 1e3
        x.view(-1)[::7] = float("nan")
        return x

    def cat(x: torch.Tensor, pad: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.cat([x, pad.to(x.dtype)], dim=dim)

    b, k, lf = batch.nb_frames.shape[:3]
    n, t = batch.nb_tokens.shape[2], batch.nb_labels.shape[2]
    lf2, n2 = lf + extra_frames, n + extra_tokens
    d = batch.nb_frames.shape[-1]
    nb_frames = cat(batch.nb_frames, garbage(b, k, extra_frames, d), 2)
    nb_frame_mask = cat(batch.nb_frame_mask, torch.zeros(b, k, extra_frames), 2)
    nb_tokens = cat(batch.nb_tokens, garbage(b, k, extra_tokens, d), 2)
    nb_token_mask = cat(batch.nb_token_mask, torch.zeros(b, k, extra_tokens), 2)
    return ModelBatch(
        frames=cat(batch.frames, garbage(b, extra_frames, D_FRAME), 1),
        frame_mask=cat(batch.frame_mask, torch.zeros(b, extra_frames), 1),
        tokens=cat(batch.tokens, garbage(b, extra_tokens, D_TOKEN), 1),
        token_mask=cat(batch.token_mask, torch.zeros(b, extra_tokens), 1),
        nb_frames=cat(nb_frames, garbage(b, extra_nb, lf2, d), 1),
        # padded neighbours claim valid frames / labels: nb_mask alone must exclude them
        nb_frame_mask=cat(nb_frame_mask, torch.ones(b, extra_nb, lf2), 1),
        nb_tokens=cat(nb_tokens, garbage(b, extra_nb, n2, d), 1),
        nb_token_mask=cat(nb_token_mask, torch.ones(b, extra_nb, n2), 1),
        nb_score=cat(batch.nb_score, garbage(b, extra_nb), 1),
        nb_mask=cat(batch.nb_mask, torch.zeros(b, extra_nb), 1),
        nb_labels=cat(batch.nb_labels, garbage(b, extra_nb, t), 1),
        nb_label_mask=cat(batch.nb_label_mask, torch.ones(b, extra_nb, t), 1),
        nb_summary=batch.nb_summary,
        nb_wide=batch.nb_wide,
        meta_numeric=torch.where(batch.meta_numeric_mask, batch.meta_numeric, float("nan")),
        meta_numeric_mask=batch.meta_numeric_mask,
        meta_categorical=batch.meta_categorical,
    )


def test_padding_never_changes_outputs() -> None:
    cfg = small_config()
    torch.manual_seed(0)
    model = PopularityModel(cfg).eval()
    batch = make_batch(cfg, b=6, k=4)
    padded = pad_batch(batch, extra_frames=3, extra_tokens=5, extra_nb=2)
    out, out_pad = model(batch), model(padded)
    for name in ("mu_y", "logvar_y", "z_mu", "z_logvar", "kl"):
        torch.testing.assert_close(getattr(out_pad, name), getattr(out, name), atol=1e-5, rtol=0)
    torch.testing.assert_close(out_pad.neighbour_weights[:, :4], out.neighbour_weights)
    assert torch.all(out_pad.neighbour_weights[:, 4:] == 0)
    assert torch.equal(out_pad.expert_mask, out.expert_mask)
    p, p_pad = (
        model.predict(batch, n_samples=16, seed=1),
        model.predict(padded, n_samples=16, seed=1),
    )
    torch.testing.assert_close(p_pad.lower, p.lower, atol=1e-5, rtol=0)


def test_empty_bank_drops_retrieval_experts() -> None:
    cfg = small_config(use_label_interaction=False, dropout=0.0)
    torch.manual_seed(0)
    model = PopularityModel(cfg).eval()
    batch = make_batch(cfg, k=0)
    out = model(batch)
    assert_finite(out.mu_y, out.logvar_y, out.z_mu, out.z_logvar, out.kl)
    assert out.neighbour_weights.shape == (5, 0)
    for name in RETRIEVAL_EXPERTS:
        assert not out.expert_mask[:, expert_column(model, name)].any()
    # same weights without retrieval: identical prediction. The neighbour statistics are
    # the decoder's last inputs and all zero here, so their weight columns are dropped.
    no_ret = PopularityModel(dataclasses.replace(cfg, use_retrieval=False)).eval()
    state = model.state_dict()
    state["decoder.net.0.weight"] = state["decoder.net.0.weight"][:, : no_ret.decoder.net[0].in_features]
    result = no_ret.load_state_dict(state, strict=False)
    assert not result.missing_keys
    out_ref = no_ret(batch)
    torch.testing.assert_close(out.mu_y, out_ref.mu_y)
    torch.testing.assert_close(out.z_logvar, out_ref.z_logvar)
    # an item whose neighbours are all invalid scores as if the bank were empty
    with_nb = make_batch(cfg, k=3)
    with_nb.nb_mask[0] = False
    out_nb = model(summarise(with_nb, cfg.wide_widths))
    for name in RETRIEVAL_EXPERTS:
        assert not out_nb.expert_mask[0, expert_column(model, name)]
        assert out_nb.expert_mask[1:, expert_column(model, name)].all()
    nb_fields = [
        f.name
        for f in dataclasses.fields(ModelBatch)
        if f.name.startswith("nb_") and f.name not in ("nb_summary", "nb_wide") and getattr(with_nb, f.name) is not None
    ]
    no_nb = summarise(dataclasses.replace(with_nb, **{f: getattr(with_nb, f)[:, :0] for f in nb_fields}), cfg.wide_widths)
    torch.testing.assert_close(out_nb.mu_y[0], model(no_nb).mu_y[0], atol=1e-5, rtol=0)
    # and training on an empty bank works (with interactions too)
    full = PopularityModel(small_config()).train()
    o = full(batch)
    loss, _ = popularity_loss(o, torch.randn(5, 2), torch.ones(5, 2, dtype=torch.bool), kl_weight=1.0)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in full.parameters() if p.grad is not None)


def test_text_only_and_video_only_items_in_one_batch() -> None:
    cfg = small_config()
    model = PopularityModel(cfg).train()
    batch = make_batch(cfg, b=4)
    batch.frame_mask[0] = False  # text-only item
    batch.nb_frame_mask[0] = False
    batch.token_mask[1] = False  # video-only item
    batch.nb_token_mask[1] = False
    out = model(batch)
    assert_finite(out.mu_y, out.logvar_y, out.z_mu, out.z_logvar, out.kl)
    em = out.expert_mask
    col = {n: expert_column(model, n) for n in ("V", "T", "V_r", "T_r")}
    assert em[0].tolist()[col["V"]] is False and em[0, col["T"]] and not em[0, col["V_r"]]
    assert em[1, col["V"]] and not em[1, col["T"]] and not em[1, col["T_r"]]
    assert em[2:, list(col.values())].all()
    loss, _ = popularity_loss(out, torch.randn(4, 2), torch.ones(4, 2, dtype=torch.bool), 0.5)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize(("n_frames", "n_tokens"), [(0, 6), (4, 0)])
def test_whole_batch_without_one_modality(n_frames: int, n_tokens: int) -> None:
    cfg = small_config()
    model = PopularityModel(cfg).train()
    batch = make_batch(cfg, n_frames=n_frames, n_tokens=n_tokens)
    out = model(batch)
    assert_finite(out.mu_y, out.logvar_y, out.kl)
    missing = ("V", "V_r") if n_frames == 0 else ("T", "T_r")
    for name in missing:
        assert not out.expert_mask[:, expert_column(model, name)].any()
    popularity_loss(out, torch.randn(5, 2), torch.ones(5, 2, dtype=torch.bool), 1.0)[0].backward()


SWITCHES = [
    "use_retrieval",
    "use_positive_attention",
    "use_negative_attention",
    "use_poe",
    "use_label_interaction",
    "use_frames",
    "use_text",
    "use_meta",
    "use_label_embedding",
]


@pytest.mark.parametrize(
    "overrides",
    [{s: False for s in SWITCHES if s != "use_text"} | {"use_meta": True}]
    + [{s: False} for s in SWITCHES]
    + [
        {"use_positive_attention": False, "use_negative_attention": False},
        {"tau_learnable": False},
        {"n_meta_numeric": 0, "meta_cardinalities": []},
        {"decoder_layers": 0, "n_targets": 1},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_every_ablation_runs_forward_and_backward(overrides: dict[str, object]) -> None:
    cfg = small_config(**overrides)
    model = PopularityModel(cfg).train()
    batch = make_batch(cfg)
    out = model(batch)
    assert out.mu_y.shape == (5, cfg.inputs.n_targets)
    assert out.expert_mask.shape == (5, len(cfg.expert_names))
    assert_finite(out.mu_y, out.logvar_y, out.kl)
    target = torch.randn(5, cfg.inputs.n_targets)
    loss, parts = popularity_loss(out, target, torch.ones_like(target, dtype=torch.bool), 1.0)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert set(parts) == {"total", "recon", "kl"}
    if not cfg.use_poe:
        assert torch.all(out.kl == 0)
    pred = model.predict(batch, n_samples=8)
    assert_finite(pred.mean, pred.lower, pred.upper)


def test_metadata_expert_availability() -> None:
    cfg = small_config(use_frames=False, use_text=False, use_retrieval=False)
    model = PopularityModel(cfg).eval()
    batch = make_batch(cfg, b=3)
    batch.meta_numeric_mask[0] = False
    batch.meta_categorical[0] = 0  # all unknown
    batch.meta_categorical[1] = 99  # out of range -> unknown
    batch.meta_numeric_mask[1] = False
    batch.meta_numeric_mask[2, 0] = True
    out = model(batch)
    assert out.expert_mask[:, 0].tolist() == [False, False, True]
    # no expert at all: the posterior is the prior
    torch.testing.assert_close(out.z_mu[0], torch.zeros(cfg.d_z))
    torch.testing.assert_close(out.z_logvar[0], torch.zeros(cfg.d_z))
    no_meta = dataclasses.replace(
        batch, meta_numeric=None, meta_numeric_mask=None, meta_categorical=None
    )
    assert not model(no_meta).expert_mask.any()


# -------------------------------------------------------------------- loss


def test_loss_ignores_masked_nan_targets() -> None:
    cfg = small_config()
    model = PopularityModel(cfg).train()
    out = model(make_batch(cfg))
    target = torch.randn(5, 2)
    mask = torch.ones(5, 2, dtype=torch.bool)
    target[1, 0] = float("nan")
    target[3, 1] = float("nan")
    mask[1, 0] = mask[3, 1] = False
    for kind in ("gaussian_nll", "mse"):
        loss, parts = popularity_loss(out, target, mask, kl_weight=0.0, kind=kind)
        sq = (target - out.mu_y) ** 2
        if kind == "gaussian_nll":
            per = 0.5 * (math.log(2 * math.pi) + out.logvar_y + sq / out.logvar_y.exp())
        else:
            per = sq
        torch.testing.assert_close(loss, per[mask].mean())
        assert parts["kl"] >= 0
        # changing a masked target changes nothing
        other = target.clone()
        other[1, 0] = 1e6
        torch.testing.assert_close(popularity_loss(out, other, mask, 0.0, kind)[0], loss)
    loss, parts = popularity_loss(out, target, mask, kl_weight=0.5)
    assert parts["total"] == pytest.approx(
        parts["recon"] + 0.5 * float(out.kl.mean().detach()), rel=1e-5
    )
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with pytest.raises(ValueError):
        popularity_loss(out, target, mask, 0.0, kind="huber")


# ----------------------------------------------------------------- predict


def test_predict_is_seeded_and_eval_only() -> None:
    cfg = small_config()
    model = PopularityModel(cfg).train()
    batch = make_batch(cfg)
    p1 = model.predict(batch, n_samples=64, quantiles=(0.1, 0.9), seed=7)
    p2 = model.predict(batch, n_samples=64, quantiles=(0.1, 0.9), seed=7)
    assert model.training  # restored
    torch.testing.assert_close(p1.lower, p2.lower)
    torch.testing.assert_close(p1.upper, p2.upper)
    model.eval()
    torch.testing.assert_close(p1.mean, model(batch).mu_y)
    assert torch.all(p1.lower < p1.upper) and torch.all(p1.std > 0)
    analytic = model.predict(batch, n_samples=0)
    z = 1.6448536
    torch.testing.assert_close(analytic.upper, analytic.mean + z * analytic.std)
    # training mode samples z; eval mode uses its mean
    out_a, out_b = model(batch), model(batch)
    torch.testing.assert_close(out_a.mu_y, out_b.mu_y)


def _gaussian_output(mu: torch.Tensor, logvar: torch.Tensor) -> ModelOutput:
    b = mu.shape[0]
    return ModelOutput(
        mu_y=mu, logvar_y=logvar, z_mu=torch.zeros(b, 1), z_logvar=torch.zeros(b, 1),
        kl=torch.zeros(b), expert_mask=torch.ones(b, 1, dtype=torch.bool),
        neighbour_weights=torch.zeros(b, 0),
    )


def test_beta_nll_weights_items_by_their_variance() -> None:
    y = torch.tensor([[0.0], [0.0]])
    mask = torch.ones_like(y, dtype=torch.bool)
    logvar = torch.tensor([[0.0], [math.log(4.0)]])  # the second item is called noisy

    def mean_grads(beta: float) -> torch.Tensor:
        mu = torch.tensor([[1.0], [1.0]], requires_grad=True)
        popularity_loss(_gaussian_output(mu, logvar), y, mask, 0.0, beta=beta)[0].backward()
        return mu.grad.squeeze(1)

    plain = mean_grads(0.0)
    # plain NLL: the noisy item pulls its mean 4x less
    torch.testing.assert_close(plain[1] / plain[0], torch.tensor(0.25))
    # beta = 1: both pull as under a squared error, whatever their variance
    full = mean_grads(1.0)
    torch.testing.assert_close(full[1], full[0])
    # beta = 0 is exactly the Gaussian NLL
    mu = torch.ones(2, 1)
    a = popularity_loss(_gaussian_output(mu, logvar), y, mask, 0.0)[0]
    b = popularity_loss(_gaussian_output(mu, logvar), y, mask, 0.0, beta=0.0)[0]
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="beta"):
        popularity_loss(_gaussian_output(mu, logvar), y, mask, 0.0, beta=1.5)


# ----------------------------------------------------------- metadata paths


def test_missing_numbers_are_masked_not_read() -> None:
    """Whatever value sits under a missing number (NaN or garbage) never reaches the output."""
    cfg = small_config()
    torch.manual_seed(0)
    model = PopularityModel(cfg).eval()
    batch = make_batch(cfg, b=6)
    other = dataclasses.replace(
        batch,
        meta_numeric=torch.where(batch.meta_numeric_mask, batch.meta_numeric, torch.tensor(1e4)),
    )
    nan = dataclasses.replace(
        batch,
        meta_numeric=torch.where(batch.meta_numeric_mask, batch.meta_numeric, float("nan")),
    )
    ref = model(batch).mu_y
    torch.testing.assert_close(model(other).mu_y, ref)
    torch.testing.assert_close(model(nan).mu_y, ref)


# -------------------------------------------------------------- neighbour prior


def test_neighbour_label_average_matches_the_weighted_mean_and_ignores_missing_labels() -> None:
    cfg = small_config(use_neighbour_prior=True, use_neighbour_summary=False, use_wide_neighbourhood=False, n_targets=2)
    torch.manual_seed(0)
    model = PopularityModel(cfg).eval()
    batch = make_batch(cfg, b=4, k=3)
    batch.nb_label_mask[1] = False  # item 1: no neighbour label at all
    enc = model.encode(summarise(batch))
    t = cfg.inputs.n_targets
    prior = enc.scalars[:, -2 * t :]  # (B, 2T): averages, then availability
    lm = batch.nb_label_mask & batch.nb_mask.unsqueeze(-1)
    a = enc.neighbour_weights
    for i in range(4):
        for j in range(t):
            w = a[i] * lm[i, :, j]
            if w.sum() == 0:
                assert prior[i, j] == 0 and prior[i, t + j] == 0
            else:
                want = (w * batch.nb_labels[i, :, j]).sum() / w.sum()
                torch.testing.assert_close(prior[i, j], want)
                assert prior[i, t + j] == 1
    # garbage under missing labels never gets in
    noisy = dataclasses.replace(batch, nb_labels=torch.where(lm, batch.nb_labels, torch.tensor(1e6)))
    torch.testing.assert_close(model(noisy).mu_y, model(batch).mu_y)
    # without retrieval there is nothing to average
    assert not PopularityModel(dataclasses.replace(cfg, use_retrieval=False)).neighbour_prior


def test_wide_summary_averages_the_best_n_and_ignores_absent_neighbours() -> None:
    labels = torch.tensor([[[1.0, 9.0], [3.0, 0.0], [5.0, 4.0], [7.0, 0.0]]])  # (1, 4, 2)
    present = torch.tensor([[True, True, True, False]])  # the 4th is absent
    mask = present.unsqueeze(-1) & torch.tensor([[[True, True], [True, False], [True, True], [True, True]]])
    score = torch.tensor([[0.9, 0.7, 0.5, 123.0]])
    out = wide_summary(labels, mask, score, (2, 10))
    # width 2: labels 1, 3 (target 0) and 9 (target 1), scores 0.9, 0.7; width 10: what is there
    expected = [2.0, 9.0, 0.8, 3.0, 6.5, 0.7]
    torch.testing.assert_close(out, torch.tensor([expected]))
    nothing = wide_summary(labels, torch.zeros_like(mask), score, (2,))
    torch.testing.assert_close(nothing, torch.zeros(1, 3))


def test_neighbour_summary_statistics_match_numpy_and_ignore_missing_labels() -> None:
    cfg = small_config(use_neighbour_summary=True, use_wide_neighbourhood=False, n_targets=2)
    torch.manual_seed(0)
    model = PopularityModel(cfg).eval()
    batch = make_batch(cfg, b=4, k=3)
    batch.nb_label_mask[1] = False  # item 1: neighbours without labels
    batch.nb_mask[2] = False  # item 2: no neighbours at all
    batch.nb_label_mask[3, 0, 0] = False  # item 3: its most similar neighbour lacks target 0
    batch.nb_score[3] = torch.tensor([0.9, 0.5, 0.7])
    enc = model.encode(summarise(batch))
    t = cfg.inputs.n_targets
    summary = enc.scalars[:, -(4 * t + 2) :].detach()
    lm = (batch.nb_label_mask & batch.nb_mask.unsqueeze(-1)).numpy()
    labels, sim, valid = batch.nb_labels.numpy(), batch.nb_score.numpy(), batch.nb_mask.numpy()
    for i in range(4):
        for j in range(t):
            has = lm[i, :, j]
            got = summary[i, [j, t + j, 2 * t + j, 3 * t + j]].numpy()
            if not has.any():
                np.testing.assert_allclose(got, 0.0)
                continue
            y = labels[i, has, j]
            top = labels[i, np.flatnonzero(has)[np.argmax(sim[i, has])], j]
            np.testing.assert_allclose(got, [y.mean(), y.std(), top, has.sum() / valid[i].sum()], rtol=1e-5, atol=1e-6)
        s = sim[i, valid[i]]
        want = [s.max(), s.mean()] if valid[i].any() else [0.0, 0.0]
        np.testing.assert_allclose(summary[i, -2:].numpy(), want, rtol=1e-5, atol=1e-6)
    # item 3, target 0: the top label is the most similar neighbour that has one (the third)
    assert summary[3, 2 * t] == batch.nb_labels[3, 2, 0]
    noisy = dataclasses.replace(batch, nb_labels=torch.where(torch.from_numpy(lm), batch.nb_labels, torch.tensor(1e6)))
    torch.testing.assert_close(model(summarise(noisy)).mu_y, model(batch).mu_y)
    assert not PopularityModel(dataclasses.replace(cfg, use_retrieval=False)).neighbour_summary
    # copies (scores equal up to float noise) count as one: their labels' mean is the top label
    copies = dataclasses.replace(batch)
    copies.nb_score = batch.nb_score.clone()
    copies.nb_score[0, :2] = torch.tensor([0.8, 0.8 + 1e-7])
    copies.nb_label_mask = torch.ones_like(batch.nb_label_mask)
    copies.nb_mask = torch.ones_like(batch.nb_mask)
    top = summarise(copies).nb_summary[0, 2 * t : 3 * t]
    torch.testing.assert_close(top, copies.nb_labels[0, :2].mean(dim=0))
    # and the statistics do not depend on the neighbours' order
    order = torch.tensor([2, 0, 1])
    shuffled = dataclasses.replace(
        copies, **{f: getattr(copies, f)[:, order] for f in ("nb_score", "nb_mask", "nb_labels", "nb_label_mask")}
    )
    torch.testing.assert_close(summarise(shuffled).nb_summary, summarise(copies).nb_summary)


def test_a_prediction_does_not_depend_on_its_batch_or_its_neighbours_order() -> None:
    cfg = small_config()
    torch.manual_seed(0)
    model = PopularityModel(cfg).eval()
    batch = make_batch(cfg, b=6, k=4)
    ref = model.predict(batch, n_samples=32, seed=3)
    # the neighbours in another order
    order = torch.tensor([3, 1, 0, 2])
    nb_fields = [
        f.name for f in dataclasses.fields(ModelBatch)
        if f.name.startswith("nb_") and f.name not in ("nb_summary", "nb_wide") and getattr(batch, f.name) is not None
    ]
    shuffled = summarise(dataclasses.replace(batch, **{f: getattr(batch, f)[:, order] for f in nb_fields}),
                         cfg.wide_widths)
    # the items in another order, and each item alone
    perm = torch.tensor([5, 2, 0, 4, 1, 3])
    items = [f.name for f in dataclasses.fields(ModelBatch) if isinstance(getattr(batch, f.name), torch.Tensor)]
    permuted = dataclasses.replace(batch, **{f: getattr(batch, f)[perm] for f in items})
    for other, index in ((shuffled, torch.arange(6)), (permuted, perm)):
        got = model.predict(other, n_samples=32, seed=3)
        for name in ("mean", "lower", "upper"):
            torch.testing.assert_close(getattr(got, name), getattr(ref, name)[index], atol=1e-5, rtol=1e-5)
    for i in range(6):
        alone = dataclasses.replace(batch, **{f: getattr(batch, f)[i : i + 1] for f in items})
        got = model.predict(alone, n_samples=32, seed=3)
        torch.testing.assert_close(got.lower[0], ref.lower[i], atol=1e-5, rtol=1e-5)
