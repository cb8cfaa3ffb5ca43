"""Benchmark: the evaluation's linear probes against scikit-learn's LogisticRegression, same data, same run.

The evaluate stage (`spear evaluate`) fits thousands of probes: per model, layer, task and seed, an
L2 grid on a validation carve and a refit (:mod:`spear.evaluation.probes`). This prints, per shape
(training items, feature dimension, classes), how fast our probe fits and how close its solution
is to the reference's, then the whole recipe per probe:

  fit     ``fit_probe`` (float64 L-BFGS in torch, one thread) against ``LogisticRegression(lbfgs)``
          with ``C = 1 / (2 * l2 * N)``: the same objective (mean cross-entropy + l2 * ||W||^2, bias
          unpenalised), so both should reach the same optimum. Columns: fits/s of each, the ratio
          (ours / sklearn), the relative objective gap (ours - sklearn) / sklearn at each solution,
          and both probes' held-out accuracy.
  recipe  ``run_probe`` with 3 seeds and the 5-value grid (18 fits a probe; no CI bootstrap, which
          the reference has not) against the same recipe
          written with sklearn (our validation carve, grid choice by validation accuracy, refit on
          all training items): probes/s of each, the ratio, both test scores.

Features are correlated like log-mel or layer activations (a low-rank latent plus noise with a
power-law spectrum); labels come from a linear map of the latent plus noise. BLAS runs on one
thread for both (threadpoolctl), as the probes do in `spear evaluate`.

Usage:
    python bench/probe.py            # ~3 minutes on 2 cores
    python bench/probe.py --quick    # one small shape, a smoke run
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np

SHAPES = [  # (training items, dimension, classes): a clip task on fbank, on a wide layer, a frame task
    (600, 80, 10),
    (600, 384, 10),
    (4000, 256, 12),
]
QUICK_SHAPES = [(300, 40, 5)]


def make_task(n_train: int, n_test: int, dim: int, classes: int, seed: int = 0):
    """(x_train, y_train, x_test, y_test): correlated features, labels linear in a latent plus noise."""
    rng = np.random.default_rng(seed)
    rank = max(4, dim // 8)
    n = n_train + n_test
    latent = rng.standard_normal((n, rank))
    mix = rng.standard_normal((rank, dim)) / np.sqrt(rank)
    spectrum = (1.0 + np.arange(dim)) ** -0.7
    x = latent @ mix + 0.5 * rng.standard_normal((n, dim)) * spectrum + rng.normal(size=dim)
    logits = latent @ rng.standard_normal((rank, classes)) + 1.5 * rng.standard_normal((n, classes))
    y = logits.argmax(axis=1)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def objective(x: np.ndarray, y: np.ndarray, weight: np.ndarray, bias: np.ndarray, l2: float) -> float:
    """Mean cross-entropy + l2 * ||W||^2 on standardised ``x`` (the objective both fits minimise)."""
    z = x @ weight + bias
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y)), y].mean() + l2 * (weight * weight).sum())


def sklearn_fit(x: np.ndarray, y: np.ndarray, l2: float, max_iter: int = 500):
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=1.0 / (2.0 * l2 * len(y)), solver="lbfgs", max_iter=max_iter)  # its default tol
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning at max_iter: the objective gap shows it
        clf.fit(x, y)
    weight, bias = clf.coef_.T, clf.intercept_
    if weight.shape[1] == 1:  # sklearn's binary form: one column, the second class's logit
        weight, bias = np.hstack([np.zeros_like(weight), weight]), np.array([0.0, bias[0]])
    return clf, weight, bias


def sklearn_recipe(x_train, y_train, x_test, y_test, seeds, grid) -> float:
    """``run_probe``'s recipe written with sklearn: per seed, our validation carve, the grid value with the
    best validation accuracy, a refit on every training item; test accuracy averaged over the seeds."""
    from spear.evaluation.probes import standardise, validation_carve

    mean, scale = standardise(x_train)
    xt, xs = (x_train - mean) / scale, (x_test - mean) / scale
    scores = []
    for seed in seeds:
        val = validation_carve(y_train, seed)
        best = max(grid, key=lambda l2: (sklearn_fit(xt[~val], y_train[~val], l2)[0].predict(xt[val])
                                         == y_train[val]).mean())
        scores.append((sklearn_fit(xt, y_train, best)[0].predict(xs) == y_test).mean())
    return float(np.mean(scores))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one small shape (a smoke run)")
    ap.add_argument("--l2", type=float, nargs="+", default=[1e-3, 1e-1], help="L2 strengths of the fit rows")
    args = ap.parse_args(argv)

    from threadpoolctl import threadpool_limits

    from spear.evaluation.probes import L2_GRID, fit_probe, run_probe, standardise

    from common import timed

    shapes = QUICK_SHAPES if args.quick else SHAPES
    seeds = (0, 1, 2)
    with threadpool_limits(limits=1):
        print(f"{'shape N x D, C':<18} {'l2':>7} {'ours fit/s':>11} {'sklearn fit/s':>14} {'ratio':>6} "
              f"{'objective gap':>14} {'acc ours':>9} {'acc sklearn':>12}")
        for n, d, c in shapes:
            x_train, y_train, x_test, y_test = make_task(n, max(200, n // 4), d, c)
            mean, scale = standardise(x_train)
            xt, xs = (x_train - mean) / scale, (x_test - mean) / scale
            for l2 in args.l2:
                ours, t_ours = timed(lambda: fit_probe(x_train, y_train, l2=l2))
                (clf, w_ref, b_ref), t_ref = timed(lambda: sklearn_fit(xt, y_train, l2))
                f_ours = objective(xt, y_train, ours.weight, ours.bias, l2)
                f_ref = objective(xt, y_train, w_ref, b_ref, l2)
                acc_ours = float((ours.predict(x_test) == y_test).mean())
                acc_ref = float((clf.predict(xs) == y_test).mean())
                print(f"{f'{n} x {d}, {c}':<18} {l2:>7g} {1 / t_ours:>11.1f} {1 / t_ref:>14.1f} "
                      f"{t_ref / t_ours:>5.2f}x {(f_ours - f_ref) / f_ref:>+14.2e} {acc_ours:>9.3f} {acc_ref:>12.3f}")
        print(f"\nthe recipe: {len(seeds)} seeds x ({len(L2_GRID)} grid fits + 1 refit) a probe")
        print(f"{'shape N x D, C':<18} {'ours probe/s':>13} {'sklearn probe/s':>16} {'ratio':>6} "
              f"{'score ours':>11} {'score sklearn':>14}")
        for n, d, c in shapes:
            x_train, y_train, x_test, y_test = make_task(n, max(200, n // 4), d, c)
            res, t_ours = timed(lambda: run_probe(x_train, y_train, x_test, y_test, seeds=seeds, n_bootstrap=0),
                                min_seconds=0.5)
            ref, t_ref = timed(lambda: sklearn_recipe(x_train, y_train, x_test, y_test, seeds, L2_GRID),
                               min_seconds=0.5)
            print(f"{f'{n} x {d}, {c}':<18} {1 / t_ours:>13.2f} {1 / t_ref:>16.2f} {t_ref / t_ours:>5.2f}x "
                  f"{res.score:>11.3f} {ref:>14.3f}")


if __name__ == "__main__":
    main()
