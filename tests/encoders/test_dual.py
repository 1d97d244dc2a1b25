"""DualEncoder: user-tower shapes and masking, both fusions, both negative modes, save/load."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from userllm.encoders import DualEncoder, DualEncoderConfig, build_encoder, load_encoder, save_encoder

from encoder_toys import SPECS, make_batch

pytestmark = pytest.mark.usefixtures("one_thread")


def make_encoder(seed=0, **kw) -> DualEncoder:
    torch.manual_seed(seed)
    cfg = DualEncoderConfig(SPECS, d_model=16, n_layers=1, n_heads=2, dropout=0.0, max_len=12, **kw)
    return DualEncoder(cfg).eval()


@pytest.mark.parametrize("fusion,k", [("attention", 3), ("last", 2), ("attention", 1)])
def test_user_tower_shape_and_padding_invariance(fusion, k):
    enc = make_encoder(fusion=fusion, num_user_embeddings=k)
    feats, lengths = make_batch()
    out = enc(feats, lengths)
    assert out.embeddings.shape == (4, k, 16) and out.mask.shape == (4, k) and out.mask.all()
    noisy = [x.clone() for x in feats]
    pad = torch.arange(6)[None] >= lengths[:, None]
    noisy[0][pad] = 5
    noisy[1][pad] = 2
    assert torch.allclose(enc(noisy, lengths).embeddings, out.embeddings, atol=1e-6)
    assert enc.score_next(feats, lengths).shape == (4, 30)


@pytest.mark.parametrize("negatives", ["in_batch", "sampled", "mixed", "all"])
def test_loss_is_finite_and_trains(negatives):
    enc = make_encoder(negatives=negatives, num_negatives=16, num_user_embeddings=2).train()
    feats, lengths = make_batch(lengths=(6, 5, 4, 6, 3, 6), seed=2)
    feats[0][:, :] = torch.where(feats[0] >= 0, feats[0] % 6 + 1, -1)  # a small label set
    opt = torch.optim.AdamW(enc.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss, per = enc.next_event_loss(feats, lengths)
        assert torch.isfinite(loss) and set(per) == {"item"}
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


def test_in_batch_loss_matches_hand_computation():
    enc = make_encoder(temperature=0.5)
    feats, lengths = make_batch(lengths=(6, 3, 2, 5))
    rows = torch.arange(4)
    feats[0][rows, lengths - 1] = torch.tensor([4, 9, 4, 0])            # a duplicate label and an UNK one
    loss, _ = enc.next_event_loss(feats, lengths)
    history, hist_len, label = enc.split_history(feats, lengths)
    assert hist_len.tolist() == [5, 2, 1, 4] and label.tolist() == [4, 9, 4, 0]
    assert all((x[rows, lengths - 1] == -1).all() for x in history)
    keep = torch.tensor([0, 1, 2])
    u = F.normalize(enc([x[keep] for x in history], hist_len[keep]).embeddings, dim=-1)[:, 0]
    v = F.normalize(enc.label_embeddings(torch.tensor([4, 9, 4])), dim=-1)
    logits = u @ v.t() / 0.5
    logits[0, 2] = logits[2, 0] = float("-inf")                          # same item: not a negative
    assert torch.allclose(loss, F.cross_entropy(logits, torch.arange(3)), atol=1e-5)


@pytest.mark.parametrize("correct", [True, False])
def test_logq_correction_subtracts_each_candidates_log_frequency(correct):
    enc = make_encoder(temperature=0.5, logq_correction=correct)
    feats, lengths = make_batch(lengths=(6, 3, 2, 5))
    rows = torch.arange(4)
    feats[0][rows, lengths - 1] = torch.tensor([4, 9, 11, 3])
    plain, _ = make_encoder(temperature=0.5, logq_correction=False).next_event_loss(feats, lengths)
    assert torch.allclose(enc.next_event_loss(feats, lengths)[0], plain)   # no frequencies yet: no correction
    counts = torch.zeros(30)
    counts[[4, 9, 11, 3]] = torch.tensor([99.0, 0.0, 9.0, 4.0])
    enc.set_label_frequencies(counts)
    log_q = ((counts + 1) / (counts + 1).sum()).log()
    assert torch.allclose(enc.label_log_q, log_q)
    history, hist_len, label = enc.split_history(feats, lengths)
    u = F.normalize(enc(history, hist_len).embeddings, dim=-1)[:, 0]
    v = F.normalize(enc.label_embeddings(label), dim=-1)
    logits = u @ v.t() / 0.5 - (log_q[label][None, :] if correct else 0)
    loss, _ = enc.next_event_loss(feats, lengths)
    assert torch.allclose(loss, F.cross_entropy(logits, torch.arange(4)), atol=1e-5)
    assert "label_log_q" not in enc.state_dict()                          # set from data, never saved
    with pytest.raises(ValueError, match="label counts must be \\[30\\]"):
        enc.set_label_frequencies(torch.ones(29))


def test_all_negatives_is_the_exact_softmax_over_real_items():
    enc = make_encoder(temperature=0.5, negatives="all")
    feats, lengths = make_batch(lengths=(6, 3, 2, 5))
    rows = torch.arange(4)
    feats[0][rows, lengths - 1] = torch.tensor([4, 9, 4, 0])             # a duplicate label and an UNK one
    loss, _ = enc.next_event_loss(feats, lengths)
    history, hist_len, label = enc.split_history(feats, lengths)
    keep = torch.tensor([0, 1, 2])
    u = F.normalize(enc([x[keep] for x in history], hist_len[keep]).embeddings, dim=-1)[:, 0]
    logits = u @ F.normalize(enc.label_embeddings(), dim=-1).t() / 0.5
    logits[:, 0] = float("-inf")
    assert torch.allclose(loss, F.cross_entropy(logits, label[keep]), atol=1e-5)


@pytest.mark.parametrize("negatives", ["in_batch", "sampled", "mixed", "all"])
def test_item_bias_adds_each_candidates_bias_to_every_score(negatives):
    feats, lengths = make_batch(lengths=(6, 3, 2, 5))
    rows = torch.arange(4)
    feats[0][rows, lengths - 1] = torch.tensor([4, 9, 11, 3])
    plain = make_encoder(temperature=0.5, negatives=negatives, num_negatives=6)
    enc = make_encoder(temperature=0.5, negatives=negatives, num_negatives=6, item_bias=True)
    assert enc.label_bias.shape == (30,) and "label_bias" in enc.state_dict()
    torch.manual_seed(1)
    base = plain.next_event_loss(feats, lengths)[0]
    torch.manual_seed(1)
    assert torch.allclose(enc.next_event_loss(feats, lengths)[0], base, atol=1e-6)   # zero-initialised
    with torch.no_grad():
        enc.label_bias.copy_(torch.linspace(-2, 2, 30))
    bias = torch.linspace(-2, 2, 30)
    assert torch.allclose(enc.score_next(feats, lengths), plain.score_next(feats, lengths) + bias, atol=1e-5)
    if negatives == "in_batch":                                         # the label's own bias enters its logit
        history, hist_len, label = enc.split_history(feats, lengths)
        u = F.normalize(enc(history, hist_len).embeddings, dim=-1)[:, 0]
        logits = u @ F.normalize(enc.label_embeddings(label), dim=-1).t() / 0.5 + bias[label][None, :]
        assert torch.allclose(enc.next_event_loss(feats, lengths)[0],
                              F.cross_entropy(logits, torch.arange(4)), atol=1e-5)
    torch.manual_seed(1)
    loss = enc.next_event_loss(feats, lengths)[0]
    loss.backward()
    assert enc.label_bias.grad is not None and enc.label_bias.grad.abs().sum() > 0


@pytest.mark.parametrize("correct", [True, False])
def test_mixed_negatives_match_hand_computation(correct):
    enc = make_encoder(temperature=0.5, negatives="mixed", num_negatives=5, logq_correction=correct)
    counts = torch.arange(30.0)
    enc.set_label_frequencies(counts)
    feats, lengths = make_batch(lengths=(6, 3, 2, 5))
    rows = torch.arange(4)
    feats[0][rows, lengths - 1] = torch.tensor([4, 9, 4, 7])
    torch.manual_seed(5)
    loss, _ = enc.next_event_loss(feats, lengths)
    torch.manual_seed(5)
    neg = torch.randint(1, 30, (5,))
    history, hist_len, label = enc.split_history(feats, lengths)
    cand = torch.cat([label, neg])
    u = F.normalize(enc(history, hist_len).embeddings, dim=-1)[:, 0]
    logits = u @ F.normalize(enc.label_embeddings(cand), dim=-1).t() / 0.5
    if correct:
        p = (counts + 1) / (counts + 1).sum()
        logits = logits - (4 * p[cand] + 5 / 29).log()[None, :]
    dup = (cand[None, :] == label[:, None])
    dup[rows, rows] = False
    logits = logits.masked_fill(dup, float("-inf"))
    assert dup[0, 2] and dup[2, 0]                                        # the duplicate label is masked
    assert torch.allclose(loss, F.cross_entropy(logits, rows), atol=1e-5)


def test_all_targets_equal_every_prefix_as_its_own_window():
    """targets="all" (one pass per window) == the mean over every prefix of the one-label loss."""
    kw = dict(temperature=0.5, negatives="all", fusion="last")
    enc = make_encoder(targets="all", **kw)
    feats, lengths = make_batch(lengths=(6, 3, 2, 5))
    feats[0][1, 1] = 0                                                    # an UNK label is skipped
    loss, _ = enc.next_event_loss(feats, lengths)
    logits, labels = [], []
    for b, n in enumerate(lengths.tolist()):
        for t in range(1, n):
            label = int(feats[0][b, t])
            if label <= 0:
                continue
            user = enc([x[b:b + 1, :t] for x in feats], torch.tensor([t])).embeddings
            logits.append(enc.scores(user, enc.label_embeddings())[0])
            labels.append(label)
    logits = torch.stack(logits)
    logits[:, 0] = float("-inf")
    assert len(labels) == 5 + 1 + 1 + 4
    assert torch.allclose(loss, F.cross_entropy(logits, torch.tensor(labels)), atol=1e-5)
    with pytest.raises(ValueError, match="targets='all' needs fusion='last'"):
        make_encoder(targets="all", fusion="attention")


@pytest.mark.parametrize("negatives", ["in_batch", "sampled", "all"])
def test_dot_score_with_a_linear_label_tower_matches_hand_computation(negatives):
    """score="dot": max_j u_j . v_i, no normalisation and no temperature; label_tower="linear": one Linear."""
    enc = make_encoder(temperature=0.5, negatives=negatives, num_negatives=6, num_user_embeddings=2,
                       fusion="attention", score="dot", label_tower="linear", logq_correction=False)
    assert isinstance(enc.label_mlp, torch.nn.Linear)
    table = enc.tables["item"]
    ids = torch.tensor([4, 9, 11])
    assert torch.allclose(enc.label_embeddings(ids), table[ids] @ enc.label_mlp.weight.t() + enc.label_mlp.bias)
    feats, lengths = make_batch(lengths=(6, 3, 2, 5))
    rows = torch.arange(4)
    feats[0][rows, lengths - 1] = torch.tensor([4, 9, 11, 3])
    history, hist_len, label = enc.split_history(feats, lengths)
    u = enc(history, hist_len).embeddings                                 # [4, 2, 16]
    v_all = enc.label_embeddings()                                        # [30, 16]
    full = torch.einsum("bkd,cd->bkc", u, v_all).amax(dim=1)              # [4, 30]
    assert torch.allclose(enc.score_next(history, hist_len), full, atol=1e-5)
    torch.manual_seed(3)
    loss, _ = enc.next_event_loss(feats, lengths)
    if negatives == "in_batch":
        logits = full[:, label]
    elif negatives == "all":
        logits = full.clone()
        logits[:, 0] = float("-inf")
    else:
        torch.manual_seed(3)
        neg = torch.randint(1, 30, (6,))
        logits = torch.cat([full[rows, label][:, None], full[:, neg].masked_fill(neg[None] == label[:, None],
                                                                                 float("-inf"))], dim=1)
    target = {"in_batch": rows, "all": label, "sampled": torch.zeros(4, dtype=torch.long)}[negatives]
    assert torch.allclose(loss, F.cross_entropy(logits, target), atol=1e-5)
    loss.backward()
    assert enc.label_mlp.weight.grad.abs().sum() > 0


def test_table_label_tower_is_the_items_input_embedding():
    """label_tower="table" with score="dot": the user vector dotted with the item's input embedding (the AR
    head's form), plus the item bias."""
    enc = make_encoder(feature_dims={"item": 16}, score="dot", label_tower="table", item_bias=True,
                       negatives="all", fusion="last")
    assert list(enc.label_mlp.parameters()) == []
    with torch.no_grad():
        enc.label_bias.copy_(torch.linspace(-1, 1, 30))
    feats, lengths = make_batch()
    user = enc(feats, lengths).embeddings[:, 0]
    want = user @ enc.tables["item"].t() + torch.linspace(-1, 1, 30)
    assert torch.allclose(enc.score_next(feats, lengths), want, atol=1e-5)
    loss, _ = enc.next_event_loss(feats, lengths)
    loss.backward()
    assert enc.tables["item"].grad.abs().sum() > 0


