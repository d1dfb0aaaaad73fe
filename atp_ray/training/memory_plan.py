"""Each GPU's peak memory for a run, on paper, before anything is loaded or any Ray job starts.

The plan reads the model's config (hidden size, layers, heads, KV heads, head dim, MLP width,
vocabulary) and the run config (dtypes, LoRA rank and targets, batch sizes, sequence length,
strategy, workers, activation checkpointing), and adds up what one GPU holds at its peak:

* the frozen base weights (ZeRO-3 shards them over the workers, and gathers one piece at a
  time whole while it computes with it);
* LoRA weights, their gradients and AdamW state; the generator, its gradients and AdamW state;
* the activations the autograd graph saves for backward, for the larger of the LoRA step and
  the generator step: the recipe (``atp_ray.training.atp``) runs them one after the other, and the
  first one's graph is freed by its backward before the second one's forward starts;
* what backward itself allocates on top: the fp32 gradients of the loss head (log-probs and
  logits, batch x seq x vocab each), or the gradients of one decoder layer (and, with
  activation checkpointing, the layer being recomputed);
* with distillation on, the teacher's logits and the KL's vocabulary-sized tensors (an estimate);
* a fixed overhead and the allocator's fragmentation (see the constants below).

Importance scores (two-step, the importance prior) run before training and hold less: one
decoder layer whole with its gradients and one calibration batch's activations of that
layer (atp_ray.pruning.importance), next to the same LM head as the generator step.

The activation term is an exact count of the tensors transformers (5.x, sdpa attention),
peft LoRA and our mask hooks save for backward, checked against the bytes measured with
``torch.autograd.graph.saved_tensors_hooks`` on tiny models (tests/test_memory_plan.py); the
weight, LoRA and optimizer terms are checked against the real tensors. The backward working
set, the overhead and fragmentation are estimates, named as such.

Plain Python and torch: no Ray. For hub models whose config cannot be read here (no network)
``KNOWN_CONFIGS`` holds the published numbers of the shipped spaces' models.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoConfig

from atp_ray.config import RunConfig, load_config
from atp_ray.errors import ConfigError
from atp_ray.pruning.structures import PruningSpace
from atp_ray.training.mask_sources import MASK_SOURCES

GIB = 2**30
FP32_BYTES = 4  # RMSNorm's internals, the loss's log-probs, attention's log-sum-exp, AdamW state
INDEX_BYTES = 8  # int64 labels the loss keeps
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
BF16_BYTES = 2
# AdamW keeps two fp32 moments per trainable parameter.
ADAMW_STATES = 2
# CUDA context (about 0.5 GiB on current drivers) plus cuBLAS/NCCL workspaces and DeepSpeed's
# communication buckets: an assumption, not a measurement.
FIXED_OVERHEAD_BYTES = int(1.5 * GIB)
# Share of everything else lost to the caching allocator's fragmentation: an assumption.
FRAGMENTATION = 0.10
# DeepSpeed's default stage3_prefetch_bucket_size (elements): ZeRO-3 gathers this much ahead.
ZERO3_PREFETCH_ELEMENTS = 50_000_000
# fp32 batch x seq x vocab tensors the distillation KL holds at once (atp_ray.training.distillation): an estimate.
DISTILL_FP32_TENSORS = 5
# Most workers the "more workers" suggestion considers.
MAX_SUGGESTED_WORKERS = 64

# Which projections read which input: LoRA on projections that share an input keeps one copy
# of it when no dropout (and no dtype cast) makes each its own.
_INPUT_GROUPS = (
    ("attention_in", ("q_proj", "k_proj", "v_proj")),
    ("attention_out", ("o_proj",)),
    ("mlp_in", ("gate_proj", "up_proj")),
    ("mlp_out", ("down_proj",)),
)

# config.json numbers of the shipped spaces' hub models (as published on the hub), so that
# validating those spaces never downloads anything.
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "meta-llama/Meta-Llama-3-8B": dict(
        model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, intermediate_size=14336, vocab_size=128256,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
    ),
    "meta-llama/Llama-2-7b-hf": dict(
        model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, head_dim=128, intermediate_size=11008, vocab_size=32000,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
    ),
}


# -- the model -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder's config that its memory depends on."""

    space: PruningSpace  # layers, hidden size, heads, KV heads, head dim, MLP width, biases
    vocab_size: int
    tied_embeddings: bool

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """The shape of a transformers config (LlamaConfig, MistralConfig, Qwen2Config)."""
        return cls(PruningSpace.from_config(config), config.vocab_size, bool(config.tie_word_embeddings))

    @property
    def q_dim(self) -> int:
        return self.space.num_heads * self.space.head_dim

    @property
    def kv_dim(self) -> int:
        return self.space.num_kv_heads * self.space.head_dim

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer: its projections, their biases, two norms."""
        s = self.space
        shapes = s.projection_shapes()
        weights = sum(i * o for i, o in shapes.values())
        biases = sum(o for name, (_, o) in shapes.items() if name in s.biased)
        return weights + biases + 2 * s.hidden_size

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.space.hidden_size

    @property
    def base_params(self) -> int:
        """Parameters of the whole model: embeddings, layers, final norm, LM head (unless tied)."""
        heads = 1 if self.tied_embeddings else 2
        return heads * self.embedding_params + self.space.num_layers * self.layer_params + self.space.hidden_size

    def lora_params(self, rank: int, targets: list[str]) -> int:
        """LoRA parameters on ``targets`` in every layer: A is rank x in, B is out x rank."""
        shapes = self.space.projection_shapes()
        return self.space.num_layers * sum(rank * sum(shapes[t]) for t in targets)

    def generator_params(self, width: int) -> int:
        """Parameters of the pruning generator for this model (built on the meta device: no memory)."""
        from atp_ray.pruning.generator import PruningGenerator

        with torch.device("meta"):
            generator = PruningGenerator(self.space, width=width)
        return sum(p.numel() for p in generator.parameters())


def read_model_shape(path: str) -> ModelShape:
    """The shape of ``model.path``: a shipped hub model from ``KNOWN_CONFIGS``, else its config.json.

    A local folder is read locally; another hub id reads config.json from the hub (or its
    cache): a few kB at plan time. Raises ConfigError naming model.path when it cannot be read.
    """
    from atp_ray.runtime.modeling import resolve_model_path

    if path in KNOWN_CONFIGS:
        values = dict(KNOWN_CONFIGS[path])
        return ModelShape.from_config(AutoConfig.for_model(values.pop("model_type"), **values))
    try:
        config = AutoConfig.from_pretrained(resolve_model_path(path))
    except Exception as err:  # noqa: BLE001 - any failure to read it (missing, no network, not a model)
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(
            [f"model.path: the memory plan cannot read the model's config ({first_line}) (got {path!r})"]
        ) from None
    return ModelShape.from_config(config)


# -- activations ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Precision:
    """Bytes per element of what a GPU run holds, as the strategy makes them."""

    weights: int  # frozen base weights
    activations: int  # the base model's activations
    lora: int  # LoRA weights and the LoRA path's activations

    @classmethod
    def of(cls, config: RunConfig) -> Precision:
        """bf16 everywhere when a DeepSpeed engine casts the model (ZeRO with bf16), else as loaded.

        Without an engine, peft keeps LoRA in fp32 and casts its inputs up; the weights stay
        in model.dtype. Autocast (ddp with train.precision bf16) is planned as if it were off:
        it makes some activations smaller, so the plan errs on the safe side.
        """
        engine_bf16 = config.distributed.strategy != "ddp" and config.train.precision != "fp32"
        if engine_bf16:
            return cls(BF16_BYTES, BF16_BYTES, BF16_BYTES)
        loaded = DTYPE_BYTES[config.model.dtype]
        return cls(loaded, loaded, FP32_BYTES)


@dataclass(frozen=True)
class LLMPass:
    """One forward + backward of the masked LLM: what decides the activations it keeps."""

    batch_size: int
    seq_len: int
    lora_dropout: bool  # LoRA dropout is live (the LoRA step: training mode, lora.dropout > 0)
    masks_need_grad: bool  # the generator's gradient flows through the masks (generator or joint step)
    checkpointing: bool

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len


def _layer_bytes_per_token(
    shape: ModelShape, rank: int, targets: list[str], precision: Precision, llm_pass: LLMPass, first: bool
) -> int:
    """Bytes one decoder layer saves for backward per token, without checkpointing.

    ``first``: the first layer's input (the embeddings) needs no gradient, so its input norm
    records nothing and its LoRA dropout keeps no mask.
    """
    s, e, a = shape.space, precision.activations, precision.lora
    h, m = s.hidden_size, s.intermediate_size
    # RMSNorm keeps an fp32 copy of its input and 1/rms per token.
    total = (1 if first else 2) * (FP32_BYTES * h + FP32_BYTES)
    # Attention (sdpa): rotated queries and keys, values, the output, and fp32 log-sum-exp per head.
    total += e * (2 * shape.q_dim + 2 * shape.kv_dim) + FP32_BYTES * s.num_heads
    # MLP: gate and up outputs (read by silu and the product), silu's output.
    total += 3 * e * m
    dims = {"attention_in": h, "attention_out": shape.q_dim, "mlp_in": h, "mlp_out": m}
    for name, projections in _INPUT_GROUPS:
        lora = [p for p in projections if p in targets]
        input_needs_grad = not (first and name == "attention_in")
        if llm_pass.lora_dropout:
            # Each LoRA layer drops out its own copy of the input: the mask and the dropped input.
            total += len(lora) * (2 if input_needs_grad else 1) * dims[name] * a
        elif lora:
            # lora_A keeps its input: one shared tensor, or one up-cast copy per LoRA layer.
            total += (1 if a == e else len(lora)) * dims[name] * a
        total += len(lora) * rank * a  # lora_A's output, which lora_B's backward reads
    if llm_pass.masks_need_grad:
        total += e * m  # d(loss)/d(channel mask) reads the MLP product the mask scales
    return total


def saved_activation_bytes(
    shape: ModelShape, rank: int, targets: list[str], precision: Precision, llm_pass: LLMPass
) -> int:
    """Bytes the autograd graph of one pass keeps for backward (what saved_tensors_hooks sees).

    With checkpointing each decoder layer keeps only its input; the final norm and the loss
    (fp32 log-probs over the vocabulary, int64 labels) are kept either way. Left out: RoPE's
    cos/sin tables (2 x seq x head_dim, shared by all layers).
    """
    s, tokens = shape.space, llm_pass.tokens
    e = precision.activations
    head = tokens * (FP32_BYTES * s.hidden_size + FP32_BYTES + FP32_BYTES * shape.vocab_size + INDEX_BYTES)
    head += FP32_BYTES  # the loss itself
    if llm_pass.checkpointing:
        return s.num_layers * tokens * e * s.hidden_size + head
    per_token = _layer_bytes_per_token(shape, rank, targets, precision, llm_pass, first=True)
    per_token += (s.num_layers - 1) * _layer_bytes_per_token(shape, rank, targets, precision, llm_pass, first=False)
    masks = s.num_layers * e * (shape.q_dim + s.intermediate_size)  # the mask hooks' per-layer masks
    return tokens * per_token + masks + head


def backward_working_bytes(
    shape: ModelShape, rank: int, targets: list[str], precision: Precision, llm_pass: LLMPass
) -> int:
    """What backward allocates on top of the saved activations, at its largest (an estimate).

    Either the loss head's fp32 gradients (of the log-probs and of the logits, batch x seq x
    vocab each), or one decoder layer's activation gradients, taken as large as its saved
    activations; with checkpointing, plus that layer recomputed.
    """
    loss_grads = 2 * FP32_BYTES * llm_pass.tokens * shape.vocab_size
    layer = llm_pass.tokens * _layer_bytes_per_token(shape, rank, targets, precision, llm_pass, first=False)
    return max(loss_grads, (2 if llm_pass.checkpointing else 1) * layer)


def distillation_bytes(shape: ModelShape, precision: Precision, llm_pass: LLMPass) -> int:
    """What distillation adds to the LoRA step (an estimate): the teacher's logits, kept through
    the student's pass, and the KL's fp32 batch x seq x vocab tensors (teacher and student at
    temperature, their log-probs, the teacher's probabilities)."""
    return llm_pass.tokens * shape.vocab_size * (precision.activations + DISTILL_FP32_TENSORS * FP32_BYTES)


# -- the plan -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryPlan:
    """One GPU's peak bytes, by component, for one run config."""

    rows: tuple[tuple[str, int], ...]  # counted components, in bytes
    notes: tuple[str, ...]  # lines printed under the table
    checkpointing: bool
    gpu_memory_gib: float | None

    @property
    def peak_bytes(self) -> int:
        return sum(b for _, b in self.rows)

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    def component(self, prefix: str) -> int:
        """Bytes of the one component whose name starts with ``prefix`` (e.g. "LoRA grads")."""
        (found,) = [b for name, b in self.rows if name.startswith(prefix)]
        return found

    def fits(self) -> bool | None:
        """Whether the peak fits the GPU (None: its memory is not known)."""
        return None if self.gpu_memory_gib is None else self.peak_gib <= self.gpu_memory_gib

    def table(self) -> str:
        """The plan as a small table: component, GiB; then the peak against the GPU's memory."""
        width = max(len(name) for name, _ in self.rows)
        lines = ["memory plan, per GPU:"]
        lines += [f"  {name:<{width}}  {b / GIB:7.2f} GiB" for name, b in self.rows]
        lines.append(f"  {'peak':<{width}}  {self.peak_gib:7.2f} GiB")
        if self.gpu_memory_gib is not None:
            verdict = "fits" if self.fits() else "does NOT fit"
            lines.append(f"  {'GPU memory':<{width}}  {self.gpu_memory_gib:7.2f} GiB  ({verdict})")
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)


