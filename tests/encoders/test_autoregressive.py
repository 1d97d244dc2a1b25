"""AutoregressiveEncoder: shapes, padding and causality, tied heads, the next-event loss, save/load."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from userllm import kernels
from userllm.encoders import (AutoregressiveEncoder, EncoderConfig, build_encoder, load_encoder,
                              save_encoder)
from userllm.encoders.autoregressive import feature_cross_entropy
from userllm.errors import UserError

from encoder_toys import fit_briefly

SPECS = [dict(name="item", num_embeddings=40, multi_valued=False),
         dict(name="rating", num_embeddings=6, multi_valued=False),
         dict(name="category", num_embeddings=9, multi_valued=True)]

pytestmark = pytest.mark.usefixtures("one_thread")



def make_encoder(seed: int = 0, **kw) -> AutoregressiveEncoder:
    torch.manual_seed(seed)
    cfg = EncoderConfig(SPECS, feature_dims={"item": 12, "rating": 4, "category": 6},
                        d_model=16, n_layers=2, n_heads=2, dropout=0.0, max_len=16, **kw)
    return AutoregressiveEncoder(cfg).eval()


def make_batch(lengths=(7, 4, 1), L=7, K=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    lengths = torch.tensor(lengths)
    pad = torch.arange(L)[None, :] >= lengths[:, None]
    item = torch.randint(1, 40, (B, L), generator=g).masked_fill(pad, -1)
    rating = torch.randint(1, 6, (B, L), generator=g).masked_fill(pad, -1)
    cat = torch.randint(-1, 9, (B, L, K), generator=g).masked_fill(pad[..., None], -1)
    cat[..., 0] = torch.randint(1, 9, (B, L), generator=g).masked_fill(pad, -1)  # at least one genre
    return [item, rating, cat], lengths


def test_shapes_and_mask():
    enc = make_encoder()
    feats, lengths = make_batch()
    out = enc(feats, lengths)
    assert out.embeddings.shape == (3, 7, 16) and out.embeddings.dtype == torch.float32
    assert enc.output_dim == 16
    assert out.mask.tolist() == (torch.arange(7)[None] < lengths[:, None]).tolist()
    assert torch.all(out.embeddings[~out.mask] == 0)
    assert torch.isfinite(out.embeddings).all()
    assert enc.score_next(feats, lengths).shape == (3, 40)


def test_score_next_is_the_full_forward_at_the_last_event_bit_for_bit():
    """score_next runs the last block at each row's last event only (the ranking path); the scores are
    exactly those of the full forward's last real position, for full, partial, one-event and empty rows."""
    enc = make_encoder()
    feats, lengths = make_batch(lengths=(7, 4, 1, 0, 6), L=7)
    out = enc(feats, lengths)
    last = (lengths - 1).clamp_min(0)
    hidden = out.embeddings[torch.arange(5), last]
    hidden[lengths == 0] = enc.transformer(enc.embed(feats))[lengths == 0, 0]     # position 0's output
    table = enc.tables["item"]
    want = enc.head_proj["item"](hidden) @ table.t() + enc.head_bias["item"]
    assert torch.equal(enc.last_hidden(feats, lengths), hidden)
    assert torch.allclose(enc.score_next(feats, lengths), want, rtol=0, atol=1e-6)   # addmm: bias in the GEMM


def test_next_item_query_factors_score_next_bit_for_bit():
    enc = make_encoder()
    feats, lengths = make_batch(lengths=(7, 4, 1, 0, 6), L=7)
    query, table, bias = enc.next_item_query(feats, lengths)
    assert query.shape == (5, 12) and table.shape == (40, 12) and bias.shape == (40,)
    assert torch.equal(torch.addmm(bias, query, table.t()), enc.score_next(feats, lengths))


def test_padding_does_not_affect_real_outputs():
    enc = make_encoder()
    feats, lengths = make_batch()
    ref = enc(feats, lengths).embeddings
    g = torch.Generator().manual_seed(5)
    perturbed = []
    for x, hi in zip(feats, (40, 6, 9)):
        y = x.clone()
        pad = (torch.arange(7)[None] >= lengths[:, None])
        pad = pad if y.dim() == 2 else pad[..., None].expand_as(y)
        y[pad] = torch.randint(0, hi, (int(pad.sum()),), generator=g)     # real ids where padding was
        perturbed.append(y)
    out = enc(perturbed, lengths)
    mask = out.mask
    assert torch.allclose(out.embeddings[mask], ref[mask], atol=1e-6)
    # And extra trailing padding columns change nothing either.
    longer = [torch.cat([x, torch.full_like(x[:, :2], -1)], dim=1) for x in feats]
    out2 = enc(longer, lengths)
    assert torch.allclose(out2.embeddings[:, :7], ref, atol=1e-6)


def test_causality_future_events_do_not_change_past_outputs():
    enc = make_encoder()
    feats, lengths = make_batch(lengths=(7, 7, 7))
    ref = enc(feats, lengths).embeddings
    t = 3
    changed = [x.clone() for x in feats]
    changed[0][:, t + 1:] = (changed[0][:, t + 1:] + 7) % 39 + 1
    changed[2][:, t + 1:, 0] = (changed[2][:, t + 1:, 0] + 3) % 8 + 1
    out = enc(changed, lengths).embeddings
    assert torch.allclose(out[:, :t + 1], ref[:, :t + 1], atol=1e-6)
    assert not torch.allclose(out[:, t + 1:], ref[:, t + 1:], atol=1e-3)


