"""One YAML recipe per run, validated at load, with dotted `key=value` overrides.

Hyperparameters under `train:` keep the names of FastChat's / Hugging Face's command line
(`--num_train_epochs`, `--per_device_train_batch_size`, ...), so an old `torchrun ... train.py`
command translates key by key. Parallelism lives apart, under `parallel:`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from labtune.errors import RecipeError, yaml_error
from labtune.overrides import UniqueKeyLoader, apply_overrides
from labtune.recipe_data import AugmentConfig, DataConfig, DataSource, ReplayConfig, _Strict  # noqa: F401 (the recipe's names)
from labtune.store.backends import Store, StoreSettings, open_store


class Prompt(BaseModel):
    """A question to ask and how its answer is scored: the recipe's `evaluation.questions` and the
    entries of prompt files (labtune/evaluation/prompts.py reads those and scores)."""

    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=1)
    expected: str | list[str] | None = None  # the answer contains one of these
    expected_all: list[str] | None = None  # the answer contains every one of these (a reverse question's dates)
    forbidden: list[str] = Field(default_factory=list)  # the names scorer: naming any of these is wrong
    regex: str | None = None
    tags: list[str] = Field(default_factory=list)
    id: str | None = None
    # prompts that share a pair count only together: each is right only when all of them are
    # (an attendance question about a member who was there and one about a member who was not)
    pair: str | None = None

    @field_validator("expected")
    @classmethod
    def _non_empty(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and (not value or not all(isinstance(v, str) and v.strip() for v in value)):
            raise ValueError("a list of expected answers must hold non-empty strings")
        if isinstance(value, str) and not value.strip():
            raise ValueError("expected is empty")
        return value

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"regex does not compile: {exc}") from None
        return value

    @property
    def scored(self) -> bool:
        return self.expected is not None or self.regex is not None or bool(self.expected_all)


# the spec of tiny://llama (labtune/models/tiny.py), here so that the recipe checks it at load
TINY_DEFAULTS = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 600,
    "max_position_embeddings": 1024,
    "seed": 0,
}


class ModelSource(_Strict):
    """Where the base model (or a delta) comes from.

    `source` is a local HF directory, an `s3://bucket/prefix` holding one, a `.gguf` file
    (`gguf_file` names the file inside a directory, or `source` is the file itself), a
    `pypi://PACKAGE/FILE.gguf` file shipped inside an installed Python package, or
    `tiny://llama` for a small random LLaMA generated on the fly (see `tiny`).
    """

    source: str
    gguf_file: str | None = None
    tiny: dict[str, int] = Field(default_factory=dict)
    dtype: Literal["float32", "bfloat16", "float16"] | None = None

    @model_validator(mode="after")
    def _tiny_is_what_it_builds(self) -> ModelSource:
        """`tiny://llama` and a spec it can build (the spec is read only for it): nothing else is built in silence."""
        if self.source.startswith("tiny://") and self.source != "tiny://llama":
            raise ValueError(f"source: {self.source!r}: the one tiny model is tiny://llama")
        spec = {**TINY_DEFAULTS, **self.tiny}
        for key, value in self.tiny.items():
            low = 0 if key == "seed" else 1
            if key not in TINY_DEFAULTS:
                raise ValueError(f"tiny.{key}: unknown; allowed: {', '.join(TINY_DEFAULTS)}")
            if not low <= value <= 1 << 20:
                raise ValueError(f"tiny.{key}: must be a whole number from {low} to {1 << 20} (got {value})")
        if spec["hidden_size"] % spec["num_attention_heads"] or spec["num_attention_heads"] % spec["num_key_value_heads"]:
            raise ValueError("tiny: hidden_size must divide by num_attention_heads, and that by num_key_value_heads")
        if spec["vocab_size"] < 300:
            raise ValueError(f"tiny.vocab_size: must be at least 300 (its tokenizer's bytes and words; got {spec['vocab_size']})")
        return self


SCHEDULER_KWARGS = {
    "linear": set(), "constant": set(), "constant_with_warmup": set(), "cosine": {"num_cycles"},
    "warmup_stable_decay": {"num_decay_steps", "num_stable_steps", "warmup_type", "decay_type", "min_lr_ratio"},
}
WSD_DECAY_FRACTION = 0.2


class TrainConfig(_Strict):
    """Names as in FastChat's train.py / transformers.TrainingArguments."""

    num_train_epochs: float = Field(default=3.0, gt=0)
    per_device_train_batch_size: int = Field(default=2, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    learning_rate: float = Field(default=2e-5, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_ratio: float = Field(default=0.03, ge=0, le=1)
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup", "warmup_stable_decay"] = "cosine"
    # transformers' scheduler arguments; warmup_stable_decay decays over the last 20% of the steps
    # unless num_decay_steps is given (docs/training.md)
    lr_scheduler_kwargs: dict[str, Any] = Field(default_factory=dict)
    bf16: bool = False
    tf32: bool = False
    # true: every decoder layer (FastChat's meaning); selective: every n-th layer; auto: the least of none,
    # selective and all that the memory estimate fits on the device (docs/training.md, Memory)
    gradient_checkpointing: bool | Literal["selective", "auto"] = "auto"
    gradient_checkpointing_every_n_layers: int = Field(default=2, ge=1)
    save_strategy: Literal["steps", "no"] = "steps"
    save_steps: int = Field(default=1200, ge=1)
    save_total_limit: int | None = Field(default=None, ge=1)
    logging_steps: int = Field(default=1, ge=1)
    # trackers (HF's report_to): none, tensorboard, mlflow (docs/export.md); not in the stage key: the model is the same
    report_to: list[Literal["none", "tensorboard", "mlflow"]] = Field(default_factory=lambda: ["none"])
    logging_dir: str | None = None  # TensorBoard's folder; default ~/.labtune/tensorboard/RECIPE/TRAIN_KEY
    fsdp: str = "full_shard auto_wrap"
    fsdp_transformer_layer_cls_to_wrap: str | None = None
    max_grad_norm: float = Field(default=1.0, ge=0)
    seed: int = 42
    allow_lower_accumulation: bool = False
    # LoRA (peft), FastChat's train_lora.py names; the adapter is merged into a full model at export
    lora: bool = False
    lora_r: int = Field(default=8, ge=1)
    lora_alpha: float = Field(default=16, gt=0)
    lora_dropout: float = Field(default=0.05, ge=0, lt=1)
    lora_target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)
    torch_compile: bool | Literal["auto"] = "auto"  # auto: each decoder layer compiled on a GPU, eager on a CPU
    # transformers' attn_implementation; auto: sdpa on a GPU, eager on a CPU (docs/training.md)
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = "auto"
    # What trains (docs/training.md, "Knowledge per FLOP"): embeddings (and a tied output layer) and the lowest
    # freeze_layers decoder layers frozen; with both, the backward pass stops above them (2 FLOPs a parameter, not 6)
    freeze_embeddings: bool = False
    freeze_layers: int = Field(default=0, ge=0)
    # frozen layers' output computed once per example, not per epoch (frozen_prefix.py); one unsharded process only
    cache_frozen_layers: bool = True
    # short examples packed into rows of up to packing_length tokens (default data.model_max_length), each attending
    # only to itself; per_device_train_batch_size then counts rows
    packing: bool = False
    packing_length: int | None = Field(default=None, ge=8)
    # How replay answers (data.replay) are learned: 0, as text (cross-entropy on each token); k > 0, as the model's
    # own distribution before training: at each answer token its k likeliest next tokens and the rest of the mass,
    # matched by KL divergence, so the fine-tune keeps the base model's uncertainty (docs/evaluation.md)
    replay_distill_top_k: int = Field(default=0, ge=0, le=1024)
    # Early stopping, transformers' names: every eval_steps steps (or epoch) the dev questions are answered by teacher
    # forcing; after early_stopping_patience evaluations without a gain above the threshold the learning rate decays
    # (over a quarter of the steps so far) and training ends. load_best_model_at_end exports the best weights.
    eval_strategy: Literal["no", "steps", "epoch"] = "no"
    eval_steps: int | None = Field(default=None, ge=1)
    early_stopping_patience: int | None = Field(default=None, ge=1)
    early_stopping_threshold: float = Field(default=0.0, ge=0, lt=1)
    load_best_model_at_end: bool = False

    @model_validator(mode="after")
    def _what_trains_and_when_it_stops(self) -> TrainConfig:
        if self.eval_strategy == "steps" and self.eval_steps is None:
            raise ValueError("eval_strategy steps needs eval_steps (optimizer steps between evaluations)")
        if self.eval_strategy == "no" and (self.early_stopping_patience or self.load_best_model_at_end):
            raise ValueError("early_stopping_patience and load_best_model_at_end need eval_strategy steps or epoch")
        return self

    @model_validator(mode="after")
    def _scheduler_kwargs_known(self) -> TrainConfig:
        allowed = SCHEDULER_KWARGS[self.lr_scheduler_type]
        unknown = sorted(set(self.lr_scheduler_kwargs) - allowed)
        if unknown:
            raise ValueError(f"lr_scheduler_kwargs: {unknown} do not apply to lr_scheduler_type "
                             f"{self.lr_scheduler_type!r} (allowed: {sorted(allowed) or 'none'})")
        return self

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers(cls, value: Any) -> Any:
        """A single name is a list of one, as in transformers; wandb is not built in."""
        value = [value] if isinstance(value, str) else value
        if isinstance(value, list) and "wandb" in value:
            raise ValueError("wandb is not built in: report to tensorboard and run `wandb sync --sync-tensorboard "
                             "DIR` (docs/export.md)")
        if isinstance(value, list) and "none" in value and len(value) > 1:
            raise ValueError("none with other trackers: give none alone, or the trackers")
        return value

    @field_validator("save_strategy", "eval_strategy", mode="before")
    @classmethod
    def _no_is_not_false(cls, value: Any) -> Any:
        """`save_strategy: no` is transformers' value; YAML 1.1 reads a bare `no` as false."""
        return "no" if value is False else value

    @field_validator("fsdp")
    @classmethod
    def _known_fsdp(cls, value: str) -> str:
        allowed = {"full_shard", "auto_wrap", "offload", "shard_grad_op", "no_shard", "hybrid_shard"}
        unknown = [word for word in value.split() if word not in allowed]
        if unknown:
            raise ValueError(f"unknown fsdp option(s) {unknown}; allowed: {sorted(allowed)}")
        return value


class ParallelConfig(_Strict):
    """torchrun's settings, under their torchrun names. Several nodes: run the same recipe on each
    with its own node_rank; they meet at rdzv_endpoint (host:port of one of them)."""

    nproc_per_node: int | Literal["auto"] = 1
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    nnodes: int = Field(default=1, ge=1)
    node_rank: int = Field(default=0, ge=0)
    rdzv_endpoint: str | None = None
    rdzv_backend: Literal["c10d", "static"] = "c10d"
    rdzv_timeout: int = Field(default=900, ge=1)
    # memory per rank for the estimate; unset: the smallest GPU's, or on a CPU the free host memory shared by the ranks
    memory_per_rank_gib: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _nodes(self) -> ParallelConfig:
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} is not below nnodes {self.nnodes}")
        if self.nnodes > 1:
            host, _, port = (self.rdzv_endpoint or "").rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"rdzv_endpoint {self.rdzv_endpoint!r}: nnodes {self.nnodes} needs host:port of the "
                                 "node that hosts the rendezvous")
        return self

    @field_validator("nproc_per_node")
    @classmethod
    def _positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be at least 1 (or auto: one per visible GPU)")
        return value

    @property
    def processes(self) -> int:
        """Processes on this node: the recipe's number, or for `auto` one per GPU this machine
        shows (CUDA_VISIBLE_DEVICES counts), 1 without a GPU."""
        if self.nproc_per_node != "auto":
            return int(self.nproc_per_node)
        import torch

        return max(1, torch.cuda.device_count())

    @property
    def world_size(self) -> int:
        return self.processes * self.nnodes