def plan_memory(
    config: RunConfig, shape: ModelShape, *, checkpointing: bool | None = None, gpu_memory_gib: float | None = None
) -> MemoryPlan:
    """The memory plan of ``config`` on a model of ``shape``, per GPU.

    ``checkpointing`` overrides train.activation_checkpointing (None: resolve it, see
    :func:`resolve_checkpointing`); ``gpu_memory_gib`` defaults to distributed.gpu_memory_gib.
    """
    if gpu_memory_gib is None:
        gpu_memory_gib = config.distributed.gpu_memory_gib
    if checkpointing is None:
        checkpointing = resolve_checkpointing(config, shape, gpu_memory_gib)
    workers = config.distributed.workers or 1
    strategy = config.distributed.strategy
    precision = Precision.of(config)
    rank, targets = config.lora.rank, config.lora.target_modules
    rows: list[tuple[str, int]] = []

    weights = shape.base_params * precision.weights
    if strategy == "zero3":
        rows.append((f"base weights ({shape.base_params / 1e9:.2f}B, sharded over {workers})", weights // workers))
        gathered = max(shape.embedding_params, shape.layer_params) + ZERO3_PREFETCH_ELEMENTS
        rows.append(("ZeRO-3 gathered weights + prefetch", gathered * precision.weights))
    else:
        rows.append((f"base weights ({shape.base_params / 1e9:.2f}B)", weights))

    lora = shape.lora_params(rank, targets)
    rows.append((f"LoRA weights ({lora / 1e6:.1f}M)", lora * precision.lora))
    # fp32 gradients and AdamW moments; ZeRO shards them (and keeps an fp32 master copy of bf16 LoRA).
    state = lora * FP32_BYTES * (1 + ADAMW_STATES + int(precision.lora != FP32_BYTES))
    rows.append(("LoRA grads + AdamW", state if strategy == "ddp" else state // workers))
    learned = MASK_SOURCES[config.method].trains_generator
    if learned:
        generator = shape.generator_params(config.atp.generator_width)
        rows.append((f"generator + AdamW ({generator / 1e6:.1f}M)", generator * FP32_BYTES * (2 + ADAMW_STATES)))

    passes = {"LoRA step": _lora_pass(config, checkpointing)}
    if learned and config.atp.control_step == "alternating":
        passes["generator step"] = _generator_pass(config, checkpointing)
    peaks = {
        name: saved_activation_bytes(shape, rank, targets, precision, p)
        + backward_working_bytes(shape, rank, targets, precision, p)
        for name, p in passes.items()
    }
    if config.distill.weight > 0:
        peaks["LoRA step"] += distillation_bytes(shape, precision, passes["LoRA step"])
    largest = max(peaks, key=peaks.get)
    step = passes[largest]
    rows.append((f"activations, {largest} ({step.batch_size} x {step.seq_len})", peaks[largest]))
    notes = [f"activation checkpointing: {'on' if checkpointing else 'off'} (train.activation_checkpointing="
             f"{json.dumps(config.train.activation_checkpointing)})"]  # fmt: skip
    for name, value in peaks.items():
        if name != largest:
            notes.append(f"{name} activations {value / GIB:.2f} GiB: not added (the steps run one after the other)")
    rows.append(("CUDA context + workspaces (assumed)", FIXED_OVERHEAD_BYTES))
    rows.append((f"fragmentation ({FRAGMENTATION:.0%}, assumed)", int(FRAGMENTATION * sum(b for _, b in rows))))
    return MemoryPlan(tuple(rows), tuple(notes), checkpointing, gpu_memory_gib)


def _lora_pass(config: RunConfig, checkpointing: bool) -> LLMPass:
    joint = MASK_SOURCES[config.method].trains_generator and config.atp.control_step == "joint"
    return LLMPass(config.train.batch_size, config.data.seq_len, config.lora.dropout > 0, joint, checkpointing)


def _generator_pass(config: RunConfig, checkpointing: bool) -> LLMPass:
    # The LLM runs in eval mode (no LoRA dropout); the task loss's gradient flows into the masks.
    return LLMPass(config.train.calibration_batch_size, config.data.seq_len, False, True, checkpointing)


def resolve_checkpointing(config: RunConfig, shape: ModelShape, gpu_memory_gib: float | None) -> bool:
    """Whether the run checkpoints activations: train.activation_checkpointing, with auto resolved.

    auto is on for a GPU run whose plan does not fit ``gpu_memory_gib`` without it, and on
    for a GPU run whose GPU memory is unknown (the safe side); off on CPU.
    """
    wanted = config.train.activation_checkpointing
    if wanted != "auto":
        return wanted
    if not uses_gpu(config):
        return False
    if gpu_memory_gib is None:
        return True
    return not plan_memory(config, shape, checkpointing=False, gpu_memory_gib=gpu_memory_gib).fits()


def uses_gpu(config: RunConfig) -> bool:
    """Whether the run config asks for GPUs (distributed.use_gpu or train.device cuda)."""
    return config.distributed.use_gpu or config.train.device == "cuda"


# -- refusing a plan that cannot fit ---------------------------------------------------------


def fit_problems(config: RunConfig, shape: ModelShape, gpu_memory_gib: float, where: str) -> list[str]:
    """One problem if the plan does not fit ``gpu_memory_gib``, naming the knobs that would make it fit.

    ``where`` says where the GPU memory figure came from (e.g. "resources.gpu_memory_gib").
    """
    plan = plan_memory(config, shape, gpu_memory_gib=gpu_memory_gib)
    if plan.fits():
        return []
    fixes = [hint for hint, cfg in _fixes(config) if plan_memory(cfg, shape, gpu_memory_gib=gpu_memory_gib).fits()]
    batch = _largest_batch_that_fits(config, shape, gpu_memory_gib)
    if batch:
        fixes.append(f"lower train.batch_size and train.calibration_batch_size to {batch}")
    workers = _fewest_workers_that_fit(config, shape, gpu_memory_gib)
    if workers:
        fixes.append(f"more workers: {workers} with distributed.strategy=zero3")
    advice = "; or ".join(fixes) if fixes else "none of strategy zero3, activation checkpointing, batch size 1 or more workers alone makes it fit"
    return [
        f"memory plan: {plan.peak_gib:.1f} GiB per GPU does not fit the {gpu_memory_gib:g} GiB of {where} "
        f"(model {config.model.path}, strategy {config.distributed.strategy}, {config.distributed.workers or 1} "
        f"worker(s), batch {config.train.batch_size} x {config.data.seq_len}, activation checkpointing "
        f"{'on' if plan.checkpointing else 'off'}); to fit: {advice}"
    ]


def _with(config: RunConfig, **changes: Any) -> RunConfig:
    """A copy of ``config`` with dotted-key changes (section__field=value), validated again."""
    raw = config.to_dict()
    for key, value in changes.items():
        section, field = key.split("__")
        raw[section][field] = value
    return RunConfig.model_validate(raw)


def _fixes(config: RunConfig) -> list[tuple[str, RunConfig]]:
    """Single-knob changes worth trying, with the hint that names each."""
    fixes = []
    if config.train.activation_checkpointing is not True:
        fixes.append(("set train.activation_checkpointing=true", _with(config, train__activation_checkpointing=True)))
    workers = config.distributed.workers or 1
    if config.distributed.strategy != "zero3" and workers > 1:
        fixes.append(("set distributed.strategy=zero3", _with(config, distributed__strategy="zero3")))
    return fixes


def _largest_batch_that_fits(config: RunConfig, shape: ModelShape, gpu_memory_gib: float) -> int | None:
    for batch in range(max(config.train.batch_size, config.train.calibration_batch_size) - 1, 0, -1):
        smaller = _with(config, train__batch_size=batch, train__calibration_batch_size=batch)
        if plan_memory(smaller, shape, gpu_memory_gib=gpu_memory_gib).fits():
            return batch
    return None


def _fewest_workers_that_fit(config: RunConfig, shape: ModelShape, gpu_memory_gib: float) -> int | None:
    for workers in range((config.distributed.workers or 1) + 1, MAX_SUGGESTED_WORKERS + 1):
        more = _with(config, distributed__workers=workers, distributed__strategy="zero3")
        if plan_memory(more, shape, gpu_memory_gib=gpu_memory_gib).fits():
            return workers
    return None


# -- a search's heaviest trial ----------------------------------------------------------------


def heaviest_trial(base: dict[str, Any], knob_values: dict[str, list[Any]], shape: ModelShape) -> RunConfig:
    """The trial config whose plan is largest: each knob at whichever of its values weighs most.

    ``base`` is a search's resolved base run config (a raw dict); ``knob_values`` the values
    that span each searched knob (bounds, choices). Per knob, the heavier value is chosen with
    the others at the base, then all are set together (memory grows with each knob alone).
    """

    def config_with(params: dict[str, Any]) -> RunConfig:
        return load_config(copy.deepcopy(base), [f"{k}={json.dumps(v)}" for k, v in params.items()])

    def peak(params: dict[str, Any]) -> int:
        return plan_memory(config_with(params), shape).peak_bytes

    heaviest = {key: max(values, key=lambda v, key=key: peak({key: v})) for key, values in knob_values.items()}
    return config_with(heaviest)


def search_plan(
    base: dict[str, Any], knob_values: dict[str, list[Any]], gpu_memory_gib: float | None
) -> tuple[MemoryPlan, list[str]]:
    """The heaviest trial's plan for a GPU search, and its problems (none when it fits or memory is unknown)."""
    config = load_config(copy.deepcopy(base))
    shape = read_model_shape(config.model.path)
    trial = heaviest_trial(base, knob_values, shape)
    plan = plan_memory(trial, shape, gpu_memory_gib=gpu_memory_gib)
    problems = [] if gpu_memory_gib is None else fit_problems(trial, shape, gpu_memory_gib, "resources.gpu_memory_gib")
    return plan, problems


def check_run_plan(config: RunConfig) -> MemoryPlan:
    """The plan of one run (``atp-ray train``); ConfigError if it cannot fit distributed.gpu_memory_gib."""
    shape = read_model_shape(config.model.path)
    gpu_memory_gib = config.distributed.gpu_memory_gib
    if gpu_memory_gib is not None:
        problems = fit_problems(config, shape, gpu_memory_gib, "distributed.gpu_memory_gib")
        if problems:
            raise ConfigError(problems)
    return plan_memory(config, shape)
