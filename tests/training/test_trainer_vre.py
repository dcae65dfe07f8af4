"""Stage-1 training runs on the tiny config with real face crops (CPU, seeded).

* a short run on a fixed batch: every loss finite, reconstruction and association losses fall,
  codebook usage and everything else logged to TensorBoard;
* stop after step k + resume == an uninterrupted run (parameters, optimiser-driven updates,
  data order across an epoch boundary, on-the-fly degradations);
* the export loads into the pipeline, as a VRE folder and in the official layout.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from osdface.training.checkpoint import latest_checkpoint, list_checkpoints
from osdface.training.vre import load_vre_config, train_vre

TINY = Path(__file__).resolve().parents[2] / "configs" / "vre-tiny.yaml"
QUIET = ["train.val_every=0", "data.val_images=2", "train.log_images=1"]
NO_LPIPS = ["loss.lpips=0"]  # LPIPS is exercised by the overfit run; elsewhere it only costs time


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow  # multi-second optimisation / multi-process run: ./test.sh --all (CI)
def test_overfit_fixed_batch_losses_fall_and_everything_is_logged(tmp_path, fixed_pairs):
    # 12 reconstruction/association steps, then 4 with the GAN (D and adaptive G terms) switched on
    steps, disc_start = 16, 12
    cfg = load_vre_config(TINY, [f"train.max_steps={steps}", "train.log_every=1", "train.ckpt_every=1000",
                                 f"loss.disc_start={disc_start}", "data.hflip=false", *QUIET])
    assert cfg.loss.lpips > 0 and cfg.phase == "assoc"
    run = tmp_path / "run"
    result = train_vre(cfg, fixed_pairs, run, cpu=True)
    assert result["step"] == steps
    train = [r for r in read_log(run) if "train/g_total" in r]
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    for r in train:
        assert all(math.isfinite(v) for v in r.values())
        assert r["train/hq/rec_lpips"] >= 0 and r["train/lq/rec_lpips"] >= 0

    def mean(key, rows):
        return sum(r[key] for r in rows) / len(rows)

    first, before_gan, last = train[:2], train[disc_start - 4 : disc_start], train[-4:]
    for key in ("train/hq/rec_l1", "train/lq/rec_l1", "train/hq/rec_lpips", "train/lq/rec_lpips"):
        assert mean(key, before_gan) < 0.9 * mean(key, first), key
    assert mean("train/assoc/loss", last) < 0.6 * mean("train/assoc/loss", first)
    # the GAN starts at disc_start: no D terms before, both G and D terms after
    assert all("train/hq/d_loss" not in r for r in train[:disc_start])
    assert all("train/hq/d_loss" in r and "train/lq/gan_weight" in r for r in train[disc_start:])
    # codebook usage: fraction of the 16 codes used and perplexity, per branch
    for b in ("hq", "lq"):
        for r in train:
            assert 0 < r[f"train/{b}/codebook_usage"] <= 1
            assert 1 <= r[f"train/{b}/codebook_perplexity"] <= 16
    val = [r for r in read_log(run) if "val/lq/psnr" in r]
    assert val and "val/lq/codebook_usage" in val[-1] and "val/assoc/loss" in val[-1]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "logs"), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    tags = ea.Tags()
    expected = {"train/hq/rec_l1", "train/lq/rec_lpips", "train/hq/vq", "train/assoc/loss", "train/hq/d_loss",
                "train/hq/g_loss", "train/lq/gan_weight", "train/assoc/logit_scale", "lr/generator",
                "lr/discriminator", "perf/images_per_s", "train/lq/codebook_usage",
                "train/hq/codebook_perplexity", "val/lq/psnr"}
    assert expected <= set(tags["scalars"])
    assert {"val/hq_input_recon", "val/lq_input_recon"} <= set(tags["images"])
    assert len(ea.Scalars("train/hq/rec_l1")) == steps


def _params(ckpt: Path) -> dict[str, torch.Tensor]:
    out = {}
    for sub in sorted(p for p in ckpt.iterdir() if (p / "config.json").is_file()):
        for k, v in load_file(str(sub / "diffusion_pytorch_model.safetensors")).items():
            out[f"{sub.name}.{k}"] = v
    out.update({f"extra.{k}": v for k, v in load_file(str(ckpt / "extra.safetensors")).items()})
    return out


def test_resume_after_step_k_reaches_the_uninterrupted_state(tmp_path, small_face_dir):
    # 3 faces, batch 1 → 3 micro-batches per epoch; grad_accum 2. Stop after step 1 (mid-epoch 0);
    # step 2 then takes the last batch of epoch 0 and the first of epoch 1 (new order, new degradations).
    base = ["train.batch_size=1", "train.grad_accum=2", "train.ckpt_every=1", "train.keep_last=0",
            "loss.disc_start=1", "train.log_every=1", *QUIET, *NO_LPIPS]
    full = tmp_path / "full"
    train_vre(load_vre_config(TINY, [*base, "train.max_steps=2"]), [small_face_dir], full, cpu=True)
    split = tmp_path / "split"
    train_vre(load_vre_config(TINY, [*base, "train.max_steps=1"]), [small_face_dir], split, cpu=True)
    assert [p.name for p in list_checkpoints(split)] == ["step-0000001"]
    with pytest.raises(FileExistsError, match="--resume"):
        train_vre(load_vre_config(TINY, [*base, "train.max_steps=2"]), [small_face_dir], split, cpu=True)
    train_vre(load_vre_config(TINY, [*base, "train.max_steps=2"]), [small_face_dir], split, resume=True, cpu=True)

    a, b = latest_checkpoint(full), latest_checkpoint(split)
    assert a.name == b.name == "step-0000002"
    sa, sb = (json.loads((c / "trainer_state.json").read_text()) for c in (a, b))
    assert sa == sb and sa["epoch"] == 1 and sa["batch_in_epoch"] == 1
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys() and any(k.startswith("disc_lq.") for k in pa)
    mismatched = [k for k in pa if not torch.equal(pa[k], pb[k])]
    assert not mismatched, mismatched[:5]
    # the step-1 state really differs from step 2 (the comparison is not vacuous)
    p1 = _params(list_checkpoints(full)[0])
    for prefix in ("disc_hq.", "vqgan_lq.", "extra.logit_scale"):
        assert any(not torch.equal(p1[k], pa[k]) for k in pa if k.startswith(prefix)), prefix
    # the resumed step's losses equal the uninterrupted ones
    la = {r["step"]: r for r in read_log(full) if "train/g_total" in r}
    lb = {r["step"]: r for r in read_log(split) if "train/g_total" in r}
    assert la[2]["train/g_total"] == lb[2]["train/g_total"]
    assert la[2]["train/hq/d_loss"] == lb[2]["train/hq/d_loss"]


@pytest.fixture(scope="module")
def assoc_run(tmp_path_factory, face_dir):
    """3 steps of phase assoc (checkpoint every step, keep 2) on the 9 faces."""
    run = tmp_path_factory.mktemp("assoc") / "run"
    cfg = load_vre_config(TINY, ["train.max_steps=3", "train.ckpt_every=1", "train.keep_last=2",
                                 "loss.disc_start=1", *QUIET, *NO_LPIPS])
    return cfg, run, train_vre(cfg, [face_dir], run, cpu=True)


def test_checkpoints_are_atomic_and_pruned(assoc_run):
    cfg, run, result = assoc_run
    assert result["step"] == 3
    assert [p.name for p in list_checkpoints(run)] == ["step-0000002", "step-0000003"]
    ck = latest_checkpoint(run)
    assert result["checkpoint"] == ck
    assert {"vqgan_hq", "vqgan_lq", "disc_hq", "disc_lq", "extra.safetensors", "accelerate_state",
            "trainer_state.json", "config.yaml"} <= {p.name for p in ck.iterdir()}
    assert load_vre_config(ck / "config.yaml") == cfg
    # a half-written (temporary) checkpoint of a crashed save is never taken as the latest
    shutil.copytree(ck, run / "checkpoints" / ".tmp-step-0000009")
    (run / "checkpoints" / "step-0000010").mkdir()  # no trainer_state.json: incomplete
    assert latest_checkpoint(run) == ck
    shutil.rmtree(run / "checkpoints" / ".tmp-step-0000009")
    (run / "checkpoints" / "step-0000010").rmdir()


def test_export_loads_into_the_pipeline_and_the_official_layout(tmp_path, assoc_run, face_crops):
    from osdface.models.prompt_encoder import VisualPromptEncoder
    from osdface.models.vqgan import VQAutoencoder
    from osdface.pipelines import OSDFacePipeline
    from osdface.testing import tiny_components, write_official_layout
    from osdface.training.vre import export_vre
    from osdface.weights import load_official_vre_state_dict

    _, run, result = assoc_run
    exp = run / "export"
    assert result["export"] == [exp / "vre", exp / "associate_2.ckpt"]
    vre = VisualPromptEncoder.from_pretrained(exp / "vre")
    assert vre.config.input_normalization == "official" and vre.config.num_tokens == 77

    # same features as the trained LQ encoder
    lq = VQAutoencoder.from_pretrained(latest_checkpoint(run) / "vqgan_lq")
    x = torch.from_numpy(face_crops[:2]).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.allclose(vre.encode_features(x), lq.encode(x), atol=1e-6)
    assert not torch.equal(lq.encoder.conv_in.weight, VQAutoencoder(**lq.config).encoder.conv_in.weight)

    c = tiny_components(0)
    pipe = OSDFacePipeline(c["vae"], c["unet"], vre, c["prompt_adapter"], c["scheduler"])
    out = pipe(torch.from_numpy(face_crops[:2]).permute(0, 3, 1, 2).float() / 255)
    assert out.images.shape == (2, 3, 64, 64) and 0 <= out.images.min() and out.images.max() <= 1
    assert (out.prompt_indices >= 0).any()

    # official layout: a plain tensor dict under "state_dict", readable with weights_only=True
    raw = torch.load(exp / "associate_2.ckpt", weights_only=True)
    keys = set(raw["state_dict"])
    assert "vqvae_LQ.decoder.conv_out.weight" in keys and "vqvae.encoder.conv_in.weight" in keys
    assert "logit_scale" in keys
    sd = load_official_vre_state_dict(exp / "associate_2.ckpt", expected=vre.state_dict())
    assert all(torch.equal(sd[k], v) for k, v in vre.state_dict().items())
    # ... and the whole official loader path: drop it into a release folder
    base, weights = write_official_layout(tmp_path / "official", seed=0)
    shutil.copy(exp / "associate_2.ckpt", weights / "associate_2.ckpt")
    official = OSDFacePipeline.from_official(base, weights)  # architecture read from the tensors
    assert all(torch.equal(official.vre.state_dict()[k], v) for k, v in vre.state_dict().items())
    x01 = torch.from_numpy(face_crops[2:4]).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(official.vre(official.preprocess(x01)), vre(official.preprocess(x01)))

    # export from a checkpoint folder gives the same files
    again = export_vre(run, tmp_path / "again")
    assert torch.equal(load_file(str(again[0] / "diffusion_pytorch_model.safetensors"))["quantize.embedding.weight"],
                       vre.codebook.detach())


def test_three_phase_chain_initialises_the_association_phase(tmp_path, small_face_dir):
    one = ["train.max_steps=1", "train.batch_size=1", *QUIET, *NO_LPIPS]
    train_vre(load_vre_config(TINY, [*one, "phase=hq"]), [small_face_dir], tmp_path / "hq", cpu=True)
    train_vre(load_vre_config(TINY, [*one, "phase=lq"]), [small_face_dir], tmp_path / "lq", cpu=True)
    # lr 0: the association run's weights must stay exactly the ones it was initialised from
    cfg = load_vre_config(TINY, [*one, "phase=assoc", "optim.lr=0", f"model.init_hq={tmp_path / 'hq'}",
                                 f"model.init_lq={latest_checkpoint(tmp_path / 'lq')}"])
    train_vre(cfg, [small_face_dir], tmp_path / "assoc", cpu=True)
    got = _params(latest_checkpoint(tmp_path / "assoc"))
    for branch in ("hq", "lq"):
        src = latest_checkpoint(tmp_path / branch)
        for sub in (f"vqgan_{branch}", f"disc_{branch}"):
            ref = load_file(str(src / sub / "diffusion_pytorch_model.safetensors"))
            assert all(torch.equal(got[f"{sub}.{k}"], v) for k, v in ref.items() if "running" not in k
                       and "num_batches" not in k), sub
    # model.train_hq=false: the association updates only the LQ branch
    frozen = load_vre_config(TINY, [*one, "phase=assoc", "model.train_hq=false", "loss.disc_start=0",
                                    f"model.init_hq={tmp_path / 'hq'}", f"model.init_lq={tmp_path / 'lq'}"])
    train_vre(frozen, [small_face_dir], tmp_path / "frozen", cpu=True)
    got = _params(latest_checkpoint(tmp_path / "frozen"))
    ref_hq = load_file(str(latest_checkpoint(tmp_path / "hq") / "vqgan_hq" / "diffusion_pytorch_model.safetensors"))
    ref_lq = load_file(str(latest_checkpoint(tmp_path / "lq") / "vqgan_lq" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(got[f"vqgan_hq.{k}"], v) for k, v in ref_hq.items())
    assert not all(torch.equal(got[f"vqgan_lq.{k}"], v) for k, v in ref_lq.items())
    assert not any(k.startswith("disc_hq.") for k in got) and any(k.startswith("disc_lq.") for k in got)
    # an earlier phase with another architecture is refused, naming the difference
    bad = load_vre_config(TINY, [*one, "phase=assoc", "model.vqgan.n_embed=8", f"model.init_hq={tmp_path / 'hq'}"])
    with pytest.raises(ValueError, match="n_embed"):
        train_vre(bad, [small_face_dir], tmp_path / "bad", cpu=True)
