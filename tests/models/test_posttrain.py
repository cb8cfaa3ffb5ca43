"""Post-training heads and losses: AAM softmax against its formula, padding-independent pooling,
the freezing modes and parameter groups, and a real tiny student post-trained on espeak-ng
speech (speaker, semantic) and synthetic counting items in one batch, each loss on its own rows."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import soxr
import torch

import spear.models.posttrain as posttrain
from spear.models.device import torch_threads
from spear.models.posttrain import (
    AAMSoftmax,
    AttentiveStatsPooling,
    AttributeHead,
    AttributeSpec,
    CountingLoss,
    LayerWeighting,
    PostTrainBatch,
    PostTrainModel,
    SemanticAlignmentLoss,
    info_nce,
    margin_warmup,
    masked_mean,
    pivot_text_embedding,
)
from spear.models.student import build_encoder, build_student, export_fields, export_state
from spear.synthetic.counting import CountingGenerator
from spear.synthetic.speech import ESPEAK_RATE, synth_speech

SR = 16000


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):  # tiny models on a shared machine: threads only wait on each other
        yield


def _student(seed: int = 0):
    torch.manual_seed(seed)
    enc = build_encoder("zipformer2", "tiny", num_mel_bins=80)
    return build_student(export_fields(enc), export_state(enc), device="cpu")


@pytest.fixture(scope="module")
def speech() -> dict[tuple[str, int], np.ndarray]:
    """espeak-ng speech, 16 kHz: two voices x two sentences."""
    texts = ("the cat sat on the mat", "seven green boats sail home")
    voices = (("en-us", 160, 50), ("en+m3", 145, 30))
    return {(v[0], k): (0.3 * soxr.resample(synth_speech(t, *v), ESPEAK_RATE, SR)).astype(np.float32)
            for v in voices for k, t in enumerate(texts)}


def _pad(wavs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(w) for w in wavs)
    out = torch.zeros(len(wavs), n)
    for i, w in enumerate(wavs):
        out[i, : len(w)] = torch.from_numpy(w)
    return out, torch.tensor([len(w) for w in wavs])


def test_docstring_examples_hold():
    assert doctest.testmod(posttrain).failed == 0


# ----------------------------------------------------------------------------- AAM softmax


def test_aam_true_class_logit_is_scaled_cos_of_angle_plus_margin():
    torch.manual_seed(0)
    aam = AAMSoftmax(16, 5, margin=0.3, scale=20.0)
    emb, labels = torch.randn(12, 16), torch.randint(0, 5, (12,))
    logits = aam.logits(emb, labels).detach()
    w = aam.weight.detach()
    cos = (emb / emb.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).T
    theta = torch.acos(cos.clamp(-1, 1))
    for i in range(12):
        for j in range(5):
            expected = 20.0 * (math.cos(theta[i, j] + 0.3) if j == labels[i] else float(cos[i, j]))
            assert float(logits[i, j]) == pytest.approx(expected, abs=1e-4)
    # without labels (or margin 0): plain scaled cosines; the margin lowers only the true class
    torch.testing.assert_close(aam.logits(emb), 20.0 * cos, atol=1e-5, rtol=0)
    torch.testing.assert_close(aam.logits(emb, labels, margin=0.0), 20.0 * cos, atol=1e-5, rtol=0)
    with torch.no_grad():
        assert float(aam(emb, labels)) > float(aam(emb, labels, margin=0.0))
    # past theta = pi - m the logit keeps falling: cos(theta) - m sin(m) (an embedding opposite its centre)
    opposite = -w[labels[:1]]
    assert float(aam.logits(opposite, labels[:1]).detach()[0, labels[0]]) == pytest.approx(
        20.0 * (-1.0 - 0.3 * math.sin(0.3)), abs=1e-3)


def test_aam_gradients_flow_and_a_tiny_head_learns_separable_embeddings():
    torch.manual_seed(0)
    centres = torch.randn(6, 8) * 3
    y = torch.arange(6).repeat(20)
    x = centres[y] + 0.5 * torch.randn(len(y), 8)
    proj, aam = torch.nn.Linear(8, 16), AAMSoftmax(16, 6, margin=0.2, scale=30.0)
    loss = aam(proj(x), y)
    loss.backward()
    for p in (*proj.parameters(), aam.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    opt = torch.optim.Adam([*proj.parameters(), aam.weight], lr=0.02)
    first = float(loss.detach())
    for step in range(150):
        opt.zero_grad()
        loss = aam(proj(x), y, margin=margin_warmup(step, 0.2, 50))
        loss.backward()
        opt.step()
    assert first > 5.0 and float(loss.detach()) < 0.5, (first, float(loss.detach()))
    assert (aam.cosine(proj(x)).argmax(1) == y).all()


def test_margin_warmup_and_aam_argument_errors():
    assert [margin_warmup(s, 0.2, 100, start_step=10) for s in (0, 10, 60, 110, 500)] == \
        pytest.approx([0.0, 0.0, 0.1, 0.2, 0.2])
    with pytest.raises(ValueError, match="margin"):
        AAMSoftmax(4, 3, margin=2.0)
    with pytest.raises(ValueError, match="at least 2 classes"):
        AAMSoftmax(4, 1)


# ----------------------------------------------------------------------------- other losses


def test_semantic_alignment_and_info_nce():
    torch.manual_seed(0)
    t = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    cos_loss = SemanticAlignmentLoss("cosine", contrastive_weight=1.0, temperature=0.05)
    # aligned embeddings: alignment 0, contrastive near 0; shuffled: both large
    assert float(cos_loss(3.0 * t, t)) < 0.01
    assert float(cos_loss(t.roll(1, 0), t)) > 5.0
    mse = SemanticAlignmentLoss("mse", contrastive_weight=0.0)
    assert float(mse(t + 0.1, t)) == pytest.approx(0.01, rel=1e-4)
    # two rows with one target (translations of one sentence) are not each other's negatives
    targets = torch.stack([t[0], t[0], t[1], t[2]])
    emb = targets.clone()
    emb[1] = 0.9 * t[0] + 0.1 * t[3]
    with_groups = info_nce(emb, targets, 0.05, groups=torch.tensor([0, 0, 1, 2]))
    without = info_nce(emb, targets, 0.05)
    assert float(with_groups) < 0.05 < float(without)
    # the semantic loss finds the shared targets by itself
    assert float(SemanticAlignmentLoss("cosine")(emb, targets)) == pytest.approx(
        float((1 - torch.nn.functional.cosine_similarity(emb, targets)).mean() + with_groups), abs=1e-5)


@pytest.mark.parametrize("mode", ["classify", "regress", "both"])
def test_counting_loss_learns_counts_per_task(mode):
    torch.manual_seed(0)
    n = 240
    tasks = torch.randint(0, 2, (n,))
    labels = torch.where(tasks == 0, torch.randint(0, 5, (n,)), torch.randint(0, 2, (n,)))
    emb = torch.stack([labels.float(), tasks.float(), torch.randn(n)], 1) + 0.05 * torch.randn(n, 3)
    head = CountingLoss(3, {"tones": 5, "higher": 2}, mode=mode)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        loss, correct = head(emb, labels, tasks)
        loss.backward()
        opt.step()
    assert float(correct.float().mean()) > 0.95, (mode, float(correct.float().mean()))
    with pytest.raises(ValueError, match="labels must be in 0..1"):
        head(emb[:2], torch.tensor([3, 3]), torch.tensor([1, 1]))


# ----------------------------------------------------------------------------- pooling


@pytest.mark.parametrize("time_context", [False, True])
def test_layer_weighting_and_pooling_are_padding_independent(time_context):
    torch.manual_seed(0)
    head = AttributeHead([6, 10, 8], dim=5, pool_hidden=12, time_context=time_context)
    with torch.no_grad():
        head.weighting.logits.copy_(torch.tensor([0.3, -1.0, 0.7]))
    lengths = torch.tensor([13, 5, 9, 0])
    layers = [torch.randn(4, 20, d) for d in (6, 10, 8)]
    for x in layers:  # padding frames hold garbage: it must not leak into any embedding
        for b, n in enumerate(lengths):
            x[b, n:] = 1e3 * torch.randn(20 - int(n), x.shape[-1])
    batch = head(layers, lengths)
    for b, n in enumerate(lengths.tolist()):
        alone = head([x[b:b + 1, :n] for x in layers], torch.tensor([n]))
        torch.testing.assert_close(batch[b:b + 1], alone, atol=1e-5, rtol=1e-5)
    # an empty utterance pools to zeros, projected to the bias; nothing is NaN and gradients are finite
    assert torch.isfinite(batch).all()
    torch.testing.assert_close(batch[3], head.projection.bias, atol=1e-6, rtol=0)
    batch.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())
    # the weights are a softmax over layers
    w = LayerWeighting([4, 4, 4]).weights()
    assert w.tolist() == pytest.approx([1 / 3] * 3)
    with pytest.raises(ValueError, match="expected 3 layers"):
        head(layers[:2], lengths)


def test_attentive_pooling_attends_to_the_informative_frames():
    """Trained to tell two classes apart from the one frame that differs, the attention moves onto it."""
    torch.manual_seed(0)
    pool, lin = AttentiveStatsPooling(4, hidden=8), torch.nn.Linear(8, 2)
    y = torch.randint(0, 2, (64,))
    x = torch.randn(64, 30, 4) * 0.5
    x[torch.arange(64), 7, 0] = torch.where(y == 1, 4.0, -4.0) + 4.0  # one frame, channel 0: 0 or 8
    x[torch.arange(64), 7, 1] = 6.0  # and a marker the attention can find it by
    opt = torch.optim.Adam([*pool.parameters(), *lin.parameters()], lr=0.03)
    for _ in range(150):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(pool(x, torch.full((64,), 30))), y)
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.1
    assert (lin(pool(x, torch.full((64,), 30))).argmax(1) == y).all()


def test_time_context_lets_pooling_answer_an_order_question():
    """Label: is the first half of the utterance higher than the second? Both orders hold the same
    frames, so plain pooled statistics cannot tell them apart (held-out accuracy at chance); with
    each frame's relative position the attention pools the halves apart."""

    def data(seed: int, n: int = 256, T: int = 24):
        g = torch.Generator().manual_seed(seed)
        lo, hi = torch.rand(n, generator=g) * 2, torch.rand(n, generator=g) * 2 + 2.5
        first_high = torch.rand(n, generator=g) < 0.5
        a, b = torch.where(first_high, hi, lo), torch.where(first_high, lo, hi)
        lengths = 2 * torch.randint(T // 4, T // 2 + 1, (n,), generator=g)  # even: two equal halves
        x = 0.1 * torch.randn(n, T, 3, generator=g)
        for i in range(n):
            h = int(lengths[i]) // 2
            x[i, :h, 0] += a[i]
            x[i, h:2 * h, 0] += b[i]
        return x, lengths, first_high.long()

    (x, lengths, y), (x_test, lengths_test, y_test) = data(0), data(1)
    accuracy = {}
    for time_context in (False, True):
        torch.manual_seed(1)
        pool = AttentiveStatsPooling(3, hidden=16, time_context=time_context)
        lin = torch.nn.Linear(6, 2)
        opt = torch.optim.Adam([*pool.parameters(), *lin.parameters()], lr=0.02)
        for _ in range(200):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(lin(pool(x, lengths)), y).backward()
            opt.step()
        with torch.no_grad():
            accuracy[time_context] = float((lin(pool(x_test, lengths_test)).argmax(1) == y_test).float().mean())
    assert accuracy[False] < 0.65 and accuracy[True] > 0.95, accuracy


# ----------------------------------------------------------------------------- the model


def _specs(num_speakers: int = 2) -> list[AttributeSpec]:
    return [AttributeSpec("speaker", "speaker", dim=16, num_classes=num_speakers, scale=16.0),
            AttributeSpec("semantic", "semantic", dim=12, weight=0.5, temperature=0.1),
            AttributeSpec("count", "counting", dim=8, tasks={"onsets": 4, "higher": 2})]


def test_attribute_spec_and_model_argument_errors():
    with pytest.raises(ValueError, match="kind must be one of"):
        AttributeSpec("x", "emotion")
    with pytest.raises(ValueError, match="tasks must name"):
        AttributeSpec("c", "counting")
    with pytest.raises(ValueError, match="unique"):
        PostTrainModel(_student(), [_specs()[0], _specs()[0]])
    with pytest.raises(ValueError, match=r"trainable_layers must be in 1\.\.5"):
        PostTrainModel(_student(), _specs(), freeze="top", trainable_layers=9)
    with pytest.raises(ValueError, match="freeze must be one of"):
        PostTrainModel(_student(), _specs(), freeze="partial")


def test_frozen_encoder_gets_no_gradients_and_stays_in_eval_mode(speech):
    model = PostTrainModel(_student(), _specs(), freeze="frozen").train()
    assert not model.student.training and not model.student.encoder.training
    wavs, lengths = _pad([speech[("en-us", 0)], speech[("en+m3", 1)]])
    batch = PostTrainBatch(wavs, lengths, labels={"speaker": torch.tensor([0, 1])})
    model.loss(batch).loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.student.parameters())
    assert all(p.grad is not None for p in model.heads["speaker"].parameters())
    groups = model.param_groups(head_lr=1e-3, encoder_lr=1e-4)
    assert [g["name"] for g in groups] == ["heads"]


