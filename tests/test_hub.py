"""Hugging Face interop: MMDiT save_pretrained / from_pretrained, the diffusers scheduler that
reproduces our Euler sampler, and the model card. Offline: nothing here reaches the Hub."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, replace

import pytest
import torch
import yaml
from conftest import randomize
from diffusers import FlowMatchEulerDiscreteScheduler
from safetensors.torch import load_file, save_file

from selfflow.configs.factory import model_params
from selfflow.configs.schema import config_to_dict
from selfflow.inference import hub, samplers
from selfflow.models import flow
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


# diffusers' FlowMatchEulerDiscreteScheduler <-> our Euler sampler


def toy_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Exact E[eps - x0 | x_t] for 1-D data N(1.5, 0.5^2): non-linear in t, so the schedule matters."""
    t = flow.expand_time(t, x)
    a, mu, s2 = 1.0 - t, 1.5, 0.25
    return -mu + (t - a * s2) / (a**2 * s2 + t**2) * (x - a * mu)


def diffusers_euler(v_fn: samplers.Velocity, x1: torch.Tensor, folder, steps: int) -> torch.Tensor:
    """A diffusers user's loop: the scheduler from FOLDER/scheduler, the model fed timestep / 1000."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    scheduler.set_timesteps(sigmas=hub.scheduler_sigmas(steps))
    x = x1
    for timestep in scheduler.timesteps:
        t = (timestep / scheduler.config.num_train_timesteps).expand(x.shape[0])  # [B]
        x = scheduler.step(v_fn(x, t), timestep, x).prev_sample
    return x


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 4, 25])
def test_the_written_scheduler_reproduces_our_euler_sampler(tmp_path, shift, steps):
    path = hub.write_scheduler_config(tmp_path, shift, steps)
    assert path == tmp_path / "scheduler" / "scheduler_config.json"
    x1 = samplers.initial_noise((64,), [0, 1, 2])  # [3, 64]
    ours = samplers.sample("euler", toy_velocity, x1, steps, shift)
    theirs = diffusers_euler(toy_velocity, x1, tmp_path, steps)
    assert (theirs - ours).abs().max() <= 1e-5
    other = samplers.sample("euler", toy_velocity, x1, steps, 4.0 - shift)  # the other shift
    if steps > 1:  # a single step [1, 0] is the same for every shift
        assert (theirs - other).abs().max() > 1e-2


def test_the_scheduler_takes_our_shift_from_its_config(tmp_path):
    """Without the config's shift the loop is the unshifted sampler, far from ours."""
    x1 = samplers.initial_noise((64,), [0, 1])
    ours = samplers.sample("euler", toy_velocity, x1, 4, 3.0)
    hub.write_scheduler_config(tmp_path, 3.0, 4)
    config = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert config["shift"] == 3.0
    assert config["_selfflow_sampler"] == {"sampler": "euler", "steps": 4, "shift": 3.0}
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "shift": 1.0}))
    assert (diffusers_euler(toy_velocity, x1, tmp_path, 4) - ours).abs().max() > 1e-2


def test_the_scheduler_reproduces_a_random_mmdit(small, tiny_cfg, tmp_path):
    v_fn, x1 = image_velocity(small, tiny_cfg), image_noise(tiny_cfg)
    hub.write_scheduler_config(tmp_path, 3.0, 4)
    ours = samplers.sample("euler", v_fn, x1, 4, 3.0)
    with torch.no_grad():
        assert (diffusers_euler(v_fn, x1, tmp_path, 4) - ours).abs().max() <= 1e-5


