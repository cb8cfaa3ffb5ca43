"""Span and channel masking: fairseq compute_mask_indices semantics on fbank frames."""

from __future__ import annotations

import math

import torch

from spear.models.student.masking import channel_mask, mask_features, span_mask
from spear.config import MaskingConfig


def _runs(row: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of the maximal runs of True."""
    runs, start = [], None
    for t, v in enumerate(row.tolist() + [False]):
        if v and start is None:
            start = t
        elif not v and start is not None:
            runs.append((start, t - start))
            start = None
    return runs


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_masks_respect_lengths_and_are_reproducible():
    lengths = torch.tensor([1000, 300, 57, 12, 1, 0])
    m = span_mask(lengths, 1000, generator=_gen(0))
    assert m.shape == (6, 1000) and m.dtype == torch.bool
    for b, L in enumerate(lengths.tolist()):
        assert not m[b, L:].any()  # padding is never masked
        if L:
            assert int(m[b, :L].sum()) < L  # never the whole utterance
    assert m[0].any() and m[1].any() and m[2].any() and m[3].any()
    assert torch.equal(m, span_mask(lengths, 1000, generator=_gen(0)))
    assert not torch.equal(m, span_mask(lengths, 1000, generator=_gen(1)))
    assert not span_mask(lengths, 1000, mask_prob=0.0, generator=_gen(0)).any()


def test_spans_are_mask_length_long_and_start_before_the_last_span():
    m = span_mask(torch.full((50,), 400), 400, generator=_gen(2))
    for row in m:
        runs = _runs(row)
        assert runs
        # a run is a union of 10-frame spans; starts lie in [0, L - 10), so no span is clipped
        assert all(length >= 10 for _, length in runs)
        assert all(start + length <= 399 for start, length in runs)
        assert not row[399]  # fairseq never starts a span in the last mask_length positions


def test_min_masks_gives_two_spans_on_short_or_rarely_masked_utterances():
    m = span_mask(torch.full((200,), 1000), 1000, mask_prob=1e-4, generator=_gen(3))
    counts = m.sum(1)
    # two distinct 10-frame spans: 20 frames unless they overlap (11..19)
    assert counts.max() == 20 and counts.min() >= 11
    assert (counts == 20).float().mean() > 0.9  # overlap is rare with 990 possible starts


def test_masked_fraction_matches_the_fairseq_expectation():
    # L = 1000, p = 0.65, span 10: int(65 + u) = 65 distinct starts among 990 positions. Frame t is
    # unmasked iff none of the m_t starts that would cover it was drawn (hypergeometric).
    L, n_pos, k = 1000, 990, 65
    expected = 0.0
    for t in range(L):
        m_t = len(range(max(0, t - 9), min(t, n_pos - 1) + 1))
        p_free = math.prod((n_pos - k - i) / (n_pos - i) for i in range(m_t))
        expected += 1 - p_free
    expected /= L
    m = span_mask(torch.full((256,), L), L, generator=_gen(4))
    got = float(m.float().mean())
    # per-utterance fractions have sd ~0.02; the mean of 256 is within 0.005 with overwhelming odds
    assert abs(got - expected) < 0.006, (got, expected)
    assert 0.45 < expected < 0.52  # ~1 - exp(-0.65): about half the frames


def test_channel_mask_spans_of_twenty_bins():
    cm = channel_mask(500, 128, generator=_gen(5))
    counts = cm.sum(1)
    # int(0.25 * 128 / 20 + u) = 1 or 2 spans of 20 bins starting in [0, 108)
    assert counts.min() >= 20 and counts.max() <= 40
    assert 0.3 < float((counts == 20).float().mean()) < 0.6
    for row in cm[:50]:
        assert all(length >= 20 for _, length in _runs(row))


def test_mask_features_zeroes_masked_channels_and_returns_the_frame_mask():
    feats = torch.randn(4, 300, 128) - 5.0
    lengths = torch.tensor([300, 200, 150, 100])
    out = mask_features(feats, lengths, generator=_gen(6), **MaskingConfig().model_dump())
    assert out.frame_mask.shape == (4, 300) and out.channel_mask.shape == (4, 128)
    assert out.channel_mask.any(1).any()
    zeroed = out.channel_mask.unsqueeze(1).expand(-1, 300, -1)
    assert torch.all(out.feats[zeroed] == 0)
    assert torch.equal(out.feats[~zeroed], feats[~zeroed])  # frames are not touched: the encoder embeds them
    assert not out.frame_mask[3, 100:].any()
    off = mask_features(feats, lengths, generator=_gen(6), channel_mask_prob=0.0)
    assert torch.equal(off.feats, feats) and not off.channel_mask.any()


def test_defaults_are_the_config_defaults():
    """mask_features takes plain settings; its defaults are SPEAR's, as MaskingConfig's."""
    import inspect

    from spear.models.student.mixing import mix_batch

    from spear.config import MixingConfig

    for fn, cfg in ((mask_features, MaskingConfig()), (mix_batch, MixingConfig())):
        params = inspect.signature(fn).parameters
        assert {k: params[k].default for k in cfg.model_dump()} == cfg.model_dump(), fn.__name__