def test_top_n_trains_only_the_top_layers_with_the_lower_lr(speech):
    model = PostTrainModel(_student(), _specs(), freeze="top", trainable_layers=2).train()
    enc = model.student.encoder
    layers = [layer for stack in enc.stacks for layer in stack.layers]
    assert len(layers) == 5
    # the frozen part stays in eval mode (no dropout), the trainable part trains
    assert not enc.encoder_embed.training and not any(m.training for m in layers[:3])
    assert all(m.training for m in layers[3:])
    before = {n: p.detach().clone() for n, p in model.student.named_parameters()}
    groups = model.param_groups(head_lr=1e-2, encoder_lr=1e-3)
    assert [(g["name"], g["lr"]) for g in groups] == [("heads", 1e-2), ("encoder", 1e-3)]
    enc_ids = {id(p) for p in groups[1]["params"]}
    assert enc_ids == {id(p) for p in model.student.parameters() if p.requires_grad}
    assert not enc_ids & {id(p) for p in groups[0]["params"]}
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    wavs, lengths = _pad([speech[("en-us", 0)], speech[("en+m3", 0)]])
    opt.zero_grad()
    model.loss(PostTrainBatch(wavs, lengths, labels={"speaker": torch.tensor([0, 1])})).loss.backward()
    opt.step()
    changed = {n for n, p in model.student.named_parameters() if not torch.equal(p, before[n])}
    top = {f"encoder.{n}" for n, _ in enc.named_parameters()
           if n.startswith(("stacks.3.", "stacks.4."))}
    assert changed, "the top layers did not move"
    assert changed <= top, sorted(changed - top)  # nothing below the top two layers moved
    # the third stack's downsampling weights feed a frozen layer: frozen; its output bypass
    # follows it: frozen too (layer 2 is frozen); the fourth stack's are trainable
    assert not enc.stacks[2].downsample_bias.requires_grad
    assert enc.stacks[3].downsample_bias.requires_grad and enc.stacks[3].out_combiner.bypass_scale.requires_grad
    assert not enc.mask_embedding.requires_grad


