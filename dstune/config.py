"""Run config: one YAML recipe plus `key=value` overrides, validated by pydantic.

Every field carries its help text; `dstune train --help` points here. Paths are relative
to the working directory and are made absolute on load, so a run dir's saved
`config.yaml` works from anywhere.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dstune.errors import UserError, did_you_mean
from dstune.tasks import TASKS

TASK_NAMES = tuple(TASKS)
RANDOM_DATA = "random"  # data.train value: synthetic token ids instead of a file


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` as a string; recipes mean a number. A key given twice in one mapping is an
    error (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (first on line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*(?:\.[\d_]*)?|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."))


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def read_value(text: str) -> Any:
    """A value given on the command line, read as a recipe reads it (1e-4 is a number; bad YAML: the text)."""
    try:
        return _yaml(text)
    except yaml.YAMLError:
        return text


class _Section(BaseModel):
    # infinities and NaN are no learning rate, epoch count or weight decay
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


class ModelConfig(_Section):
    path: str | None = Field(None, description="local Hugging Face model folder (or the folder holding gguf_file)")
    gguf_file: str | None = Field(None, description="GGUF file name inside `path`, loaded through transformers; "
                                                    "dequantized once and kept as safetensors in $DSTUNE_MODEL_CACHE "
                                                    "(default ~/.cache/dstune/models; `off`: not kept)")
    tiny: str | None = Field(
        None, description="build a tiny random model of this family (dstune/families.py: gpt2, llama, mistral, "
                          "qwen2, qwen3, gemma, gemma2, gemma3_text, phi3, qwen2_moe, mixtral, bert, t5) instead of "
                          "loading weights")
    config_overrides: dict[str, Any] = Field(default_factory=dict, description="fields set on the model config")
    quantize: Literal["nf4", "fp4", "int8"] | None = Field(
        None, description="hold the frozen base's linear layers quantized (bitsandbytes): nf4 (QLoRA: 4-bit "
                          "NormalFloat, double quantization), fp4, or int8; computes in training.precision; only "
                          "methods that leave the base frozen train on it. A checkpoint saved quantized "
                          "(bitsandbytes) is read as such without it")
    trust_remote_code: bool = Field(False, description="allow model code shipped inside the model folder")

    @field_validator("tiny")
    @classmethod
    def _known_family(cls, v: str | None) -> str | None:
        from dstune.families import FAMILIES
        if v is not None and v not in FAMILIES:
            raise ValueError(f"unknown family {v!r}{did_you_mean(v, FAMILIES)}; known: {', '.join(sorted(FAMILIES))}")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
        if (self.path is None) == (self.tiny is None):
            raise ValueError("set exactly one of model.path and model.tiny")
        if self.gguf_file and not self.path:
            raise ValueError("model.gguf_file needs model.path (the folder holding it)")
        if self.path and not self.gguf_file and self.path.lower().endswith(".gguf"):
            folder, name = os.path.split(self.path)
            raise ValueError(f"model.path is a GGUF file; set model.path to its folder "
                             f"({folder or '.'}) and model.gguf_file to its name ({name})")
        if self.gguf_file and os.sep in self.gguf_file:
            raise ValueError(f"model.gguf_file is a path ({self.gguf_file}); give the file's name inside model.path")
        return self


class TokenizerConfig(_Section):
    path: str | None = Field(None, description="HF tokenizer folder or a SentencePiece .model file; default: model.path")
    chat_template: str | None = Field(
        None, description="chat template (a Jinja string, or a file holding one) for chat data and prompts; "
                          "replaces the tokenizer's own")

    def template_is_file(self) -> bool:
        return self.chat_template is not None and "{{" not in self.chat_template and "{%" not in self.chat_template


FORMATS = ("auto", "text", "prompt_response", "messages", "sharegpt", "alpaca", "pairs", "unpaired")


class DataSource(_Section):
    """One source of a mixture (`data.train` as a list): its own file, format and columns, and its share."""
    path: str = Field(description="a data file or saved `datasets` folder")
    weight: float | None = Field(None, gt=0, description="share of the mixture's examples (relative to the other "
                                                         "sources' weights; the mixture has as many examples as "
                                                         "the sources have rows)")
    epochs: float | None = Field(None, gt=0, description="passes over this source per pass over the mixture "
                                                         "(default 1; fractions take a seeded sample)")
    format: Literal[FORMATS] | None = Field(None, description="default: data.format")
    messages_column: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    prompt_column: str | None = None
    response_column: str | None = None
    source_column: str | None = None
    target_column: str | None = None
    chosen_column: str | None = None
    rejected_column: str | None = None
    completion_column: str | None = None
    labeled: bool = Field(True, description="false: rows without labels, trained by a distill teacher's outputs "
                                            "alone (classification)")

    @model_validator(mode="after")
    def _one_share(self) -> "DataSource":
        if self.weight is not None and self.epochs is not None:
            raise ValueError("give a source a weight or epochs, not both")
        return self


AUGMENT_OPS = ("delete", "swap", "insert", "neighbour", "paraphrase", "back_translate")


class AugmentConfig(_Section):
    """data.augment: extra copies of the training rows, rewritten (never the evaluation rows)."""
    ops: list[Literal[AUGMENT_OPS]] = Field(
        min_length=1, description="rewrites a copy is made with, one drawn per copy: delete, swap, insert (a "
                                  "word's embedding neighbour at a random place), neighbour (words replaced by "
                                  "embedding neighbours), paraphrase (a causal LM), back_translate (two seq2seq "
                                  "models)")
    copies: int = Field(1, ge=1, le=100, description="augmented copies per row at most; a copy equal to its row or "
                                                     "to an earlier copy is dropped")
    rate: float = Field(0.1, gt=0, le=1, description="delete, swap, insert, neighbour: share of a row's words "
                                                     "changed (at least one)")
    columns: list[str] | None = Field(None, description="text columns rewritten (default: the task's input: "
                                                        "text_column, prompt_column, instruction or source_column)")
    seed: int | None = Field(None, description="draws of ops, words and samples (default: training.seed)")
    neighbours: str | None = Field(None, description="model folder (or .gguf file) whose input embeddings give "
                                                     "a word's neighbours (insert, neighbour); default: model.path")
    neighbour_k: int = Field(8, ge=1, description="a replacement word is drawn from a word's k nearest neighbours")
    paraphrase_model: str | None = Field(None, description="causal LM folder (or .gguf file) that paraphrases")
    paraphrase_prompt: str = Field(
        "Paraphrase the following text. Keep its meaning and reply with the paraphrase only.\n\n{text}",
        description="what the paraphrase model reads ({text}: the row's text), through its chat template if "
                    "it has one")
    back_translate: list[str] | None = Field(None, min_length=2, max_length=2, description="[forward, backward]: "
                                             "seq2seq model folders, text → pivot language → text")
    back_translate_prompts: list[str] = Field(["{text}", "{text}"], min_length=2, max_length=2, description=(
        "what each translation model reads ({text}), e.g. 'translate English to German: {text}' for T5"))
    temperature: float = Field(0.8, ge=0, description="paraphrase, back_translate: sampling temperature "
                                                      "(0: greedy)")
    max_new_tokens: int | None = Field(None, gt=0, description="paraphrase, back_translate: longest rewrite "
                                                               "(default: data.max_length)")
    batch_size: int = Field(16, gt=0, description="paraphrase, back_translate: rows per generate() call")

    @model_validator(mode="after")
    def _models(self) -> "AugmentConfig":
        if "paraphrase" in self.ops and not self.paraphrase_model:
            raise ValueError("op paraphrase needs paraphrase_model (a causal LM folder or .gguf file)")
        if "back_translate" in self.ops and not self.back_translate:
            raise ValueError("op back_translate needs back_translate: [forward model, backward model]")
        for prompt in (self.paraphrase_prompt, *self.back_translate_prompts):
            if "{text}" not in prompt:
                raise ValueError(f"prompt {prompt!r} has no {{text}}")
        return self


class DataConfig(_Section):
    train: str | list[DataSource] = Field(
        description="training data: .jsonl/.json/.csv/.parquet file or a saved `datasets` folder; a list of "
                    "sources ({path, weight | epochs, format, *_column}) to mix; `random`: uniform random "
                    "token ids in full max_length blocks (causal_lm throughput benchmarks, no tokenizer needed)")
    eval: str | None = Field(None, description="evaluation data, same formats; default: hold out eval_fraction of train")
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="share of train held out for eval when eval is unset")
    unlabeled: str | None = Field(None, description="classification with distill: rows without labels (the text "
                                                    "column is enough), trained by the teacher's outputs alone; "
                                                    "a source beside data.train, taken once per epoch")
    format: Literal[FORMATS] = Field(
        "auto", description="causal_lm row format; auto: text_column, else prompt_column+response_column, else a "
                            "messages/conversations column (OpenAI or ShareGPT turns), else instruction+output "
                            "(Alpaca). preference: pairs (chosen_column + rejected_column) or unpaired "
                            "(completion_column + label_column, kto)")
    messages_column: str | None = Field(None, description="column of messages/sharegpt turns (default: messages / "
                                                          "conversations)")
    text_column: str = Field("text", description="input text (classification, plain causal_lm)")
    label_column: str = Field("label", description="label (classification); labels are taken from the data")
    prompt_column: str = Field("prompt", description="prompt (causal_lm prompt/response; masked from the loss)")
    response_column: str = Field("response", description="response (causal_lm prompt/response)")
    source_column: str = Field("source", description="source text (seq2seq)")
    target_column: str = Field("target", description="target text (seq2seq)")
    chosen_column: str = Field("chosen", description="preference pairs: the preferred reply (text, one assistant "
                                                     "turn, or the whole conversation)")
    rejected_column: str = Field("rejected", description="preference pairs: the dispreferred reply")
    completion_column: str = Field("completion", description="preference, unpaired (kto): the reply, good or bad "
                                                             "by label_column (true / false)")
    max_length: int = Field(128, gt=0, description="tokens per example (truncated); packed block size")
    max_target_length: int = Field(64, gt=0, description="target tokens (seq2seq)")
    num_proc: int | None = Field(None, gt=0, description="processes that tokenize (default: one per core from "
                                                          "20,000 rows on, else one)")
    cache_dir: str | None = Field(None, description="where prepared (tokenized, packed) data is kept, keyed by "
                                                    "the data's content, the tokenizer and these settings "
                                                    "(default: $DSTUNE_DATA_CACHE or ~/.cache/dstune/data)")
    drop_invalid_rows: bool = Field(False, description="leave out rows missing a value the task reads (null, "
                                                       "absent key, empty CSV cell), counted in the start-up "
                                                       "line; default: such a row stops the run, named by line")
    augment: AugmentConfig | None = Field(None, description="add rewritten copies of the training rows (token "
                                                            "edits, embedding neighbours, paraphrase, "
                                                            "back-translation); saved in the run dir")
    packing: bool = Field(False, description="causal_lm: put whole examples together into blocks of up to "
                                             "max_length tokens; each keeps its own positions and attends only "
                                             "to itself")

    @field_validator("train")
    @classmethod
    def _mixture(cls, train: str | list[DataSource]) -> str | list[DataSource]:
        if isinstance(train, list):
            if not train:
                raise ValueError("a list of sources needs at least one")
            weighted = [s.weight is not None for s in train]
            if any(weighted) and not all(weighted):
                raise ValueError("give every source a weight, or none (each then takes epochs, default 1)")
        return train

    def sources(self) -> list[DataSource]:
        """data.train as a list of sources (one file is one source, taken once), then data.unlabeled."""
        train = self.train if isinstance(self.train, list) else [DataSource(path=self.train)]
        return train + ([DataSource(path=self.unlabeled, labeled=False)] if self.unlabeled else [])


class TrainingConfig(_Section):
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; overrides epochs when set")
    epochs: float = Field(1.0, gt=0, description="passes over the training data")
    micro_batch_size: int = Field(8, gt=0, description="examples per rank per forward pass")
    gradient_accumulation_steps: int = Field(1, gt=0, description="micro-batches per optimizer step")
    lr: float = Field(5e-5, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (never on biases and norms)")
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.9, 0.999), description="AdamW betas, each in [0, 1)")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field("linear", description="decay after warmup")
    warmup_steps: int = Field(0, ge=0, description="linear warmup steps")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping (0 = off)")
    seed: int = Field(42, ge=0, lt=2**63, description="seeds init, data order and dropout")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="training precision; auto (the default): on CUDA bf16 (fp16 on GPUs without bf16); on a CPU "
                            "with AVX512-BF16/AMX whichever of bf16 and fp32 a short probe measures faster (once per "
                            "machine; $DSTUNE_CPU_PRECISION=probe measures again), on other CPUs fp32")
    activation_checkpointing: bool | Literal["auto"] = Field(
        False, description="recompute activations in backward to save memory; auto: on only where `dstune "
                           "estimate` says the run does not fit the device (or this rank's share of RAM) without it")
    activation_checkpointing_every: int = Field(
        1, gt=0, description="with activation_checkpointing: recompute every n-th layer only; the others keep "
                             "their activations (less recompute for more memory; `dstune estimate` shows both)")
    lean_activations: bool = Field(True, description="Llama-style RMSNorm and SwiGLU keep no redundant copies "
                                                     "for the backward (same numbers, less activation memory)")
    compile: bool = Field(False, description="torch.compile each transformer layer (ZeRO 0-2; the first steps "
                                             "pay the compile time)")
    loss_chunk_tokens: int = Field(
        1024, ge=0, description="causal_lm: cross-entropy over this many tokens at a time, never fp32 logits "
                                "for the whole batch (0 = transformers' loss)")
    measure_memory: Literal["off", "allocator", "device"] = Field(
        "allocator", description="memory.json: off; allocator (the default, host-side counters, no sync): engine "
                                 "bytes after step 1 and each phase's peak from the caching allocator (GPU) or the "
                                 "process RSS (CPU); device: also a device-level sampler (cudaMemGetInfo in a thread, "
                                 "a CUDA extension built at its first use) and pynvml's view of the process")

    @field_validator("measure_memory", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        return "off" if v is False else v   # YAML reads a bare `off` as false

    profile_step: int = Field(0, ge=0, description="profile this optimizer step with torch.profiler: a trace per "
                                                  "rank and a table of the costliest operators in output_dir/profile/ "
                                                  "(0 = off)")
    log_every: int = Field(1, gt=0, description="steps between metric lines")
    checkpoint_every: int = Field(0, ge=0, description="steps between DeepSpeed checkpoints (0 = only at the end)")
    keep_checkpoints: int = Field(2, ge=1, description="complete checkpoints kept (the newest); older ones are "
                                  "removed once a newer one is complete")
    nan_policy: Literal["stop", "skip"] = Field(
        "stop", description="a step whose loss or gradients are not finite: stop the run (the last complete "
                            "checkpoint is kept), or skip its update and go on (stops after 8 such steps in a row)")
    save_final: bool = Field(True, description="write the final checkpoint and trainable weights (bench: off)")
    resume: bool = Field(True, description="continue from output_dir's last complete checkpoint if there is one")
    dist_timeout_s: int = Field(600, gt=0, description="seconds a collective may wait before the job fails")
    build_timeout_s: int = Field(1800, gt=0, description="seconds to wait for another process's JIT build of "
                                 "an op before the job fails")


LOWER_IS_BETTER = ("loss", "perplexity", "nll_loss")  # every other metric (accuracy, f1, bleu, rouge*) is better higher


class EarlyStoppingConfig(_Section):
    metric: str = Field("loss", description="the held-out metric to watch (loss, perplexity, accuracy, f1, bleu, "
                                            "rougeL, ... as the task reports them)")
    mode: Literal["auto", "min", "max"] = Field(
        "auto", description="whether lower or higher is better; auto: lower for loss and perplexity, else higher")
    patience: int = Field(3, ge=1, description="evaluations in a row without improvement before training stops")
    min_delta: float = Field(0.0, ge=0, description="the least change that counts as an improvement")

    def lower_is_better(self) -> bool:
        return self.mode == "min" or (self.mode == "auto" and self.metric in LOWER_IS_BETTER)


class EvaluationConfig(_Section):
    every: int = Field(0, ge=0, description="steps between evaluations (0 = before and after training only)")
    batch_size: int = Field(16, gt=0, description="examples per rank per eval batch")
    max_samples: int | None = Field(None, gt=0, description="evaluate on at most this many examples")
    generate: bool | None = Field(None, description="score generations with BLEU/ROUGE; default: on for seq2seq")
    max_new_tokens: int = Field(32, gt=0, description="generation length for BLEU/ROUGE")
    early_stopping: EarlyStoppingConfig | None = Field(
        None, description="stop training when the held-out metric has not improved for `patience` evaluations "
                          "(needs evaluation.every and held-out rows)")
    keep_best: bool | None = Field(
        None, description="keep the best-scoring trainable state (by early_stopping's metric, else the loss) as "
                          "best.safetensors beside the last; eval, export, generate and chat load it by default. "
                          "Default: on with early_stopping")

    @model_validator(mode="after")
    def _stops_on_evaluations(self) -> "EvaluationConfig":
        if self.early_stopping is not None and not self.every:
            raise ValueError("evaluation.early_stopping needs evaluation.every (steps between the evaluations it "
                             "watches)")
        return self

    def watched(self) -> EarlyStoppingConfig | None:
        """What the best state is chosen by (early_stopping's metric, else the loss), or None without keep_best."""
        keep = self.keep_best if self.keep_best is not None else self.early_stopping is not None
        return (self.early_stopping or EarlyStoppingConfig()) if keep else None


TRACKERS = ("tensorboard", "jsonl", "wandb", "mlflow")
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


class LoggingConfig(_Section):
    report_to: list[Literal[TRACKERS]] = Field(
        ["tensorboard", "jsonl"], description="where rank 0 logs metrics: tensorboard (run dir), jsonl (run dir's "
                                              "metrics.jsonl), wandb (WANDB_MODE=offline works without a network), "
                                              "mlflow (mlflow_tracking_uri, e.g. file:./mlruns); the resolved recipe "
                                              "is each run's config")
    project: str = Field("dstune", description="W&B project / MLflow experiment")
    run_name: str | None = Field(None, description="the run's name in W&B / MLflow (default: output_dir's name)")
    mlflow_tracking_uri: str | None = Field(None, description="MLflow tracking URI (default: MLFLOW_TRACKING_URI, "
                                                              "else MLflow's own default)")

    @field_validator("report_to")
    @classmethod
    def _installed(cls, v: list[str]) -> list[str]:
        import importlib.util
        missing = [t for t in dict.fromkeys(v) if t in TRACKER_PACKAGES and not importlib.util.find_spec(TRACKER_PACKAGES[t])]
        if missing:
            raise ValueError(f"{', '.join(missing)} not installed here: pip install "
                             + " ".join(f"'dstune[{t}]'" for t in missing))
        return list(dict.fromkeys(v))


DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


class DistillConfig(_Section):
    teacher: str = Field(description="the teacher: a dstune run dir (its base, methods and trained weights) or a "
                                     "local Hugging Face model folder; same task, same vocabulary or labels")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the distillation term: loss = (1 - alpha) * "
                                                      "task loss + alpha * T^2 * divergence")
    temperature: float = Field(2.0, gt=0, description="T: both models' logits are divided by it")
    divergence: Literal[DIVERGENCES] = Field(
        "forward_kl", description="forward_kl = KL(teacher || student), reverse_kl = KL(student || teacher), or "
                                  "jsd (Jensen-Shannon); over the label logits (classification) or per target "
                                  "token (causal_lm, seq2seq)")


