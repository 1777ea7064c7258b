"""Candidate sets (split conformal prediction) and the three verdicts, on calibrated synthetic classifiers."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fmnist.core import conformal as C
from fmnist.core import verdict as V

N_CAL, N_TEST, TARGET = 5000, 20000, 0.95
# Coverage varies with the test sample (binomial) and with the calibration sample (the quantile's own
# Beta-distributed coverage); the two add up.
SD = math.sqrt(TARGET * (1 - TARGET) * (1 / N_TEST + 1 / (N_CAL + 1)))


def cal_test(sharpness: float, seed: int):
    return C.synthetic(N_CAL, sharpness, seed) + C.synthetic(N_TEST, sharpness, 10_000 + seed)


def coverage_and_size(params, probs, labels) -> tuple[float, float]:
    m = C.set_metrics(C.candidate_sets(probs, params), labels)
    return m["coverage"], m["mean_size"]


@pytest.mark.parametrize("margin", [0.0, C.SHIFT_MARGIN])
@pytest.mark.parametrize("method", ["raps", "aps"])
@pytest.mark.parametrize("sharpness", [2.5, 5.0])
def test_coverage_on_held_out_data_is_the_fitted_level(method, sharpness, margin):
    # Top-1 accuracy 84 % and 93 %, both under the target: the deterministic sets must then be near exact,
    # neither under-covering (a broken quantile) nor over-covering (a wasteful score such as U = 1). On
    # exchangeable data the margin for harder new images shows as coverage above the target, at fit_level.
    level = C.fit_level(TARGET, margin)
    covs = []
    for seed in range(4):
        pc, yc, pt, yt = cal_test(sharpness, seed)
        params = C.fit(pc, yc, TARGET, method, margin=margin)
        assert params["coverage"] == TARGET and params["fit_level"] == pytest.approx(level)
        cov, _ = coverage_and_size(params, pt, yt)
        assert abs(cov - level) <= 3 * SD, (seed, cov)
        covs.append(cov)
    assert abs(np.mean(covs) - level) <= 3 * SD / math.sqrt(len(covs)), covs


def test_the_margin_covers_new_images_harder_than_the_calibration_ones():
    # Calibration images from a sharper classifier than the new ones (validation easier than the test set, as
    # on Fashion-MNIST): the plain quantile under-covers the new images, the default margin reaches the target.
    covs = {}
    for margin in (0.0, C.SHIFT_MARGIN):
        runs = []
        for seed in range(4):
            pc, yc = C.synthetic(N_CAL, 5.0, 100 + seed)
            pt, yt = C.synthetic(N_TEST, 4.6, 200 + seed)
            runs.append(coverage_and_size(C.fit(pc, yc, TARGET, margin=margin), pt, yt)[0])
        covs[margin] = np.mean(runs)
    assert covs[0.0] < TARGET <= covs[C.SHIFT_MARGIN], covs
    assert C.fit_level(0.95) == pytest.approx(0.956) and C.fit_level(0.9, 0) == pytest.approx(0.9)
    for bad in (-0.1, 1.0, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="margin"):
            C.fit_level(0.95, bad)


def test_parameters_fitted_before_the_margin_still_load_and_a_wrong_level_is_refused():
    pc, yc = C.synthetic(N_CAL, 5.0, 0)
    params = C.fit(pc, yc)
    old = {k: v for k, v in params.items() if k != "fit_level"}
    assert (C.candidate_sets(pc, old) == C.candidate_sets(pc, params)).all()
    for bad in (0.9, 1.0, "0.96", None):
        with pytest.raises(ValueError, match="fit_level"):
            C.validate_params({**params, "fit_level": bad})


def test_other_targets_are_met_too():
    pc, yc, pt, yt = cal_test(2.5, 7)  # 84 % top-1 accuracy
    for target in (0.9, 0.97, 0.99):
        cov, _ = coverage_and_size(C.fit(pc, yc, target, margin=0), pt, yt)
        sd = math.sqrt(target * (1 - target) * (1 / N_TEST + 1 / (N_CAL + 1)))
        assert abs(cov - target) <= 3 * sd, (target, cov)
    # Under the accuracy, the sets are the top label alone and over-cover: no deterministic set can do less.
    cov, size = coverage_and_size(C.fit(pc, yc, 0.8), pt, yt)
    assert size == 1.0 and cov == pytest.approx((pt.argmax(1) == yt).mean())


def test_sets_shrink_as_the_model_gets_sharper():
    sizes = []
    for sharpness in (2.0, 3.5, 5.0, 8.0):
        pc, yc, pt, yt = cal_test(sharpness, 3)
        cov, size = coverage_and_size(C.fit(pc, yc), pt, yt)
        assert cov >= TARGET - 3 * SD
        sizes.append(size)
    assert all(a > b for a, b in zip(sizes, sizes[1:])), sizes
    assert sizes[0] > 1.5 and sizes[-1] < 1.01, sizes


def test_a_model_more_accurate_than_the_target_answers_with_one_label():
    # Top-1 accuracy 97 % > 95 %: qhat is 0, every set is the top label, and coverage is the accuracy.
    pc, yc, pt, yt = cal_test(12.0, 0)
    params = C.fit(pc, yc)
    assert params["qhat"] == 0.0
    m = C.set_metrics(C.candidate_sets(pt, params), yt)
    assert m["singleton_share"] == 1.0
    assert m["coverage"] == pytest.approx((pt.argmax(1) == yt).mean()) and m["coverage"] >= TARGET


@pytest.fixture(scope="module")
def params():
    pc, yc = C.synthetic(N_CAL, 5.0, 0)
    return C.fit(pc, yc)


def test_a_confident_image_gets_one_label_and_a_hard_one_several(params):
    confident = np.full(10, 0.02 / 9)
    confident[4] = 0.98
    hard = np.array([0.02, 0.44, 0.40, 0.10, 0.01, 0.01, 0.005, 0.005, 0.005, 0.005])
    masks = C.candidate_sets(np.stack([confident, hard]), params)
    assert C.members(masks[0], confident) == [4]
    got = C.members(masks[1], hard)
    assert got[:2] == [1, 2] and 2 <= len(got) <= 3


def test_sets_are_never_empty_and_ordered_by_probability(params):
    rng = np.random.default_rng(0)
    # Sharp, flat and in-between rows, with ties (the uniform row).
    probs = np.concatenate([rng.dirichlet(np.full(10, a), size=300) for a in (0.05, 0.5, 5.0, 100.0)]
                           + [np.full((1, 10), 0.1)])
    masks = C.candidate_sets(probs, params)
    assert masks.sum(1).min() >= 1
    assert masks[np.arange(len(probs)), probs.argmax(1)].all()
    for m, p in zip(masks, probs):
        ids = C.members(m, p)
        assert list(p[ids]) == sorted(p[ids], reverse=True)
        # A set is a prefix of the ranking: no label is left out while a less likely one is in.
        assert p[ids].min() >= p[~m].max(initial=-1)


def test_sets_are_deterministic_and_do_not_depend_on_the_batch(params):
    probs, _ = C.synthetic(500, 3.0, 5)
    first = C.candidate_sets(probs, params)
    assert (C.candidate_sets(probs, params) == first).all()
    for i in (0, 17, 499):
        assert (C.candidate_sets(probs[i:i + 1], params)[0] == first[i]).all()
    # Stored as JSON (model.json) and read back: the same sets, float32 input (torch's softmax) too.
    again = json.loads(json.dumps(params, allow_nan=False))
    assert (C.candidate_sets(probs, again) == first).all()
    assert (C.candidate_sets(probs.astype(np.float32), again).sum(1) - first.sum(1)).__abs__().max() <= 1


def test_a_row_with_nan_gets_no_set_and_does_not_stop_the_batch(params):
    probs, _ = C.synthetic(3, 5.0, 1)
    probs[1] = np.nan
    masks = C.candidate_sets(probs, params)
    assert masks[1].sum() == 0 and masks[0].sum() >= 1 and masks[2].sum() >= 1


def test_fit_returns_plain_json_with_its_own_figures(params):
    text = json.dumps(params, allow_nan=False)
    assert json.loads(text) == params
    assert params["method"] == "raps" and params["k_reg"] == 2 and params["lam"] == 0.1
    assert params["n"] == N_CAL and not params["randomized"]
    assert all(type(v) in (str, int, float, bool) for v in params.values())
    assert params["val_coverage"] >= TARGET and 1 <= params["val_mean_size"] < 1.2


def test_quantile_is_the_finite_sample_one():
    scores = np.arange(100) / 100
    assert C.quantile(scores, 0.9) == 0.90  # ceil(101 * 0.9) = 91st smallest
    assert C.quantile(np.arange(19.0), 0.95) == 18.0  # ceil(20 * 0.95) = 19, exactly, not 20
    assert C.min_calibration_size(0.95) == 19
    with pytest.raises(ValueError, match="too few"):
        C.quantile(np.arange(18.0), 0.95)


def test_randomised_sets_need_a_generator():
    pc, yc = C.synthetic(2000, 5.0, 2)
    params = C.fit(pc, yc, randomized=True)
    with pytest.raises(ValueError, match="rng"):
        C.candidate_sets(pc, params)
    masks = C.candidate_sets(pc, params, rng=np.random.default_rng(0))
    assert masks.sum(1).min() >= 1


@pytest.mark.parametrize("change", [
    {"qhat": float("nan")}, {"qhat": float("inf")}, {"qhat": -0.1}, {"qhat": 5.0}, {"qhat": "0.5"},
    {"coverage": 1.0}, {"coverage": 0}, {"coverage": float("nan")}, {"method": "lac"}, {"k_reg": -1},
    {"k_reg": 1.5}, {"k_reg": True}, {"k_reg": 11}, {"lam": -0.1}, {"lam": float("nan")}, {"classes": 1},
    {"n": 0}, {"randomized": "no"}, {"qhat": None},
])
def test_bad_parameters_are_refused_with_the_field_named(params, change):
    bad = {**params, **change}
    if change == {"qhat": None}:
        del bad["qhat"]
    key = next(iter(change))
    with pytest.raises(ValueError, match=key):
        C.validate_params(bad)
    with pytest.raises(ValueError):
        C.candidate_sets(np.full((1, 10), 0.1), bad)


def test_bad_inputs_are_refused(params):
    with pytest.raises(ValueError, match="dict"):
        C.validate_params([1, 2])
    with pytest.raises(ValueError, match="classes"):
        C.candidate_sets(np.full((2, 5), 0.2), params)
    pc, yc = C.synthetic(200, 5.0, 0)
    with pytest.raises(ValueError, match="softmax"):
        C.fit(np.log(pc), yc)  # logits, not probabilities
    with pytest.raises(ValueError, match="labels"):
        C.fit(pc, yc + 10)
    with pytest.raises(ValueError, match="labels"):
        C.fit(pc, yc[:-1])
    with pytest.raises(ValueError, match="too few"):
        C.fit(pc[:10], yc[:10])
    with pytest.raises(ValueError, match="coverage"):
        C.fit(pc, yc, coverage=95)
    with pytest.raises(ValueError, match="method"):
        C.fit(pc, yc, method="lac")
    assert C.fit(pc, yc, k_reg=np.int64(1), lam=np.float32(0.05))["k_reg"] == 1  # NumPy numbers are fine
    with pytest.raises(ValueError, match="k_reg"):
        C.fit(pc, yc, k_reg=1.5)
    with pytest.raises(ValueError, match="APS"):
        C.fit(pc, yc, method="aps", lam=0.1)
    with pytest.raises(ValueError, match="NaN"):
        C.fit(np.where(pc > 0.5, np.nan, pc), yc)


def test_set_metrics_by_hand():
    masks = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 1], [0, 0, 1]], dtype=bool)
    m = C.set_metrics(masks, [0, 2, 1, 2])
    assert m["n"] == 4 and m["coverage"] == 0.75 and m["mean_size"] == 1.5 and m["singleton_share"] == 0.5
    assert m["by_size"] == [{"size": 1, "count": 2, "share": 0.5, "coverage": 1.0},
                            {"size": 2, "count": 2, "share": 0.5, "coverage": 0.5}]
    json.dumps(m, allow_nan=False)


# --- verdicts ---------------------------------------------------------------------------------------------

CONFIDENT = np.array([0.9, 0.05] + [0.05 / 8] * 8)
UNSURE = np.array([0.5, 0.4] + [0.1 / 8] * 8)


def mask(*ids):
    m = np.zeros(10, dtype=bool)
    m[list(ids)] = True
    return m


def test_verdict_answer_and_uncertain():
    assert V.verdict(False, False, CONFIDENT, 0.6, mask(0)) == ("answer", None, [0])
    assert V.verdict(False, False, UNSURE, 0.6, mask(1, 0)) == ("uncertain", "low_confidence", [0, 1])
    # A one-label set under the threshold still says "not sure": the runner-up joins it.
    assert V.verdict(False, False, UNSURE, 0.6, mask(0)) == ("uncertain", "low_confidence", [0, 1])
    # Exactly at the threshold is an answer (>=), as seed B's rule.
    assert V.verdict(False, False, UNSURE, 0.5, mask(0))[0] == "answer"
    # A run without conformal parameters: the same verdicts, no candidates.
    assert V.verdict(False, False, CONFIDENT, 0.6) == ("answer", None, None)
    assert V.verdict(False, False, UNSURE, 0.6) == ("uncertain", "low_confidence", None)


def test_a_non_garment_is_refused_never_uncertain():
    for probs in (CONFIDENT, UNSURE):
        assert V.verdict(False, True, probs, 0.6, mask(0, 1)) == ("refused", "out_of_distribution", None)
    assert V.verdict(True, True, UNSURE, 0.6, mask(0, 1)) == ("refused", "blank", None)
    assert V.verdict(True, False, CONFIDENT, 0.6, mask(0)) == ("refused", "blank", None)


def test_nan_scores_are_refused():
    nan = CONFIDENT.copy()
    nan[3] = np.nan
    assert V.verdict(False, False, nan, 0.6, mask(0)) == ("refused", "invalid_scores", None)
    assert V.verdict(False, False, np.full(10, np.nan), 0.6, None) == ("refused", "invalid_scores", None)
    # A NaN OOD score fails the gate; no detector passes everything.
    assert V.is_ood(float("nan"), 1.0) and V.is_ood(2.0, 1.0)
    assert not V.is_ood(0.5, 1.0) and not V.is_ood(None, 1.0) and not V.is_ood(0.5, None)


def test_verdict_rejects_a_bad_threshold_or_mask():
    # a threshold above 1 is a legitimate "never sure": everything is hedged, nothing refused for it
    assert V.verdict(False, False, CONFIDENT, 1.01)[0] == "uncertain"
    for threshold in (float("nan"), True, "0.6", None):
        with pytest.raises(ValueError, match="threshold"):
            V.verdict(False, False, CONFIDENT, threshold)
    with pytest.raises(ValueError, match="classes"):
        V.verdict(False, False, CONFIDENT, 0.6, np.ones(5, dtype=bool))


def test_served_candidates_keep_the_coverage(params):
    # What a predictor does: sets for the batch, a verdict per image. Served candidates are never smaller
    # than the conformal sets, so their coverage is at least theirs.
    pt, yt = C.synthetic(N_TEST, 5.0, 99)
    masks = C.candidate_sets(pt, params)
    served = np.zeros_like(masks)
    kinds = []
    for i, (p, m) in enumerate(zip(pt, masks)):
        kind, _, ids = V.verdict(False, False, p, 0.6, m)
        served[i, ids] = True
        kinds.append(kind)
        assert (served[i] >= m).all() and len(ids) >= (2 if kind == "uncertain" else 1)
    kinds = np.array(kinds)
    assert set(kinds) == {"answer", "uncertain"}
    assert served[np.arange(len(yt)), yt].mean() >= C.set_metrics(masks, yt)["coverage"] >= TARGET - 3 * SD