def test_top_n_on_a_conformer_student():
    torch.manual_seed(0)
    enc = build_encoder("transformer", "tiny", num_mel_bins=80)
    student = build_student(export_fields(enc), export_state(enc), device="cpu")
    model = PostTrainModel(student, _specs(), freeze="top", trainable_layers=1).train()
    trainable = {n.split(".")[1] + ("." + n.split(".")[2] if n.split(".")[1] == "blocks" else "")
                 for n, p in model.student.named_parameters() if p.requires_grad}
    assert trainable == {"blocks.1", "norm_out"}
    assert not student.encoder.subsample.training and not student.encoder.blocks[0].training
    assert student.encoder.blocks[1].training


def test_bad_labels_are_named(speech):
    model = PostTrainModel(_student(), _specs(), freeze="frozen")
    wavs, lengths = _pad([speech[("en-us", 0)], speech[("en+m3", 1)]])
    with pytest.raises(ValueError, match="'speaker': speaker labels must be < num_classes=2"):
        model.loss(PostTrainBatch(wavs, lengths, labels={"speaker": torch.tensor([0, 5])}))
    with pytest.raises(ValueError, match=r"'semantic': targets must be \[B, 12\]"):
        model.loss(PostTrainBatch(wavs, lengths, labels={"semantic": torch.randn(2, 7)}))
    with pytest.raises(ValueError, match="unknown attribute"):
        model.loss(PostTrainBatch(wavs, lengths, labels={"emotion": torch.tensor([0, 1])}))
    with pytest.raises(ValueError, match="no labels for it"):
        model.loss(PostTrainBatch(wavs, lengths, masks={"speaker": torch.tensor([True, False])}))
    with pytest.raises(ValueError, match="needs tasks"):
        model.loss(PostTrainBatch(wavs, lengths, labels={"count": torch.tensor([0, 1])}))


