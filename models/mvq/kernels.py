"""The numerical core of the multi-codebook quantiser: pure torch functions, no state.

An additive quantiser approximates ``x`` by ``sum_m C[m, i_m]`` with ``M`` codebooks of ``K``
entries each. For fixed codebooks, the squared error of a code tuple expands into

    ||x||^2 + sum_m (||C[m,i_m]||^2 - 2 <x, C[m,i_m]>) + 2 sum_{m < m'} <C[m,i_m], C[m',i_m']>

so once the inner products ``<x, C>`` (one matmul) and the codebook Gram matrix are known,
every search step works on K-long score rows instead of D-long vectors. The pairwise sums are
gathered with ``embedding_bag`` (a fused gather-and-sum), which keeps memory traffic at
``M x K`` floats per codebook and row. See :func:`encode_chunk`.

Training alternates that encoder with an exact least-squares update of all codebooks
jointly (:func:`least_squares_update`), after a residual k-means initialisation
(:func:`residual_kmeans_init`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
import math
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

# Memory the encoder may use per chunk for its [rows, C, K] score tables (chunk_size=None).
_CHUNK_BYTES = 256 << 20


# --------------------------------------------------------------------------- encoder


@dataclass(frozen=True)
class CodebookTables:
    """Per-codebook-set constants the encoder needs (computed once per set of codebooks)."""

    flat: torch.Tensor  # [M*K, D] codebooks, row m*K + k
    norms: torch.Tensor  # [M, K] squared norms of the entries
    pair2: torch.Tensor  # [M, M*K, K]: pair2[m, m'*K + k', k] = 2 <C[m',k'], C[m,k]>, zero for m' == m
    offsets: torch.Tensor  # [M] m*K, to index rows of `pair` with codes

    @property
    def num_codebooks(self) -> int:
        return self.norms.shape[0]

    @property
    def codebook_size(self) -> int:
        return self.norms.shape[1]


def codebook_tables(codebooks: torch.Tensor) -> CodebookTables:
    """Build the :class:`CodebookTables` of ``codebooks`` [M, K, D] (float32, on their device)."""
    M, K, D = codebooks.shape
    flat = codebooks.reshape(M * K, D).contiguous()
    gram = flat @ flat.T  # [MK, MK]
    norms = gram.diagonal().reshape(M, K).clone()
    # Pre-scaled by the 2 of the expansion, so the search adds gathered rows without a multiply.
    pair2 = (2.0 * gram).reshape(M, K, M, K).permute(2, 0, 1, 3).contiguous()  # [m, m', k', k]
    # A codebook does not interact with itself: zero blocks let the encoder sum over all M codes.
    pair2[torch.arange(M), torch.arange(M)] = 0.0
    pair2 = pair2.reshape(M, M * K, K)
    offsets = torch.arange(M, device=codebooks.device) * K
    return CodebookTables(flat=flat, norms=norms, pair2=pair2, offsets=offsets)


def _pair_sums(tables: CodebookTables, m: int, codes: torch.Tensor) -> torch.Tensor:
    """[n, K]: sum over the codes ``codes`` [n, j] of codebooks 0..j-1 of 2 <C[m', i_m'], C[m, :]>."""
    j = codes.shape[1]
    return F.embedding_bag(codes + tables.offsets[:j], tables.pair2[m], mode="sum")


def row_block(device: torch.device) -> int:
    """Rows per matmul block (see :func:`unary_costs`)."""
    return 4096 if device.type == "cuda" else 512


def unary_costs(x: torch.Tensor, tables: CodebookTables) -> torch.Tensor:
    """[n, M, K]: ||C[m,k]||^2 - 2 <x, C[m,k]>, the per-entry part of the squared error.

    BLAS picks kernels by matrix shape, and kernels differ in summation order, so one row's
    inner products could change with the number of rows next to it. The matmul therefore runs
    on fixed-size row blocks (the last one zero-padded): a row's codes do not depend on how the
    caller chunks its input.
    """
    M, K = tables.norms.shape
    n = x.shape[0]
    blk = row_block(x.device)
    ip = torch.empty(n, M * K, dtype=x.dtype, device=x.device)
    for s in range(0, n, blk):
        xs = x[s : s + blk]
        if xs.shape[0] < blk:
            xs = torch.cat([xs, xs.new_zeros(blk - xs.shape[0], xs.shape[1])])
        ip[s : s + blk] = (xs @ tables.flat.T)[: min(blk, n - s)]
    return ip.view(n, M, K).mul_(-2.0).add_(tables.norms)


def beam_search(unary: torch.Tensor, tables: CodebookTables, beam: int) -> torch.Tensor:
    """Sequential search over codebooks 0..M-1 keeping the ``beam`` best partial code tuples.

    With beam 1 this is greedy residual encoding. Returns codes [n, M] int64 of the best tuple.
    """
    n, M, K = unary.shape
    dev = unary.device
    if beam <= 1:
        codes = torch.empty(n, M, dtype=torch.long, device=dev)
        codes[:, 0] = torch.argmin(unary[:, 0, :], dim=1)
        for m in range(1, M):
            codes[:, m] = torch.argmin(_pair_sums(tables, m, codes[:, :m]).add_(unary[:, m, :]), dim=1)
        return codes
    B = min(beam, K)
    cost, first = torch.topk(unary[:, 0, :], B, dim=1, largest=False, sorted=False)  # [n, B]
    codes = torch.zeros(n, B, M, dtype=torch.long, device=dev)
    codes[:, :, 0] = first
    for m in range(1, M):
        total = _pair_sums(tables, m, codes[:, :, :m].reshape(n * B, m)).view(n, B, K)
        total += unary[:, m, :].unsqueeze(1)
        total += cost.unsqueeze(2)
        nb = min(beam, B * K)
        cost, flat_idx = torch.topk(total.view(n, B * K), nb, dim=1, largest=False, sorted=False)
        parent = torch.div(flat_idx, K, rounding_mode="floor")
        codes = torch.gather(codes, 1, parent.unsqueeze(2).expand(n, nb, M))
        codes[:, :, m] = flat_idx - parent * K
        B = nb
    best = torch.argmin(cost, dim=1)
    return codes[torch.arange(n, device=dev), best]


def icm_sweeps(unary: torch.Tensor, tables: CodebookTables, codes: torch.Tensor, sweeps: int) -> torch.Tensor:
    """Iterated conditional modes: for each codebook in turn pick the entry that minimises the
    error given all the other codes. Never increases the error. ``codes`` [n, M] is updated in place."""
    n, M, K = unary.shape
    for _ in range(sweeps):
        for m in range(M):
            # the own codebook's block of the table is zero, so all M codes can go in the bag
            codes[:, m] = torch.argmin(_pair_sums(tables, m, codes).add_(unary[:, m, :]), dim=1)
    return codes


def squared_errors(x: torch.Tensor, tables: CodebookTables, codes: torch.Tensor) -> torch.Tensor:
    """[n] exact ||x - x_hat||^2 of ``codes`` (decoding is cheap next to encoding)."""
    return ((x - decode_flat(codes, tables)) ** 2).sum(1)


def encode_chunk(x: torch.Tensor, tables: CodebookTables, beam: int, sweeps: int,
                 init_codes: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode one chunk ``x`` [n, D]: beam search (codebook order) then ICM sweeps.

    With ``init_codes`` (e.g. the previous training iteration's codes) the ICM also refines those,
    and each row keeps the better of the two results. Returns (codes [n, M] int64, squared error [n]).
    """
    unary = unary_costs(x, tables)
    codes = icm_sweeps(unary, tables, beam_search(unary, tables, beam), sweeps)
    err = squared_errors(x, tables, codes)
    if init_codes is not None:
        warm = icm_sweeps(unary, tables, init_codes.clone(), max(1, sweeps))
        warm_err = squared_errors(x, tables, warm)
        better = warm_err < err
        codes = torch.where(better.unsqueeze(1), warm, codes)
        err = torch.where(better, warm_err, err)
    return codes, err


