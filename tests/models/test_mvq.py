"""MultiCodebookQuantizer: fitting quality, encoder, determinism, artefact round trips, bad input."""

from __future__ import annotations

import json
import sys

import faiss
import numpy as np
import pytest
import torch

from spear.cluster.storage import join_uri
from spear.models.mvq import FitSettings, MultiCodebookQuantizer, codebook_usage, plot_codebook_usage
from spear.schemas.codebooks import ArtefactError
from spear.stages.artefacts import load_quantizer, save_quantizer

D = 64
# Small, fast settings; one thread keeps faiss/torch from fighting over a busy 2-core machine.
FIT = dict(num_codebooks=4, codebook_size=16, seed=0, num_threads=1, kmeans_iters=8, progressive_dim_steps=4)


def structured(n: int, seed: int) -> np.ndarray:
    """Teacher-like frames: a low-rank Gaussian mixture plus anisotropic noise, offset and scaled per dim."""
    rng = np.random.default_rng(1234)  # the distribution is fixed; `seed` draws the frames
    centers = rng.standard_normal((32, 8)) * 2.0
    proj = rng.standard_normal((8, D)) / np.sqrt(8)
    noise_dirs = np.linalg.qr(rng.standard_normal((D, D)))[0]
    noise_scale = 0.5 / (1 + np.arange(D) / 4)
    scale = np.exp(rng.standard_normal(D) * 0.5)
    offset = rng.standard_normal(D)
    draw = np.random.default_rng(seed)
    z = centers[draw.integers(0, 32, n)] + 0.5 * draw.standard_normal((n, 8))
    x = z @ proj + (draw.standard_normal((n, D)) * noise_scale) @ noise_dirs.T
    return (x * scale + offset).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(structured(4000, seed=0)), torch.from_numpy(structured(1000, seed=1))


@pytest.fixture(scope="module")
def fitted(data) -> MultiCodebookQuantizer:
    train, held = data
    return MultiCodebookQuantizer.fit(train, FitSettings(refine_iters=3, **FIT), heldout=held, teacher_id="mfcc-test",
                                      layer=3)


# --------------------------------------------------------------------------- quality


def test_round_trip_beats_single_kmeans_codebook(fitted, data):
    train, held = data
    codes = fitted.encode(held)
    x_hat = fitted.decode(codes)
    assert x_hat.dtype == torch.float32 and x_hat.shape == held.shape
    # Relative loss in the normalised space, computed by hand from decode().
    mean, std = train.mean(0), train.std(0, unbiased=False)
    xn, xhn = (held - mean) / std, (x_hat - mean) / std
    by_hand = float(((xn - xhn) ** 2).sum() / ((xn - xn.mean(0)) ** 2).sum())
    assert by_hand == pytest.approx(fitted.relative_reconstruction_loss(held), rel=1e-4)
    assert by_hand == pytest.approx(fitted.metadata["heldout_relative_loss"], rel=1e-4)
    # Trivial baseline: one k-means codebook of the same size on the same normalised frames.
    km = faiss.Kmeans(D, 16, niter=20, seed=0)
    km.train(((train - mean) / std).numpy())
    _, assign = km.index.search(xn.numpy(), 1)
    baseline = float(((xn.numpy() - km.centroids[assign[:, 0]]) ** 2).sum() / ((xn - xn.mean(0)) ** 2).sum())
    assert by_hand < 0.5 * baseline, (by_hand, baseline)
    assert by_hand < 0.3


def test_search_and_refinement_beat_greedy_residual(data):
    train, held = data
    # Plain greedy residual VQ: greedy residual k-means, greedy encoder, no refinement.
    greedy = MultiCodebookQuantizer.fit(train, FitSettings(init_beam_size=1, refine_iters=0, beam_size=1, **FIT))
    loss_greedy = greedy.relative_reconstruction_loss(held)
    # Same codebooks, joint search (beam + ICM): lower loss.
    searched = MultiCodebookQuantizer(greedy.codebooks, greedy.mean, greedy.std, normalize=True, beam_size=8,
                                      icm_sweeps=1)
    assert searched.relative_reconstruction_loss(held) < loss_greedy
    # Unguarded joint refinement (every pass kept): the training loss can only go down ...
    init = MultiCodebookQuantizer.fit(train, FitSettings(refine_iters=0, **FIT))
    refined = MultiCodebookQuantizer.fit(train, FitSettings(refine_iters=3, validation_fraction=0.0, **FIT))
    assert refined.metadata["fit"]["refine_iters_done"] == 3
    assert refined.metadata["train_relative_loss"] < init.metadata["train_relative_loss"]
    # ... and the default fit (beam initialisation, validation-guarded refinement) beats greedy held-out.
    default = MultiCodebookQuantizer.fit(train, FitSettings(**FIT))
    assert default.relative_reconstruction_loss(held) < searched.relative_reconstruction_loss(held)
    assert default.metadata["validation_frames"] == 200


