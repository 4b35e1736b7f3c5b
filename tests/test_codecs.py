"""Codecs: tiny diffusers autoencoders (random weights, saved to a temporary directory, no download)
loaded back as frozen codecs, their latent normalisation, and their agreement with the clip spec."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from selfflow.tokenizers.codecs import DiffusersAutoencoder, IdentityCodec, build_codec, check_codec
from selfflow.tokenizers.media import MediaTokenizer
from selfflow.tokenizers.spec import ClipSpec
from selfflow.tokenizers.video import VideoPatchifier


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------- codecs
@pytest.fixture(scope="module")
def ae_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import diffusers

    root = tmp_path_factory.mktemp("autoencoders")
    torch.manual_seed(0)
    kl = diffusers.AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        scaling_factor=0.5,
        shift_factor=0.25,
    )
    kl.save_pretrained(root / "ae")
    oobleck = diffusers.AutoencoderOobleck(
        encoder_hidden_size=8,
        downsampling_ratios=[2, 4],
        channel_multiples=[1, 2],
        decoder_channels=8,
        decoder_input_channels=4,
        audio_channels=1,
        sampling_rate=16000,
    )
    oobleck.save_pretrained(root / "oobleck")
    return {"kl": root / "ae", "oobleck": root / "oobleck"}


@pytest.fixture(scope="module")
def codecs(ae_dirs: dict[str, Path]) -> dict[str, DiffusersAutoencoder]:
    return {
        "image": DiffusersAutoencoder(ae_dirs["kl"], "image"),
        "video": DiffusersAutoencoder(ae_dirs["kl"], "video"),
        "audio": DiffusersAutoencoder(ae_dirs["oobleck"], "audio"),
    }


# 0.5 s at 8 fps = 4 frames of 16x16 -> latents 4 x 8 x 8; audio 8000 samples -> 1000 latent frames
CODEC_SPEC = ClipSpec(
    duration=0.5,
    fps=8,
    height=16,
    width=16,
    image_height=16,
    image_width=16,
    image_latent_channels=4,
    video_latent_channels=4,
    audio_latent_channels=4,
    space_stride=2,
    audio_stride=8,
    image_patch=4,
    video_patch=(1, 4, 4),
    audio_patch=40,
)


def test_codec_spec_geometry() -> None:
    assert CODEC_SPEC.image_grid == (2, 2)
    assert CODEC_SPEC.video_grid == (4, 2, 2)
    assert CODEC_SPEC.audio_grid == 25
    assert CODEC_SPEC.token_dim("video") == 4 * 16
    assert CODEC_SPEC.token_dim("audio") == 4 * 40
    assert CODEC_SPEC.audio_token_ticks == 2.0  # 40 latent frames * 8 samples = 320 samples = 20 ms


def test_kl_image_codec(ae_dirs: dict[str, Path], codecs: dict[str, DiffusersAutoencoder]) -> None:
    import diffusers

    codec = codecs["image"]
    assert (codec.latent_channels, codec.space_stride, codec.time_stride) == (4, 2, 1)
    assert codec.scale == 0.5 and codec.shift == 0.25
    assert not codec.autoencoder.training
    params = list(codec.parameters())
    assert params and not any(p.requires_grad for p in params)

    x = randn(2, 3, 16, 16).clamp(-1, 1).requires_grad_(True)
    z = codec.encode(x)
    assert z.shape == (2, 4, 8, 8)
    assert not z.requires_grad
    assert torch.equal(z, codec.encode(x))  # the mode, not a sample

    raw = diffusers.AutoencoderKL.from_pretrained(str(ae_dirs["kl"])).eval()
    with torch.no_grad():
        mode = raw.encode(x).latent_dist.mode()
        torch.testing.assert_close(z, (mode - 0.25) * 0.5, rtol=0, atol=1e-6)
        assert not torch.allclose(z, mode, atol=1e-3)
        y = codec.decode(z)
        assert y.shape == x.shape
        torch.testing.assert_close(y, raw.decode(z / 0.5 + 0.25).sample, rtol=0, atol=1e-6)


def test_kl_video_codec_is_frame_wise(codecs: dict[str, DiffusersAutoencoder]) -> None:
    video, image = codecs["video"], codecs["image"]
    assert (video.latent_channels, video.space_stride, video.time_stride) == (4, 2, 1)
    x = randn(2, 3, 3, 16, 16, seed=5).clamp(-1, 1)
    z = video.encode(x)
    assert z.shape == (2, 4, 3, 8, 8)
    for t in range(3):
        torch.testing.assert_close(z[:, :, t], image.encode(x[:, :, t]), rtol=0, atol=1e-5)
    # frames are not mixed up across the batch: sample 1 frame 2 alone gives the same latent
    torch.testing.assert_close(z[1:2, :, 2], image.encode(x[1:2, :, 2]), rtol=0, atol=1e-5)
    y = video.decode(z)
    assert y.shape == x.shape
    for t in range(3):
        torch.testing.assert_close(y[:, :, t], image.decode(z[:, :, t]), rtol=0, atol=1e-5)


def test_oobleck_audio_codec(ae_dirs: dict[str, Path], codecs: dict[str, DiffusersAutoencoder]) -> None:
    import diffusers

    codec = codecs["audio"]
    assert (codec.latent_channels, codec.space_stride, codec.time_stride) == (4, 1, 8)
    assert codec.scale == 1.0 and codec.shift == 0.0
    params = list(codec.autoencoder.parameters())
    assert params and not any(p.requires_grad for p in params)
    x = randn(2, 1, 1600, seed=6)
    z = codec.encode(x)
    assert z.shape == (2, 4, 200)
    assert torch.equal(z, codec.encode(x))
    raw = diffusers.AutoencoderOobleck.from_pretrained(str(ae_dirs["oobleck"])).eval()
    with torch.no_grad():
        torch.testing.assert_close(z, raw.encode(x).latent_dist.mode(), rtol=0, atol=1e-6)
    assert codec.decode(z).shape == x.shape


def test_media_tokenizer_with_autoencoders(codecs: dict[str, DiffusersAutoencoder]) -> None:
    tok = MediaTokenizer(CODEC_SPEC, codecs=dict(codecs))
    media = {
        "image": randn(2, 3, 16, 16, seed=7).clamp(-1, 1),
        "video": randn(2, 3, 4, 16, 16, seed=8).clamp(-1, 1),
        "audio": randn(2, 1, 8000, seed=9),
    }
    tokens, ids = tok.encode(media)
    for m in media:
        assert tokens[m].shape == (2, CODEC_SPEC.tokens(m), CODEC_SPEC.token_dim(m)), m
    assert ids.shape == (sum(CODEC_SPEC.tokens(m) for m in media), 4)
    # the video tokens are the patchified latents
    latents = codecs["video"].encode(media["video"])
    assert torch.equal(tokens["video"], VideoPatchifier(CODEC_SPEC).patchify(latents))
    out = tok.decode(tokens)
    for m, x in media.items():
        assert out[m].shape == x.shape, m
        assert torch.isfinite(out[m]).all()


def test_build_codec(ae_dirs: dict[str, Path]) -> None:
    codec = build_codec(str(ae_dirs["kl"]), "video", CODEC_SPEC)
    assert isinstance(codec, DiffusersAutoencoder) and codec.modality == "video"
    audio = build_codec(str(ae_dirs["oobleck"]), "audio", CODEC_SPEC)
    assert audio.time_stride == 8
    identity = build_codec("identity", "audio", ClipSpec(audio_channels=2, audio_latent_channels=2))
    assert isinstance(identity, IdentityCodec) and identity.latent_channels == 2
    assert build_codec("identity", "image", ClipSpec()).latent_channels == 3
    with pytest.raises(ValueError, match="video codec"):
        build_codec(str(ae_dirs["kl"]), "video", ClipSpec())  # identity geometry vs a stride-2 AE


def test_mismatched_spec_is_rejected(codecs: dict[str, DiffusersAutoencoder]) -> None:
    with pytest.raises(ValueError, match="video codec"):
        check_codec(codecs["video"], "video", ClipSpec())
    with pytest.raises(ValueError, match="audio codec"):
        check_codec(codecs["audio"], "audio", ClipSpec())
    wrong_stride = ClipSpec(**{**CODEC_SPEC.__dict__, "audio_stride": 4})
    with pytest.raises(ValueError, match=r"audio codec has .*\(1, 4, 1, 8\).*\(1, 4, 1, 4\)"):
        MediaTokenizer(wrong_stride, codecs=dict(codecs))
    wrong_channels = ClipSpec(**{**CODEC_SPEC.__dict__, "video_latent_channels": 8})
    with pytest.raises(ValueError, match="video codec"):
        MediaTokenizer(wrong_channels, codecs=dict(codecs))
    # identity codecs against a spec that expects an autoencoder's geometry: refused on first use
    with pytest.raises(ValueError, match="video codec"):
        MediaTokenizer(CODEC_SPEC).encode({"video": randn(1, 3, 4, 16, 16)})
    # a mono autoencoder cannot serve a stereo spec
    stereo = ClipSpec(**{**CODEC_SPEC.__dict__, "audio_channels": 2})
    with pytest.raises(ValueError, match=r"audio codec has .*\(1, 4, 1, 8\).*\(2, 4, 1, 8\)"):
        check_codec(codecs["audio"], "audio", stereo)


def test_video_audio_tokenizer_needs_no_image_codec(codecs: dict[str, DiffusersAutoencoder]) -> None:
    tok = MediaTokenizer(CODEC_SPEC, codecs={"video": codecs["video"], "audio": codecs["audio"]})
    tokens, ids = tok.encode({"video": randn(1, 3, 4, 16, 16), "audio": randn(1, 1, 8000)})
    assert ids.shape[0] == sum(x.shape[1] for x in tokens.values())
    check_codec(IdentityCodec(3), "video", ClipSpec())  # and the matching case passes


def test_autoencoder_load_errors(ae_dirs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        DiffusersAutoencoder(tmp_path / "missing", "image")
    with pytest.raises(FileNotFoundError):
        build_codec(str(tmp_path / "missing"), "video", CODEC_SPEC)
    with pytest.raises(ValueError, match="AutoencoderKL"):
        DiffusersAutoencoder(ae_dirs["kl"], "audio")
    with pytest.raises(ValueError, match="AutoencoderOobleck"):
        DiffusersAutoencoder(ae_dirs["oobleck"], "image")
    with pytest.raises(ValueError, match="AutoencoderOobleck"):
        DiffusersAutoencoder(ae_dirs["oobleck"], "video")


def test_per_channel_latent_statistics_normalise_the_latents(tmp_path: Path) -> None:
    """A KL autoencoder whose config has latents_mean / latents_std: latents are (mode - mean) *
    scaling_factor / std per channel, and decode undoes exactly that."""
    import diffusers

    torch.manual_seed(1)
    mean, std = [0.1, -0.2, 0.3, 0.0], [0.5, 2.0, 1.0, 4.0]
    kl = diffusers.AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
        norm_num_groups=8, scaling_factor=0.5, latents_mean=mean, latents_std=std,
    )  # fmt: skip
    kl.save_pretrained(tmp_path / "ae")
    codec = DiffusersAutoencoder(tmp_path / "ae", "video")
    x = randn(2, 3, 2, 16, 16).clamp(-1, 1)  # [B, C, T, H, W]
    z = codec.encode(x)
    raw = diffusers.AutoencoderKL.from_pretrained(str(tmp_path / "ae")).eval()
    m, s = torch.tensor(mean).view(1, 4, 1, 1), torch.tensor(std).view(1, 4, 1, 1)
    with torch.no_grad():
        frame = raw.encode(x[:, :, 1]).latent_dist.mode()
        torch.testing.assert_close(z[:, :, 1], (frame - m) * 0.5 / s, rtol=0, atol=1e-5)
        torch.testing.assert_close(codec.decode(z)[:, :, 1], raw.decode(frame).sample, rtol=0, atol=1e-4)


# ---------------------------------------- a causal video VAE (Wan 2.x class)
WAN_SPEC = ClipSpec(duration=1.0, fps=9, height=32, width=32, video_latent_channels=4, space_stride=8,
                    time_stride=4, causal_time=True, video_patch=(1, 2, 2))  # fmt: skip


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random AutoencoderKLWan (8x space, 4x time, causal) saved as users have it."""
    import diffusers

    torch.manual_seed(0)
    ae = diffusers.AutoencoderKLWan(
        base_dim=16, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[False, True, True], latents_mean=[0.1, -0.1, 0.2, 0.0],
        latents_std=[0.5, 1.5, 1.0, 2.0],
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("wan") / "vae"
    ae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def wan(wan_dir: Path) -> DiffusersAutoencoder:
    return DiffusersAutoencoder(wan_dir, "video")


def test_make_shards_latents_take_every_supported_autoencoder(wan_dir: Path) -> None:
    """`make_shards --latents` reads the codecs' own table of autoencoder classes (Wan included)."""
    from selfflow.data.latents import LatentOptions

    assert LatentOptions((str(wan_dir),), WAN_SPEC).sources() == {"video": str(wan_dir)}


def test_a_causal_video_vae_compresses_time_and_keeps_the_first_frame_alone(wan) -> None:
    """9 frames -> 1 + 8 / 4 = 3 latent frames of 4 x 4; the first latent frame depends on frame 0 only;
    latents are normalised per channel; tokens, positions and the round trip follow the spec."""
    assert (wan.latent_channels, wan.space_stride, wan.time_stride, wan.causal) == (4, 8, 4, True)
    tok = MediaTokenizer(WAN_SPEC, codecs={"video": wan})
    x = randn(1, 3, 9, 32, 32).clamp(-1, 1)
    z = wan.encode(x)
    assert z.shape == (1, 4, 3, 4, 4)
    later = x.clone()
    later[:, :, 1:] = randn(1, 3, 8, 32, 32, seed=5).clamp(-1, 1)
    moved = wan.encode(later)
    assert torch.equal(z[:, :, 0], moved[:, :, 0]) and not torch.allclose(z[:, :, 1], moved[:, :, 1])
    with torch.no_grad():
        mode = wan.autoencoder.encode(x).latent_dist.mode()
    mean, std = torch.tensor([0.1, -0.1, 0.2, 0.0]), torch.tensor([0.5, 1.5, 1.0, 2.0])
    torch.testing.assert_close(z, (mode - mean.view(1, 4, 1, 1, 1)) / std.view(1, 4, 1, 1, 1))
    tokens, ids = tok.encode({"video": x})
    assert tokens["video"].shape == (1, WAN_SPEC.tokens("video"), WAN_SPEC.token_dim("video")) == (1, 12, 16)
    ticks = sorted({round(float(v), 3) for v in ids[:, 0]})
    assert ticks == [0.0, round(100 / 9, 3), round(500 / 9, 3)]  # latent frames start at frames 0, 1, 5
    assert tok.decode(tokens)["video"].shape == x.shape


def test_a_causal_codec_needs_a_causal_spec(wan) -> None:
    flat = ClipSpec(**{**WAN_SPEC.__dict__, "causal_time": False, "fps": 8})
    with pytest.raises(ValueError, match="set spec.causal_time=true"):
        check_codec(wan, "video", flat)
    with pytest.raises(ValueError, match="video frames after the first"):
        ClipSpec(**{**WAN_SPEC.__dict__, "fps": 8})  # 8 frames: 1 + 7 / 4 does not divide


# ---------------------------------------- more autoencoder families, lazy weights, stamps
FLUX2_SPEC = ClipSpec(image_height=32, image_width=32, image_latent_channels=16, space_stride=4,
                      image_patch=2, height=32, width=32, video_latent_channels=16)  # fmt: skip


def test_flux2_autoencoder_patchifies_and_normalises_as_its_pipeline_does(tmp_path: Path) -> None:
    """FLUX.2's autoencoder: 2x2 latent patches become channels (16x space, 4 x 4 channels), normalised
    by its batch norm's running statistics; checked against Flux2Pipeline's own helpers."""
    import diffusers
    from diffusers import Flux2Pipeline

    torch.manual_seed(2)
    ae = diffusers.AutoencoderKLFlux2(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=8,
    )  # fmt: skip
    ae.bn.running_mean.copy_(torch.linspace(-0.5, 0.5, 16))
    ae.bn.running_var.copy_(torch.linspace(0.5, 2.0, 16))
    ae.save_pretrained(tmp_path / "flux2")
    codec = build_codec(str(tmp_path / "flux2"), "image", FLUX2_SPEC)
    assert (codec.latent_channels, codec.space_stride, codec.causal) == (16, 4, False)
    x = randn(2, 3, 32, 32, seed=3).clamp(-1, 1)
    z = codec.encode(x)
    assert z.shape == (2, 16, 8, 8)
    raw = diffusers.AutoencoderKLFlux2.from_pretrained(str(tmp_path / "flux2")).eval()
    mean = raw.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(raw.bn.running_var.view(1, -1, 1, 1) + raw.config.batch_norm_eps)
    with torch.no_grad():
        want = (Flux2Pipeline._patchify_latents(raw.encode(x).latent_dist.mode()) - mean) / std
        torch.testing.assert_close(z, want, rtol=0, atol=1e-5)
        pixels = raw.decode(Flux2Pipeline._unpatchify_latents(z * std + mean)).sample
        torch.testing.assert_close(codec.decode(z), pixels, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="AutoencoderKLFlux2"):
        DiffusersAutoencoder(tmp_path / "flux2", "video")


def test_longcat_audio_vae_is_a_second_audio_family(tmp_path: Path) -> None:
    """LongCat-AudioDiT's waveform VAE: stride = product of its strides, latents = posterior mean / scale."""
    import diffusers

    torch.manual_seed(4)
    ae = diffusers.LongCatAudioDiTVae(channels=8, c_mults=[1, 2], strides=[2, 4], latent_dim=4,
                                      encoder_latent_dim=8, sample_rate=16000, scale=0.5)  # fmt: skip
    ae.save_pretrained(tmp_path / "longcat")
    codec = build_codec(str(tmp_path / "longcat"), "audio", CODEC_SPEC)  # 4 channels, stride 8
    assert (codec.latent_channels, codec.time_stride) == (4, 8)
    x = randn(2, 1, 8000, seed=7) * 0.3
    z = codec.encode(x)
    assert z.shape == (2, 4, 1000) and torch.equal(z, codec.encode(x))  # the mean, not a sample
    raw = diffusers.LongCatAudioDiTVae.from_pretrained(str(tmp_path / "longcat")).eval()
    with torch.no_grad():
        torch.testing.assert_close(z, raw.encode(x, sample_posterior=False).latents, rtol=0, atol=1e-6)
        torch.testing.assert_close(codec.decode(z), raw.decode(z).sample, rtol=0, atol=1e-6)
    tok = MediaTokenizer(CODEC_SPEC, codecs={"audio": codec})
    tokens, _ = tok.encode({"audio": x})
    assert tokens["audio"].shape == (2, CODEC_SPEC.tokens("audio"), 4 * 40)


def test_the_geometry_needs_only_the_config_and_weights_load_on_first_use(ae_dirs, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(ae_dirs["kl"], tmp_path / "kl")
    (tmp_path / "config-only").mkdir()
    shutil.copy(ae_dirs["kl"] / "config.json", tmp_path / "config-only")
    lazy = build_codec(str(tmp_path / "config-only"), "image", CODEC_SPEC)
    assert (lazy.latent_channels, lazy.space_stride) == (4, 2) and not list(lazy.parameters())
    with pytest.raises(FileNotFoundError, match="config.json but no weights"):
        lazy.decode(randn(1, 4, 8, 8))
    full = build_codec(str(tmp_path / "kl"), "image", CODEC_SPEC)
    assert not list(full.parameters())  # nothing loaded until it is used
    full.encode(randn(1, 3, 16, 16))
    assert list(full.parameters())

    from selfflow.tokenizers.codecs import codec_stamp

    stamp = codec_stamp(ae_dirs["kl"])
    assert stamp == codec_stamp(tmp_path / "kl")  # a copy elsewhere is the same codec
    assert stamp["class"] == "AutoencoderKL" and stamp["weights"]
    assert codec_stamp(tmp_path / "config-only") == {**stamp, "weights": None}
    with torch.no_grad():
        full.autoencoder.decoder.conv_out.bias.add_(1.0)
    full.autoencoder.save_pretrained(tmp_path / "kl")  # other weights, same config
    changed = codec_stamp(tmp_path / "kl")
    assert changed["config"] == stamp["config"] and changed["weights"] != stamp["weights"]


def test_make_shards_latents_can_name_the_modality_of_each_folder(ae_dirs, wan_dir) -> None:
    """Two KL folders (one for images, one for video frames) need `image=DIR` / `video=DIR`."""
    from selfflow.data.latents import LatentOptions

    kl, oobleck = str(ae_dirs["kl"]), str(ae_dirs["oobleck"])
    named = LatentOptions((f"image={kl}", f"video={kl}", oobleck), CODEC_SPEC).sources()
    assert named == {"image": kl, "video": kl, "audio": oobleck}
    assert LatentOptions((kl, str(wan_dir)), WAN_SPEC).sources() == {"image": kl, "video": str(wan_dir)}
    with pytest.raises(ValueError, match="two autoencoders for image"):
        LatentOptions((kl, kl + "/"), CODEC_SPEC).sources()  # two folders of one class
    with pytest.raises(ValueError, match="cannot code audio"):
        LatentOptions((f"audio={kl}",), CODEC_SPEC).sources()
