"""Every component class saves and loads on its own: ``save_pretrained`` → ``from_pretrained`` gives the
same config, the same tensors and bit-identical outputs, and only safetensors + JSON are written.

One parametrised test over all of them (the stock diffusers UNet and VAE too, as the pipeline stores
them), so a new component gets the invariant by adding one line to ``COMPONENTS``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from osdface.models import (
    LatentDiscriminator,
    NLayerDiscriminator,
    PromptAdapter,
    VisualPromptEncoder,
    VQAutoencoder,
)
from osdface.testing import TINY_CROSS_DIM, TINY_RESOLUTION, TINY_VRE_CONFIG, tiny_unet, tiny_vae, tiny_vre


@dataclass(frozen=True)
class Component:
    cls: type
    build: Callable[[], torch.nn.Module]
    run: Callable[[torch.nn.Module, torch.Generator], torch.Tensor]


def _image(g: torch.Generator, size: int = TINY_RESOLUTION) -> torch.Tensor:
    return torch.rand(2, 3, size, size, generator=g) * 2 - 1


def _latent_disc() -> LatentDiscriminator:
    return LatentDiscriminator.from_unet(tiny_unet(1), head_channels=16, lora_rank=2, lora_alpha=2.0, seed=3)


_STAGE1 = {k: v for k, v in TINY_VRE_CONFIG.items() if k != "num_tokens"}

COMPONENTS = {
    "VisualPromptEncoder": Component(VisualPromptEncoder, lambda: tiny_vre(2), lambda m, g: m(_image(g))),
    "PromptAdapter": Component(PromptAdapter, lambda: PromptAdapter(TINY_VRE_CONFIG["embed_dim"], TINY_CROSS_DIM),
                               lambda m, g: m(torch.randn(2, 77, TINY_VRE_CONFIG["embed_dim"], generator=g))),
    "VQAutoencoder": Component(VQAutoencoder, lambda: VQAutoencoder(**_STAGE1), lambda m, g: m(_image(g)).recon),
    "NLayerDiscriminator": Component(NLayerDiscriminator, lambda: NLayerDiscriminator(ndf=16, n_layers=2),
                                     lambda m, g: m(_image(g))),
    "LatentDiscriminator": Component(
        LatentDiscriminator, _latent_disc,
        lambda m, g: m(torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]),
                       torch.randn(2, 77, TINY_CROSS_DIM, generator=g))),
    "UNet2DConditionModel": Component(
        type(tiny_unet()), lambda: tiny_unet(0),
        lambda m, g: m(torch.randn(2, 4, 8, 8, generator=g), 399,
                       encoder_hidden_states=torch.randn(2, 77, TINY_CROSS_DIM, generator=g)).sample),
    "AutoencoderKL": Component(type(tiny_vae()), lambda: tiny_vae(0),
                               lambda m, g: m.decode(m.encode(_image(g)).latent_dist.mode()).sample),
}


def _json_config(model) -> dict:
    return json.loads(json.dumps({k: v for k, v in dict(model.config).items() if not k.startswith("_")}))


@pytest.mark.parametrize("name", sorted(COMPONENTS))
def test_save_load_same_config_tensors_and_outputs(name, tmp_path):
    comp = COMPONENTS[name]
    torch.manual_seed(0)
    model = comp.build().eval()
    model.save_pretrained(tmp_path / name, safe_serialization=True)
    written = sorted(p.name for p in (tmp_path / name).iterdir())
    assert all(n.endswith((".safetensors", ".json")) for n in written), written

    loaded = comp.cls.from_pretrained(tmp_path / name).eval()
    assert type(loaded) is type(model)
    assert _json_config(loaded) == _json_config(model)  # tuples come back as lists: compare as JSON
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    # Loaded weights may be views of the memory-mapped file at offsets that are not 64-byte aligned,
    # where oneDNN/MKL take another SIMD path (last-bit differences, e.g. a 16→1 Linear). Copy them
    # into fresh memory so that the comparison below tests the rebuilt structure exactly.
    with torch.no_grad():
        for t in [*loaded.parameters(), *loaded.buffers()]:
            t.data = t.data.clone()
        a = comp.run(model, torch.Generator().manual_seed(5))
        b = comp.run(loaded, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert torch.isfinite(a).all()


def test_every_component_class_is_covered():
    import osdface.models

    model_mixins = {getattr(osdface.models, n) for n in osdface.models.__all__
                    if hasattr(getattr(osdface.models, n), "from_pretrained")}
    assert model_mixins <= {c.cls for c in COMPONENTS.values()}
