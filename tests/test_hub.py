"""Hugging Face interop: MMDiT save_pretrained / from_pretrained. Offline: nothing here reaches the Hub."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest
import torch
from conftest import randomize
from safetensors.torch import load_file, save_file

from selfflow.inference import samplers
from selfflow.models.factory import model_params
from selfflow.models.mmdit import MMDiT, MMDiTParams
from selfflow.tokenizers.media import MediaTokenizer


@pytest.fixture
def small(tiny_cfg) -> MMDiT:
    """The tiny preset with one single-stream block and random weights (the init zeroes the outputs)."""
    torch.manual_seed(0)
    return randomize(MMDiT(replace(model_params(tiny_cfg), depth_single=1))).eval()


def image_velocity(model: MMDiT, tiny_cfg, batch: int = 2) -> samplers.Velocity:
    """v = fn(x [B, L, C] image tokens, t [B]) of `model` for fixed random captions."""
    ids = MediaTokenizer(tiny_cfg.spec).position_ids(["image"])
    txt = torch.randint(3, 259, (batch, 8), generator=torch.Generator().manual_seed(1))
    return lambda x, t: model({"image": x}, ids, t.float(), txt).velocity["image"]


def image_noise(tiny_cfg, batch: int = 2) -> torch.Tensor:
    spec = tiny_cfg.spec
    return samplers.initial_noise((spec.tokens("image"), spec.token_dim("image")), list(range(batch)))


# MMDiT <-> a Hugging Face folder


def test_save_and_load_give_the_same_params_and_bitwise_outputs(small, tiny_cfg, tmp_path):
    small.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = MMDiT.from_pretrained(tmp_path)
    assert loaded.params == small.params and isinstance(loaded.params.axes_dim, tuple)
    assert not loaded.training
    x, t = image_noise(tiny_cfg), torch.tensor([0.9, 0.3])
    with torch.no_grad():
        assert torch.equal(image_velocity(loaded, tiny_cfg)(x, t), image_velocity(small, tiny_cfg)(x, t))


def test_config_json_holds_the_constructor_argument_and_nothing_else(small, tmp_path):
    small.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config == {"params": json.loads(json.dumps(asdict(small.params)))}
    assert config["params"]["axes_dim"] == list(small.params.axes_dim)
    assert config["params"]["media_channels"] == {"image": 48, "video": 192, "audio": 640}


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda p: p.pop("hidden_size"), r"missing fields \['hidden_size'\]"),
        (lambda p: p.update(hidden_sise=192), r"unknown fields \['hidden_sise'\]"),
        (lambda p: p.update(num_heads="4"), "mistyped fields num_heads='4'"),
        (lambda p: p.update(qkv_bias=1), "mistyped fields qkv_bias=1"),
        (lambda p: p.update(axes_dim=[12, 12, "12", 12]), "mistyped fields axes_dim"),
        (lambda p: p.update(media_channels={"image": 4.5}), "mistyped fields media_channels"),
        (lambda p: p.update(num_heads=5), "not divisible by num_heads 5"),
    ],
)
def test_a_bad_or_missing_field_is_a_clear_error(small, tmp_path, edit, message):
    small.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    edit(config["params"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        MMDiT.from_pretrained(tmp_path)


def test_a_folder_without_params_or_with_missing_weights_does_not_load(small, tmp_path):
    small.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights.pop("null_txt")
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(RuntimeError, match="null_txt"):  # strict: not silently left at its init
        MMDiT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no config.json with 'params'"):
        MMDiT.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="must be a JSON object"):
        MMDiTParams.from_json([192])