@pytest.mark.parametrize("negatives", ["in_batch", "sampled", "mixed", "all"])
def test_rows_without_a_label_are_neither_scored_nor_candidates(negatives):
    """contrastive_loss on rows interleaved with unlabelled ones (-1: padding, 0: UNK; targets="all" keeps
    every prefix so that the logits keep one shape) equals the loss on the labelled rows alone."""
    enc = make_encoder(negatives=negatives, num_negatives=7, temperature=0.5)
    enc.set_label_frequencies(torch.arange(30.0))
    g = torch.Generator().manual_seed(4)
    user = torch.randn(9, 1, 16, generator=g)
    label = torch.tensor([4, -1, 9, 0, 4, 11, -1, 3, 0])
    keep = label > 0
    torch.manual_seed(2)
    padded, _ = enc.contrastive_loss(user, label)
    torch.manual_seed(2)
    compact, _ = enc.contrastive_loss(user[keep], label[keep])
    assert torch.isfinite(padded) and torch.allclose(padded, compact, atol=1e-6)
    user.requires_grad_(True)
    enc.contrastive_loss(user, label)[0].backward()
    assert torch.isfinite(user.grad).all() and user.grad[~keep].abs().sum() == 0


def test_sampled_negatives_exclude_unk_and_follow_torch_rng():
    enc = make_encoder(negatives="sampled", num_negatives=8)
    feats, lengths = make_batch()
    torch.manual_seed(7)
    a, _ = enc.next_event_loss(feats, lengths)
    torch.manual_seed(7)
    b, _ = enc.next_event_loss(feats, lengths)
    assert torch.equal(a, b)


