"""osdface.io.state_dicts: the one unwrap / prefix / strict-check implementation."""

import pytest
import torch
from torch import nn

from osdface.errors import ModelFileError, OSDFaceError
from osdface.io.state_dicts import check_state_dict, load_checked, strip_prefix, unwrap_state_dict


def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


def test_unwrap_containers_and_data_parallel_prefix():
    sd = _net().state_dict()
    for obj in (sd, {"state_dict": sd}, {"params_ema": {f"module.{k}": v for k, v in sd.items()}},
                {"epoch": 3, "model": {"net": sd}}):
        got = unwrap_state_dict(obj, "f.pth")
        assert list(got) == list(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    for bad in ({}, {"epoch": 1}, [1, 2], {"state_dict": {"a": 1}}):
        with pytest.raises(ModelFileError, match=r"^f\.pth: no state dict of tensors"):
            unwrap_state_dict(bad, "f.pth")


def test_strip_prefix_keeps_order_and_other_keys():
    t = torch.zeros(1)
    assert list(strip_prefix({"backbone.a": t, "b": t, "backbone.c": t}, "backbone.")) == ["a", "b", "c"]


def test_check_names_source_what_and_first_keys_with_counts():
    expected = {f"k{i}": (2, 2) for i in range(8)}
    got = {"k0": torch.zeros(2, 2), "k1": torch.zeros(3), "k2": "text", "x": torch.zeros(1)}
    with pytest.raises(ModelFileError) as e:
        check_state_dict(got, expected, "w.pth", "a tiny net", hint="; try again")
    msg = str(e.value)
    assert isinstance(e.value, (OSDFaceError, ValueError))
    assert msg.startswith("w.pth: not a tiny net: 5 missing ['k3', 'k4', 'k5', 'k6', 'k7']"), msg
    assert "1 unexpected ['x']" in msg and "2 with a wrong shape" in msg
    assert "k1 (3,) != (2, 2)" in msg and "k2 str != (2, 2)" in msg and msg.endswith("; try again")
    many = {f"m{i}": (1,) for i in range(7)}
    with pytest.raises(ModelFileError, match=r"7 missing \['m0', 'm1', 'm2', 'm3', 'm4'\] \.\.\."):
        check_state_dict({}, many, "w.pth", "x")
    check_state_dict({"a": torch.zeros(2)}, {"a": torch.empty(2, device="meta")}, "w.pth", "x")


def test_load_checked_strict_with_allowed_missing():
    src, dst = _net(), _net()
    sd = {k: v + 1 for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    with pytest.raises(ModelFileError, match="num_batches_tracked"):
        load_checked(dst, sd, "w.pth", "the net")
    out = load_checked(dst, sd, "w.pth", "the net", may_be_missing=lambda k: k.endswith("num_batches_tracked"))
    assert out is dst and torch.equal(dst.state_dict()["0.weight"], sd["0.weight"])