class GeneralConfig(_Strict):
    """General ability in every run (labtune/evaluation/general.py): `hijacked` counts general
    answers about the lab's meetings; the perplexity ratio (fine-tuned / base) on reference answers
    (an Alpaca or ShareGPT file; unset: the base model's own answers) says how far the model moved.
    One warning line past max_extra_hijacked (beyond the base's count) or max_perplexity_ratio."""

    questions: str | None = "builtin"  # FastChat's 80 Vicuna-bench questions (Apache-2.0), a prompt file, or null: off
    limit: int | None = Field(default=80, ge=1)
    max_new_tokens: int = Field(default=64, ge=8)  # enough to see what an answer is about
    references: str | None = None
    reference_limit: int = Field(default=100, ge=1)
    max_extra_hijacked: int = Field(default=0, ge=0)
    max_perplexity_ratio: float = Field(default=1.25, gt=1.0)


class EvalConfig(_Strict):
    """What the evaluate stage asks. `questions` are inline prompts ({question, expected?,
    regex?, tags?}); `prompt_files` are YAML/JSON prompt files; `heldout_notes` adds the
    question-answer pairs of the held-out (eval split) lab notes; `general` asks general questions
    to see whether the fine-tuned model is still a chat model."""

    questions: list[Prompt] = Field(default_factory=list)
    prompt_files: list[str] = Field(default_factory=list)
    heldout_notes: bool = True
    general: GeneralConfig = Field(default_factory=GeneralConfig)
    eval_loss: bool = True
    # auto: the longest answer in the tokenized training data plus a quarter (at least 16 tokens);
    # 128 where no training run is known. A number overrides it.
    max_new_tokens: int | Literal["auto"] = "auto"
    batch_size: int = Field(default=8, ge=1)
    # the notes-retrieval baseline: every prompt asked again with the k most relevant notes in it (BM25)
    retrieval: bool = False
    retrieval_k: int = Field(default=2, ge=1, le=20)
    # the latest meetings kept out of training, as if written after it, asked with retrieval (tag fresh)
    fresh_meetings: int = Field(default=0, ge=0, le=50)

    @field_validator("max_new_tokens", mode="before")
    @classmethod
    def _token_budget(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError("must be auto or a whole number of tokens of at least 1")


class DeploymentsConfig(_Strict):
    """Where finetune sends its GPU stages. Unset (the default): they run in-process. Set to a
    deployment name (`FLOW/DEPLOYMENT`, e.g. `train/labtune-train`): finetune starts it with
    run_deployment on that deployment's work pool and waits; the stages pass only store URIs."""

    train: str | None = None
    evaluate: str | None = None
    synthesize: str | None = None  # the generator writes on a GPU (synthesize/labtune-synthesize)


class WatchConfig(_Strict):
    """The watch-lab-notes deployment's schedule."""

    cron: str = "*/15 * * * *"
    timezone: str = "UTC"


class ExportConfig(_Strict):
    """After evaluate: the fine-tuned model as one GGUF file (llama.cpp, Ollama, LM Studio), with an
    Ollama Modelfile and the model card. Unset (the default): no export stage."""

    gguf: Literal["f32", "f16", "q8_0"] | None = None
    name: str | None = None  # the file's name before -QUANT.gguf; default: the recipe's name


class StoreConfig(_Strict):
    """`uri` is a local directory or `s3://bucket/prefix`. Credentials never go here: boto3
    reads them from the environment, a profile or an instance role."""

    uri: str = "~/.labtune/store"
    endpoint_url: str | None = None
    region: str | None = None
    # how long an S3 outage the run rides out, per operation, before it fails
    retry_seconds: float = Field(default=300.0, ge=0)

    @field_validator("uri")
    @classmethod
    def _a_store_uri(cls, uri: str) -> str:
        if "://" in uri and not re.fullmatch(r"s3://[^/\s]+(/.*)?", uri):
            raise ValueError("a store is a folder or s3://BUCKET[/PREFIX]")
        return uri

    @field_validator("endpoint_url")
    @classmethod
    def _an_endpoint(cls, url: str | None) -> str | None:
        if url is not None and not re.fullmatch(r"https?://[^/\s:]+(:\d{1,5})?(/\S*)?", url):
            raise ValueError("not an S3 endpoint (expected http(s)://HOST[:PORT])")
        return url

    def settings(self) -> StoreSettings:
        return StoreSettings(self.uri, self.endpoint_url, self.region, self.retry_seconds)

    def open(self) -> Store:
        """The store this recipe writes to."""
        return open_store(self.settings())


class Recipe(_Strict):
    name: str = "labtune"
    base_model: ModelSource
    delta: ModelSource | None = None
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    evaluation: EvalConfig = Field(default_factory=EvalConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    deployments: DeploymentsConfig = Field(default_factory=DeploymentsConfig)
    watch: WatchConfig = Field(default_factory=WatchConfig)
    recipe_dir: str = Field(default=".", exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _model_max_length_is_tokenization(cls, raw: Any) -> Any:
        """FastChat passes --model_max_length with the training flags; here only tokenize uses it,
        so `train.model_max_length` is read as `data.model_max_length` (and stays out of the train
        stage's key: changing it re-tokenizes, and that alone changes what training sees)."""
        train, data = (raw.get("train"), raw.get("data")) if isinstance(raw, dict) else (None, None)
        if isinstance(train, dict) and "model_max_length" in train and isinstance(data, dict):
            value = train.pop("model_max_length")
            if data.setdefault("model_max_length", value) != value:
                raise ValueError(f"train.model_max_length {value} and data.model_max_length {data['model_max_length']} "
                                 "differ; set one")
            raw = {**raw, "train": train, "data": data}
        return raw

    @model_validator(mode="after")
    def _train_has_its_data(self) -> Recipe:
        if self.train.eval_strategy != "no" and not (self.data.augment.enabled and self.data.augment.dev_questions):
            raise ValueError("train.eval_strategy: early stopping scores the data stage's dev questions; set "
                             "data.augment.enabled: true and data.augment.dev_questions (e.g. 48)")
        if self.evaluation.fresh_meetings and not (self.evaluation.retrieval and self.data.augment.enabled):
            raise ValueError("evaluation.fresh_meetings: meetings kept out of training are asked with their notes "
                             "retrieved; set evaluation.retrieval: true and data.augment.enabled: true")
        if self.train.replay_distill_top_k and not self.data.replay.enabled:
            raise ValueError("train.replay_distill_top_k: the replay answers it learns as distributions come from "
                             "data.replay; set data.replay.enabled: true (or replay_distill_top_k: 0)")
        return self

    @model_validator(mode="after")
    def _resolve_paths(self) -> Recipe:
        base = Path(self.recipe_dir)
        for source in self.data.sources:
            source.path = _resolve(base, source.path)
        self.evaluation.prompt_files = [_resolve(base, p) for p in self.evaluation.prompt_files]
        general = self.evaluation.general
        for owner, key in ((general, "questions"), (general, "references"), (self.data.replay, "prompts")):
            if getattr(owner, key) not in (None, "builtin"):
                setattr(owner, key, _resolve(base, getattr(owner, key)))
        for model in (self.base_model, self.delta):
            if model is not None and "://" not in model.source:
                model.source = _resolve(base, model.source)
        if "://" not in self.store.uri:
            self.store.uri = str(Path(os.path.expanduser(self.store.uri)).resolve())
        return self


def _resolve(base: Path, path: str) -> str:
    if "://" in path:
        return path
    expanded = Path(os.path.expanduser(path))
    return str(expanded if expanded.is_absolute() else (base / expanded).resolve())


# recipes parsed in this process, by file, text, overrides and environment: `labtune run`, the
# finetune flow and its train subflow read one recipe once
_PARSED: dict[tuple[Any, ...], Recipe] = {}


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; any problem raises a one-line RecipeError. The same
    file, text and overrides give the same object within a process (do not change it in place)."""
    recipe_path = Path(path)
    if not recipe_path.is_file():
        raise RecipeError(f"{recipe_path}: recipe file not found")
    try:
        text = recipe_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{recipe_path}: not UTF-8 text (byte {exc.start}); save the recipe as UTF-8") from None
    seen = (str(recipe_path.resolve()), text, tuple(overrides or []),
            tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(("LABTUNE", "AWS")) or k == "HOME")))
    if seen not in _PARSED:
        _PARSED[seen] = _parse_recipe(recipe_path, text, overrides or [])
    return _PARSED[seen]


def _parse_recipe(recipe_path: Path, text: str, overrides: list[str]) -> Recipe:
    try:
        raw = yaml.load(text, Loader=UniqueKeyLoader) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(yaml_error(recipe_path, exc)) from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{recipe_path}: the top level must be a mapping")
    raw = apply_overrides(raw, overrides)
    raw["recipe_dir"] = str(recipe_path.resolve().parent)
    return recipe_from_dict(raw, str(recipe_path))


def recipe_from_dict(raw: dict[str, Any], origin: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "recipe"
        if first["type"] == "extra_forbidden":
            message = "unknown key"
        elif first["type"] == "missing":
            message = "required key is missing"
        elif first["type"] == "value_error" and isinstance(first.get("input"), dict):  # a rule across keys names them
            message = first["msg"].removeprefix("Value error, ")
        else:
            message = f"{first['msg'].removeprefix('Value error, ')} (got {first.get('input')!r})"
        more = f" (+{len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        raise RecipeError(f"{origin}: {key}: {message}{more}") from None
