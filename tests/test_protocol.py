"""Evaluation follows the paper's protocol unless told otherwise, and the guidance interval reaches the
sampling commands, the evaluation tools and the config."""

from __future__ import annotations

import argparse
import json

import pytest

from selfflow.configs.schema import ConfigError, load_config
from selfflow.inference import sample_av
from selfflow.inference.cli import guidance_interval
from selfflow.metrics.protocol import PAPER, Protocol, protocol_of
from selfflow.tools import benchmark, evaluate


def test_evaluation_defaults_are_the_papers_protocol():
    args = evaluate.parse_args(["--out", "x.json"])
    protocol = protocol_of(args)
    assert protocol == PAPER
    assert (protocol.sampler, protocol.steps, protocol.cfg_scale) == ("euler", 50, 1.0)
    record = protocol.resolve(model_shift=6.93).record()
    assert record == {"protocol": "paper", "sampler": "euler", "steps": 50, "cfg_scale": 1.0,
                      "guidance_interval": [0.0, 1.0], "shift": 6.93}  # fmt: skip
    bench = benchmark.parse_args(["--preset", "tiny", "--steps", "4", "--out", "o"])
    assert (bench.sample_steps, bench.cfg, bench.guidance_interval) == (50, 1.0, (0.0, 1.0))


def test_a_changed_setting_is_recorded_as_custom():
    args = evaluate.parse_args(["--out", "x.json", "--cfg", "3", "--guidance-interval", "0,0.7"])
    record = protocol_of(args).resolve(model_shift=1.0).record()
    assert record["protocol"] == "custom" and record["guidance_interval"] == [0.0, 0.7]
    assert Protocol(shift=2.0).resolve(model_shift=5.0).shift == 2.0  # an explicit shift wins
    assert Protocol(shift=2.0).resolve(model_shift=5.0).record()["protocol"] == "custom"
    assert Protocol(shift=5.0).resolve(model_shift=5.0).record()["protocol"] == "paper"
    assert json.loads(json.dumps(record)) == record  # a report read back compares equal (benchmark reruns)


@pytest.mark.parametrize("text", ["0.7", "a,b", "0.8,0.2", "-0.1,0.5", "0,1.5"])
def test_bad_guidance_intervals_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        guidance_interval(text)


def test_the_config_takes_a_guidance_interval_and_refuses_a_bad_one():
    assert load_config("tiny", ["sample.guidance_interval=[0.1,0.7]"]).sample.guidance_interval == (0.1, 0.7)
    with pytest.raises(ConfigError, match="guidance_interval"):
        load_config("tiny", ["sample.guidance_interval=[0.8,0.7]"])


def test_the_guidance_interval_reaches_the_sampler_and_the_sidecar(av_ckpt, tmp_path, monkeypatch):
    """What --cfg / --guidance-interval / --shift say is what Generator.generate gets (samplers.cfg applies
    the interval: tests/test_samplers.py) and what the sidecar records."""
    from selfflow.inference.pipeline import Generator

    seen = []
    real = Generator.generate

    def spy(self, *args, **kw):
        seen.append(args)
        return real(self, *args, **kw)

    monkeypatch.setattr(Generator, "generate", spy)
    out = tmp_path / "clip.mp4"
    argv = ["--ckpt", str(av_ckpt), "--prompt", "a square appears", "--steps", "2", "--cfg", "4",
            "--guidance-interval", "0.5,1", "--shift", "3", "--out", str(out)]  # fmt: skip
    assert sample_av.main(argv) == 0
    ((_, _, _, steps, sampler, cfg_scale, shift, interval),) = seen
    assert (steps, sampler, cfg_scale, shift, interval) == (2, "euler", 4.0, 3.0, (0.5, 1.0))
    meta = json.loads(out.with_suffix(".json").read_text())
    assert (meta["cfg"], meta["guidance_interval"], meta["shift"]) == (4.0, [0.5, 1.0], 3.0)