def test_heads_are_tied_to_embedding_tables():
    enc = make_encoder()
    for f in enc.features:
        assert enc.head_weight(f.name) is enc.tables[f.name]
    # No separate [V, D] output matrix exists anywhere in the module.
    shapes = [tuple(p.shape) for n, p in enc.named_parameters() if not n.startswith("embed.tables")]
    assert (40, 12) not in shapes and (12, 40) not in shapes
    h = torch.randn(5, 16)
    logits = enc.feature_logits(h, "item")
    manual = enc.head_proj["item"](h) @ enc.tables["item"].t() + enc.head_bias["item"]
    assert torch.allclose(logits, manual, atol=1e-6)
    with torch.no_grad():
        enc.tables["item"][3] += 1.0                                   # editing the table moves the head
    assert not torch.allclose(enc.feature_logits(h, "item")[:, 3], logits[:, 3])
    # The loss's gradient reaches the item table through the head even with item input absent.
    enc.train()
    feats, lengths = make_batch()
    feats[0][:, :-1] = torch.where(feats[0][:, :-1] >= 0, 1, -1)
    loss, _ = enc.next_event_loss(feats, lengths)
    loss.backward()
    assert enc.tables["item"].grad[2:].abs().sum() > 0


def test_embedding_goes_through_kernel_op(monkeypatch):
    calls = []
    real = kernels.embedding_concat

    def spy(ids, tables, pooling="mean"):
        calls.append(([tuple(i.shape) for i in ids], [tuple(t.shape) for t in tables], pooling))
        return real(ids, tables, pooling)

    monkeypatch.setattr(kernels, "embedding_concat", spy)
    enc = make_encoder()
    feats, lengths = make_batch()
    enc(feats, lengths)
    assert calls == [([(3, 7), (3, 7), (3, 7, 3)], [(40, 12), (6, 4), (9, 6)], "mean")]


def test_loss_matches_hand_computation():
    enc = make_encoder()
    feats, lengths = make_batch(lengths=(5, 3), L=5)
    feats[1][0, 2] = 0                                                  # an UNK rating target: ignored
    loss, per = enc.next_event_loss(feats, lengths)
    h = enc(feats, lengths).embeddings
    src = [(0, t) for t in range(4)] + [(1, t) for t in range(2)]
    hs = torch.stack([h[b, t] for b, t in src])
    expect = {}
    for f, x in zip(enc.features, feats):
        logp = torch.log_softmax(enc.feature_logits(hs, f.name), -1)
        terms = []
        for j, (b, t) in enumerate(src):
            tgt = x[b, t + 1]
            ids = [int(i) for i in tgt.reshape(-1) if i > 0]
            if ids:
                terms.append(-sum(logp[j, i] for i in ids) / len(ids))
        expect[f.name] = torch.stack(terms).mean()
    for name, value in expect.items():
        assert torch.allclose(per[name], value, atol=1e-5), name
    assert torch.allclose(loss, sum(expect.values()), atol=1e-5)


def test_feature_cross_entropy_rules():
    logits = torch.randn(3, 5)
    assert feature_cross_entropy(logits, torch.tensor([0, -1, 0])) is None   # UNK and padding ignored
    ce = feature_cross_entropy(logits, torch.tensor([2, 0, 4]))
    assert torch.allclose(ce, F.cross_entropy(logits[[0, 2]], torch.tensor([2, 4])))
    bags = torch.tensor([[1, 3, -1], [0, -1, -1], [2, 2, 4]])
    logp = torch.log_softmax(logits, -1)
    expect = -((logp[0, 1] + logp[0, 3]) / 2 + (logp[2, 2] * 2 + logp[2, 4]) / 3) / 2
    assert torch.allclose(feature_cross_entropy(logits, bags), expect)


def test_loss_weights_drop_a_feature():
    enc = make_encoder(loss_weights={"rating": 0.0, "category": 0.5})
    feats, lengths = make_batch()
    loss, per = enc.next_event_loss(feats, lengths)
    assert set(per) == {"item", "category"}
    assert torch.allclose(loss, per["item"] + 0.5 * per["category"])


def test_loss_decreases_on_tiny_batch():
    enc = make_encoder(seed=3).train()
    feats, lengths = make_batch(lengths=(7, 6, 5, 7), seed=4)
    first, last = fit_briefly(enc, feats, lengths)
    assert last < 0.5 * first


def test_save_load_roundtrip(tmp_path):
    enc = make_encoder()
    path = tmp_path / "enc.safetensors"
    save_encoder(enc, path, extra={"dataset": "toy"})
    again = load_encoder(path)
    assert isinstance(again, AutoregressiveEncoder) and not again.training
    assert again.config.to_dict() == enc.config.to_dict()
    feats, lengths = make_batch()
    assert torch.equal(again(feats, lengths).embeddings, enc(feats, lengths).embeddings)
    again2 = build_encoder("ar", enc.config.to_dict())
    assert again2.config.feature_dims == [12, 4, 6]


def test_load_encoder_rejects_other_files(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="x.safetensors"):
        load_encoder(bad)
    with pytest.raises(UserError, match="not found"):
        load_encoder(tmp_path / "missing.safetensors")
    with pytest.raises(UserError, match="unknown encoder kind"):
        build_encoder("rnn", {})


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        EncoderConfig(SPECS, d_model=10, n_heads=3)
    with pytest.raises(ValueError, match="unknown features"):
        EncoderConfig(SPECS, loss_weights={"genre": 1.0})
    with pytest.raises(ValueError, match="max_len"):
        make_encoder()(*make_batch(lengths=(20,), L=20))
    assert math.isclose(EncoderConfig(SPECS).dropout, 0.1)