PREFERENCE_LOSSES = ("dpo", "ipo", "simpo", "orpo", "kto")
REFERENCES = ("auto", "base", "copy", "precompute")
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "kto": 0.1, "simpo": 2.0, "orpo": 0.1}


class PreferenceConfig(_Section):
    loss: Literal[PREFERENCE_LOSSES] = Field(
        "dpo", description="dpo (Rafailov et al. 2023; label_smoothing > 0: cDPO), ipo (Azar et al. 2023), simpo "
                           "(Meng et al. 2024: no reference), orpo (Hong et al. 2024: no reference), kto "
                           "(Ethayarajh et al. 2024: unpaired rows labelled good or bad)")
    beta: float | None = Field(None, gt=0, description="dpo, ipo, kto: how far from the reference the rewards may "
                                                       "move (default 0.1); simpo: the reward scale (default 2.0); "
                                                       "orpo: lambda, the odds-ratio term's weight (default 0.1)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="dpo, simpo: the share of pairs assumed "
                                                                  "mislabelled (cDPO)")
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: the target reward margin gamma")
    desirable_weight: float = Field(1.0, gt=0, description="kto: weight of rows labelled good")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of rows labelled bad")
    sft_weight: float = Field(0.0, ge=0, description="adds sft_weight × the chosen reply's token-mean NLL (RPO; "
                                                     "orpo always has it, with weight 1)")
    reference: str = Field(
        "auto", description="where the reference log-probabilities come from (dpo, ipo, kto): base (the model with "
                            "its methods stepped aside: no second copy; methods that leave the base frozen), copy "
                            "(a frozen copy of model.path, partitioned under ZeRO-3), precompute (computed once "
                            "before the first step with the methods stepped aside, kept with the prepared data), "
                            "or a model folder or dstune run dir (e.g. the SFT run); auto: base where the methods "
                            "leave the base frozen, else precompute")

    @field_validator("sft_weight")
    @classmethod
    def _orpo_has_its_nll(cls, v: float, info) -> float:
        if v and info.data.get("loss") == "orpo":
            raise ValueError("orpo has its NLL term built in (weight 1); leave sft_weight at 0")
        return v

    def beta_value(self) -> float:
        return self.beta if self.beta is not None else DEFAULT_BETA[self.loss]

    def uses_reference(self) -> bool:
        return self.loss in ("dpo", "ipo", "kto")

    def reference_path(self) -> str | None:
        """The model folder or run dir `reference` names, or None for base, copy, precompute and auto."""
        return None if self.reference in REFERENCES else self.reference


