"""Strategy comparisons: grids of fedlora runs, the protocol that makes them fair, and their reports.

* :mod:`~fedlora.experiments.grid` — the grid file: studies of methods × partitions × privacy levels × seeds;
* :mod:`~fedlora.experiments.variants` — equal-communication variants (the rank whose upload matches a reference);
* :mod:`~fedlora.experiments.lr_sweep` — each method's learning rate, chosen on the validation split;
* :mod:`~fedlora.experiments.cells` — where a cell lives and whether it is finished, stale or waiting;
* :mod:`~fedlora.experiments.sweep` and :mod:`~fedlora.experiments.baselines` — running cells;
* :mod:`~fedlora.experiments.run` — ``fedlora grid`` (``main(argv)``);
* :mod:`~fedlora.experiments.report` — ``fedlora report`` (``main(argv)``): paired differences with bootstrap
  confidence intervals, plots, and the numbers of ``experiments/RESULTS.md``. The report package is analysis
  only: it is left out of the code version that keys the cells (:func:`fedlora.server.rundir.code_version`).
"""
