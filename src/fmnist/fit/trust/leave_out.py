"""Leave-one-family-out: what the OOD detector does on a kind of input it never saw.

The detector's outlier score learns from procedural non-garments (:mod:`fmnist.fit.trust.outliers`), and some of
those families were drawn to stand for kinds of input that ``fmnist ood-eval`` measures (1/f noise for the noise
sets, strokes for digits and letters, ...). A figure on a set whose imitation was in the fit says little about a
kind nobody thought of. So for each group of families below, the detector is fitted *without* them and measured
on fresh draws of them and on every ``ood-eval`` set they imitate: the worst of those left-out figures is the
honest one (``benchmarks/ood_leave_out.py``).
"""
from __future__ import annotations

from fmnist.fit.trust.outliers import FAMILIES

NATURAL = ("fractal", "plain", "dead-leaves")  # the models of natural images: they stand for every photo set
# ood-eval set -> the procedural families drawn to imitate it (none: the detector's fit has nothing like it)
IMITATED_BY = {
    "uniform-noise": ("fractal",), "gaussian-noise": ("fractal",), "constant": ("plain",),
    "rotated-90": (), "rotated-180": (),  # garments turned: the orientation score, not an outlier family
    "photo-crops": NATURAL, "faces": NATURAL, "animal": NATURAL, "other-photos": NATURAL,
    "sample-photos": NATURAL, "misc-images": NATURAL,
    "digits": ("strokes",), "letters": ("strokes",), "letters-serif": ("strokes",),
    "silhouettes": ("blobs",), "icons": ("strokes", "blobs"),
}


def groups() -> list[tuple[str, ...]]:
    """The groups of families left out together: each family alone, and every set's imitators together."""
    out = [(f,) for f in FAMILIES]
    for imitators in IMITATED_BY.values():
        if imitators and imitators not in out:
            out.append(imitators)
    return out


def plan(families=FAMILIES) -> list[dict]:
    """One fit per group: ``left_out`` (the group), ``fit_families`` (the others, among ``families``), and what
    it is measured on besides fresh draws of each left-out family: the ``sets`` they imitate."""
    families = tuple(families)
    rows = []
    for group in groups():
        if not set(group) <= set(families):
            continue
        rest = tuple(f for f in families if f not in group)
        if not rest:
            continue
        rows.append({"left_out": group, "fit_families": rest,
                     "sets": tuple(s for s, by in IMITATED_BY.items() if by and set(by) <= set(group))})
    return rows

