"""The trust layer of a run, by job: when to believe the model's answer.

- :mod:`~fmnist.fit.trust.calibration`: temperature scaling and the metrics that judge it (ECE, NLL, Brier);
- :mod:`~fmnist.core.ood`: the out-of-distribution detector (is this a garment at all?);
- :mod:`~fmnist.core.conformal`: candidate sets (split conformal prediction) and the verdict of an answer;
- :mod:`~fmnist.fit.trust.fit`: fitting all three for a run (end of ``fmnist train``, ``fmnist calibrate``);
- :mod:`~fmnist.fit.trust.metrics`: AUROC and FPR at a TPR of an OOD score;
- :mod:`~fmnist.fit.trust.eval_sets`: the out-of-distribution image sets ``fmnist ood-eval`` measures on;
- :mod:`~fmnist.fit.trust.evaluation`: that measurement, through the Predictor's own path.
"""
