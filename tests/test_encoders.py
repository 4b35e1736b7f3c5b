"""The frozen REPA encoder: tiny random DINOv2 backbones saved to a temporary directory (no download),
loaded back through `build_encoder`; token-grid shapes, token order, freezing, and the repa objective."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers
from conftest import randomize

from selfflow.configs.factory import build_model
from selfflow.tokenizers.image import ImagePatchifier
from selfflow.tokenizers.media import MediaTokenizer
from selfflow.tokenizers.spec import ClipSpec
from selfflow.training.encoders import VisionEncoder, build_encoder, resample_grid
from selfflow.training.objectives import OBJECTIVES, Batch, Models, make_head

TINY = {"hidden_size": 32, "num_attention_heads": 2, "mlp_ratio": 2, "image_size": 28, "patch_size": 14}
# temporal patch 2 and one spatial token per 8 x 8 pixels, for images and video frames alike
PAIRED = ClipSpec(
    duration=1.0,
    fps=8,
    height=32,
    width=32,
    image_height=32,
    image_width=32,
    image_patch=8,
    video_patch=(2, 8, 8),
)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 2-block DINOv2 (with dropout, so train mode would show), and 0-block ones (patch embedding +
    position table + norm: each feature depends on its own patch only), without and with registers."""
    root = tmp_path_factory.mktemp("encoders")
    configs = {
        "dinov2": transformers.Dinov2Config(num_hidden_layers=2, hidden_dropout_prob=0.3, **TINY),
        "local": transformers.Dinov2Config(num_hidden_layers=0, **TINY),
        "local_registers": transformers.Dinov2WithRegistersConfig(num_hidden_layers=0, **TINY),
    }
    for name, config in configs.items():
        torch.manual_seed(0)
        transformers.AutoModel.from_config(config).save_pretrained(root / name)
    return {name: root / name for name in configs}


@pytest.fixture(scope="module")
def encoder(model_dirs: dict[str, Path], tiny_cfg) -> VisionEncoder:
    return build_encoder(model_dirs["dinov2"], MediaTokenizer(tiny_cfg.spec))


# ---------------------------------------- resample_grid
def ramp(h: int, w: int, a: float, b: float) -> torch.Tensor:
    """[1, h, w, 1] holding a * y + b * x at the cell centres of a unit square."""
    y = (torch.arange(h) + 0.5) / h
    x = (torch.arange(w) + 0.5) / w
    return (a * y[:, None] + b * x[None, :])[None, :, :, None]


def test_resample_grid_keeps_constants_and_the_identity():
    const = torch.full((2, 6, 4, 3), 0.7)
    for size in ((3, 2), (12, 8), (3, 8), (6, 4)):
        torch.testing.assert_close(resample_grid(const, size), torch.full((2, *size, 3), 0.7))
    x = randn(2, 5, 7, 3)
    assert torch.equal(resample_grid(x, (5, 7)), x)


@pytest.mark.parametrize("src, dst", [((8, 8), (4, 2)), ((8, 4), (2, 4)), ((6, 9), (3, 3))])
def test_resample_grid_shrinking_keeps_a_linear_ramp_exactly(src, dst):
    torch.testing.assert_close(resample_grid(ramp(*src, 2.0, -3.0), dst), ramp(*dst, 2.0, -3.0))


def test_resample_grid_growing_keeps_a_linear_ramp_between_edge_cells():
    out, want = resample_grid(ramp(2, 4, 2.0, -3.0), (8, 16)), ramp(8, 16, 2.0, -3.0)
    # output centres between the first and last input centres: rows 2..5, columns 2..13
    torch.testing.assert_close(out[:, 2:6, 2:14], want[:, 2:6, 2:14])
    torch.testing.assert_close(out[:, :2, :2], ramp(2, 4, 2.0, -3.0)[:, :1, :1].expand(1, 2, 2, 1))


