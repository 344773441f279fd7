"""The example trainer as a small library: ``config`` (TrainConfig, presets), ``data`` (datasets per
rank), ``model`` (embedding modules, DLRM under DMP), ``loop`` (train, evaluate, fit, run), ``cli``
(the command line of ``python -m examples.train_dlrm``)."""
