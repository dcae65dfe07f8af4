"""DegradedFaceDataset and PairedFolderDataset: items, determinism across workers, epochs, pairing."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from osdface.data.datasets import DegradedFaceDataset, PairedFolderDataset, list_images
from osdface.data.degradation import DegradationConfig, Degrader, image_seed
from osdface.image import read_image, save_image

SIZE = 64


def _photos():
    """Real RGB photos bundled offline with scikit-image (uint8)."""
    from skimage import data

    gray = data.camera()
    return {"astronaut": data.astronaut(), "coffee": data.coffee(), "chelsea": data.chelsea(),
            "camera": np.repeat(gray[..., None], 3, axis=2)}


@pytest.fixture(scope="module")
def hq_dir(tmp_path_factory):
    """5 HQ images at 96 px (resized by the dataset to 64), one in a sub-folder and one JPEG."""
    root = tmp_path_factory.mktemp("hq")
    photos = _photos()
    for i, (name, img) in enumerate(photos.items()):
        save_image(root / f"{i:02d}_{name}.png", cv2.resize(img, (96, 96), interpolation=cv2.INTER_AREA))
    save_image(root / "sub" / "04_astro.jpg", cv2.resize(photos["astronaut"], (80, 96)))
    (root / "notes.txt").write_text("not an image")
    return root


def _stack(items, key):
    return torch.stack([it[key] for it in items])


def test_item_shapes_ranges_and_identity(hq_dir):
    ds = DegradedFaceDataset(hq_dir, degradation="daefr", size=SIZE, seed=0)
    assert len(ds) == 5 and ds.keys == list_images(hq_dir)
    assert ds.keys[-1] == "sub/04_astro.jpg"
    for i in range(len(ds)):
        item = ds[i]
        assert set(item) == {"lq", "gt", "path", "index"}
        for k in ("lq", "gt"):
            t = item[k]
            assert t.shape == (3, SIZE, SIZE) and t.dtype == torch.float32
            assert 0.0 <= t.min() and t.max() <= 1.0
        assert item["index"] == i and item["path"].endswith(ds.keys[i])
        assert not torch.equal(item["lq"], item["gt"])


def test_gt_is_the_resized_hq_image_flipped_or_not(hq_dir):
    ds = DegradedFaceDataset(hq_dir, size=SIZE, hflip=True, seed=3)
    flips = []
    for i in range(len(ds)):
        s = ds.sample(i)
        src = cv2.resize(read_image(ds.files[i]).rgb, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
        assert np.array_equal(s["gt"], src[:, ::-1] if s["hflip"] else src)
        flips.append(s["hflip"])
        # the LQ is exactly the degrader's output for the recorded seed
        assert s["seed"] == image_seed(3, ds.keys[i], 0)
        lq, params = Degrader("daefr")(s["gt"], s["seed"])
        assert np.array_equal(lq, s["lq"]) and params == s["params"]
    no_flip = DegradedFaceDataset(hq_dir, size=SIZE, hflip=False, seed=3)
    assert not any(no_flip.sample(i)["hflip"] for i in range(len(no_flip)))
    # over a few epochs both outcomes occur
    for epoch in range(1, 4):
        ds.set_epoch(epoch)
        flips.extend(ds.sample(i)["hflip"] for i in range(len(ds)))
    assert any(flips) and not all(flips)


def test_identical_items_with_0_or_2_workers_and_any_batch_or_order(hq_dir):
    ds = DegradedFaceDataset(hq_dir, degradation="osediff-face", size=SIZE, seed=1)
    ref = [ds[i] for i in range(len(ds))]
    ref_lq, ref_gt = _stack(ref, "lq"), _stack(ref, "gt")
    # Start OpenCV's thread pool in this process before the workers fork: touching the pool's
    # configuration in a forked child (cv2.setNumThreads) then deadlocks. timeout= turns a hang
    # into an error.
    big = np.zeros((1024, 1024, 3), np.float32)
    cv2.filter2D(cv2.resize(big, (900, 900)), -1, np.ones((41, 41), np.float32))
    for workers, batch in ((0, 1), (2, 2), (2, 3)):
        batches = list(DataLoader(ds, batch_size=batch, num_workers=workers, timeout=120 if workers else 0))
        assert torch.equal(torch.cat([b["lq"] for b in batches]), ref_lq)
        assert torch.equal(torch.cat([b["gt"] for b in batches]), ref_gt)
        assert torch.cat([b["index"] for b in batches]).tolist() == list(range(len(ds)))
    # shuffled order: each item is still the same, identified by its index
    g = torch.Generator().manual_seed(0)
    for b in DataLoader(ds, batch_size=2, shuffle=True, generator=g, num_workers=2, timeout=120):
        for j, idx in enumerate(b["index"].tolist()):
            assert torch.equal(b["lq"][j], ref_lq[idx])


def test_seed_and_epoch_change_the_draws_deterministically(hq_dir):
    a = DegradedFaceDataset(hq_dir, size=SIZE, seed=0)
    b = DegradedFaceDataset(hq_dir, size=SIZE, seed=0)
    c = DegradedFaceDataset(hq_dir, size=SIZE, seed=1)
    assert torch.equal(a[0]["lq"], b[0]["lq"])
    assert a.sample(0)["params"] != c.sample(0)["params"]
    e0 = a.sample(0)["params"]
    a.set_epoch(1)
    assert a.sample(0)["params"] != e0
    b.set_epoch(1)
    assert torch.equal(a[0]["lq"], b[0]["lq"])
    a.set_epoch(0)
    assert a.sample(0)["params"] == e0
    with pytest.raises(ValueError, match="epoch must be non-negative"):
        a.set_epoch(-1)


def test_set_epoch_reaches_persistent_workers(hq_dir):
    ds = DegradedFaceDataset(hq_dir, size=SIZE, seed=4)
    ref = DegradedFaceDataset(hq_dir, size=SIZE, seed=4)
    loader = DataLoader(ds, batch_size=5, num_workers=2, persistent_workers=True, timeout=120)
    for epoch in (0, 2, 1):
        ds.set_epoch(epoch)
        ref.set_epoch(epoch)
        (batch,) = list(loader)
        assert torch.equal(batch["lq"], _stack([ref[i] for i in range(len(ref))], "lq")), epoch


def test_several_roots_pool_their_images_with_distinct_identities(hq_dir, tmp_path):
    second = tmp_path / "ffhqr"
    second.mkdir()
    same_name = sorted(hq_dir.glob("*.png"))[0]
    save_image(second / same_name.name, read_image(same_name).rgb)  # same relative path, other root
    ds = DegradedFaceDataset([hq_dir, second], size=SIZE, seed=0)
    assert len(ds) == 6
    assert ds.keys[0] == f"{hq_dir.name}/{same_name.name}" and ds.keys[-1] == f"ffhqr/{same_name.name}"
    # same pixels, different identity → different degradation
    assert ds.sample(0)["params"] != ds.sample(5)["params"]


def test_custom_config_and_resizing_up(hq_dir):
    cfg = DegradationConfig(blur_prob=0.0, downsample_range=(1, 1), noise_range=None, jpeg_range=None)
    ds = DegradedFaceDataset(hq_dir, degradation=cfg, size=128, hflip=False)
    item = ds[0]
    assert item["lq"].shape == (3, 128, 128)
    assert torch.equal(item["lq"], item["gt"])  # identity degradation
    assert ds.config is cfg


def test_bad_roots_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        DegradedFaceDataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: folder contains no images"):
        DegradedFaceDataset(tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown degradation preset 'strong'"):
        DegradedFaceDataset(tmp_path, degradation="strong")


def test_corrupt_file_error_names_the_file(tmp_path):
    save_image(tmp_path / "good.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    ds = DegradedFaceDataset(tmp_path, size=8)
    with pytest.raises(ValueError, match=r"bad\.png: cannot decode image"):
        ds[0]
    assert ds[1]["lq"].shape == (3, 8, 8)


# ---------------------------------------------------------------------------------------------
# PairedFolderDataset
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def pair_dirs(tmp_path):
    photos = list(_photos().values())
    lq, gt = tmp_path / "lq", tmp_path / "gt"
    for i, img in enumerate(photos[:3]):
        hq = cv2.resize(img, (48, 48), interpolation=cv2.INTER_AREA)
        save_image(gt / f"{i:04d}.png", hq)
        save_image(lq / f"{i:04d}.jpg", Degrader("daefr")(hq, i)[0])
    save_image(gt / "9999.png", np.zeros((48, 48, 3), np.uint8))  # GT without LQ: ignored
    return lq, gt


def test_paired_folder_matches_by_stem(pair_dirs):
    lq, gt = pair_dirs
    ds = PairedFolderDataset(lq, gt)
    assert len(ds) == 3
    for i in range(3):
        item = ds[i]
        assert item["index"] == i
        assert item["path"].endswith(f"{i:04d}.jpg") and item["gt_path"].endswith(f"{i:04d}.png")
        assert item["lq"].shape == item["gt"].shape == (3, 48, 48) and item["lq"].dtype == torch.float32
        expected = torch.from_numpy(read_image(gt / f"{i:04d}.png").rgb.copy()).permute(2, 0, 1).float() / 255
        assert torch.equal(item["gt"], expected)
    batch = next(iter(DataLoader(ds, batch_size=3, num_workers=0)))
    assert batch["lq"].shape == (3, 3, 48, 48)


def test_paired_folder_resizes_when_asked(pair_dirs):
    ds = PairedFolderDataset(*pair_dirs, size=32)
    item = ds[1]
    assert item["lq"].shape == item["gt"].shape == (3, 32, 32)
    assert 0 <= item["lq"].min() and item["lq"].max() <= 1


def test_paired_folder_errors(pair_dirs, tmp_path):
    lq, gt = pair_dirs
    (gt / "0001.png").unlink()
    with pytest.raises(ValueError, match=r"no GT image for LQ stem\(s\) 0001"):
        PairedFolderDataset(lq, gt)
    save_image(lq / "0000.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="two images share the stem '0000'"):
        PairedFolderDataset(lq, gt)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        PairedFolderDataset(tmp_path / "nope", gt)