def test_diffusers_loads_the_config_without_a_warning(tmp_path):
    """Our "_selfflow_sampler" entry is one diffusers skips silently (keys starting with "_")."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("diffusers")  # does not propagate to the root logger
    logger.addHandler(handler)
    try:
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
            hub.write_scheduler_config(tmp_path, 3.0, 4).parents[1], subfolder="scheduler"
        )
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == []
    assert scheduler.config.shift == 3.0 and not scheduler.config.use_dynamic_shifting


def test_plain_set_timesteps_matches_only_with_a_step_specific_num_train_timesteps():
    """Why the sigmas are passed (inference/hub.py): set_timesteps(steps) alone ends its unshifted
    levels at shift(1 / num_train_timesteps), ours at 1 / steps."""
    for shift, steps in ((1.0, 4), (3.0, 4), (3.0, 25)):
        ours = samplers.get_schedule(steps, shift)
        config = hub.scheduler_config(shift, steps)
        for n_train, same in ((1000, False), (int(shift * (steps - 1) + 1), True)):
            config["num_train_timesteps"] = n_train
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
            scheduler.set_timesteps(num_inference_steps=steps)
            assert ((scheduler.sigmas.double() - ours).abs().max() <= 1e-6) == same


def test_scheduler_arguments_are_checked():
    assert hub.scheduler_sigmas(4) == [1.0, 0.75, 0.5, 0.25]
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="steps"):
            hub.scheduler_config(3.0, bad)
        with pytest.raises(ValueError, match="steps"):
            hub.scheduler_sigmas(bad)
    with pytest.raises(ValueError, match="shift"):
        hub.scheduler_config(0.0, 4)


# The model card


def card_info(tiny_cfg, small: MMDiT, **kw) -> hub.CardInfo:
    cfg = config_to_dict(tiny_cfg)
    n = sum(p.numel() for p in small.parameters())
    return hub.CardInfo(small.params, n, cfg, folder="my/model", **kw)


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_model_card_front_matter_and_sections(tiny_cfg, small):
    metrics = {"FID": 12.5, "KID": 0.106, "OCR | word accuracy": 0.0}
    card = hub.render_model_card(card_info(tiny_cfg, small, metrics=metrics, data="Fashion-MNIST (MIT)."))
    meta = front_matter(card)
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "selfflow"
    assert meta["pipeline_tag"] == "text-to-video"
    assert {"self-flow", "mmdit", "flow-matching"} <= set(meta["tags"])
    headings = [line for line in card.splitlines() if line.startswith("## ")]
    assert headings == [
        "## Model",
        "## Training recipe",
        "## Data",
        "## Evaluation",
        "## Limitations",
        "## How to sample",
    ]
    n = sum(p.numel() for p in small.parameters())
    assert f"{n:,}" in card and "hidden 192, 4 heads of 48, 2 double-stream + 1 single-stream" in card
    assert "| FID | 12.5 |" in card and "| KID | 0.106 |" in card
    assert "| OCR \\| word accuracy | 0.0 |" in card  # escaped: one cell
    assert "Fashion-MNIST (MIT)." in card
    assert "selfflow-sample-av --model my/model --prompt" in card and "--out clip.mp4" in card
    assert 'MMDiT.from_pretrained(FOLDER + "/transformer")' in card and 'FOLDER = "my/model"' in card
    assert f"the euler sampler, {tiny_cfg.sample.steps} steps" in card
    assert f"steps = {tiny_cfg.sample.steps}\n" in card
    assert "set_timesteps(sigmas=scheduler_sigmas(steps))" in card


def test_model_card_shows_the_training_recipe(tiny_cfg, small):
    cfg = config_to_dict(tiny_cfg)
    cfg["train"] |= {"max_steps": 2277, "lr": 0.001, "ema_decay": 0.995, "batch_size": 16}
    cfg["objective"]["timesteps"]["video"] = {"kind": "logit_normal", "mu": 0.0, "sigma": 1.0, "shift": 3.0}
    card = hub.render_model_card(hub.CardInfo(small.params, 1, cfg))
    assert f"| objective | {cfg['objective']['name']} (gamma default) |" in card
    assert "| steps | 2277 |" in card and "| EMA decay | 0.995 |" in card and "lr 0.001" in card
    assert "| batch size | 16 per process x 1 accumulation |" in card
    assert "| video | logit-normal(mu 0.0, sigma 1.0), shift 3.0 | 0.1 |" in card
    assert "| image | uniform | 0.25 |" in card and "| av | uniform | video 0.1, audio 0.5 |" in card
    assert "50 warm-up steps, then constant; grad clip" in card  # the tiny preset's schedule
    cases = [("linear", 0, "linear decay to 0"),
             ("cosine", 800, "constant, then cosine decay to 0 over the last 800 steps")]  # fmt: skip
    for schedule, decay, says in cases:
        cfg["train"] |= {"schedule": schedule, "decay_steps": decay}
        card = hub.render_model_card(hub.CardInfo(small.params, 1, cfg))
        assert f"50 warm-up steps, then {says}; grad clip" in card


def test_model_card_with_nothing_optional(small):
    """Empty metrics, no data or limitations text, an empty config and params as a plain dict."""
    card = hub.render_model_card(hub.CardInfo(json.loads(json.dumps(asdict(small.params))), 10, {}))
    assert front_matter(card)["license"] == "apache-2.0"
    assert "## Evaluation\n\nNone reported." in card and "| steps | n/a |" in card
    audio_only = {**asdict(small.params), "media_channels": {"audio": 8}}
    card = hub.render_model_card(hub.CardInfo(audio_only, 10, {}))
    assert front_matter(card)["pipeline_tag"] == "text-to-audio"
