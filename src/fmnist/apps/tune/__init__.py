"""The study engine behind ``fmnist tune`` (its command line is :mod:`fmnist.apps.cli.tune`): the search space
(:mod:`.space`), the Optuna study and its worker processes (:mod:`.study`), the storage (:mod:`.storage`), and the
study's summary files (:mod:`.output`)."""