def test_full_fine_tuning_reaches_every_encoder_parameter(speech):
    model = PostTrainModel(_student(), _specs(), freeze="full").train()
    wavs, lengths = _pad([speech[("en-us", 0)], speech[("en+m3", 0)]])
    model.loss(PostTrainBatch(wavs, lengths, labels={"speaker": torch.tensor([0, 1])})).loss.backward()
    missing = [n for n, p in model.student.named_parameters() if p.grad is None and n != "encoder.mask_embedding"]
    assert not missing, missing


def _mixed_batch(speech) -> tuple[PostTrainBatch, dict]:
    """4 speech rows (2 speakers x 2 sentences: speaker + semantic labels) and 3 counting rows."""
    gen = CountingGenerator(tasks=("onsets", "higher"), ranges={"onsets": (1, 4)}, seed=0)
    count_items = [gen.make("onsets", 2), gen.make("higher", 1), gen.make("onsets", 0)]
    keys = [("en-us", 0), ("en-us", 1), ("en+m3", 0), ("en+m3", 1)]
    wavs, lengths = _pad([speech[k] for k in keys] + [i.wav for i in count_items])
    torch.manual_seed(1)
    sentence_targets = torch.nn.functional.normalize(torch.randn(2, 12), dim=-1)
    semantic = torch.full((7, 12), float("nan"))
    semantic[:4] = sentence_targets[torch.tensor([0, 1, 0, 1])]  # one target per sentence, both voices
    labels = {"speaker": torch.tensor([0, 0, 1, 1, -1, -1, -1]),
              "semantic": semantic,
              "count": torch.tensor([-1, -1, -1, -1, 2, 1, 0])}
    tasks = {"count": torch.tensor([0, 0, 0, 0, 0, 1, 0])}
    return PostTrainBatch(wavs, lengths, labels=labels, tasks=tasks), {"keys": keys, "items": count_items}


