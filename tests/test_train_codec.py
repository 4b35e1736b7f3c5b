"""tools/train_codec.py: small autoencoders of the diffusers classes the codecs load, trained on shards;
exact resume; the published folder loads as a codec; the reconstruction report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from selfflow.configs import load_config
from selfflow.tokenizers.codecs import build_codec
from selfflow.tokenizers.spec import ClipSpec
from selfflow.tools import train_codec as cli
from selfflow.training.codec_trainer import CodecRecipe, psnr, si_snr, stft_loss, train_codec


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "diffusion_pytorch_model.safetensors")


def test_an_image_codec_trains_resumes_exactly_and_loads_as_a_codec(shards, tmp_path: Path) -> None:
    spec = load_config("tiny").spec  # 32 x 32 images
    recipe = CodecRecipe("image", "kl", width=8, latent_channels=4, down=(2,), steps=4, batch=4, ckpt_every=2)
    straight = train_codec(recipe, str(shards), tmp_path / "a", spec, eval_n=4, progress=False)
    half = CodecRecipe(**{**recipe.__dict__, "steps": 2})
    train_codec(half, str(shards), tmp_path / "b", spec, eval_n=4, progress=False)
    resumed = train_codec(recipe, str(shards), tmp_path / "b", spec, eval_n=4, progress=False)  # continues
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight["steps"] == resumed["steps"] == 4 and straight["psnr_db"] == resumed["psnr_db"]
    assert straight["latents"]["shape"] == [4, 16, 16] and straight["eval_samples"] == 4
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL" and len(config["latents_mean"]) == 4
    codec_spec = ClipSpec(
        **{**spec.__dict__, "image_latent_channels": 4, "space_stride": 2, "image_patch": 2}
    )
    codec = build_codec(str(tmp_path / "a"), "image", codec_spec)
    z = codec.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert z.shape == (2, 4, 16, 16) and codec.decode(z).shape == (2, 3, 32, 32)
    assert json.loads((tmp_path / "a" / "report.json").read_text())["psnr_db"] == straight["psnr_db"]


def test_a_causal_video_codec_and_an_audio_codec_train_on_av_shards(mixed_shards, tmp_path: Path) -> None:
    spec = ClipSpec(duration=1.0, fps=9, height=32, width=32, sample_rate=16000)  # 9 = 1 + 4 x 2 frames
    video = CodecRecipe(
        "video", "wan", width=8, latent_channels=4, down=(2, 2), time_down=2, steps=2, batch=2
    )
    report = train_codec(video, str(mixed_shards), tmp_path / "v", spec, eval_n=2, progress=False)
    assert report["latents"] == {"channels": 4, "space_stride": 4, "time_stride": 4, "shape": [4, 3, 8, 8]}
    assert report["psnr_db"] > 0
    geometry = dict(
        video_latent_channels=4, space_stride=4, time_stride=4, causal_time=True, video_patch=(1, 2, 2)
    )
    codec = build_codec(str(tmp_path / "v"), "video", ClipSpec(**{**spec.__dict__, **geometry}))
    assert codec.causal and codec.encode(torch.zeros(1, 3, 9, 32, 32)).shape == (1, 4, 3, 8, 8)

    audio = CodecRecipe("audio", "oobleck", width=8, latent_channels=4, down=(2, 4), steps=2, batch=2)
    report = train_codec(audio, str(mixed_shards), tmp_path / "a", spec, eval_n=4, progress=False)
    assert report["latents"]["shape"] == [4, 2000] and report["onsets"] > 0  # the clicks of the av clips
    assert 0.0 <= report["onsets_preserved"] <= 1.0 and "si_snr_db" in report
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderOobleck" and len(config["latents_std"]) == 4


def test_the_losses_and_scores_measure_what_they_name() -> None:
    x = torch.randn(2, 1, 4000)
    assert stft_loss(x, x).item() < 1e-5 < stft_loss(x * 0.5, x).item()
    assert si_snr(3 * x, x).min().item() > 80  # scale-invariant
    assert si_snr(x + torch.randn_like(x), x).max().item() < 5
    img = torch.rand(2, 3, 8, 8) * 2 - 1
    assert psnr(img, img).min().item() > 90 and abs(psnr(img * 0, img + 0.1 - img).mean().item() - 26.0) < 0.1


def test_the_command_line_refuses_bad_recipes_in_one_line(shards, tmp_path: Path, capsys) -> None:
    for args, words in (
        (["--modality", "audio", "--arch", "kl"], "cannot code audio"),
        (["--modality", "image", "--down", "3"], "2x stages"),
        (["--modality", "video", "--arch", "wan"], "not 1 + a multiple of 4"),  # tiny: 8 frames
    ):
        code = cli.main([*args, "--shards", str(shards), "--out", str(tmp_path / "o"), "--preset", "tiny"])
        err = capsys.readouterr().err
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("modality", ["video"])
def test_no_video_media_is_a_clear_error(shards, tmp_path: Path, modality: str) -> None:
    recipe = CodecRecipe(modality, "kl", width=8, down=(2,), steps=1, batch=2)
    with pytest.raises(FileNotFoundError, match="no shards with video media"):
        train_codec(recipe, str(shards), tmp_path / "o", load_config("tiny").spec, progress=False)
