"""Reading foreign files into our models: the lowest layer shared by models, pipelines, face, training and evaluation.

* :mod:`osdface.io.state_dicts`: unwrapping released checkpoints (``state_dict`` / ``params``
  containers, DataParallel ``module.`` prefixes) and the one strict key/shape check.
* :mod:`osdface.io.networks`: the metric/loss networks (LPIPS, DISTS, FID Inception, identity
  networks) built from local weight files, and the table of those files.

Nothing here imports :mod:`osdface.evaluation`, :mod:`osdface.losses` or :mod:`osdface.training`.
"""