def test_real_student_on_speech_and_counting_each_loss_on_its_rows(speech):
    model = PostTrainModel(_student(), _specs(), freeze="top", trainable_layers=2).eval()
    batch, _ = _mixed_batch(speech)
    out = model(batch.wavs, batch.lengths)
    assert {k: tuple(v.shape) for k, v in out.embeddings.items()} == {
        "speaker": (7, 16), "semantic": (7, 12), "count": (7, 8)}
    assert len(out.features.layers) == 5 and out.features.lengths.tolist() == \
        model.student.num_frames_for(batch.lengths).tolist()
    res = model.loss(batch)
    assert res.rows == {"speaker": 4, "semantic": 4, "count": 3}
    assert all(math.isfinite(v) for v in res.per_attribute.values())
    expected = res.per_attribute["speaker"] + 0.5 * res.per_attribute["semantic"] + res.per_attribute["count"]
    assert float(res.loss.detach()) == pytest.approx(expected, rel=1e-5)
    # each attribute's loss is computed on its rows alone: the same rows in a batch of their own
    # (other lengths, other padding) give the same loss
    speech_only = PostTrainBatch(batch.wavs[:4, : int(batch.lengths[:4].max())], batch.lengths[:4],
                                 labels={"speaker": batch.labels["speaker"][:4],
                                         "semantic": batch.labels["semantic"][:4]})
    alone = model.loss(speech_only)
    assert alone.rows == {"speaker": 4, "semantic": 4, "count": 0} and math.isnan(alone.per_attribute["count"])
    assert alone.per_attribute["speaker"] == pytest.approx(res.per_attribute["speaker"], rel=1e-4)
    assert alone.per_attribute["semantic"] == pytest.approx(res.per_attribute["semantic"], rel=1e-4)
    counting_only = PostTrainBatch(batch.wavs[4:], batch.lengths[4:], labels={"count": batch.labels["count"][4:]},
                                   tasks={"count": batch.tasks["count"][4:]})
    assert model.loss(counting_only).per_attribute["count"] == pytest.approx(res.per_attribute["count"], rel=1e-4)
    # a row's labels of other attributes change nothing when masked out
    masked = PostTrainBatch(batch.wavs, batch.lengths, labels={**batch.labels,
                            "speaker": torch.tensor([0, 0, 1, 1, 1, 0, 1])},
                            masks={"speaker": torch.tensor([1, 1, 1, 1, 0, 0, 0], dtype=torch.bool)},
                            tasks=batch.tasks)
    assert model.loss(masked).per_attribute["speaker"] == pytest.approx(res.per_attribute["speaker"], rel=1e-5)
    # backward reaches every head, loss and trainable encoder parameter, even without rows of its own
    model.train()
    model.loss(speech_only).loss.backward()
    for name, p in [*model.heads.named_parameters(), *model.losses.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder_parameters())


