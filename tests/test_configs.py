"""Typed configs, YAML presets, dotted overrides, the saved resolved config, and tools/model_info.py."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from selfflow.configs import ConfigError, load_config, save_config
from selfflow.configs.factory import build_model
from selfflow.configs.schema import PRESET_DIR
from selfflow.training.flops import report, training_flops
from selfflow.training.objectives import alignment_layers

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def n_params(cfg) -> int:
    return sum(p.numel() for p in build_model(cfg, "meta").parameters())


def test_presets_exist_and_have_their_sizes():
    assert {"tiny", "small", "base", "4b"} <= set(PRESETS)
    sizes = {name: n_params(load_config(name)) for name in ("tiny", "small", "base", "4b")}
    assert 1e6 <= sizes["tiny"] <= 1e7
    assert 20e6 <= sizes["small"] <= 50e6
    assert 0.8e9 <= sizes["base"] <= 1.5e9
    assert 3.8e9 <= sizes["4b"] <= 4.2e9


def test_4b_architecture_is_the_documented_one():
    m = load_config("4b").model
    assert (m.hidden_size, m.num_heads, m.depth_double, m.depth_single, m.mlp_ratio) == (3072, 24, 5, 20, 3.0)


def test_overrides_apply_with_types():
    cfg = load_config("tiny", ["model.hidden_size=256", "spec.fps=4", "spec.video_patch=[2,8,8]", "seed=7"])
    assert cfg.model.hidden_size == 256 and cfg.spec.fps == 4.0 and cfg.seed == 7
    assert cfg.spec.video_patch == (2, 8, 8) and cfg.spec.tokens("video") == 2 * 4 * 4
    assert load_config(PRESET_DIR / "tiny.yaml") == load_config("tiny")


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.hiden_size=3", "unknown config key 'model.hiden_size'"),
        ("nope=1", "unknown config key 'nope'"),
        ("model.hidden_size=big", "bad value for 'model.hidden_size'"),
        ("spec.video_patch=[1,8]", "bad value for 'spec.video_patch'"),
        ("model.hidden_size", "not of the form key=value"),
        ("spec.fps=7.5", "duration \\* fps"),
        ("text.tokenizer=wordpiece", "text.tokenizer"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config("tiny", [override])
    assert "\n" not in str(info.value)


def test_unknown_key_in_a_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_size: 64\n  depth_dobule: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'model.depth_dobule'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="presets: .*tiny"):
        load_config("tinyy")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config("small", ["model.grad_checkpointing=true", "text.max_len=32"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert path.is_file() and not list(path.parent.glob(".*tmp"))
    assert load_config(path) == cfg


def test_alignment_layers_follow_the_paper():
    assert alignment_layers(28) == (8, 20)  # SiT-XL/2: student block 8, teacher block 20
    assert alignment_layers(12) == (4, 8)
    assert alignment_layers(4) == (1, 3)


def test_training_flops_are_consistent():
    cfg = load_config("tiny")
    model = build_model(cfg, "meta").eval()
    f = training_flops(model, cfg, ("video", "audio"))
    assert 2.8 < f["student_fwd_bwd"] / f["student_fwd"] < 3.3  # backward ~ 2x forward
    _, k = alignment_layers(model.params.depth)
    assert f["teacher_fwd"] < f["student_fwd"] and f["total"] == f["student_fwd_bwd"] + f["teacher_fwd"]
    # 2 * params * tokens lower-bounds the dense part of a forward
    n_tokens = cfg.spec.tokens("video") + cfg.spec.tokens("audio")
    block_params = sum(p.numel() for b in model.single_blocks for p in b.parameters())
    assert f["student_fwd"] > 2 * block_params * (n_tokens + cfg.text.max_len)
    assert "params: " in report(cfg)


def test_model_info_cli():
    run = subprocess.run(
        [sys.executable, "tools/model_info.py", "configs/tiny.yaml"], cwd=ROOT, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    (line,) = [x for x in run.stdout.splitlines() if x.startswith("params:")]
    assert re.fullmatch(r"params: \d+", line) and int(line.split()[1]) == n_params(load_config("tiny"))
    assert "tokens per modality" in run.stdout and "teacher fwd" in run.stdout
    bad = subprocess.run(
        [sys.executable, "tools/model_info.py", "tiny", "model.nope=1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "unknown config key 'model.nope'" in bad.stderr


def test_smoke_forward_demo_runs():
    run = subprocess.run(
        [sys.executable, "tools/smoke_forward.py", "--config", "tiny"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert (
        "velocity -> video (1, 3, 8, 32, 32)" in run.stdout
        and "velocity -> audio (1, 1, 16000)" in run.stdout
    )


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_lr_schedules_warm_up_then_decay_as_named(schedule):
    from selfflow.training.loop import lr_factor

    t = load_config(
        "tiny", ["train.warmup_steps=4", "train.max_steps=104", f"train.schedule={schedule}"]
    ).train
    factors = [lr_factor(t, s) for s in range(104)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    middle, last = factors[54], factors[103]  # half-way through the decay, and the last step
    expected = {"constant": (1.0, 1.0), "cosine": (0.5, 0.5 * (1 + math.cos(math.pi * 0.99))),
                "linear": (0.5, 0.01)}[schedule]  # fmt: skip
    assert middle == pytest.approx(expected[0]) and last == pytest.approx(expected[1])
    with pytest.raises(ConfigError, match="train.schedule 'step' is not one of"):
        load_config("tiny", ["train.schedule=step"])


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decay_steps_hold_the_lr_then_decay_over_the_last_steps(schedule):
    from selfflow.training.loop import lr_factor

    over = ["train.warmup_steps=4", "train.max_steps=104", f"train.schedule={schedule}"]
    t = load_config("tiny", [*over, "train.decay_steps=50"]).train
    factors = [lr_factor(t, s) for s in range(104)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0] and set(factors[4:55]) == {1.0}
    assert factors[79] == pytest.approx(0.5) and 0 < factors[103] < factors[102] < factors[55] < 1.0
    # decaying over every step after the warm-up is the plain schedule
    whole = load_config("tiny", [*over, "train.decay_steps=100"]).train
    plain = load_config("tiny", over).train
    assert [lr_factor(whole, s) for s in range(104)] == [lr_factor(plain, s) for s in range(104)]
    with pytest.raises(ConfigError, match="train.decay_steps=101 must be in"):
        load_config("tiny", [*over, "train.decay_steps=101"])


def test_a_resumed_scheduler_follows_the_new_config_schedule():
    """Cooling down a constant-lr run: its scheduler state, loaded under a decay schedule, takes the
    new schedule at the saved step (torch's LambdaLR keeps no copy of the old one)."""
    from functools import partial

    import torch

    from selfflow.training.loop import lr_factor

    over = ["train.max_steps=100", "train.lr=0.1"]
    old, new = (load_config("tiny", [*over, *x]).train for x in ([], ["train.schedule=linear",
                                                                     "train.decay_steps=40"]))  # fmt: skip
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    first = torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_factor, old))
    for _ in range(80):
        opt.step()
        first.step()
    state = first.state_dict()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    second = torch.optim.lr_scheduler.LambdaLR(opt2, partial(lr_factor, new))
    second.load_state_dict(state)
    second.step()
    assert second.get_last_lr()[0] == pytest.approx(0.1 * lr_factor(new, 81))
    assert lr_factor(new, 81) == pytest.approx(1 - 21 / 40)


