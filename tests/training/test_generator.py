"""Stage-2 generator task, step by step, on tiny components (CPU, seeded, real face crops).

* the generator's forward is the pipeline's inference forward;
* every loss term is finite and logged; gradients reach only LoRA, adapter and the discriminator's
  LoRA + head (never the UNet base, VAE or VRE); D is frozen during the G step; both G and D update;
* the latent discriminator and the loss modules behave as specified;
* runs: an overfit on real faces lowers the reconstruction loss; stop + resume equals an
  uninterrupted run; export → ``osdface restore --model`` works and differs from the untrained model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _helpers import generator_trained_tensors
from safetensors.torch import load_file

from osdface.testing import tiny_components
from osdface.training.checkpoint import latest_checkpoint, list_checkpoints
from osdface.training.generator_config import load_generator_config
from osdface.training.generator_task import GeneratorTask, train_generator

TINY = Path(__file__).resolve().parents[2] / "configs" / "generator-tiny.yaml"
FAST = ["loss.ea_dists=0", "loss.identity=0"]  # those networks are exercised by the step tests
QUIET = ["data.val_images=0", "train.val_every=0"]


def components(seed: int = 0) -> dict:
    """Fresh tiny base model (VAE, UNet, scheduler) + VRE; adapter and LoRA start fresh (from scratch)."""
    c = tiny_components(seed)
    return {k: c[k] for k in ("vae", "unet", "scheduler", "vre")}


def pairs_batch(ds) -> dict:
    return {"lq": torch.stack([ds[i]["lq"] for i in range(len(ds))]),
            "gt": torch.stack([ds[i]["gt"] for i in range(len(ds))]),
            "index": torch.arange(len(ds))}


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def _build(accelerator, overrides=(), comps=None):
    cfg = load_generator_config(TINY, list(overrides))
    task = GeneratorTask(cfg, comps if comps is not None else components(0))
    task.build(accelerator)
    return task


def test_forward_is_the_pipeline_inference_forward(accelerator, face_crops):
    task = _build(accelerator, ["loss.ea_dists=0", "loss.identity=0"])
    gen = task.gen_module
    with torch.no_grad():  # make the LoRA non-trivial (B is zero-initialised)
        for name, p in gen.unet.named_parameters():
            if ".lora_B" in name:
                p.normal_(0, 0.1)
    lq = torch.from_numpy(face_crops[:2]).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        out = gen(lq)
        ref = task.pipe.restore_tensor(lq * 2 - 1)
        plain = task.pipe(lq).images
    assert torch.equal(out["pred"], ref)
    assert torch.allclose(out["pred"], plain, atol=1e-4)  # __call__ (input checks; another memory layout)
    assert out["z_hat"].shape == (2, 4, 8, 8) and out["prompt"].shape == (2, 77, 32)


def _grads(module):
    return {n: p.grad for n, p in module.named_parameters()}


def test_gradients_reach_only_the_trainable_parameters_and_both_g_and_d_update(accelerator, fixed_pairs):
    task = _build(accelerator)  # all four losses, random-init DISTS and ArcFace
    gen, disc, pipe = task.gen_module, task.disc_module, task.pipe
    batch = pairs_batch(fixed_pairs)
    # ---- the G step alone: D frozen (no grads), G's trainable tensors all get gradients
    rng = torch.Generator().manual_seed(0)
    out, logs = task.generator_step(batch, 0, 1.0, rng, task.gan_inputs(batch, 0))
    for key in ("g/mse", "g/ea_dists", "g/identity", "g/gan", "g_total", "g/logits_fake"):
        assert key in logs and math.isfinite(logs[key]), key
    assert logs["g_total"] == pytest.approx(logs["g/mse"] + logs["g/ea_dists"] + 0.1 * logs["g/identity"]
                                            + 0.05 * logs["g/gan"], rel=1e-5)
    assert all(p.grad is None for p in disc.parameters()), "D must be frozen during the G step"
    assert all(p.requires_grad == (".lora_" in n or n.startswith("head.")) for n, p in disc.named_parameters())
    g_trainable = {n for n, p in gen.named_parameters() if p.requires_grad}
    assert g_trainable == {n for n, _ in gen.named_parameters() if ".lora_" in n or n.startswith("prompt_adapter.")}
    assert any(".lora_" in n and n.startswith("unet.") for n in g_trainable)
    for n, g in _grads(gen).items():
        assert (g is not None) == (n in g_trainable), n
    assert any(float(g.abs().sum()) > 0 for n, g in _grads(gen).items() if ".lora_B" in n)
    assert float(gen.prompt_adapter.conv1.weight.grad.abs().sum()) > 0
    for frozen in (pipe.vae, pipe.vre):
        assert all(p.grad is None and not p.requires_grad for p in frozen.parameters())
    g_before = {n: g.clone() for n, g in _grads(gen).items() if g is not None}
    # ---- the D step: grads reach D's LoRA + head only; the fake is detached (G grads unchanged)
    d_logs = task.discriminator_step(batch, out, 1.0, rng, task.gan_inputs(batch, 0))
    assert all(math.isfinite(v) for v in d_logs.values()) and 0 <= d_logs["d/accuracy"] <= 1
    for n, p in disc.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
    assert any(float(p.grad.abs().sum()) > 0 for n, p in disc.named_parameters() if n.startswith("head."))
    assert all(torch.equal(g_before[n], p.grad) for n, p in gen.named_parameters() if n in g_before)
    # ---- one optimiser step: G's and D's trainable tensors move, every frozen tensor stays
    frozen_before = {**{f"unet.{n}": p.clone() for n, p in gen.unet.named_parameters() if not p.requires_grad},
                     **{f"vae.{n}": p.clone() for n, p in pipe.vae.named_parameters()},
                     **{f"vre.{n}": p.clone() for n, p in pipe.vre.named_parameters()},
                     **{f"d.{n}": p.clone() for n, p in disc.named_parameters() if not p.requires_grad}}
    g0 = {n: p.clone() for n, p in gen.named_parameters() if p.requires_grad}
    d0 = {n: p.clone() for n, p in disc.named_parameters() if p.requires_grad}
    task.optimizer_step(0)
    assert any(not torch.equal(g0[n], p) for n, p in gen.named_parameters() if ".lora_A" in n)
    assert any(not torch.equal(g0[n], p) for n, p in gen.named_parameters() if n.startswith("prompt_adapter."))
    assert any(not torch.equal(d0[n], p) for n, p in disc.named_parameters() if ".lora_" in n)
    assert any(not torch.equal(d0[n], p) for n, p in disc.named_parameters() if n.startswith("head."))
    now = {**{f"unet.{n}": p for n, p in gen.unet.named_parameters() if not p.requires_grad},
           **{f"vae.{n}": p for n, p in pipe.vae.named_parameters()},
           **{f"vre.{n}": p for n, p in pipe.vre.named_parameters()},
           **{f"d.{n}": p for n, p in disc.named_parameters() if not p.requires_grad}}
    assert now.keys() == frozen_before.keys()
    assert all(torch.equal(frozen_before[k], v) for k, v in now.items())
    assert all(p.grad is None for p in gen.parameters()) and all(p.grad is None for p in disc.parameters())


def test_gan_schedule_and_shared_noise(accelerator, fixed_pairs):
    task = _build(accelerator, ["loss.ea_dists=0", "loss.identity=0", "loss.gan_start=2", "loss.d_every=2"])
    assert not task.gan_active(1) and task.gan_active(2) and task.d_update(2) and not task.d_update(3)
    logs = task.train_micro_step(pairs_batch(fixed_pairs), 1, 1.0)
    assert "g/gan" not in logs and "d/loss" not in logs
    logs = task.train_micro_step(pairs_batch(fixed_pairs), 2, 1.0)
    assert "g/gan" in logs and "d/loss" in logs
    # t and ε are drawn per sample from (seed, step, index): independent of batch composition
    b = pairs_batch(fixed_pairs)
    both = task.gan_inputs(b, 5)
    one = task.gan_inputs({k: v[1:] for k, v in b.items()}, 5)
    assert torch.equal(both.t[1:], one.t) and torch.equal(both.noise[1:], one.noise)
    assert not torch.equal(task.gan_inputs(b, 6).noise, both.noise)
    assert both.noise.shape == (2, 4, 8, 8) and ((0 <= both.t) & (both.t <= 999)).all()


def test_latent_discriminator_copies_the_unet_encoder_and_round_trips(tmp_path):
    from osdface.models.latent_discriminator import LatentDiscriminator
    from osdface.training.generator_task import DiscriminatorFolder, load_discriminator

    unet = tiny_components(0)["unet"]
    d = LatentDiscriminator.from_unet(unet, head_channels=16, lora_rank=4, lora_alpha=4, seed=1)
    assert torch.equal(d.conv_in.base_layer.weight, unet.conv_in.weight)
    assert torch.equal(d.mid_block.resnets[0].conv1.base_layer.weight, unet.mid_block.resnets[0].conv1.weight)
    z, t, p = torch.randn(3, 4, 8, 8), torch.tensor([0, 400, 999]), torch.randn(3, 77, 32)
    logits = d(z, t, p)
    assert logits.shape == (3,) and torch.isfinite(logits).all()
    # the time step and the prompt condition the score
    assert not torch.allclose(d(z, torch.tensor([999, 0, 400]), p), logits)
    assert not torch.allclose(d(z, t, torch.randn(3, 77, 32)), logits)
    with torch.no_grad():  # make the LoRA matter, then round-trip config + weights
        for n, q in d.named_parameters():
            if ".lora_B" in n:
                q.normal_(0, 0.1)
    d.save_pretrained(tmp_path / "full")
    again = LatentDiscriminator.from_pretrained(tmp_path / "full")
    assert torch.allclose(again(z, t, p), d(z, t, p), atol=1e-6)  # equal weights; loaded tensors' layout differs
    DiscriminatorFolder(d).save_pretrained(tmp_path / "small")  # LoRA + head only; backbone from the UNet
    small = load_discriminator(tmp_path / "small", unet)
    assert all(torch.equal(v, d.state_dict()[k]) for k, v in small.state_dict().items())
    assert torch.allclose(small(z, t, p), d(z, t, p), atol=1e-6)


def test_latent_gan_and_identity_losses():
    from osdface.losses.gan_latent import LatentGANInputs, LatentGANLoss, diffuse_latents
    from osdface.losses.identity import IdentityLoss, build_identity_network
    from osdface.testing import sd21_scheduler

    ac = sd21_scheduler().alphas_cumprod
    z, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([0, 999])
    f = diffuse_latents(z, t, eps, ac)
    assert torch.allclose(f[1], ac[999].sqrt() * z[1] + (1 - ac[999]).sqrt() * eps[1])
    assert torch.allclose(f[0], ac[0].sqrt() * z[0] + (1 - ac[0]).sqrt() * eps[0])
    inputs = LatentGANInputs.sample(z, generator=torch.Generator().manual_seed(0))
    assert inputs.noise.shape == z.shape and inputs.t.shape == (2,)

    class Linear(torch.nn.Module):  # a real (tiny) discriminator: mean of the latent, scaled
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(3.0))

        def forward(self, x, t, prompt):
            return self.w * x.mean(dim=(1, 2, 3))

    gan = LatentGANLoss(ac)
    fake = torch.randn(2, 4, 8, 8, requires_grad=True)
    g_loss, logits = gan.generator_loss(Linear(), fake, torch.zeros(2, 1, 1), inputs)
    assert torch.isclose(g_loss, torch.nn.functional.softplus(-logits).mean())
    g_loss.backward()
    assert fake.grad is not None and float(fake.grad.abs().sum()) > 0
    d_loss, real_l, fake_l = gan.discriminator_loss(Linear(), z, fake, torch.zeros(2, 1, 1), inputs)
    expected = 0.5 * (torch.nn.functional.softplus(-real_l).mean() + torch.nn.functional.softplus(fake_l).mean())
    assert torch.isclose(d_loss, expected) and d_loss.grad_fn is not None

    net = build_identity_network("arcface", pretrained=False)
    loss = IdentityLoss(net)
    x = torch.rand(2, 3, 64, 64)
    assert float(loss(x, x)) == pytest.approx(0.0, abs=1e-5)
    y = torch.rand(2, 3, 64, 64, requires_grad=True)
    v = loss(y, x)
    assert 0 < float(v.detach()) <= 2
    v.backward()
    assert float(y.grad.abs().sum()) > 0 and all(p.grad is None for p in net.parameters())
    loss.train()
    assert not net.net.training  # BatchNorm of the identity net never switches to training
    from osdface.weights import WeightsNotFoundError

    with pytest.raises(WeightsNotFoundError, match="nowhere.pth"):
        build_identity_network("arcface", weights="/nowhere.pth")


# --------------------------------------------------------------------------------------- runs
def _decoder_floor(gt: torch.Tensor, steps: int = 300) -> float:
    """The lowest MSE the frozen tiny VAE decoder can reach on ``gt``: optimise the latents directly."""
    from osdface.testing import tiny_pipeline

    pipe = tiny_pipeline(0, with_lora=False)  # the same VAE as components(0)
    z = torch.zeros(gt.shape[0], 4, 8, 8, requires_grad=True)
    opt = torch.optim.Adam([z], lr=0.05)
    for _ in range(steps):
        loss = ((pipe.decode(z) * 2 - 1 - (gt * 2 - 1)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


@pytest.mark.slow  # multi-second optimisation / multi-process run: ./test.sh --all (CI)
def test_overfit_on_real_faces_lowers_the_reconstruction_loss(tmp_path, fixed_pairs):
    steps = 40
    cfg = load_generator_config(TINY, [f"train.max_steps={steps}", "train.log_every=1", "train.ckpt_every=1000",
                                       "data.hflip=false", "data.val_images=2", "train.val_every=20",
                                       "optim.grad_clip=0", *FAST])
    run = tmp_path / "run"
    result = train_generator(cfg, fixed_pairs, run, cpu=True, components=components(0))
    assert result["step"] == steps
    train = [r for r in read_log(run) if "train/g_total" in r]
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    assert all(math.isfinite(v) for r in train for v in r.values())
    first = sum(r["train/g/mse"] for r in train[:3]) / 3
    last = sum(r["train/g/mse"] for r in train[-3:]) / 3
    # the random tiny VAE decoder bounds what any latent can reach; training must close most of that gap
    floor = _decoder_floor(pairs_batch(fixed_pairs)["gt"])
    assert floor < last < 0.8 * first, (first, last, floor)
    assert (first - last) > 0.5 * (first - floor), (first, last, floor)
    assert all("train/d/loss" in r and "train/g/gan" in r for r in train)  # the GAN ran all along
    val = [r for r in read_log(run) if "val/psnr" in r]
    assert [r["step"] for r in val] == [20, 40]
    assert {"val/lpips", "val/dists", "val/ids", "val/mse"} <= set(val[-1])
    assert val[-1]["val/mse"] < val[0]["val/mse"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "logs"), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    tags = ea.Tags()
    assert {"train/g/mse", "train/g/gan", "train/d/loss", "train/d/logits_real", "train/g_total",
            "lr/generator", "lr/discriminator", "val/lpips", "val/ids"} <= set(tags["scalars"])
    assert "val/lq_restored_gt" in tags["images"]
    # the run's export: the three official files (plain tensors / safetensors)
    exp = run / "export"
    assert result["export"] == [exp / "associate_2.ckpt", exp / "embedding_change_weights.pth",
                                exp / "pytorch_lora_weights.safetensors"]
    assert set(torch.load(exp / "embedding_change_weights.pth", weights_only=True)) == {
        "conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"}
    assert all(k.startswith("vqvae_LQ.") for k in torch.load(exp / "associate_2.ckpt", weights_only=True)["state_dict"])
    lora = load_file(str(exp / "pytorch_lora_weights.safetensors"))
    assert lora and all(k.startswith("unet.") and (".lora_A.weight" in k or ".lora_B.weight" in k) for k in lora)


def test_resume_after_step_k_equals_an_uninterrupted_run(tmp_path, face_dir):
    # 9 faces, batch 2 → 4 micro-batches per epoch; grad_accum 2 → 2 steps per epoch.
    # Stop after step 1 (mid-epoch), resume to step 3 (into epoch 1, with new on-the-fly degradations).
    base = ["train.batch_size=2", "train.grad_accum=2", "train.ckpt_every=1", "train.keep_last=0",
            "train.log_every=1", *QUIET, *FAST]
    full = tmp_path / "full"
    train_generator(load_generator_config(TINY, [*base, "train.max_steps=3"]), [face_dir], full, cpu=True,
                    components=components(0))
    split = tmp_path / "split"
    train_generator(load_generator_config(TINY, [*base, "train.max_steps=1"]), [face_dir], split, cpu=True,
                    components=components(0))
    with pytest.raises(FileExistsError, match="--resume"):
        train_generator(load_generator_config(TINY, [*base, "train.max_steps=3"]), [face_dir], split, cpu=True,
                        components=components(0))
    train_generator(load_generator_config(TINY, [*base, "train.max_steps=3"]), [face_dir], split, resume=True,
                    cpu=True, components=components(0))
    a, b = latest_checkpoint(full), latest_checkpoint(split)
    assert a.name == b.name == "step-0000003"
    assert {p.name for p in a.iterdir()} >= {"unet_lora", "prompt_adapter", "vre", "discriminator",
                                             "accelerate_state", "trainer_state.json", "config.yaml"}
    pa, pb = generator_trained_tensors(a), generator_trained_tensors(b)
    assert pa.keys() == pb.keys() and any(k.startswith("disc.head") for k in pa)
    mismatched = [k for k in pa if not torch.equal(pa[k], pb[k])]
    assert not mismatched, mismatched[:5]
    p1 = generator_trained_tensors(list_checkpoints(full)[0])  # the comparison is not vacuous: step 1 ≠ step 3
    for prefix in ("lora.", "adapter.", "disc.head"):
        assert any(not torch.equal(p1[k], pa[k]) for k in pa if k.startswith(prefix)), prefix
    la = {r["step"]: r for r in read_log(full) if "train/g_total" in r}
    lb = {r["step"]: r for r in read_log(split) if "train/g_total" in r}
    for step in (2, 3):
        assert la[step]["train/g_total"] == lb[step]["train/g_total"]
        assert la[step]["train/d/loss"] == lb[step]["train/d/loss"]
    # the accelerate state holds only the trainable tensors (not the frozen UNet / D backbone)
    state = load_file(str(a / "accelerate_state" / "model.safetensors"))
    assert state and all(".lora_" in k or k.startswith("prompt_adapter.") for k in state)


def test_cli_train_export_restore(tmp_path, face_dir):
    """Fine-tune the (tiny) official release through the CLI, export, restore with --model."""
    import numpy as np
    from PIL import Image

    from osdface.cli import main
    from osdface.testing import write_official_layout

    base, weights = write_official_layout(tmp_path / "official", seed=0)
    run = tmp_path / "run"
    argv = ["train", "generator", "--config", str(TINY), "--data", str(face_dir), "--base-model", str(base),
            "--weights", str(weights), "-o", str(run), "--max-steps", "3", "--cpu",
            "--set", *FAST, *QUIET, "train.log_every=1", "optim.lr=3e-3"]
    assert main(argv) == 0
    assert main(argv) == 2  # the run exists: refuses without --resume
    model, official = tmp_path / "model", tmp_path / "official-export"
    assert main(["export", str(run), "-o", str(model), "--official-layout", str(official)]) == 0
    assert (model / "model_index.json").is_file() and (model / "unet" / "config.json").is_file()
    assert main(["export", str(run), "-o", str(model)]) == 2  # never overwrites
    faces = tmp_path / "faces"
    faces.mkdir()
    for name in ("face00.png", "face03.png"):
        (faces / name).write_bytes((face_dir / name).read_bytes())

    def restore(out: str, *model_args: str) -> np.ndarray:
        assert main(["restore", str(faces), "-o", str(tmp_path / out), "--aligned", "--device", "cpu",
                     *model_args]) == 0
        return np.stack([np.asarray(Image.open(tmp_path / out / n)) for n in ("face00.png", "face03.png")])

    trained = restore("trained", "--model", str(model))
    untrained = restore("untrained", "--base-model", str(base), "--weights", str(weights))
    via_official = restore("via-official", "--base-model", str(base), "--weights", str(official))
    assert trained.shape == (2, 64, 64, 3)
    assert np.abs(trained.astype(int) - untrained.astype(int)).mean() > 0.5  # training changed the model
    assert np.abs(trained.astype(int) - via_official.astype(int)).max() <= 1  # the two exports agree
    # the official-layout files: plain tensors, the official key conventions
    raw = torch.load(official / "associate_2.ckpt", weights_only=True)
    assert set(raw) == {"state_dict"} and "vqvae_LQ.quantize.embedding.weight" in raw["state_dict"]
    ck = latest_checkpoint(run)
    assert json.loads((ck / "unet_lora" / "adapter_config.json").read_text())["r"] == 4
    assert load_generator_config(ck / "config.yaml").model.weights == str(weights.resolve())