PER_ADAPTER_TRAINING = ("lr", "weight_decay", "betas", "eps", "lr_schedule", "warmup_steps", "max_steps", "epochs",
                        "micro_batch_size", "max_grad_norm", "nan_policy")  # what each adapter of a job may set


class AdapterConfig(_Section):
    """One named adapter of a job that trains several over one shared base (`adapters:`)."""
    name: str = Field(description="the adapter's name (letters, digits, _ and -): its run dir is "
                                  "output_dir/adapters/NAME")
    task: Literal[TASK_NAMES] | None = Field(
        None, description="what it learns (default: the job's task); classification and causal_lm adapters can "
                          "share a decoder-only base, each classifier with a head of its own")
    methods: list[dict[str, Any]] | None = Field(
        None, description="its own tuning methods (only those that leave the base frozen); default: the job's "
                          "methods, or none beside shared_methods when the job has them")
    data: dict[str, Any] | None = Field(None, description="its data: keys of `data` over the job's (default: the "
                                                          "job's data)")
    training: dict[str, Any] | None = Field(
        None, description=f"its own values of training.{{{', '.join(PER_ADAPTER_TRAINING)}}} over the job's "
                          "(micro_batch_size: its rows in each micro-batch)")
    evaluation: dict[str, Any] | None = Field(None, description="keys of `evaluation` over the job's")

    @model_validator(mode="before")
    @classmethod
    def _shared_keys(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            for key in raw:
                if key not in cls.model_fields and key in RunConfig.model_fields:
                    raise ValueError(f"{key}: shared by every adapter of the job; set it at the top level")
                if key not in cls.model_fields:
                    raise ValueError(f"{key}: unknown key" + (did_you_mean(str(key), cls.model_fields) or
                                                              f"; an adapter sets {', '.join(cls.model_fields)}"))
            for section, fields in (("data", DataConfig.model_fields), ("evaluation", EvaluationConfig.model_fields)):
                for key in raw.get(section) or {} if isinstance(raw.get(section), dict) else {}:
                    if key not in fields:
                        raise ValueError(f"{section}.{key}: unknown key{did_you_mean(str(key), fields)}")
        return raw

    @field_validator("name")
    @classmethod
    def _run_dir_name(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
            raise ValueError(f"{name!r}: an adapter's name is its run dir's: letters, digits, _ and - (not first)")
        return name

    @field_validator("training")
    @classmethod
    def _own_training(cls, training: dict[str, Any] | None) -> dict[str, Any] | None:
        for key in training or {}:
            if key in TrainingConfig.model_fields and key not in PER_ADAPTER_TRAINING:
                raise ValueError(f"training.{key}: shared by every adapter of the job (one base, one engine); "
                                 f"an adapter sets only {', '.join(PER_ADAPTER_TRAINING)}")
            if key not in TrainingConfig.model_fields:
                raise ValueError(f"training.{key}: unknown key" + did_you_mean(key, PER_ADAPTER_TRAINING))
        return training


class RunConfig(_Section):
    task: Literal[TASK_NAMES] = Field(description="what the model learns")
    model: ModelConfig = Field(description="the base model: a local folder (or a GGUF file in it), or a tiny "
                                           "random one")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="the tokenizer and its chat "
                                                                                    "template")
    data: DataConfig = Field(description="training and evaluation data, its format and columns, and how rows "
                                         "become examples")
    methods: list[dict[str, Any]] = Field(
        default_factory=lambda: [{"name": "full"}],
        description="tuning methods, each {name: ..., options...}; see `dstune methods`")
    deepspeed: str | dict[str, Any] = Field(
        "zero0", description="ds_configs name (zero0..zero3, zero3_offload), a DeepSpeed JSON path, or inline")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="the optimizer, its schedule, "
                                     "batch sizes, precision and checkpoints")
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig, description="held-out scoring before, "
                                         "during and after training")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="where metrics go")
    distill: DistillConfig | None = Field(None, description="train against a frozen teacher's outputs as well "
                                                            "(knowledge distillation); composes with any method")
    preference: PreferenceConfig | None = Field(None, description="task preference: the objective and its "
                                                                 "reference model (default: dpo)")
    output_dir: str = Field(description="run directory: checkpoints, metrics, trainable.safetensors")
    adapters: list[AdapterConfig] | None = Field(
        None, description="train several named adapters over this one base in one job: each its own methods, data, "
                          "learning rate, schedule, steps and evaluation; each ends as a run dir "
                          "output_dir/adapters/NAME (see docs/how-to/many-adapters.md)")
    shared_methods: list[dict[str, Any]] | None = Field(
        None, description="with adapters: tuning methods every adapter shares (one LoRA, say), trained on all "
                          "their rows (multi-task learning by hard parameter sharing); each adapter adds its own "
                          "methods and head")

    @model_validator(mode="after")
    def _preference_section(self) -> "RunConfig":
        if self.preference is not None and self.task != "preference":
            raise ValueError(f"preference: the preference section is for task preference (this run is {self.task})")
        if self.task == "preference" and self.preference is None:
            self.preference = PreferenceConfig()
        return self

    @model_validator(mode="after")
    def _adapters(self) -> "RunConfig":
        if self.adapters is None:
            return self
        if not self.adapters:
            raise ValueError("adapters: list at least one adapter (or leave the key out for one)")
        names = [a.name for a in self.adapters]
        if twice := next((n for i, n in enumerate(names) if n in names[:i]), None):
            raise ValueError(f"adapters: the name {twice!r} is given twice; each adapter's run dir is named after it")
        for section in ("distill", "preference"):
            if getattr(self, section) is not None:
                raise ValueError(f"{section}: not with adapters yet; train it as a job of its own")
        shared = [str(m.get("name")) for m in self.shared_methods or []]
        for i, a in enumerate(self.adapters):
            if twice := next((str(m.get("name")) for m in self.own_methods(a) if str(m.get("name")) in shared), None):
                raise ValueError(f"adapters[{i}] ({a.name}).methods: {twice} is one of the shared_methods already; "
                                 "an adapter adds methods of other kinds (or none: its head)")
        tasks = {a.task or self.task for a in self.adapters}
        if len(tasks) > 1 and tasks != {"classification", "causal_lm"}:
            raise ValueError(f"adapters: tasks {', '.join(sorted(tasks))} in one job; adapters of different tasks "
                             "are classification and causal_lm over one decoder-only base")
        if len(tasks) > 1 and self.task != "causal_lm":
            raise ValueError(f"task: {self.task}, but adapters of different tasks share a causal LM's base: set "
                             "task: causal_lm (each classifier sets task: classification)")
        self.adapter_runs()  # each adapter's own recipe must be valid
        return self

    @model_validator(mode="after")
    def _shared_methods(self) -> "RunConfig":
        if self.shared_methods is not None and not self.adapters:
            raise ValueError("shared_methods: methods shared by the adapters of a job; with no adapters, list them "
                             "under methods")
        if self.shared_methods == []:
            raise ValueError("shared_methods: list at least one method (or leave the key out)")
        if self.shared_methods and self.methods != [{"name": "full"}]:  # the default: a dumped job's config.yaml
            raise ValueError("methods: unused with shared_methods (each adapter lists its own methods, none by "
                             "default); move them into shared_methods or into the adapters")
        return self

    def own_methods(self, adapter: AdapterConfig) -> list[dict[str, Any]]:
        """An adapter's own methods: its `methods`, else none when the job has shared_methods, else the job's."""
        if adapter.methods is not None:
            return adapter.methods
        return [] if self.shared_methods else self.methods

    def model_task(self) -> str:
        """The task whose model the job builds: the job's task, or its adapters' one task when they all
        learn another (a job's classifiers over a causal LM's base add their own heads)."""
        tasks = {a.task or self.task for a in self.adapters or []}
        return next(iter(tasks)) if len(tasks) == 1 else self.task

    def adapter_runs(self) -> list[tuple[str, "RunConfig"]]:
        """Each adapter of the job as the recipe of a run of its own (its run dir: output_dir/adapters/NAME):
        the job's model, tokenizer, DeepSpeed config and shared settings, its own methods, data, training
        values and evaluation. A recipe without `adapters` is one adapter (itself)."""
        if not self.adapters:
            return [("", self)]
        job = self.model_dump(mode="json", exclude={"adapters", "shared_methods"})
        runs = []
        for i, a in enumerate(self.adapters):
            own = {"task": a.task or self.task, "methods": (self.shared_methods or []) + self.own_methods(a),
                   "data": merge(job["data"], a.data or {}), "training": merge(job["training"], a.training or {}),
                   "evaluation": merge(job["evaluation"], a.evaluation or {}),
                   "output_dir": str(Path(self.output_dir) / "adapters" / a.name)}
            try:
                runs.append((a.name, RunConfig.model_validate({**job, **own})))
            except ValidationError as e:
                err = e.errors()[0]
                key = ".".join(str(p) for p in err["loc"])
                raise ValueError(f"adapters[{i}] ({a.name}).{key}: {err['msg'].removeprefix('Value error, ')}") \
                    from None
        return runs

    def with_training(self, **changes) -> "RunConfig":
        """This config with some training settings changed (e.g. `auto` ones made concrete)."""
        return self.model_copy(update={"training": self.training.model_copy(update=changes)})

    def resolve_paths(self) -> "RunConfig":
        """Make every path absolute (relative paths are taken from the working directory)."""
        def absolute(p: str | None) -> str | None:
            return None if p is None else os.path.abspath(os.path.expanduser(p))
        self.model.path = absolute(self.model.path)
        self.tokenizer.path = absolute(self.tokenizer.path)
        if self.tokenizer.template_is_file():
            self.tokenizer.chat_template = absolute(self.tokenizer.chat_template)
        if isinstance(self.data.train, list):
            for source in self.data.train:
                source.path = absolute(source.path)
        elif self.data.train != RANDOM_DATA:
            self.data.train = absolute(self.data.train)
        self.data.eval = absolute(self.data.eval)
        self.data.unlabeled = absolute(self.data.unlabeled)
        self.data.cache_dir = absolute(self.data.cache_dir)
        if (a := self.data.augment) is not None:
            a.neighbours, a.paraphrase_model = absolute(a.neighbours), absolute(a.paraphrase_model)
            a.back_translate = [absolute(p) for p in a.back_translate] if a.back_translate else None
        self.output_dir = absolute(self.output_dir)
        if self.distill is not None:
            self.distill.teacher = absolute(self.distill.teacher)
        if self.preference is not None and self.preference.reference_path():
            self.preference.reference = absolute(self.preference.reference)
        if isinstance(self.deepspeed, str) and self.deepspeed.endswith(".json"):
            self.deepspeed = absolute(self.deepspeed)
        for a in self.adapters or []:
            data = a.data or {}
            for key in ("eval", "unlabeled", "cache_dir"):
                if isinstance(data.get(key), str):
                    data[key] = absolute(data[key])
            if isinstance(data.get("train"), str) and data["train"] != RANDOM_DATA:
                data["train"] = absolute(data["train"])
            for source in data.get("train") if isinstance(data.get("train"), list) else []:
                if isinstance(source, dict) and isinstance(source.get("path"), str):
                    source["path"] = absolute(source["path"])
        return self


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`a.b=1 c=[x, y]` → {"a": {"b": 1}, "c": ["x", "y"]}; values are parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r}: expected key=value (e.g. training.lr=1e-4)")
        try:
            value = _yaml(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r}: {part} is not a section")
        node[leaf] = value
    return tree


