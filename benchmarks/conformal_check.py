"""Candidate sets on a run's own model: test coverage, mean set size and share of singletons of each variant.

Fits every variant on the run's validation split (the split `fmnist train` held out: config.json's val_size
and seed) with the run's temperature, and measures it on the official test set: the default of
`fmnist.core.conformal.fit` (deterministic RAPS, k_reg 2, lam 0.1, fitted at `fit_level`: a margin for new images
harder than the validation ones) and the same without the margin, plain APS, RAPS at other k_reg/lam, RAPS tuned
as in Angelopoulos et al. (on a fifth of the validation images), randomised APS (exact coverage, but a
different answer for the same image) with and without the top label forced in, and APS with U = 1 (Romano's
non-randomised sets). ``--synthetic`` runs the same comparison on calibrated synthetic classifiers instead
(no model, no data; the figures quoted in fmnist/core/conformal.py's docstring).

    python benchmarks/conformal_check.py runs/latest
    python benchmarks/conformal_check.py runs/latest --coverage 0.9 --data-dir /path/to/idx
    python benchmarks/conformal_check.py --synthetic --sharpness 2.5,5 --seeds 30
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from fmnist.core import conformal
from fmnist.fit.data import split_indices

FIXED = ((1, 0.1), (3, 0.1), (2, 0.01), (2, 0.05), (2, 0.2), (2, 0.5))  # (k_reg, lam) of the other RAPS rows
LAMBDAS = (0.0, 0.001, 0.01, 0.1, 0.2, 0.5)  # the tuning grid of Angelopoulos et al., plus 0


def _measure(masks: np.ndarray, labels: np.ndarray) -> tuple[float, float, float, float]:
    """(coverage, mean size, share of singletons, share of sets of four labels or more)."""
    m = conformal.set_metrics(masks, labels)
    return m["coverage"], m["mean_size"], m["singleton_share"], float((masks.sum(axis=1) >= 4).mean())


def _aps_u(pv, yv, pt, yt, coverage, u_val, u_test, force_top: bool) -> tuple[float, ...]:
    """APS with a given U, the top label forced in or not (without it, sets may be empty)."""
    qhat = conformal.quantile(conformal.conformal_scores(pv, 0, 0.0, u_val)[np.arange(len(yv)), yv], coverage)
    masks = conformal.conformal_scores(pt, 0, 0.0, u_test) <= qhat
    if force_top:
        masks[np.arange(len(pt)), pt.argmax(axis=1)] = True
    return _measure(masks, yt)


def tuned(pv, yv, coverage: float, seed: int) -> dict:
    """RAPS tuned as in Angelopoulos et al.: on a random fifth of the images, k_reg by the ranks of the true
    labels and lam by the smallest mean set size; qhat on the other four fifths."""
    tune = np.zeros(len(yv), dtype=bool)
    tune[np.random.default_rng(seed).permutation(len(yv))[:len(yv) // 5]] = True
    pt, yt = pv[tune], yv[tune]
    ranks = (np.argsort(-pt, axis=1, kind="stable") == yt[:, None]).argmax(axis=1) + 1
    k_reg = int(np.quantile(ranks, coverage, method="inverted_cdf"))
    sizes = [conformal.candidate_sets(pt, conformal.fit(pt, yt, coverage, k_reg=k_reg, lam=lam)).sum(1).mean()
             for lam in LAMBDAS]
    return conformal.fit(pv[~tune], yv[~tune], coverage, k_reg=k_reg, lam=LAMBDAS[int(np.argmin(sizes))])


def variants(pv, yv, pt, yt, coverage: float, seed: int = 0) -> dict[str, tuple[float, ...]]:
    """(test coverage, mean size, singleton share) of each variant fitted on (pv, yv), measured on (pt, yt)."""
    rng = np.random.default_rng(seed)
    out = {}
    default = conformal.fit(pv, yv, coverage)
    out[f"RAPS k_reg {default['k_reg']} lam {default['lam']:g}, the default"] = _measure(
        conformal.candidate_sets(pt, default), yt)
    plain = conformal.fit(pv, yv, coverage, margin=0)
    out["RAPS k_reg 2 lam 0.1 without the margin (fitted at the target)"] = _measure(
        conformal.candidate_sets(pt, plain), yt)
    out["APS"] = _measure(conformal.candidate_sets(pt, conformal.fit(pv, yv, coverage, "aps")), yt)
    for k_reg, lam in FIXED:
        params = conformal.fit(pv, yv, coverage, k_reg=k_reg, lam=lam)
        out[f"RAPS k_reg {k_reg} lam {lam:g}"] = _measure(conformal.candidate_sets(pt, params), yt)
    params = tuned(pv, yv, coverage, seed)
    out[f"RAPS tuned on a fifth (k_reg {params['k_reg']}, lam {params['lam']:g})"] = _measure(
        conformal.candidate_sets(pt, params), yt)
    rand = conformal.fit(pv, yv, coverage, "aps", randomized=True, seed=seed)
    out["APS randomised, top label forced"] = _measure(conformal.candidate_sets(pt, rand, rng=rng), yt)
    out["APS randomised, may be empty"] = _aps_u(pv, yv, pt, yt, coverage, rng.random(len(pv)),
                                                 rng.random(len(pt)), force_top=False)
    out["APS with U = 1, top label forced"] = _aps_u(pv, yv, pt, yt, coverage, 1.0, 1.0, True)
    out["APS with U = 1, may be empty"] = _aps_u(pv, yv, pt, yt, coverage, 1.0, 1.0, False)
    return out


def print_table(title: str, rows: dict[str, list[tuple[float, ...]]]) -> None:
    print(title)
    print("| variant | test coverage | mean set size | singletons | 4+ labels |\n|---|---|---|---|---|")
    for name, figures in rows.items():
        cov, size, single, four = np.mean(np.asarray(figures), axis=0)
        print(f"| {name} | {100 * cov:.2f} % | {size:.3f} | {100 * single:.1f} % | {100 * four:.2f} % |")
    print(flush=True)


def run_probs(run_dir: Path, data_dir, verify: bool, threads: int):
    """Calibrated (validation probs, labels, test probs, labels) of a run folder's model."""
    from fmnist.core.forward import probabilities
    from fmnist.core.run import Run
    from fmnist.fit import runtime
    from fmnist.fit.data import load_fashion_mnist
    from fmnist.fit.evaluate import run_logits

    device = runtime.setup(threads or None, "cpu")
    run = Run.load(run_dir, detector=False)
    if run.calibration is None:
        print(f"{run_dir}: no calibration in model.json (run `fmnist calibrate` first); using temperature 1",
              file=sys.stderr)
    data = load_fashion_mnist(data_dir, verify=verify)
    _, val_idx = split_indices(data.train_labels, run.config)
    if not len(val_idx):
        raise SystemExit(f"{run_dir}: the run held out no validation split (val_size 0): nothing to fit on")
    backend = run.backend("torch", device)

    def probs(images):
        return probabilities(run_logits(backend, run, images).numpy(), run.temperature)

    return (probs(data.train_images[val_idx]), data.train_labels[val_idx].numpy(),
            probs(data.test_images), data.test_labels.numpy())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", nargs="?", type=Path, help="run folder (model.json, config.json); not with --synthetic")
    ap.add_argument("--coverage", type=float, default=conformal.DEFAULT_COVERAGE,
                    help=f"target coverage (default: {conformal.DEFAULT_COVERAGE})")
    ap.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: the usual search)")
    ap.add_argument("--no-verify", action="store_true", help="skip the data checksums (default: verify)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0 = physical cores) (default: 0)")
    ap.add_argument("--synthetic", action="store_true", help="synthetic classifiers instead of a run (default: off)")
    ap.add_argument("--sharpness", default="2.5,5", help="synthetic sharpness values (default: 2.5,5)")
    ap.add_argument("--seeds", type=int, default=10, help="synthetic seeds per sharpness (default: 10)")
    args = ap.parse_args(argv)
    if args.synthetic == (args.run is not None):
        ap.error("give either a run folder or --synthetic")
    if args.synthetic:
        for sharpness in (float(s) for s in args.sharpness.split(",")):
            rows: dict[str, list] = {}
            for seed in range(args.seeds):
                pv, yv = conformal.synthetic(5000, sharpness, 1000 + seed)
                pt, yt = conformal.synthetic(20000, sharpness, 2000 + seed)
                for name, figures in variants(pv, yv, pt, yt, args.coverage, seed).items():
                    rows.setdefault(name.split(" (")[0], []).append(figures)
            acc = float((pt.argmax(1) == yt).mean())
            print_table(f"synthetic, sharpness {sharpness:g} (top-1 accuracy {100 * acc:.1f} %), 5,000 calibration "
                        f"+ 20,000 test images, mean of {args.seeds} seeds, target {100 * args.coverage:g} %", rows)
        return 0
    pv, yv, pt, yt = run_probs(args.run, args.data_dir, not args.no_verify, args.threads)
    acc = float((pt.argmax(1) == yt).mean())
    rows = {name: [figures] for name, figures in variants(pv, yv, pt, yt, args.coverage).items()}
    print_table(f"{args.run}: fitted on {len(yv):,} validation images, measured on {len(yt):,} test images "
                f"(top-1 accuracy {100 * acc:.2f} %), target {100 * args.coverage:g} %", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