def _chunk_rows(chunk_size: Optional[int], tables: CodebookTables, beam: int, device: torch.device) -> int:
    """Frames per encoder chunk, a multiple of the matmul row block (see kernels.unary_costs)."""
    blk = row_block(device)
    if chunk_size is None:
        per_row = 4 * tables.num_codebooks * tables.codebook_size * 2 + 4 * beam * tables.codebook_size * 3
        chunk_size = max(blk, _CHUNK_BYTES // per_row)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return int(math.ceil(chunk_size / blk) * blk)


def encode_rows(x: torch.Tensor, tables: CodebookTables, beam: int, sweeps: int,
                 chunk_size: Optional[int], init_codes: Optional[torch.Tensor] = None,
                 transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                 ) -> tuple[torch.Tensor, float]:
    """Encode rows chunk by chunk: (codes [N, C] int64 on the tables' device, total squared error).

    Chunks of ``chunk_size`` rows (default: from a 256 MiB budget) keep memory bounded; the codes
    do not depend on the chunk size. ``transform`` maps a chunk into the codebooks' space.
    """
    dev = tables.flat.device
    step = _chunk_rows(chunk_size, tables, beam, dev)
    n = x.shape[0]
    codes = torch.empty(n, tables.num_codebooks, dtype=torch.long, device=dev)
    err = 0.0
    for s in range(0, n, step):
        xs = x[s : s + step]
        xs = transform(xs) if transform is not None else xs.to(dev, torch.float32)
        init = None if init_codes is None else init_codes[s : s + step].to(dev)
        c, row_err = encode_chunk(xs, tables, beam, sweeps, init_codes=init)
        codes[s : s + step] = c
        err += float(row_err.to(torch.float64).sum())
    return codes, err


def decode_codes(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """sum_m codebooks[m, codes[:, m]] for ``codes`` [n, M] -> [n, D]."""
    M, K, D = codebooks.shape
    idx = codes.long() + torch.arange(M, device=codes.device) * K
    return F.embedding_bag(idx, codebooks.reshape(M * K, D), mode="sum")


def decode_flat(codes: torch.Tensor, tables: CodebookTables) -> torch.Tensor:
    """:func:`decode_codes` from the tables' flat codebooks."""
    return F.embedding_bag(codes.long() + tables.offsets, tables.flat, mode="sum")


# --------------------------------------------------------------------------- training


def least_squares_update(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, ridge: float,
                         chunk: int = 16384) -> torch.Tensor:
    """All codebooks at once: argmin_C ||X - B C||^2 + ridge ||C - C_old||^2 for fixed codes.

    B is the [N, M*K] assignment matrix (M ones per row), so the normal equations are
    (B^T B + ridge I) C = B^T X + ridge C_old, a (M*K)-square system. B^T B is a co-occurrence
    count matrix (diagonal blocks diagonal); it is singular (a constant can move between
    codebooks) and entries may be unused, which the ridge towards the old codebooks settles.
    Solved by Cholesky in float64.
    """
    M, K, D = codebooks.shape
    MK = M * K
    dev = codebooks.device
    offsets = torch.arange(M, device=dev) * K
    gram = torch.zeros(MK * MK, dtype=torch.float64, device=dev)
    rhs = torch.zeros(MK, D, dtype=torch.float64, device=dev)
    for s in range(0, x.shape[0], chunk):
        idx = codes[s : s + chunk].to(dev).long() + offsets  # [n, M]
        xs = x[s : s + chunk].to(dev, torch.float64)
        pairs = (idx.unsqueeze(2) * MK + idx.unsqueeze(1)).reshape(-1)
        gram += torch.bincount(pairs, minlength=MK * MK).to(torch.float64)
        for m in range(M):
            rhs.index_add_(0, idx[:, m], xs)
    gram = gram.view(MK, MK)
    gram.diagonal().add_(ridge)
    rhs += ridge * codebooks.reshape(MK, D).to(torch.float64)
    chol = torch.linalg.cholesky(gram)
    sol = torch.cholesky_solve(rhs, chol)
    return sol.to(codebooks.dtype).reshape(M, K, D).contiguous()


def default_kmeans_backend(device: torch.device) -> str:
    """The k-means backend for data on ``device``: faiss where it runs there (faiss-cpu for CPU data,
    faiss-gpu for CUDA data), else torch on the device itself.

    CUDA data with a faiss that sees no GPU (the faiss-cpu wheel: faiss-gpu wheels exist for some
    CUDA versions only) goes to torch: faiss would cluster on the CPU threads of a GPU task, which in
    ``spear tokenize`` holds one (an H200 node's 16 x 256 WavLM-Large fit ran past 8 minutes that way).

    Example::

        >>> default_kmeans_backend(torch.device("cpu")) in ("faiss", "torch")
        True
    """
    try:
        import faiss  # optional: GPU machines may have no faiss wheel
    except ImportError:
        return "torch"
    if torch.device(device).type == "cuda" and faiss.get_num_gpus() == 0:
        return "torch"
    return "faiss"


def kmeans(x: torch.Tensor, k: int, *, niter: int, seed: int, max_points_per_centroid: int,
           progressive_steps: int = 0, backend: Optional[str] = None) -> torch.Tensor:
    """k-means centroids [k, D] of ``x`` [N, D].

    ``backend`` "faiss" (its GPU index when faiss sees a GPU) or "torch" (Lloyd iterations on
    ``x``'s device); default: :func:`default_kmeans_backend` for ``x``'s device.
    With ``progressive_steps`` > 0 both run progressive-dimension clustering (faiss'
    ProgressiveDimClustering): k-means on the first 2, ..., D principal components in turn, each
    stage starting from the previous centroids, which finds far better optima than random
    initialisation in high dimension. At most ``max_points_per_centroid * k`` points (a seeded
    random subset) train each k-means; assigning all points happens outside.
    """
    if backend is None:
        backend = default_kmeans_backend(x.device)
    if backend == "torch":
        return _torch_kmeans(x, k, niter=niter, seed=seed, max_points_per_centroid=max_points_per_centroid,
                             progressive_steps=progressive_steps)
    if backend != "faiss":
        raise ValueError(f"k-means backend must be 'faiss' or 'torch', got {backend!r}")
    import faiss  # optional (see above)

    n, d = x.shape
    use_gpu = faiss.get_num_gpus() > 0
    xs = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
    if progressive_steps > 0:
        pc = faiss.ProgressiveDimClustering(d, k)
        pc.niter, pc.seed, pc.progressive_dim_steps = niter, seed, progressive_steps
        pc.max_points_per_centroid, pc.min_points_per_centroid = max_points_per_centroid, 1
        factory = faiss.GpuProgressiveDimIndexFactory(1) if use_gpu else faiss.ProgressiveDimIndexFactory()
        pc.train(n, faiss.swig_ptr(xs), factory)
        return torch.from_numpy(faiss.vector_to_array(pc.centroids).reshape(k, d).copy()).to(x.device)
    km = faiss.Kmeans(d, k, niter=niter, seed=seed, gpu=use_gpu, verbose=False,
                      max_points_per_centroid=max_points_per_centroid, min_points_per_centroid=1)
    km.train(xs)
    return torch.from_numpy(km.centroids.copy()).to(x.device)


def _torch_kmeans(x: torch.Tensor, k: int, *, niter: int, seed: int, max_points_per_centroid: int,
                  progressive_steps: int = 0) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n, d = x.shape
    if n > k * max_points_per_centroid:
        x = x[torch.randperm(n, generator=gen)[: k * max_points_per_centroid].to(x.device)]
        n = x.shape[0]
    x = x.to(torch.float32)
    if progressive_steps > 0:
        mean = x.mean(0)
        xc = x - mean
        _, vecs = torch.linalg.eigh((xc.T @ xc).to(torch.float64))
        basis = vecs.flip(1).to(torch.float32)  # principal directions, largest variance first
        xr = xc @ basis
        dims = sorted({max(1, min(d, int(d ** ((i + 1) / progressive_steps)))) for i in range(progressive_steps)})
        dims[-1] = d
    else:
        xr, dims = x, [d]
    cent = xr[torch.randperm(n, generator=gen)[:k].to(x.device), : dims[0]].clone()
    for di in dims:
        if cent.shape[1] < di:  # new dimensions start at zero, as in faiss
            cent = torch.cat([cent, cent.new_zeros(k, di - cent.shape[1])], dim=1)
        cent = _lloyd(xr[:, :di].contiguous(), cent, niter, gen)
    return cent @ basis.T + mean if progressive_steps > 0 else cent


def _lloyd(x: torch.Tensor, cent: torch.Tensor, niter: int, gen: torch.Generator) -> torch.Tensor:
    n, k = x.shape[0], cent.shape[0]
    for _ in range(niter):
        assign = nearest(x, cent)
        sums = torch.zeros_like(cent).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        empty = counts == 0
        cent = torch.where(empty.unsqueeze(1), cent, sums / counts.clamp_min(1).unsqueeze(1).to(x.dtype))
        if bool(empty.any()):  # re-seed empty clusters on random points
            pick = torch.randint(0, n, (int(empty.sum()),), generator=gen).to(x.device)
            cent[empty] = x[pick]
    return cent


def nearest(x: torch.Tensor, cent: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """Index of the nearest centroid for each row of ``x``."""
    cn = (cent * cent).sum(1)
    out = []
    for s in range(0, x.shape[0], chunk):
        out.append(torch.argmin(cn - 2.0 * (x[s : s + chunk] @ cent.T), dim=1))
    return torch.cat(out)


def residual_kmeans_init(x: torch.Tensor, num_codebooks: int, codebook_size: int, *, niter: int, seed: int,
                         max_points_per_centroid: int, progressive_steps: int = 0, beam: int = 1,
                         beam_tolerance: float = 0.3, kmeans_backend: Optional[str] = None, chunk: int = 8192,
                         log: Optional[Callable[[str], None]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Codebook c is the k-means of the residuals left by codebooks < c (residual VQ).

    With ``beam`` > 1 every frame keeps the ``beam`` best partial encodings (as faiss'
    ResidualQuantizer with max_beam_size does) and codebook c is fit on the residuals of all of
    them: more varied residuals per entry, which fits held-out frames better than greedy
    residuals. The beam step works on inner products (no residual vectors are kept): only the
    k-means sample, at most ``max_points_per_centroid * K`` residuals, is materialised.

    Returns (codebooks [M, K, D], codes [N, M] int64 of the best beam).
    """
    n, d = x.shape
    K = codebook_size
    dev = x.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    books: list[torch.Tensor] = []
    codes = torch.zeros(n, 1, 0, dtype=torch.long, device=dev)  # [n, B, m]
    cost = torch.zeros(n, 1, dtype=x.dtype, device=dev)  # squared error - ||x||^2, per beam
    xsq = (x * x).sum(1)
    for c in range(num_codebooks):
        t0 = time.time()
        B = codes.shape[1]
        # k-means sample: residuals of (frame, beam) pairs whose error is within `beam_tolerance`
        # (relative) of the frame's best; a random subset when there are too many.
        limit = max_points_per_centroid * K
        if B > 1:
            err = cost + xsq.unsqueeze(1)
            keep = (err - err.min(1, keepdim=True).values) <= beam_tolerance * err.min(1, keepdim=True).values
            pick = torch.nonzero(keep.flatten()).flatten()
        else:
            pick = torch.arange(n, device=dev)
        if pick.numel() > limit:
            pick = pick[torch.randperm(pick.numel(), generator=gen)[:limit].sort().values.to(dev)]
        rows, beams = torch.div(pick, B, rounding_mode="floor"), pick % B
        residual = x[rows].clone()
        if c > 0:
            prev = torch.stack(books).reshape(c * K, d)
            offsets = torch.arange(c, device=dev) * K
            for s in range(0, residual.shape[0], chunk):
                sel = codes[rows[s : s + chunk], beams[s : s + chunk]] + offsets
                residual[s : s + chunk] -= F.embedding_bag(sel, prev, mode="sum")
        cent = kmeans(residual, K, niter=niter, seed=seed + 1000 * c, max_points_per_centroid=max_points_per_centroid,
                      progressive_steps=progressive_steps, backend=kmeans_backend)
        del residual
        # extend every beam by every entry of the new codebook; keep the `beam` best
        norms = (cent * cent).sum(1)
        cross = torch.stack(books).reshape(c * K, d) @ cent.T if c > 0 else None  # [c*K, K]
        new_b = min(beam, B * K)
        new_codes = torch.empty(n, new_b, c + 1, dtype=torch.long, device=dev)
        new_cost = torch.empty(n, new_b, dtype=x.dtype, device=dev)
        for s in range(0, n, chunk):
            xs = x[s : s + chunk]
            ns = xs.shape[0]
            total = cost[s : s + chunk].unsqueeze(2) + (norms - 2.0 * (xs @ cent.T)).unsqueeze(1)  # [ns, B, K]
            if cross is not None:
                sel = (codes[s : s + chunk] + torch.arange(c, device=dev) * K).reshape(ns * B, c)
                total += 2.0 * F.embedding_bag(sel, cross, mode="sum").view(ns, B, K)
            best, flat_idx = torch.topk(total.view(ns, B * K), new_b, dim=1, largest=False, sorted=True)
            parent = torch.div(flat_idx, K, rounding_mode="floor")
            new_codes[s : s + chunk, :, :c] = torch.gather(codes[s : s + chunk], 1,
                                                           parent.unsqueeze(2).expand(ns, new_b, c))
            new_codes[s : s + chunk, :, c] = flat_idx - parent * K
            new_cost[s : s + chunk] = best
        codes, cost = new_codes, new_cost
        books.append(cent)
        if log is not None:
            energy = float(cost[:, 0].sum() + (x.to(torch.float64) ** 2).sum()) / max(1, n)
            log(f"k-means init codebook {c + 1}/{num_codebooks}: residual energy {energy:.4f} "
                f"({time.time() - t0:.1f}s)")
    return torch.stack(books).contiguous(), codes[:, 0, :].contiguous()
