"""An exported model is a Hugging Face folder: the transformer loads with `MMDiT.from_pretrained`, the
scheduler with diffusers (and gives our Euler levels), the card parses, the sampling commands take the
folder, and what does not match is refused. Format-1 snapshots still load."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from diffusers import FlowMatchEulerDiscreteScheduler
from safetensors.torch import save_file

from selfflow.configs.factory import model_params
from selfflow.configs.schema import config_to_dict
from selfflow.data.shards import sha256_file
from selfflow.inference import sample_image
from selfflow.inference.hub import scheduler_sigmas
from selfflow.inference.pipeline import load_snapshot
from selfflow.inference.samplers import get_schedule
from selfflow.inference.snapshot import CARD, CONFIG, INFO, WEIGHTS, export_snapshot, read_snapshot
from selfflow.models.mmdit import MMDiT
from selfflow.tools import export_snapshot as export_cli
from selfflow.training.checkpoint import load_weights


@pytest.fixture(scope="module")
def folder(av_ckpt, tmp_path_factory):
    return export_snapshot(av_ckpt, tmp_path_factory.mktemp("hf") / "model", dtype="float32")


def test_the_transformer_round_trips_through_from_pretrained(folder, av_ckpt):
    cfg, state, _ = read_snapshot(folder)
    model = MMDiT.from_pretrained(folder / "transformer")
    ema = load_weights(av_ckpt, "ema")
    loaded = model.state_dict()
    assert loaded.keys() == ema.keys() and all(torch.equal(loaded[k], ema[k]) for k in ema)
    assert model.params == model_params(cfg)  # the constructor argument, not the training config
    saved = json.loads((folder / "transformer" / "config.json").read_text())
    assert set(saved) == {"params"} and "train" not in json.dumps(saved)
    _, ours = load_snapshot(folder)
    ids, txt = torch.zeros(4, 4), torch.zeros(1, 3, dtype=torch.long)
    media = {"image": torch.randn(1, 4, model.params.media_channels["image"])}
    args = (media, ids, torch.tensor([0.5]), txt)
    torch.testing.assert_close(model.eval()(*args).velocity, ours(*args).velocity, rtol=0, atol=0)


def test_diffusers_loads_the_scheduler_and_steps_through_our_levels(folder):
    cfg, _, _ = read_snapshot(folder)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    steps = cfg.sample.steps
    scheduler.set_timesteps(sigmas=scheduler_sigmas(steps))
    ours = get_schedule(steps, cfg.sample.shift).float()
    torch.testing.assert_close(scheduler.sigmas.float(), ours, rtol=0, atol=1e-6)


def test_the_card_describes_the_model(folder, av_ckpt, tmp_path):
    card = (folder / CARD).read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "selfflow" and front["license"] == "apache-2.0"
    assert "selfflow-sample-av --model model" in card and "## Training recipe" in card
    report = {"settings": {"protocol": "paper", "steps": 50, "sampler": "euler", "cfg_scale": 1.0,
                           "shift": 1.0, "n": 8},
              "tasks": {"av": {"samples": {"sync": {"within_frame": 0.25}, "bounce_count_accuracy": 0.5},
                               "real": {"bounce_count_accuracy": 1.0}}}}  # fmt: skip
    (tmp_path / "eval.json").write_text(json.dumps(report))
    out = tmp_path / "carded"
    argv = [str(av_ckpt), "--out", str(out), "--metrics", str(tmp_path / "eval.json"), "--data", "toy clips"]
    assert export_cli.main(argv) == 0
    card = (out / CARD).read_text()
    assert "| av sync.within_frame | 0.25 |" in card and "| av bounce_count_accuracy | 0.5 |" in card
    assert "paper: 50 euler steps, CFG 1.0" in card and "toy clips" in card
    (out / CARD).write_text(card + "\nedited by hand\n")  # the card is documentation: not sha256-pinned
    read_snapshot(out)


def test_the_sampling_commands_take_the_folder_and_refuse_a_mismatch(folder, tmp_path, capsys):
    grid = tmp_path / "grid.png"
    assert sample_image.main(["--model", str(folder), "--prompt", "x", "--num", "1", "--steps", "2",
                              "--quiet", "--out", str(grid)]) == 0  # fmt: skip
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    config = bad / "transformer" / "config.json"
    params = json.loads(config.read_text())
    params["params"]["hidden_size"] *= 2
    config.write_text(json.dumps(params))
    info = json.loads((bad / INFO).read_text())
    info["files"]["transformer/config.json"] = sha256_file(config)  # a consistent but wrong folder
    (bad / INFO).write_text(json.dumps(info))
    with pytest.raises(ValueError, match="describe other models"):
        read_snapshot(bad)
    assert sample_image.main(["--model", str(bad), "--prompt", "x", "--out", str(tmp_path / "b.png")]) == 2
    assert "describe other models" in capsys.readouterr().err
    from selfflow.configs.schema import ConfigError
    from selfflow.training.finetune import _source_weights

    with pytest.raises(ConfigError, match="train.init_from .*describe other models"):  # one line, exit 2
        _source_weights(str(bad))
    del info["files"][WEIGHTS]  # a partial snapshot.json: the weights would load unchecked
    (bad / INFO).write_text(json.dumps(info))
    with pytest.raises(ValueError, match="no sha256 for transformer/model.safetensors"):
        read_snapshot(bad)


def test_a_format_1_snapshot_still_loads(folder, tmp_path):
    cfg, state, _ = read_snapshot(folder)
    old = tmp_path / "old"
    old.mkdir()
    save_file(state, str(old / "model.safetensors"))
    (old / "config.json").write_text(json.dumps(config_to_dict(cfg)))
    info = {"format": 1, "sha256": sha256_file(old / "model.safetensors"), "dtype": "float32", "step": 2}
    (old / INFO).write_text(json.dumps(info))
    cfg_old, model = load_snapshot(old)
    assert cfg_old == cfg and all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert WEIGHTS.startswith("transformer/") and CONFIG == "config.yaml"