def test_the_default_kmeans_runs_where_the_frames_are(data, monkeypatch):
    """faiss clusters CPU frames; CUDA frames with a faiss that sees no GPU (the faiss-cpu wheel) go to
    torch k-means on the GPU, not to one CPU thread of the GPU task; no faiss at all: torch."""
    from spear.models.mvq.kernels import default_kmeans_backend

    assert faiss.get_num_gpus() == 0  # CI's faiss-cpu wheel
    assert default_kmeans_backend(torch.device("cpu")) == "faiss"
    assert default_kmeans_backend(torch.device("cuda")) == "torch"
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    assert default_kmeans_backend(torch.device("cuda")) == "faiss"
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss raises ImportError
    assert default_kmeans_backend(torch.device("cpu")) == "torch"
    monkeypatch.undo()
    train, _ = data
    fitted = MultiCodebookQuantizer.fit(train, FitSettings(refine_iters=0, **FIT))
    assert fitted.metadata["fit"]["kmeans_backend"] == "faiss"  # the metadata names the backend used


def test_torch_kmeans_backend_matches_faiss_quality(data):
    """The torch k-means (used where no faiss wheel exists, e.g. GPU machines) fits as well as faiss."""
    train, held = data
    via_faiss = MultiCodebookQuantizer.fit(train, FitSettings(refine_iters=0, kmeans_backend="faiss", **FIT))
    via_torch = MultiCodebookQuantizer.fit(train, FitSettings(refine_iters=0, kmeans_backend="torch", **FIT))
    assert via_torch.metadata["fit"]["kmeans_backend"] == "torch"
    loss_faiss, loss_torch = via_faiss.relative_reconstruction_loss(held), via_torch.relative_reconstruction_loss(held)
    assert loss_torch < 1.1 * loss_faiss, (loss_torch, loss_faiss)


def test_codes_use_every_codebook(fitted, data):
    usage = codebook_usage(fitted.encode(data[1]), codebook_size=16)
    assert usage.counts.shape == (4, 16)
    assert (usage.counts.sum(1) == len(data[1])).all()
    assert min(usage.perplexity) > 8 and max(usage.perplexity) <= 16
    assert len(fitted.metadata["perplexity"]) == 4


# --------------------------------------------------------------------------- encoder contract


def test_dtype_shapes_and_inputs(fitted, data):
    held = data[1]
    codes = fitted.encode(held)
    assert codes.dtype == torch.uint8 and codes.shape == (len(held), fitted.num_codebooks)
    assert int(codes.max()) < fitted.codebook_size
    # numpy in, any float dtype, any leading shape
    assert torch.equal(fitted.encode(held.numpy()), codes)
    assert torch.equal(fitted.encode(held.reshape(10, 100, D)), codes.reshape(10, 100, 4))
    assert fitted.decode(codes.reshape(10, 100, 4)).shape == (10, 100, D)
    assert fitted.encode(held[:0]).shape == (0, 4)
    assert (fitted.num_codebooks, fitted.codebook_size, fitted.dim) == (4, 16, D)


def test_encode_is_chunk_size_independent(fitted, data):
    held = data[1]
    ref = fitted.encode(held)
    for chunk in (1, 100, 513, 100_000):
        assert torch.equal(fitted.encode(held, chunk_size=chunk), ref), chunk
    # a row's code does not depend on its neighbours either
    assert torch.equal(fitted.encode(held[37:38]), ref[37:38])


def test_same_seed_same_codebooks(data):
    train = data[0][:2000]
    a = MultiCodebookQuantizer.fit(train, FitSettings(refine_iters=2, **FIT))
    b = MultiCodebookQuantizer.fit(train, FitSettings(refine_iters=2, **FIT))
    assert torch.equal(a.codebooks, b.codebooks) and a.version == b.version
    c = MultiCodebookQuantizer.fit(train, FitSettings(refine_iters=2, **{**FIT, "seed": 1}))
    assert not torch.equal(a.codebooks, c.codebooks) and a.version != c.version


def test_normalize_off_fits_original_space(data):
    train, held = data
    q = MultiCodebookQuantizer.fit(train, FitSettings(refine_iters=1, normalize=False, **FIT))
    assert torch.equal(q.mean, torch.zeros(D)) and torch.equal(q.std, torch.ones(D))
    x_hat = q.decode(q.encode(held))
    by_hand = float(((held - x_hat) ** 2).sum() / ((held - held.mean(0)) ** 2).sum())
    assert by_hand == pytest.approx(q.relative_reconstruction_loss(held), rel=1e-4)


