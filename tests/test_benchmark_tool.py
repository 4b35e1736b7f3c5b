"""The convergence benchmark (tools/benchmark.py): the offline Inception REPA target, the random-CNN
feature space, the steps-to-reach and seed statistics, bad input, and one tiny end-to-end run of all
five objectives (slow)."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from conftest import flac
from PIL import Image

from selfflow.configs import load_config
from selfflow.configs.schema import OBJECTIVES
from selfflow.data.shards import ShardWriter
from selfflow.metrics.fid import kid
from selfflow.metrics.probe import decode_images, fashion_mnist_split
from selfflow.metrics.random_cnn import FEATURE_DIM, random_cnn_features
from selfflow.tokenizers.media import MediaTokenizer
from selfflow.tools import benchmark, benchmark_run
from selfflow.tools.benchmark_report import aggregate, final_values, markdown, steps_to_reach
from selfflow.training.encoders import InceptionEncoder, build_encoder, inception_grid
from selfflow.training.loop import build_trainer, make_batch, train_step


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def inception(tiny_cfg) -> InceptionEncoder:
    return build_encoder("inception", MediaTokenizer(tiny_cfg.spec))


# ---------------------------------------- the Inception REPA encoder
def test_inception_encoder_gives_one_768_vector_per_image_and_video_token(inception, tiny_cfg):
    spec = tiny_cfg.spec
    assert inception.layer == "mixed_6" and inception.feature_dim == 768
    assert inception.resolution == (155, 155) and inception_grid(155) == 8 == spec.image_grid[0]
    media = {m: randn(2, spec.tokens(m), spec.token_dim(m), seed=i) for i, m in enumerate(("image", "video"))}
    out = inception(media)  # [B, 64 + 128, 768]
    assert out.shape == (2, spec.tokens("image") + spec.tokens("video"), 768)
    assert torch.isfinite(out).all() and out.abs().sum() > 0
    torch.testing.assert_close(out[:, : spec.tokens("image")], inception({"image": media["image"]}))
    # different images, different features: the target carries information about the input
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("size", [75, 128, 155, 224])
def test_inception_grid_formula_matches_the_network(inception, size):
    x = torch.zeros(1, 3, size, size)
    for block in inception.backbone:  # what patch_features runs after resizing to its own resolution
        x = block(x)
    assert x.shape == (1, 768, inception_grid(size), inception_grid(size))


def test_inception_encoder_is_frozen_and_stays_out_of_checkpoints(inception):
    assert not any(p.requires_grad for p in inception.parameters())
    holder = torch.nn.Module()
    holder.head, holder.encoder = torch.nn.Linear(3, 3), inception
    holder.train()
    assert not inception.training and not any(m.training for m in inception.backbone.modules())
    assert sorted(holder.state_dict()) == ["head.bias", "head.weight"]
    before = {k: v.clone() for k, v in inception.backbone.state_dict().items()}
    holder.load_state_dict(holder.state_dict())
    assert all(torch.equal(v, inception.backbone.state_dict()[k]) for k, v in before.items())


def test_inception_encoder_refuses_audio_and_unknown_layers(inception, tiny_cfg):
    spec = tiny_cfg.spec
    with pytest.raises(ValueError, match="no features for audio"):
        inception({"audio": randn(1, spec.tokens("audio"), spec.token_dim("audio"))})
    with pytest.raises(ValueError, match="mixed_99"):
        build_encoder("inception:mixed_99", MediaTokenizer(spec))
    with pytest.raises(ValueError, match="below 75"):
        build_encoder("inception", MediaTokenizer(spec), resolution=64)


def test_repa_with_the_inception_target_trains_without_touching_the_encoder(tmp_path):
    cfg = load_config(
        "tiny", ["objective.name=repa", "objective.repa_encoder=inception", f"run.dir={tmp_path}"]
    )
    tr = build_trainer(cfg, "cpu")
    images = randn(4, 3, 32, 32).clamp(-1, 1)
    out = train_step(tr, make_batch(tr, {"image": images}, ["a photo of a bag"] * 4))
    assert torch.isfinite(out.loss).all() and torch.isfinite(out.metrics["rep_cos"])
    assert all(p.grad is not None for p in tr.models.head.parameters())
    assert all(p.grad is None and not p.requires_grad for p in tr.models.encoder.parameters())


# ---------------------------------------- the random-CNN feature space
def test_random_cnn_kid_separates_real_from_scrambled_and_is_seeded(tiny_cfg):
    a = decode_images(fashion_mnist_split("train", 100, 0)[0], tiny_cfg.spec)  # [100, 1, 32, 32]
    b = decode_images(fashion_mnist_split("test", 100, 1)[0], tiny_cfg.spec)
    scrambled = b.flatten(2)[:, :, torch.randperm(32 * 32, generator=torch.Generator().manual_seed(0))]
    fa, fb = random_cnn_features(a), random_cnn_features(b)
    assert fa.shape == (100, FEATURE_DIM) and fa.dtype == np.float64
    same = kid(fa, fb, subsets=50, subset_size=100)[0]
    other = kid(fa, random_cnn_features(scrambled.view_as(b)), subsets=50, subset_size=100)[0]
    assert abs(same) < 0.005 and other > 10 * max(abs(same), 0.003)
    np.testing.assert_array_equal(random_cnn_features(b[:5]), fb[:5])  # same seed, same network
    assert not np.allclose(random_cnn_features(b[:5], seed=1), fb[:5])


# ---------------------------------------- statistics and steps-to-reach
def run(obj: str, seed: int, kids: list[float | None], probe: float | None = None) -> dict:
    evals = [{"step": 10 * (i + 1), "kid": k, "probe_linear": probe} for i, k in enumerate(kids)]
    return {"objective": obj, "seed": seed, "evals": evals, "rep_cos": [[5, 0.1 * seed], [30, 0.5]]}


def test_aggregate_means_over_seeds_and_skips_missing_values():
    curves = aggregate({"a": run("vanilla", 0, [0.2, 0.4, None]), "b": run("vanilla", 1, [0.4, 0.2, 0.1])})
    kid_curve = curves["vanilla"]["kid"]
    assert kid_curve["steps"] == [10, 20, 30] and kid_curve["n"] == [2, 2, 1]
    np.testing.assert_allclose(kid_curve["mean"], [0.3, 0.3, 0.1])
    np.testing.assert_allclose(kid_curve["std"], [np.std([0.2, 0.4], ddof=1)] * 2 + [0.0])
    assert "probe_linear" not in curves["vanilla"]  # never measured
    np.testing.assert_allclose(curves["vanilla"]["rep_cos"]["mean"], [0.05, 0.5])
    final = final_values(curves, 30)["vanilla"]
    assert final["kid"] == {"mean": pytest.approx(0.1), "std": 0.0, "n": 1}
    assert final["rep_cos"]["mean"] == pytest.approx(0.5)


def test_steps_to_reach_is_the_first_step_that_matches_vanillas_final_value():
    runs = {
        "v": run("vanilla", 0, [0.5, 0.3, 0.2]),
        "s": run("self_flow", 0, [0.4, 0.2, 0.1]),  # ties count: 0.2 at step 20
        "r": run("repa", 0, [0.6, 0.5, 0.4]),
        "d": run("dts_only", 0, [0.1, 0.9, 0.9]),  # the first hit, even if it gets worse later
    }
    reach = steps_to_reach(aggregate(runs), "kid")
    assert reach["target"] == pytest.approx(0.2)
    assert reach["steps"] == {"vanilla": 30, "self_flow": 20, "repa": None, "dts_only": 10}
    # higher is better for probe accuracy
    probes = {"v": run("vanilla", 0, [1.0], probe=0.5), "s": run("sra", 0, [1.0], probe=0.6)}
    assert steps_to_reach(aggregate(probes), "probe_linear")["steps"] == {"vanilla": 10, "sra": 10}
    no_ref = steps_to_reach(aggregate({"s": runs["s"]}), "kid")
    assert no_ref["target"] is None and no_ref["steps"] == {"self_flow": None}


def test_markdown_shows_mean_and_std_over_seeds_and_never():
    runs = {"a": run("vanilla", 0, [0.3]), "b": run("vanilla", 1, [0.5]), "c": run("repa", 0, [0.9])}
    curves = aggregate(runs)
    results = {
        "preset": "tiny", "steps": 10, "seeds": [0, 1], "eval_every": 10, "objectives": ["vanilla", "repa"],
        "final": final_values(curves, 10), "reference": {"kid": 0.001},
        "steps_to_reach": {m: steps_to_reach(curves, m) for m in ("kid", "kid_rand")}, "notes": ["- n"],
    }  # fmt: skip
    text = markdown(results)
    assert "| `vanilla` | 0.4 ± 0.14 |" in text and "| `repa` | 0.9 |" in text
    assert "| 10 | never |" in text and "never | never |" in text


def test_eval_steps_end_at_the_budget():
    assert benchmark_run.eval_steps(90, 25) == [25, 50, 75, 90]
    assert benchmark_run.eval_steps(4, 1) == [1, 2, 3, 4] and benchmark_run.eval_steps(3, 5) == [3]


# ---------------------------------------- bad input
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "nope"], "config 'nope' not found"),
        (["--objectives", "vanilla,dino"], "--objectives"),
        (["--steps", "0"], "--steps"),
        (["--steps", "two"], "invalid int value"),
        (["--shards", "/nonexistent/shards"], "does not exist"),
        (["seed=3"], "the benchmark sets"),
        (["model.depth=3"], "unknown config key 'model.depth'"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    code = benchmark.main(["--preset", "tiny", "--steps", "2", "--out", str(out), *argv])  # the last wins
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error:") and message in err
    assert not out.exists()  # refused before any data is built or run started


def test_shards_without_images_are_refused(tmp_path, capsys):
    (tmp_path / "audio").mkdir()
    with ShardWriter(tmp_path / "audio", "audio") as w:
        w.write({"__key__": "tone", "flac": flac(0), "txt": "a tone"})
    argv = [
        "--preset",
        "tiny",
        "--steps",
        "1",
        "--out",
        str(tmp_path / "out"),
        "--shards",
        str(tmp_path / "audio"),
    ]
    assert benchmark.main(argv) == 2
    assert "has no image shard set" in capsys.readouterr().err


# ---------------------------------------- end to end
TINY_RUN = [
    "--preset", "tiny", "--steps", "2", "--eval-every", "1", "--n", "6", "--sample-steps", "2",
    "--probe", "10", "--val-batches", "1", "--data-n", "48", "--val-n", "16",
    "train.batch_size=8", "train.log_every=1", "sample.num=1", "sample.steps=1",
]  # fmt: skip


@pytest.mark.slow
def test_benchmark_trains_scores_and_reports_all_five_objectives(tmp_path):
    out = tmp_path / "bench"
    assert benchmark.main([*TINY_RUN, "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["objectives"] == list(OBJECTIVES) and results["eval_steps"] == [1, 2]
    assert abs(results["reference"]["kid_rand"]) < 0.05  # real vs real, the floor at this n
    for obj in OBJECTIVES:
        measured = {k for k, v in results["final"][obj].items() if v["mean"] is not None}
        assert {"kid", "fid", "kid_rand", "val_loss", "probe_linear"} <= measured
        assert results["curves"][obj]["kid"]["steps"] == [1, 2]
    assert {"self_flow", "sra"} <= {o for o, c in results["curves"].items() if "rep_cos" in c}
    for metric in ("kid", "kid_rand"):
        reach = results["steps_to_reach"][metric]
        assert set(reach["steps"]) == set(OBJECTIVES) and reach["steps"]["vanilla"] in (1, 2)
        assert all(s is None or s in (1, 2) for s in reach["steps"].values())
    text = (out / "results.md").read_text()
    assert (
        all(f"| `{obj}` |" in text for obj in OBJECTIVES) and "random CNN" in text and "REPA aligned" in text
    )
    for name in ("kid", "fid", "kid_rand", "val_loss", "probe_linear", "rep_cos"):
        with Image.open(out / f"curve_{name}.png") as img:
            img.verify()
            assert img.format == "PNG" and img.size[0] > 100
    # same seed, data and schedule: the runs' configs differ only in the objective (and REPA's target)
    configs = {obj: asdict(load_config(out / "runs" / f"{obj}-seed0" / "config.yaml")) for obj in OBJECTIVES}
    assert configs["repa"]["objective"]["repa_encoder"] == "inception"
    for cfg in configs.values():
        cfg["run"] = cfg["objective"] = None
    assert all(cfg == configs["vanilla"] for cfg in configs.values())
    # a rerun reuses every finished run and evaluation
    stored = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/benchmark_eval.json")}
    assert benchmark.main([*TINY_RUN, "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in stored} == stored
    again = json.loads((out / "results.json").read_text())
    assert again["final"] == results["final"] and again["reference"] == results["reference"]
    assert "Real-data floor" in (out / "results.md").read_text()