_ITEM = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\[([A-Za-z0-9_-]+)\]$")  # methods[0], adapters[topic]


def apply_overrides(raw: dict[str, Any], items: list[str]) -> dict[str, Any]:
    """The recipe with `key=value` overrides applied: dotted keys merge into sections (parse_overrides); a key
    with a list item in it, `methods[0].r=16` or `adapters[topic].training.lr=1e-4` (an adapter by its index
    or its name), sets that item's key."""
    plain = [i for i in items if "[" not in i.partition("=")[0]]
    raw = merge(raw, parse_overrides(plain))
    for item in items:
        if item in plain:
            continue
        key, _, text = item.partition("=")
        value = parse_overrides([f"v={text}"])["v"]
        node: Any = raw
        parts = key.split(".")
        for i, part in enumerate(parts):
            m = _ITEM.match(part)
            name, index = (m.group(1), m.group(2)) if m else (part, None)
            if not isinstance(node, dict):
                raise UserError(f"override {item!r}: {'.'.join(parts[:i])} is not a section")
            if index is None:
                if i == len(parts) - 1:
                    node[name] = value
                else:
                    node = node.setdefault(name, {})
                continue
            node = node.get(name)
            if not isinstance(node, list):
                raise UserError(f"override {item!r}: the recipe has no list {name}")
            names = [x.get("name") if isinstance(x, dict) else None for x in node]
            at = int(index) if index.isdigit() else names.index(index) if index in names else None
            if at is None or at >= len(node):
                raise UserError(f"override {item!r}: {name} has no item {index!r} (it holds "
                                f"{', '.join(str(n) for n in names) or 'none'})")
            if i == len(parts) - 1:
                node[at] = value
            else:
                node = node[at]
    return raw


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _key_lines(text: str) -> dict[tuple, int]:
    """Map each key path in a YAML document to its 1-based line, so errors can say file:line."""
    lines: dict[tuple, int] = {}

    def walk(node: yaml.Node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                lines[path + (k.value,)] = k.start_mark.line + 1
                walk(v, path + (k.value,))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                lines[path + (i,)] = v.start_mark.line + 1
                walk(v, path + (i,))

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return lines


UNION_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*|dict\[.*|function-.*)$")  # pydantic's branch names


def _model_in(annotation) -> type[BaseModel] | None:
    """The pydantic model a field holds (directly, in a list, or as a branch of a union)."""
    from typing import get_args
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for a in get_args(annotation) if (m := _model_in(a)) is not None), None)


