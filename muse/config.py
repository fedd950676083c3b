"""Typed pipeline configuration: one YAML file (`pipeline.yaml`), validated at load.

Every section is a pydantic model with `extra="forbid"`, so a misspelt key fails with
its dotted path instead of being silently ignored. `--set a.b=value` overrides are
parsed as YAML scalars and merged before validation, so they get the same checks.
Cross-field rules (an impossible combination) live in `PipelineConfig._check`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration problem, with the dotted key and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageConfig(_Section):
    root: str = Field("./muse-data", description="local folder or gs://bucket/prefix")
    gcs_project: Optional[str] = Field(None, description="GCP project for gcsfs")
    work_dir: Optional[str] = Field(
        None, description="local scratch folder for img2dataset (default: a temp dir)"
    )
    # One retry policy for every request to gs:// (muse/storage.py RetryPolicy); local roots ignore it.
    retries: int = Field(6, ge=0, le=20, description="gs://: tries after the first of a failed idempotent request "
                         "(429, 5xx, reset, stall, short read); full-jitter backoff from 0.5 s, at most 30 s a wait")
    timeout_s: float = Field(60.0, gt=0, description="gs://: seconds one try may wait to connect or for its next "
                             "bytes before it counts as failed (a stalled read)")
    deadline_s: float = Field(300.0, gt=0, description="gs://: seconds one request may take with all its tries "
                              "and waits (Retry-After included) before it fails, naming the object")


class SourceFilter(_Section):
    """Keep rows whose numeric `column` is >= min and <= max (either bound may be left out)."""
    column: str = Field(..., min_length=1)
    min: Optional[float] = None
    max: Optional[float] = None

    @model_validator(mode="after")
    def _bounds(self) -> "SourceFilter":
        if self.min is None and self.max is None:
            raise ValueError(f"filter on {self.column!r} needs min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"filter on {self.column!r}: min {self.min} > max {self.max} keeps nothing")
        return self


class SourceConfig(_Section):
    paths: list[str] = Field(..., min_length=1, description="URL-list files or globs (local or remote)")
    format: Literal["auto", "parquet", "csv", "jsonl"] = "auto"
    url_column: str = "URL"
    caption_column: str = "TEXT"
    carry_columns: Optional[list[str]] = Field(
        None, description="extra columns kept in the output; null keeps all other columns"
    )
    max_samples: Optional[int] = Field(None, ge=1, description="tiny subset: first N rows (that pass the filters) overall")
    # Row selection before anything is fetched (docs/download.md "Filters"); a row with a null
    # (or NaN) in a filtered column is dropped.
    filters: list[SourceFilter] = Field(default_factory=list, description="[{column, min, max}], all must hold")
    min_aspect: Optional[float] = Field(None, gt=0, description="keep width/height >= this (aspect_columns)")
    max_aspect: Optional[float] = Field(None, gt=0, description="keep width/height <= this (aspect_columns)")
    aspect_columns: tuple[str, str] = ("WIDTH", "HEIGHT")
    dedup_urls: bool = Field(False, description="keep the first row of each URL within a file")

    @model_validator(mode="after")
    def _aspect(self) -> "SourceConfig":
        if self.min_aspect and self.max_aspect and self.min_aspect > self.max_aspect:
            raise ValueError(f"source.min_aspect {self.min_aspect} > source.max_aspect {self.max_aspect}")
        return self


class DownloadConfig(_Section):
    image_size: int = Field(256, ge=8, le=4096)
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] = "center_crop"
    processes: int = Field(4, ge=1)
    threads: int = Field(32, ge=1)
    shard_size: int = Field(10000, ge=1)
    retries: int = Field(2, ge=0)
    timeout_s: float = Field(10.0, gt=0, description="per socket read (img2dataset's timeout)")
    deadline_s: float = Field(6 * 3600.0, gt=0, description="limit for one download task (one chunk of shards)")
    # One download task = one img2dataset run over this many shards of a source file: its local
    # disk is bounded by the chunk, and a lost machine loses at most the shards in flight.
    shards_per_task: int = Field(64, ge=1, description="shards per download task (one img2dataset run)")
    encode_quality: int = Field(95, ge=1, le=100)
    # img2dataset's distributor: spark uses the active/configured SparkSession, ray the cluster at
    # download.ray_address (or $RAY_ADDRESS)
    distributor: Literal["multiprocessing", "spark", "ray"] = "multiprocessing"
    ray_address: Optional[str] = Field(None, description="distributor ray: the cluster, e.g. head:6379; "
                                       "null: $RAY_ADDRESS")
    user_agent_token: Optional[str] = None
    # img2dataset's own checks on the downloaded pixels; a row that fails one is replaced
    # (reason too_small / aspect_ratio), unlike source.filters, which skip rows before fetching.
    min_image_size: int = Field(0, ge=0, description="min(width, height) of the downloaded image")
    max_aspect_ratio: Optional[float] = Field(None, ge=1, description="max(w,h)/min(w,h); null: no limit")
    max_parallel_tasks: int = Field(1, ge=1, description="download tasks (chunks of shards_per_task shards) the flow "
                                    "runs at once (each is one img2dataset run of processes x threads)")
    # The retry pass (docs/download.md "Retrying failed rows"): after the download, rows replaced
    # for a retryable reason (muse/download/reasons.py) are fetched again into a new generation of
    # their shard. A generation younger than retry_after_s is left alone, so a row is fetched at
    # most once per interval, and at most max_retries_per_row times in all.
    retry_replaced: bool = Field(False, description="after the download, fetch rows replaced for a retryable "
                                 "reason again (muse download --retry-replaced)")
    retry_after_s: float = Field(86400.0, ge=0, description="a shard generation younger than this is not retried")
    max_retries_per_row: int = Field(3, ge=0, description="times one row is fetched again, at most")


class ModelRef(BaseModel):
    """One pretrained model as the config names it, built by `EncodeConfig.text_ref` / `vq_ref` /
    `superres_vq_ref` from the section's flat keys: a hub id or local folder (`path`), a `subfolder`
    in it, the hub `revision` (commit, tag or branch; None: the newest), the weights' `format`, and
    `key`, the config key that names it (errors say which key to change). The loaders take one
    (`TextEncoder.from_ref`, `muse.encode.image.vq_from_ref` / `paella_from_ref`), and so does
    the preflight, so no caller unpacks, or drops, one of the fields."""
    model_config = ConfigDict(frozen=True, extra="forbid")
    key: str
    path: str
    subfolder: Optional[str] = None
    revision: Optional[str] = None
    format: Literal["transformers", "diffusers", "open-muse"] = "transformers"


class EncodeConfig(_Section):
    text_model: str = "google/t5-v1_1-base"
    text_max_length: int = Field(77, ge=1, le=512)
    text_dtype: Literal["fp32", "bf16"] = "fp32"
    # Hub commit (or tag/branch) of each model; null: the newest. The commit actually loaded is
    # recorded in _ENCODERS.json either way, and a dataset version refuses shards from another.
    text_revision: Optional[str] = Field(None, description="hub revision of text_model; null: newest")
    vq_model: str = "amused/amused-256"
    vq_subfolder: Optional[str] = "vqvae"
    vq_format: Literal["diffusers", "open-muse"] = "diffusers"
    vq_revision: Optional[str] = Field(None, description="hub revision of vq_model; null: newest")
    superres: bool = False
    superres_vq_model: str = "openMUSE/paellavq-f8-8192-laion"
    superres_vq_subfolder: Optional[str] = None
    superres_vq_format: Literal["diffusers", "open-muse"] = "open-muse"
    superres_vq_revision: Optional[str] = Field(None, description="hub revision of superres_vq_model; null: newest")
    batch_size: int = Field(64, ge=1)
    row_group_size: int = Field(256, ge=1)
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    prefetch_batches: int = Field(2, ge=0)
    # One Prefect task encodes this many shards in turn (models load once per task): keeps a
    # LAION-size run (~230,000 shards) at a few thousand task runs.
    shards_per_task: int = Field(64, ge=1, description="shards per encode task")
    max_parallel_shards: Optional[int] = Field(None, ge=1, description="shards encoded at once by the flow; "
                                               "null: one per visible GPU, 1 on CPU")
    # `muse encode` on several devices of one machine: one worker process per device, each with its
    # own models (docs/encode.md). null: one device, `device`, in this process.
    devices: Union[Literal["all"], list[str], None] = Field(
        None, description="all (one worker process per visible GPU; the CPU alone: one), or a list such as "
        "[cuda:0, cuda:1]; null: `device` only")
    # How the `encode` flow spreads its chunk tasks (docs/encode.md): threads of the flow's own
    # process; ray: prefect-ray tasks on the cluster at `ray_address`; deployments: one flow run
    # per chunk on a work pool (`chunk_deployment`).
    fanout: Literal["threads", "ray", "deployments"] = "threads"
    ray_address: Optional[str] = Field(None, description="fanout ray: the cluster, e.g. ray://head:10001 or "
                                       "head:6379; null: $RAY_ADDRESS")
    # One Ray task per chunk asks for this many GPUs: 1 gives each chunk its own GPU and process
    # (its own models); 0 lets chunks run on CPU-only nodes.
    gpus_per_task: float = Field(1, ge=0, description="fanout ray: GPUs one chunk task reserves (Ray num_gpus)")
    # fanout: deployments (flows/encode_remote.py, docs/encode.md "Across machines")
    chunk_deployment: str = Field("encode-chunk/encode-chunk", description="flow/deployment that encodes one "
                                  "chunk (prefect.yaml; work pool gpu)")
    chunk_tries: int = Field(3, ge=1, description="flow runs submitted per chunk at most: a run that ends "
                             "Crashed (its machine or worker died) is submitted again")
    # A chunk run with no heartbeat for this long is marked Crashed by a Prefect automation (then
    # re-submitted). Must exceed the workers' PREFECT_FLOWS_HEARTBEAT_FREQUENCY (Prefect's
    # default 180 s, minimum 30 s) with room for a late beat.
    crashed_after_s: int = Field(600, gt=30, description="seconds without a heartbeat after which a chunk "
                                 "run is marked Crashed (> the workers' PREFECT_FLOWS_HEARTBEAT_FREQUENCY)")

    @model_validator(mode="after")
    def _check_devices(self):
        if isinstance(self.devices, list):
            if not self.devices:
                raise ValueError("encode.devices: an empty list; use null for `encode.device` alone")
            bad = [d for d in self.devices if not re.fullmatch(r"cpu|cuda(:\d+)?", d)]
            if bad:
                raise ValueError(f"encode.devices: {bad} are not devices (cpu, cuda, cuda:N)")
        return self

    @model_validator(mode="after")
    def _check_chunk_deployment(self):
        if not re.fullmatch(r"[^/\s]+/[^/\s]+", self.chunk_deployment):
            raise ValueError(f"encode.chunk_deployment: {self.chunk_deployment!r} is not a deployment name "
                             "'<flow>/<deployment>' (e.g. encode-chunk/encode-chunk)")
        return self

    @property
    def text_ref(self) -> ModelRef:
        return ModelRef(key="encode.text_model", path=self.text_model, revision=self.text_revision)

    @property
    def vq_ref(self) -> ModelRef:
        return ModelRef(key="encode.vq_model", path=self.vq_model, subfolder=self.vq_subfolder,
                        revision=self.vq_revision, format=self.vq_format)

    @property
    def superres_vq_ref(self) -> ModelRef:
        return ModelRef(key="encode.superres_vq_model", path=self.superres_vq_model,
                        subfolder=self.superres_vq_subfolder, revision=self.superres_vq_revision,
                        format=self.superres_vq_format)

    def encoder_refs(self) -> list[ModelRef]:
        """The models the encode phase loads: T5, the VQ, and the super-res VQ with `superres`."""
        return [self.text_ref, self.vq_ref] + ([self.superres_vq_ref] if self.superres else [])

    def version(self) -> str:
        """Dataset version: a short hash of everything that changes the encoded values and is known
        before a model loads. The weights themselves are fingerprinted at load time and checked
        against the version's `_ENCODERS.json` (muse/encode/fingerprint.py)."""
        keys = ("text_model", "text_max_length", "text_dtype", "vq_model", "vq_subfolder",
                "vq_format", "superres", "superres_vq_model", "superres_vq_subfolder",
                "superres_vq_format")
        pinned = {k: getattr(self, k) for k in ("text_revision", "vq_revision", "superres_vq_revision")
                  if getattr(self, k) is not None}  # only when set: unpinned versions keep their old hash
        blob = json.dumps({k: getattr(self, k) for k in keys} | pinned, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


# The one home of the transformer sizes: `model.preset` picks one, `model.*` overrides it,
# and the model classes' own defaults (muse/models/base.py MuseConfig) are the base preset.
MODEL_PRESETS = {
    "tiny": dict(hidden_size=32, depth=2, num_heads=4, mlp_ratio=2.0, mlp="gelu", dropout=0.0, downsample=1),
    # ~0.7M parameters (the demo, `make demo`): what 2 CPU cores train to adherence in minutes;
    # downsample 2: its layers run on 8x8 merged tokens, ~3.5x the samples/s of 16x16 (bench/RESULTS.md)
    "demo": dict(hidden_size=128, depth=3, num_heads=4, mlp_ratio=2.0, mlp="gelu", dropout=0.0, downsample=2),
    "small": dict(hidden_size=512, depth=8, num_heads=8, mlp_ratio=4.0, mlp="gelu", dropout=0.0, downsample=1),
    # ~632M parameters with an 8192 codebook and 768-d text (the paper's base size)
    "base": dict(hidden_size=1536, depth=16, num_heads=16, mlp_ratio=4.0, mlp="gelu", dropout=0.0, downsample=1),
}


class ModelConfig(_Section):
    kind: Literal["base", "superres"] = "base"
    preset: Literal[tuple(MODEL_PRESETS)] = "base"  # type: ignore[valid-type]  # the keys above
    # Optional overrides of the preset; null keeps the preset's value.
    hidden_size: Optional[int] = Field(None, ge=8)
    depth: Optional[int] = Field(None, ge=1)
    num_heads: Optional[int] = Field(None, ge=1)
    mlp_ratio: Optional[float] = Field(None, gt=0)
    mlp: Optional[Literal["gelu", "geglu"]] = None
    dropout: Optional[float] = Field(None, ge=0, lt=1)
    downsample: Optional[Literal[1, 2, 4]] = Field(
        None, description="base model: each downsample x downsample block of tokens is one transformer position "
        "(aMUSEd's UVit2DModel downsample); 1 = every token")
    codebook_size: int = Field(8192, ge=2)
    text_dim: int = Field(768, ge=1, description="T5 hidden size of the encoded data")
    low_res_depth: int = Field(2, ge=0, description="superres: self-attention layers over the embedded 16x16 "
                               "low-res tokens before they join the cross-attention memory (0: embedding only)")

    @model_validator(mode="after")
    def _downsample(self) -> "ModelConfig":
        if self.kind == "superres" and self.downsample not in (None, 1):
            raise ValueError(f"model.downsample {self.downsample} is a base-model option: the super-res model "
                             "attends within patches already (set model.downsample: null or 1)")
        return self


class WandbConfig(_Section):
    project: str = "muse"
    entity: Optional[str] = Field(None, description="team or user; null: your default entity")
    mode: Literal["online", "offline", "disabled"] = "online"


class TrainConfig(_Section):
    run_name: str = "muse"
    batch_size: Union[PositiveInt, Literal["auto"], None] = Field(
        None, description="per device, per micro-step; null: the model's default (DEFAULT_BATCH); "
        "auto: the largest that fits the GPU (needs global_batch)")
    grad_accum: Optional[PositiveInt] = Field(None, description="null: the model's default (DEFAULT_BATCH)")
    global_batch: Optional[PositiveInt] = Field(
        None, description="samples per optimizer step over all ranks; set: grad_accum follows from it")
    epochs: int = Field(1, ge=1)
    max_steps: Optional[int] = Field(None, ge=1, description="optimizer steps; stops early")
    lr: float = Field(1e-4, gt=0)
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(500, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.045, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    cond_dropout: float = Field(0.1, ge=0, le=1, description="P(text replaced by empty caption)")
    mixed_precision: bool = True
    nonfinite_fallback: bool = Field(False, description="on K non-finite steps, continue in fp32")
    max_nonfinite_steps: int = Field(10, ge=1)
    ema: bool = False
    ema_decay: float = Field(0.9999, gt=0, lt=1)
    compile: bool = False
    activation_checkpointing: bool = Field(False, description="recompute each block in the backward "
                                           "pass: ~1/3 more compute, a fraction of the activation memory")
    grad_compression: Literal["none", "bf16", "fp16"] = Field(
        "none", description="DDP all-reduces gradients in this dtype (halves the bytes between machines; "
        "the optimizer still sees fp32 means)")
    seed: int = 0
    num_workers: int = Field(2, ge=0)
    shuffle_buffer: int = Field(2048, ge=1, description="rows per loader stream")
    loader_streams: int = Field(8, ge=1, description="fixed data order; num_workers must divide it")
    replaced_rows: Literal["keep", "drop", "downweight"] = "keep"
    replaced_weight: float = Field(0.1, ge=0, le=1)
    checkpoint_every: int = Field(1000, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    log_every: int = Field(10, ge=1)
    sample_every: Optional[int] = Field(None, ge=1)
    wandb: Optional[WandbConfig] = Field(None, description="Weights & Biases as well as TensorBoard; null = off")
    # 0.1%: on LAION-400M 400k rows, far more than `muse eval` scores, at 0.1% of the data, so a
    # trained model can be evaluated without re-encoding; one of the fractions encode counts
    # per row group (layout.EVAL_LEVELS), so the trainer plans its epochs without reading keys
    eval_holdout: float = Field(
        0.001, ge=0, le=0.5, description="fraction of rows kept out of training for evaluation (by key hash)")
    eval_every: Optional[int] = Field(None, ge=1, description="small in-training evaluation every N steps")
    nproc_per_node: Union[Literal["auto", "gpu"], PositiveInt] = Field(
        "auto", description="torchrun --nproc-per-node: auto (all GPUs, or 1), gpu, or a number")
    # more than one machine: `muse train --nnodes N --node-rank R --rdzv-endpoint HOST:PORT` on each
    nnodes: PositiveInt = Field(1, description="machines in the job (torchrun --nnodes); 1 = this one (--standalone)")
    node_rank: int = Field(0, ge=0, description="this machine, 0..nnodes-1: node 0 hosts the rendezvous store")
    rdzv_endpoint: Optional[str] = Field(
        None, description="HOST:PORT of node 0, reachable from every node (torchrun's c10d rendezvous)")
    rdzv_id: Optional[str] = Field(None, min_length=1, description="the job's id, the same on every node "
                                   "(default muse-<run_name>)")
    device: str = "auto"
    cpu_threads: Optional[PositiveInt] = Field(
        None, description="torch threads per rank when training on the CPU; null: torch's default (the cores). "
        "A fixed count gives the same weights on machines with other core counts")
    dist_timeout_s: float = Field(
        1800.0, gt=0, description="collective timeout of the torchrun job: the longest rank 0 may save, "
        "sample or evaluate alone while the other ranks wait (NCCL's own 600 s can kill a job saving ~10 GB)")
    verify: Literal["sha256", "size", "none"] = Field(
        "size", description="check shards against the manifest at start: size (cheap), sha256 (reads all)")
    on_data_change: Literal["stop", "new_pass"] = Field(
        "stop", description="resuming after the manifest or loader settings changed: stop with an error, or "
        "new_pass: keep weights, optimizer and step and start a new pass over the data")
    on_data_error: Literal["stop", "skip"] = Field(
        "stop", description="a row group that cannot be read while training (after the storage retries): "
        "stop every rank at the last checkpoint, or skip it (logged, metrics.jsonl skipped_row_groups)")
    # train_on=deployment (flows/handoff.py): the GPU run is a deployment on another work pool
    handoff_start_timeout_s: float = Field(
        900.0, gt=0, description="the GPU run must start within this many seconds, else it is cancelled")
    job_variables: dict[str, Any] = Field(
        default_factory=dict, description="work pool job variables for the GPU run (image, env, machine type)")

    @model_validator(mode="after")
    def _streams(self) -> "TrainConfig":
        # each loader worker owns whole streams, so the data order does not depend on num_workers
        if self.loader_streams % max(self.num_workers, 1):
            raise ValueError(f"train.num_workers ({self.num_workers}) must divide train.loader_streams "
                             f"({self.loader_streams}): change one of them")
        return self

    @model_validator(mode="after")
    def _batch(self) -> "TrainConfig":
        if self.batch_size == "auto" and self.global_batch is None:
            raise ValueError("train.batch_size: auto needs train.global_batch (samples per optimizer step, "
                             "all ranks): the micro-batch is chosen to fit, the global batch stays yours")
        if self.global_batch is not None and self.grad_accum is not None:
            raise ValueError("set train.global_batch or train.grad_accum, not both (with global_batch, "
                             "grad_accum = global_batch / (batch_size x ranks))")
        return self

    @model_validator(mode="after")
    def _nodes(self) -> "TrainConfig":
        if self.node_rank >= self.nnodes:
            raise ValueError(f"train.node_rank={self.node_rank} but train.nnodes={self.nnodes}: "
                             "node ranks are 0..nnodes-1")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(f"train.nnodes={self.nnodes} needs train.rdzv_endpoint (--rdzv-endpoint HOST:PORT "
                             "of node 0, e.g. node0.example:29400), the same on every node")
        if self.nnodes == 1 and (self.rdzv_endpoint or self.rdzv_id):
            raise ValueError("train.rdzv_endpoint / train.rdzv_id are for several machines: set train.nnodes "
                             "(--nnodes N) too, or leave them out for one machine")
        host, _, port = (self.rdzv_endpoint or "").rpartition(":")
        if self.rdzv_endpoint and not (host.strip("[]") and port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"train.rdzv_endpoint={self.rdzv_endpoint!r} is not HOST:PORT with a port in "
                             "1..65535 (e.g. node0.example:29400, [fd00::1]:29400)")
        return self


# How the guidance scale moves over the decoding steps (`muse.sample.guidance_at`): sample and eval share it
GuidanceSchedule = Literal["constant", "linear"]


class DecodeConfig(_Section):
    """How pictures are decoded (`muse.sample.generate_images`): the keys `sample` and `eval` share."""
    steps: int = Field(24, ge=1)
    guidance_scale: float = Field(4.0, ge=0)
    guidance_schedule: GuidanceSchedule = Field(
        "constant", description="linear: the scale rises from 1 at the first decoding step to guidance_scale "
        "at the last (the layout is drawn unguided, the details guided)")
    temperature: float = Field(1.0, ge=0, description="initial Gumbel temperature, anneals to 0")
    seed: int = 0
    device: str = "auto"
    # Decoding promises no exact pictures across GPUs, so GPUs run it in bf16; the CPU stays fp32
    # (its pictures are what the suite compares).
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="the models' forward: auto (bf16 autocast on GPUs with native bf16, else fp32), "
        "fp32, or bf16 autocast; logits are fp32 either way")
    use_ema: bool = Field(True, description="the checkpoints' EMA weights (model_ema.safetensors, train.ema) "
                          "when they have them; false: the raw weights")


class SampleConfig(DecodeConfig):
    """`muse sample`: the decoding keys of DecodeConfig, and what to sample and where it goes."""
    prompts: list[str] = Field(default_factory=lambda: ["a photograph of a red fox in the snow"])
    prompts_file: Optional[str] = None
    checkpoint: Optional[str] = Field(None, description="base checkpoint dir; null: latest of train.run_name")
    superres_checkpoint: Optional[str] = None
    superres_steps: int = Field(8, ge=1)
    # One seeded generator runs through the batches in turn: a picture depends on the seed, the
    # prompt list and batch_size (when there are more prompts than batch_size).
    batch_size: int = Field(8, ge=1, description="prompts decoded at once (T5, base, super-res and VQ decode): "
                            "bounds the GPU memory of a long prompt list")
    out: str = "samples/sample.png"


class EvalConfig(DecodeConfig):
    """`muse eval`: FID and CLIP score on the eval slice (train.eval_holdout) of the encoded data, decoded
    with the keys of DecodeConfig."""
    max_samples: int = Field(1000, ge=2, description="eval rows generated and scored (FID needs >= 2)")
    clip_model: str = Field("openai/clip-vit-base-patch32", description="CLIPModel hub id or local folder")
    fid_features: str = Field(
        "inception", description="inception (torch-fidelity), clip (eval.clip_model image features), "
        "or a local torch.export file (.pt2) mapping uint8 [B,3,H,W] to features [B,D]")
    batch_size: int = Field(16, ge=1)
    metrics: list[str] = Field(
        default_factory=list, description="extra metrics, each module:function (imported by `muse eval` and the "
        "in-training evaluations) taking uint8 pictures [B,H,W,3] and their captions, returning {name: float}")

    @model_validator(mode="after")
    def _check_metrics(self) -> "EvalConfig":
        for spec in self.metrics:
            if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", spec):
                raise ValueError(f"eval.metrics: {spec!r} is not module:function (e.g. mypackage.metrics:score)")
        return self


class ScheduleConfig(_Section):
    cron: str = "0 3 * * *"
    timezone: str = "UTC"
    active: bool = False  # off until source.paths lists files the worker has (issue 30)


# (micro-batch, grad_accum) when train.batch_size / grad_accum are null: 512 samples per rank per
# step either way (the Muse recipe). The super-res model keeps ~15x the base model's activations
# per sample (docs/train.md "GPUs"): at 16 it fits no single GPU, at 4 a 40-80 GB one.
DEFAULT_BATCH = {"base": (16, 32), "superres": (4, 128)}


class PipelineConfig(_Section):
    storage: StorageConfig = Field(default_factory=StorageConfig)
    source: SourceConfig
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    encode: EncodeConfig = Field(default_factory=EncodeConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)

    @model_validator(mode="after")
    def _check(self) -> "PipelineConfig":
        self._default_batch()
        if self.encode.superres and self.download.image_size < 512:
            raise ValueError(
                "encode.superres=true needs 512px images: set download.image_size >= 512 "
                f"(it is {self.download.image_size})"
            )
        if self.model.kind == "superres" and not self.encode.superres:
            raise ValueError("model.kind=superres needs the 64x64 tokens: set encode.superres=true")
        if self.model.hidden_size and self.model.num_heads and self.model.hidden_size % self.model.num_heads:
            raise ValueError(
                f"model.hidden_size ({self.model.hidden_size}) must be divisible by "
                f"model.num_heads ({self.model.num_heads})"
            )
        if self.train.eval_every and not self.train.eval_holdout:
            raise ValueError("train.eval_every needs an eval slice: set train.eval_holdout > 0 (e.g. 0.01)")
        return self

    def _default_batch(self) -> None:
        """Null train.batch_size / grad_accum take the model kind's DEFAULT_BATCH (with
        train.global_batch, grad_accum stays null: the trainer derives it)."""
        micro, accum = DEFAULT_BATCH[self.model.kind]
        if self.train.batch_size is None:
            self.train.batch_size = micro
        if self.train.grad_accum is None and self.train.global_batch is None:
            self.train.grad_accum = accum

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def resolve_device(name: str):
    """A config device value -> torch.device: "auto" is the GPU when there is one, else the CPU."""
    import torch  # here, not at the top: loading a config must stay instant

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def ray_address(value: Optional[str], key: str) -> str:
    """The Ray cluster to join: the config key's value, else $RAY_ADDRESS. Read where a run
    connects, not at load time: Ray workers load the same config without that variable."""
    address = value or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError(f"{key}: no Ray cluster named; set it (e.g. head:6379 or ray://head:10001) "
                          "or export RAY_ADDRESS")
    return address


# ----------------------------------------------------------------------------- loading

def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], value parsed as a YAML scalar/list)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {item!r}: empty key segment in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {e}") from None
    return parts, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides or []:
        parts, value = parse_override(item)
        node = data
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item}: {'.'.join(parts[:i + 1])} is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "combination"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check spelling; see pipeline.yaml for the allowed keys)"
        elif e["type"] == "missing":
            msg = "required value is missing"
        elif e["type"] == "literal_error":
            msg = f"{msg}; got {e.get('input')!r}"
        elif "input" in e and not isinstance(e["input"], dict):
            msg = f"{msg}; got {e['input']!r}"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def _read_text(path: str | Path) -> str:
    """A local file, or a URL (gs://...) through the storage layer's filesystems."""
    if isinstance(path, Path):
        return path.read_text()
    from muse.storage import source_fs

    fs, p = source_fs(str(path))
    with fs.open(p, "rb") as f:
        return f.read().decode()


def load_config(path: str | Path | None = "pipeline.yaml", overrides: list[str] | None = None,
                data: dict | None = None) -> PipelineConfig:
    """Read YAML (or take `data`), apply `--set` overrides, validate. Raises ConfigError."""
    source = str(path) if data is None else "<dict>"
    if data is None:
        p = path if "://" in str(path) else Path(path)  # gs://bucket/pipeline.yaml: a deployment's config
        try:
            text = _read_text(p)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {p} (pass --config PATH)") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
    data = apply_overrides(json.loads(json.dumps(data)), overrides or [])
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None