@pytest.mark.parametrize("name", ["base", "4b"])
def test_large_presets_describe_latent_runs_with_the_codecs_people_have(name, tmp_path):
    """base / 4b: codec latents of a 16-channel 8x KL image autoencoder, diffusers' default Wan 2.1 VAE
    and the default (Stable Audio) Oobleck, whose config.json alone is checked against the spec here; a
    frozen text encoder; logit-normal p(t) per task with the paper's shifts."""
    import diffusers
    import torch

    from selfflow.tokenizers.codecs import build_codec

    cfg = load_config(name)
    kl = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16)  # fmt: skip
    builders = {"image": lambda: diffusers.AutoencoderKL(**kl), "video": diffusers.AutoencoderKLWan,
                "audio": diffusers.AutoencoderOobleck}  # fmt: skip
    for modality, make in builders.items():
        assert getattr(cfg.codecs, modality) != "identity"
        with torch.device("meta"):
            make().save_config(tmp_path / modality)  # config.json only, as a user's folder has it
        codec = build_codec(str(tmp_path / modality), modality, cfg.spec)  # raises on any mismatch
        assert not list(codec.parameters())
    assert cfg.text.tokenizer == "encoder" and cfg.text.dim == 4096
    shifts = {task: (d.kind, d.shift) for task, d in cfg.objective.timesteps.items()}
    assert shifts == {"image": ("logit_normal", 4.63), "video": ("logit_normal", 2.95),
                      "audio": ("logit_normal", 1.0), "av": ("logit_normal", 2.95)}  # fmt: skip
    assert cfg.spec.num_frames in (45, 81) and cfg.spec.sample_rate == 44_100
    if name == "base":  # the paper's T2V clip: 45 frames at 192p, ~3k tokens
        assert [cfg.spec.tokens(m) for m in ("image", "video", "audio")] == [256, 3024, 60]


def test_model_info_sizes_a_realistic_sample():
    run = subprocess.run(
        [sys.executable, "tools/model_info.py", "base"], cwd=ROOT, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    real = run.stdout.split("a realistic sample: ")[1]
    assert real.startswith("5.02 s of 480x848 video at 16.15 fps with 44.1 kHz audio; a 1024 px image")
    tokens = dict(re.findall(r"^\s+(image|video|audio)\s+(\d+) tokens", real, re.M))
    assert tokens == {"image": "4096", "video": "33390", "audio": "108"}  # 64 x 64; 21 x 30 x 53; 108
    assert re.search(r"^\s+av\s+33626\s+", real, re.M)  # + 128 text tokens