def _fields_at(loc: tuple) -> list[str]:
    """The keys a recipe may hold at `loc` (e.g. ("training",)): what a misspelt key is compared with."""
    cls: type[BaseModel] | None = RunConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part)
        cls = _model_in(field.annotation) if field is not None else None
        if cls is None:
            return []
    return list(cls.model_fields)


def format_validation_error(err: ValidationError, source: str, key_lines: dict[tuple, int],
                            overrides: dict[tuple, str] | None = None) -> str:
    """First pydantic error as one line: `recipe.yaml:7: training.lr: Input should be a valid number`, or, for a
    key given on the command line (`overrides`: key path -> the `key=value` item), `override training.lr=x: ...`."""
    errors = err.errors()
    e = max(errors, key=lambda x: len(x["loc"]))  # of a union's branches, the one that got furthest
    loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and UNION_TAG.match(p)))
    key = ".".join(str(p) for p in loc) or "(top level)"
    msg = "unknown key" + did_you_mean(str(loc[-1]), _fields_at(loc[:-1])) if e["type"] == "extra_forbidden" \
        else e["msg"].removeprefix("Value error, ")
    if e["type"] not in ("missing", "extra_forbidden") and "input" in e and not isinstance(e["input"], dict) \
            and repr(e["input"]) not in msg:  # a validator's own message may already quote it
        msg += f" (got {e['input']!r})"
    where = source
    given = overrides or {}
    below = [item for path, item in given.items() if path[:len(loc)] == loc]  # an override made the key itself
    for n in range(len(loc), 0, -1):
        if loc[:n] in given or (n == len(loc) and below):
            where = f"override {given.get(loc[:n]) or below[0]}"
            break
        if loc[:n] in key_lines:
            where = f"{source}:{key_lines[loc[:n]]}"
            break
    return f"{where}: {key}: {msg}"


def load_config(recipe: str | os.PathLike, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML recipe, apply overrides, validate, and resolve paths. Raises UserError."""
    path = Path(recipe)
    if not path.is_file():
        raise UserError(f"recipe not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {e.start})") from None
    try:
        raw = _yaml(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe is a mapping of sections (task, model, data, ...)")
    raw = apply_overrides(raw, overrides or [])
    given = {tuple(item.partition("=")[0].split(".")): item for item in overrides or []}
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise UserError(format_validation_error(e, str(path), _key_lines(text), given)) from None
    return cfg.resolve_paths()


def config_from_dict(raw: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate an already-parsed config (e.g. a run dir's saved config.yaml)."""
    try:
        return RunConfig.model_validate(raw).resolve_paths()
    except ValidationError as e:
        raise UserError(format_validation_error(e, source, {})) from None


def dump_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