# --------------------------------------------------------------------------- artefact


def test_artefact_reloads_bit_identically(fitted, data, storage_root):
    storage, root = storage_root
    uri = join_uri(root, "codebooks", "mfcc-test")
    version = save_quantizer(fitted, uri, storage=storage)
    assert version == fitted.version
    assert storage.exists(join_uri(uri, "codebooks.safetensors")) and storage.exists(join_uri(uri, "meta.json"))
    q = load_quantizer(uri, storage=storage)
    assert q.version == fitted.version
    for a, b in ((q.codebooks, fitted.codebooks), (q.mean, fitted.mean), (q.std, fitted.std)):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    assert q.metadata == fitted.metadata
    assert torch.equal(q.encode(data[1]), fitted.encode(data[1]))
    meta = json.loads(storage.read_text(join_uri(uri, "meta.json")))
    assert meta["teacher_id"] == "mfcc-test" and meta["layer"] == 3 and meta["dim"] == D
    assert meta["training_frames"] + meta["validation_frames"] == 4000 and meta["heldout_frames"] == 1000
    assert meta["normalize"] is True and meta["created_at"]


def test_tampered_artefact_is_rejected(fitted, storage_root):
    storage, root = storage_root
    uri = join_uri(root, "cb")
    save_quantizer(fitted, uri, storage=storage)
    meta = json.loads(storage.read_text(join_uri(uri, "meta.json")))
    storage.write_text(join_uri(uri, "meta.json"), json.dumps({**meta, "teacher_id": "wavlm-large"}))
    with pytest.raises(ArtefactError, match="fails its content hash"):
        load_quantizer(uri, storage=storage)
    storage.write_text(join_uri(uri, "meta.json"), json.dumps({**meta, "dim": 32}))
    with pytest.raises(ValueError, match=r"has shape \[4, 16, 64\] but meta.json says \[4, 16, 32\]"):
        load_quantizer(uri, storage=storage)
    with pytest.raises(ValueError, match="no MVQ codebook artefact"):
        load_quantizer(join_uri(root, "nothing-here"), storage=storage)


def test_check_compatible(fitted):
    fitted.check_compatible(teacher_id="mfcc-test", layer=3, dim=D, num_codebooks=4)
    with pytest.raises(ValueError, match="teacher_id: artefact has 'mfcc-test', expected 'wavlm-large'"):
        fitted.check_compatible(teacher_id="wavlm-large", dim=D)
    with pytest.raises(ValueError, match="dim: artefact has 64, expected 1024"):
        fitted.check_compatible(dim=1024)


# --------------------------------------------------------------------------- bad input


def test_bad_input_is_a_clear_value_error(fitted, data):
    train = data[0].clone()
    train[[5, 17, 99]] = float("nan")
    train[200, 3] = float("inf")
    with pytest.raises(ValueError, match=r"4 of 4000 rows contain NaN or inf values \(first bad row: 5\)"):
        MultiCodebookQuantizer.fit(train, FitSettings(**FIT))
    with pytest.raises(ValueError, match=r"expected dimension 64 on the last axis, got 32"):
        fitted.encode(torch.randn(10, 32))
    with pytest.raises(ValueError, match=r"1 of 10 rows contain NaN"):
        held = data[1][:10].clone()
        held[4, 0] = float("nan")
        fitted.encode(held)
    with pytest.raises(ValueError, match=r"too few training frames: got 0, need at least 64"):
        MultiCodebookQuantizer.fit(torch.zeros(0, D), FitSettings(**FIT))
    with pytest.raises(ValueError, match=r"too few training frames: got 63, need at least 64"):
        MultiCodebookQuantizer.fit(data[0][:63], FitSettings(**FIT))
    for bad in (3, 512, 1, 0):
        with pytest.raises(ValueError, match="codebook_size must be a power of two between 2 and 256"):
            MultiCodebookQuantizer.fit(data[0], FitSettings(**{**FIT, "codebook_size": bad}))
    with pytest.raises(ValueError, match=r"codes must lie in 0\.\.15"):
        fitted.decode(torch.full((2, 4), 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="expected 4 codebooks on the last axis"):
        fitted.decode(torch.zeros(2, 5, dtype=torch.uint8))


# --------------------------------------------------------------------------- usage report


def test_plot_codebook_usage(fitted, data, tmp_path):
    path = tmp_path / "plots" / "usage.png"
    usage = plot_codebook_usage(fitted.encode(data[1]), str(path), codebook_size=16)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert usage.num_frames == 1000 and len(usage.unused) == 4
