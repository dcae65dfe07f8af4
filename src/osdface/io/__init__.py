"""Model I/O: the lowest layer shared by pipelines, face, losses, training and evaluation.

Everything that reads or writes model files lives here, once:

* :mod:`osdface.io.names`: every file and subfolder name of the official release and of a model folder.
* :mod:`osdface.io.model_folders`: the SD 2.1-base folder, model folders, the LoRA (read, write, merge
  or attach) and the official three-file layout.
* :mod:`osdface.io.state_dicts`: unwrapping released checkpoints (``state_dict`` / ``params``
  containers, DataParallel ``module.`` prefixes) and the one strict key/shape check.
* :mod:`osdface.io.networks`: the metric/loss networks (LPIPS, DISTS, FID Inception, identity
  networks) built from local weight files, and the table of those files.

Foreign pickles are read only through :mod:`osdface.safe_load` (restricted unpicklers, plausibility
checks before allocation). Nothing here imports pipelines, face, losses, training, evaluation or cli
(checked by ``tests/test_import_graph.py``).
"""
