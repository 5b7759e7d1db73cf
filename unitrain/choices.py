"""Names the command line offers in its choices and help, kept in a module that imports nothing
heavy: ``unitrain --help`` and a mistyped flag are answered before NumPy loads (the modules that
implement these names import them from here, or, for the datasets, are checked against them by
the tests)."""

#: what a run's targets are (DataSpec.task)
TASKS = ("classification", "regression", "multi-label", "reconstruction")
#: the keys of :data:`unitrain.data.PACKAGED`, the datasets shipped with the package
PACKAGED_DATASETS = ("mnist", "fashion-mnist")