def test_a_few_steps_fit_the_mixed_batch(speech):
    """The heads and the top layers learn: speakers, sentences and counts of one batch are fitted."""
    torch.manual_seed(0)
    model = PostTrainModel(_student(), _specs(), freeze="top", trainable_layers=2).train()
    batch, _ = _mixed_batch(speech)
    opt = torch.optim.AdamW(model.param_groups(head_lr=3e-3, encoder_lr=1e-3), weight_decay=0.0)
    first = model.loss(batch)
    for _ in range(25):
        opt.zero_grad()
        res = model.loss(batch)
        res.loss.backward()
        opt.step()
    model.eval()
    last = model.loss(batch)
    assert float(last.loss.detach()) < 0.5 * float(first.loss.detach()), (first.metrics(), last.metrics())
    assert last.correct["speaker"] == 4 and last.correct["count"] == 3, last.metrics()
    m = last.metrics()
    assert m["speaker/acc"] == 1.0 and m["count/rows"] == 3.0


@pytest.mark.parametrize("input_layer", [False, True])
def test_utterance_embedding_does_not_depend_on_the_batch(speech, input_layer):
    model = PostTrainModel(_student(), _specs(), freeze="full", input_layer=input_layer).eval()
    wavs, lengths = _pad([speech[("en-us", 0)], speech[("en+m3", 1)], speech[("en-us", 1)][:4000]])
    with torch.no_grad():
        batch = model(wavs, lengths).embeddings
        for b in range(3):
            alone = model(wavs[b:b + 1, : int(lengths[b])], lengths[b:b + 1]).embeddings
            for name in alone:
                torch.testing.assert_close(batch[name][b:b + 1], alone[name], atol=2e-4, rtol=1e-4)


class _FeaturesOnly(torch.nn.Module):
    """An encoder that only offers features() (like a teacher wrapper): frozen post-training only."""

    def __init__(self, student):
        super().__init__()
        self.inner = student
        self.layer_dims = student.layer_dims

    def features(self, wavs, lengths=None):
        return self.inner.features(wavs, lengths)


def test_any_encoder_with_features_can_be_post_trained_frozen(speech):
    student = _student()
    with pytest.raises(ValueError, match="use freeze='frozen'"):
        PostTrainModel(_FeaturesOnly(student), _specs(), freeze="top", trainable_layers=1)
    generic = PostTrainModel(_FeaturesOnly(student), _specs(), freeze="frozen")
    direct = PostTrainModel(student, _specs(), freeze="frozen")
    direct.heads.load_state_dict(generic.heads.state_dict())
    wavs, lengths = _pad([speech[("en-us", 0)], speech[("en+m3", 1)]])
    with torch.no_grad():
        a, b = generic(wavs, lengths).embeddings, direct(wavs, lengths).embeddings
    for name in a:
        torch.testing.assert_close(a[name], b[name])


