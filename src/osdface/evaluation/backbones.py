"""The field's metric networks (LPIPS, DISTS, FID Inception), as the evaluation package names them.

They are built in :mod:`osdface.io.networks` (shared with :mod:`osdface.losses`), and the
checkpoint helpers live in :mod:`osdface.io.state_dicts`; this module re-exports both under the
names the metric modules and user code have always imported from here.
"""

from __future__ import annotations

from ..io.networks import LPIPS_NETS, build_dists, build_fid_inception, build_lpips, freeze
from ..io.state_dicts import CONTAINER_KEYS, load_checked, unwrap_state_dict

__all__ = ["CONTAINER_KEYS", "LPIPS_NETS", "build_dists", "build_fid_inception", "build_lpips", "freeze",
           "load_checked", "unwrap_state_dict"]