def test_resample_grid_keeps_left_right_and_top_bottom():
    """A map larger on the left (and, separately, at the top) stays so: no flip, no transpose."""
    left = torch.zeros(1, 4, 4, 2)
    left[:, :, :2, 0] = 1.0  # channel 0: left half
    left[:, :2, :, 1] = 1.0  # channel 1: top half
    for size in ((2, 2), (8, 8), (2, 8)):
        out = resample_grid(left, size)
        h, w = size
        assert (out[:, :, : w // 2, 0] > out[:, :, w // 2 :, 0]).all()
        assert (out[:, : h // 2, :, 1] > out[:, h // 2 :, :, 1]).all()


def test_resample_grid_rejects_bad_input():
    with pytest.raises(ValueError, match="features"):
        resample_grid(torch.zeros(4, 4, 3), (2, 2))
    with pytest.raises(ValueError, match="positive"):
        resample_grid(torch.zeros(1, 4, 4, 3), (0, 2))


# ---------------------------------------- the encoder
def test_joint_image_video_features_have_one_vector_per_token(encoder, tiny_cfg):
    spec = tiny_cfg.spec
    media = {m: randn(2, spec.tokens(m), spec.token_dim(m), seed=i) for i, m in enumerate(("image", "video"))}
    out = encoder(media)
    assert encoder.feature_dim == 32 and encoder.resolution == (28, 28)
    assert out.shape == (2, spec.tokens("image") + spec.tokens("video"), 32)
    assert torch.isfinite(out).all()
    # packed in dict order: the image part is what the image tokens alone give
    torch.testing.assert_close(out[:, : spec.tokens("image")], encoder({"image": media["image"]}))
    torch.testing.assert_close(encoder(media), out, rtol=0, atol=0)  # deterministic (dropout is off)


def test_encoder_is_frozen_and_stays_out_of_checkpoints(encoder):
    assert not any(p.requires_grad for p in encoder.parameters())
    holder = torch.nn.Module()
    holder.head, holder.encoder = torch.nn.Linear(3, 3), encoder
    holder.train()
    assert not encoder.training and not encoder.backbone.training
    state = holder.state_dict()
    assert sorted(state) == ["head.bias", "head.weight"]
    before = {k: v.clone() for k, v in encoder.backbone.state_dict().items()}
    foreign = {**state, "encoder.backbone.layernorm.weight": torch.zeros(32)}
    holder.load_state_dict(foreign)  # strict: the encoder neither needs nor takes checkpoint weights
    assert all(torch.equal(v, encoder.backbone.state_dict()[k]) for k, v in before.items())


def test_audio_tokens_are_refused(encoder, tiny_cfg):
    spec = tiny_cfg.spec
    audio = randn(1, spec.tokens("audio"), spec.token_dim("audio"))
    with pytest.raises(ValueError, match="no features for audio"):
        encoder({"video": randn(1, spec.tokens("video"), spec.token_dim("video")), "audio": audio})


def test_build_encoder_errors_name_the_directory(tmp_path, tiny_cfg):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_encoder(tmp_path / "missing", MediaTokenizer(tiny_cfg.spec))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        build_encoder(tmp_path, MediaTokenizer(tiny_cfg.spec))


@pytest.mark.parametrize("name", ["local", "local_registers"])
def test_each_token_gets_the_features_of_its_own_image_position(model_dirs, name):
    """A per-patch backbone whose patches are exactly the image tokens (14 px, 112 px images, no resize):
    changing the pixels under token (row, col) changes that token's feature and no other, so rows,
    columns and the CLS/register offset all line up with the patchifier's token order."""
    tokenizer = MediaTokenizer(ClipSpec(image_height=112, image_width=112, image_patch=14))  # 8 x 8 tokens
    enc = build_encoder(model_dirs[name], tokenizer, resolution=112)
    assert enc.num_prefix_tokens == (5 if name == "local_registers" else 1)
    image = randn(1, 3, 112, 112).clamp(-1, 1)
    base = enc(tokenizer.encode({"image": image})[0])  # [1, 64, F]
    for row, col in ((1, 6), (6, 1), (0, 0), (7, 3)):
        changed = image.clone()
        patch = randn(1, 3, 14, 14, seed=1).clamp(-1, 1)
        changed[:, :, 14 * row : 14 * row + 14, 14 * col : 14 * col + 14] = patch
        moved = (enc(tokenizer.encode({"image": changed})[0]) - base).norm(dim=-1)[0]  # [64]
        assert moved.nonzero().flatten().tolist() == [row * 8 + col]


def test_video_features_average_the_frames_of_each_time_patch(model_dirs):
    """Video token (t, h, w) = mean over the time patch's frames of that frame's image feature (h, w)."""
    tokenizer = MediaTokenizer(PAIRED)
    enc = build_encoder(model_dirs["dinov2"], tokenizer)
    video = randn(2, 3, 8, 32, 32).clamp(-1, 1)  # [B, C, T, H, W]
    out = enc(tokenizer.encode({"video": video})[0])  # [B, 4 * 4 * 4, F]
    patchify = ImagePatchifier(PAIRED).patchify
    frames = torch.stack([enc({"image": patchify(video[:, :, f])}) for f in range(8)], 1)  # [B, 8, 16, F]
    want = frames.view(2, 4, 2, 16, 32).mean(2).flatten(1, 2)  # [B, 64, F]
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


# ---------------------------------------- the repa objective
def test_repa_objective_trains_student_and_head_but_not_the_encoder(encoder, tiny_cfg):
    spec, tokenizer = tiny_cfg.spec, MediaTokenizer(tiny_cfg.spec)
    student = randomize(build_model(tiny_cfg)).train()
    head = make_head("repa", student.params.hidden_size, encoder.feature_dim)
    models = Models(student, head, None, encoder)
    media = {"image": randn(2, spec.tokens("image"), spec.token_dim("image"))}
    txt = torch.randint(3, 259, (2, tiny_cfg.text.max_len), generator=torch.Generator().manual_seed(0))
    batch = Batch(media, tokenizer.position_ids(["image"]), txt, None, "image")
    cfg = replace(tiny_cfg.objective, name="repa")
    out = OBJECTIVES["repa"](models, batch, torch.Generator().manual_seed(0), cfg)
    assert out.loss.shape == (2,) and torch.isfinite(out.loss).all()
    assert torch.isfinite(out.metrics["rep_cos"]) and out.metrics["loss_rep"] > 0
    out.loss.mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())
    assert all(p.grad is None for p in encoder.parameters())