# ----------------------------------------------------------------------------- targets, state


def test_pivot_text_embedding_is_stable_and_shared_by_translations():
    # the same vector in every process and version (CRC-32, not Python's salted hash)
    e = pivot_text_embedding(["hello world"], dim=16)[0]
    assert e.nonzero().squeeze(1).tolist() == [1, 3, 6, 8, 10, 11, 12, 13, 14, 15]
    assert float(e[11]) == pytest.approx(0.685994, abs=1e-5)
    # utterances in four languages carry one pivot translation: one target
    pivots = ["The boat is red.", "the boat is red", "THE BOAT IS RED!", "the boat is red "]
    t = pivot_text_embedding(pivots, dim=128)
    assert all(torch.equal(t[0], t[i]) for i in range(1, 4))
    others = pivot_text_embedding(["the boat is blue", "seven birds sing at night"], dim=128)
    assert 0.3 < float(t[0] @ others[0]) < 0.95  # shared words: similar
    assert abs(float(t[0] @ others[1])) < 0.3  # nothing shared: near orthogonal
    with pytest.raises(ValueError, match="text 1"):
        pivot_text_embedding(["fine", " ... "])
    assert masked_mean(torch.ones(2, 3, 4), torch.tensor([[1, 0, 0], [0, 0, 0]])).tolist() == \
        [[1.0] * 4, [0.0] * 4]


def test_heads_state_and_config_rebuild_the_same_embeddings(speech):
    student = _student()
    model = PostTrainModel(student, _specs(), freeze="top", trainable_layers=2, input_layer=True)
    with torch.no_grad():
        for p in model.heads.parameters():
            p.add_(0.1 * torch.randn_like(p))
    config = model.config()
    rebuilt = PostTrainModel(student, [AttributeSpec.from_dict(a) for a in config["attributes"]],
                             freeze=config["freeze"], trainable_layers=config["trainable_layers"],
                             input_layer=config["input_layer"])
    assert all(k.startswith(("heads.", "losses.")) for k in model.heads_state_dict())
    rebuilt.load_heads_state_dict(model.heads_state_dict())
    wavs, lengths = _pad([speech[("en-us", 0)], speech[("en+m3", 1)]])
    with torch.no_grad():
        a, b = model.eval()(wavs, lengths).embeddings, rebuilt.eval()(wavs, lengths).embeddings
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0)
    fewer = PostTrainModel(student, _specs()[:1])
    with pytest.raises(ValueError, match="unexpected"):
        fewer.load_heads_state_dict(model.heads_state_dict())
    with pytest.raises(ValueError, match="unknown field"):
        AttributeSpec.from_dict({"name": "x", "kind": "speaker", "num_classes": 3, "colour": "red"})


def test_input_layer_is_the_fbank_at_the_encoder_rate(speech):
    student = _student()
    model = PostTrainModel(student, _specs(), input_layer=True).eval()
    assert model.layer_dims == [80] + student.layer_dims
    wav = torch.from_numpy(speech[("en-us", 0)])[None]
    with torch.no_grad():
        f = model.features(wav)
        fbank, n = student.fbank(wav)
    T = f.layers[0].shape[1]
    assert f.inputs.shape == (1, T, 80) and student.encoder.subsampling == 2
    for t in (0, T // 2, T - 1):  # frame t averages fbank frames 2t and 2t + 1
        torch.testing.assert_close(f.inputs[0, t], fbank[0, 2 * t:2 * t + 2].mean(0))
    # plain student features lack the frontend's frames: a clear error, not a silent mismatch
    with torch.no_grad(), pytest.raises(ValueError, match="input_layer"):
        model.embed(student.features(wav))
    with pytest.raises(ValueError, match="no frontend"):
        PostTrainModel(_FeaturesOnly(student), _specs(), input_layer=True)
