"""Representation probes (linear, k-NN on pooled hidden states) and the validation velocity loss per t-bin.

Kept small for a CPU: a few hundred Fashion-MNIST images, one noise level, the tiny preset.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from selfflow.configs import load_config
from selfflow.configs.factory import build_media_tokenizer, build_model, build_text_conditioner
from selfflow.data.pipeline import DataPipeline
from selfflow.metrics import probe as P
from selfflow.training.loop import build_trainer, make_batch, train_step
from selfflow.training.validation import bin_centres, validation_loss

CHANCE = 0.1  # ten Fashion-MNIST classes


def toy_features(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Ten well-separated clusters in 16 dims: features [10 n, 16], labels [10 n]."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), n_per_class)
    centres = 5.0 * np.eye(10, 16)  # [10, 16]
    return centres[labels] + 0.3 * rng.standard_normal((len(labels), 16)), labels


def test_probes_are_perfect_on_separable_features():
    train_x, train_y = toy_features(10, seed=0)
    test_x, test_y = toy_features(5, seed=1)
    assert P.linear_probe_accuracy(train_x, train_y, test_x, test_y) == 1.0
    assert P.knn_accuracy(train_x, train_y, test_x, test_y, k=5) == 1.0
    assert P.knn_accuracy(train_x, train_y, test_x, test_y, k=5, weighted=True) == 1.0


def test_pixel_probes_learn_the_classes_but_not_shuffled_labels():
    train_img, train_y = P.fashion_mnist_split("train", 400, seed=0)
    test_img, test_y = P.fashion_mnist_split("test", 300, seed=0)
    train_x = train_img.reshape(len(train_img), -1) / 255.0  # [400, 784]
    test_x = test_img.reshape(len(test_img), -1) / 255.0  # [300, 784]
    real = P.probe_scores(train_x, train_y, test_x, test_y)
    assert real["linear"] > 0.6 and real["knn"] > 0.6, real
    rng = np.random.default_rng(0)
    shuffled = P.probe_scores(train_x, rng.permutation(train_y), test_x, rng.permutation(test_y))
    # chance is 0.1 (sd 0.017 at 300 test images): the probe cannot carry memorised labels to new images
    assert abs(shuffled["linear"] - CHANCE) < 0.07 and abs(shuffled["knn"] - CHANCE) < 0.07, shuffled


def test_probe_report_on_a_random_model_beats_chance(tiny_cfg, tiny_model):
    report = P.probe_report(tiny_model, tiny_cfg, n_train=200, n_test=100, levels=(0.0,))
    assert report["chance"] == CHANCE and report["captions"] == "null"
    assert list(report["levels"]) == [0.0]
    blocks = report["levels"][0.0]
    assert sorted(blocks) == list(range(1, tiny_model.params.depth + 1))
    for block, scores in blocks.items():  # the pixels carry the class, even through random weights
        assert scores["linear"] > 2 * CHANCE and scores["knn"] > 2 * CHANCE, (block, scores)
    assert report["pixels"]["linear"] > 0.5


def test_hidden_features_share_noise_across_batches_and_levels(tiny_cfg, tiny_model):
    media, encode_text = build_media_tokenizer(tiny_cfg), build_text_conditioner(tiny_cfg.text)
    raw, labels = P.fashion_mnist_split("test", 10, seed=0)
    images = P.decode_images(raw, tiny_cfg.spec, tiny_cfg.data.image_fit)  # [10, 3, 32, 32]
    assert images.shape == (10, 3, tiny_cfg.spec.image_height, tiny_cfg.spec.image_width)

    def feats(t: float, **kw) -> dict[int, np.ndarray]:
        return P.hidden_features(tiny_model, media, images, t, encode_text=encode_text, **kw)

    whole = feats(0.5, batch_size=10)
    assert sorted(whole) == [1, 2, 3, 4] and whole[4].shape == (10, tiny_model.params.hidden_size)
    for block, x in feats(0.5, batch_size=4).items():  # the noise does not depend on the batching
        np.testing.assert_allclose(x, whole[block], rtol=1e-5, atol=1e-6)
    assert not np.allclose(feats(0.5, seed=1)[4], whole[4])
    np.testing.assert_array_equal(feats(0.0, seed=1)[4], feats(0.0, seed=2)[4])  # clean input: no noise
    only = feats(0.5, blocks=(2,), batch_size=10)
    assert list(only) == [2]
    np.testing.assert_allclose(only[2], whole[2], rtol=1e-5, atol=1e-6)
    captions = [f"a photo of item {int(y)}" for y in labels]
    assert not np.allclose(feats(0.5, captions=captions)[4], whole[4])  # captions are an option


def test_validation_loss_of_a_zero_output_model_is_the_target_energy(tiny_cfg, fmnist_shards):
    model = build_model(tiny_cfg)  # adaLN-Zero init: the velocity head outputs exactly zero
    report = validation_loss(model, tiny_cfg, fmnist_shards, batches=1, t_bins=3, batch_size=8)
    assert report["levels"] == pytest.approx([1 / 6, 0.5, 5 / 6])
    image = report["tasks"]["image"]
    # with v = 0 the loss is E|eps - x0|^2 at every level: the same for each bin, above 1
    assert image["loss_t0"] == image["loss_t1"] == image["loss_t2"] == pytest.approx(image["loss"])
    assert image["loss"] > 1.0 and image["samples"] == 8


@pytest.fixture(scope="module")
def trained(fmnist_shards, tmp_path_factory):
    """(cfg, EMA before training, EMA after 25 vanilla steps) of the tiny preset on Fashion-MNIST."""
    run_dir = tmp_path_factory.mktemp("probe_run")
    overrides = [f"data.shards={fmnist_shards}", f"run.dir={run_dir}", "objective.name=vanilla",
                 "train.batch_size=8", "train.warmup_steps=1", "train.ema_decay=0.5"]  # fmt: skip
    cfg = load_config("tiny", overrides)
    torch.manual_seed(0)
    tr = build_trainer(cfg, "cpu")
    before = copy.deepcopy(tr.ema.model).eval()
    data = DataPipeline(fmnist_shards, cfg.spec, seed=0, batch_size=8, image_fit=cfg.data.image_fit)
    for _ in range(25):
        item = next(data)
        train_step(tr, make_batch(tr, item.media, item.captions))
    return cfg, before, tr.ema.model.eval()


def test_validation_loss_is_deterministic_and_drops_with_training(trained, fmnist_shards):
    cfg, before, after = trained
    kw = dict(batches=2, t_bins=5, seed=3, batch_size=8)
    first = validation_loss(after, cfg, fmnist_shards, **kw)
    assert validation_loss(after, cfg, fmnist_shards, **kw) == first
    assert first["levels"] == bin_centres(5) == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9])
    image = first["tasks"]["image"]
    assert {f"loss_t{i}" for i in range(5)} <= set(image) and image["samples"] == 16
    assert image["loss"] == pytest.approx(np.mean([image[f"loss_t{i}"] for i in range(5)]))
    assert first["loss"] == image["loss"]
    untrained = validation_loss(before, cfg, fmnist_shards, **kw)["tasks"]["image"]
    assert image["loss"] < untrained["loss"], (image, untrained)
    assert validation_loss(after, cfg, fmnist_shards, **{**kw, "seed": 4})["loss"] != first["loss"]