def test_save_load_roundtrip(tmp_path):
    enc = make_encoder(fusion="last", num_user_embeddings=2, negatives="sampled")
    save_encoder(enc, tmp_path / "dual.safetensors")
    again = load_encoder(tmp_path / "dual.safetensors")
    assert isinstance(again, DualEncoder) and again.config.fusion == "last"
    feats, lengths = make_batch()
    assert torch.equal(again(feats, lengths).embeddings, enc(feats, lengths).embeddings)
    dot = make_encoder(score="dot", label_tower="linear", item_bias=True)
    save_encoder(dot, tmp_path / "dot.safetensors")
    again = load_encoder(tmp_path / "dot.safetensors")
    assert (again.config.score, again.config.label_tower) == ("dot", "linear")
    assert torch.equal(again.score_next(feats, lengths), dot.score_next(feats, lengths))


def test_bad_config():
    with pytest.raises(ValueError, match="fusion"):
        build_encoder("dual", dict(feature_specs=SPECS, fusion="mean"))
    with pytest.raises(ValueError, match="score must be one of"):
        build_encoder("dual", dict(feature_specs=SPECS, score="l2"))
    with pytest.raises(ValueError, match="label_tower='table' needs the item embedding width"):
        build_encoder("dual", dict(feature_specs=SPECS, feature_dims={"item": 8}, d_model=16, label_tower="table"))
    with pytest.raises(ValueError, match="label_tower must be one of"):
        build_encoder("dual", dict(feature_specs=SPECS, label_tower="deep"))
    with pytest.raises(ValueError, match="label_feature"):
        build_encoder("dual", dict(feature_specs=SPECS, label_feature="rating"))
