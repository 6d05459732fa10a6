"""Build the model for a task: from a local folder, a GGUF file, or a tiny random config (tests)."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any

import torch

from dstune.config import RunConfig
from dstune.errors import UserError, first_line
from dstune.families import tiny_config
from dstune.models import gguf_cache, quantize
from dstune.tasks import get_task


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def weights_dtype(precision: str) -> torch.dtype:
    """The dtype DeepSpeed holds a model's parameters in for `training.precision` (fp32 for anything else, e.g.
    `auto` in a run dir written before it was resolved)."""
    return DTYPES.get(precision, torch.float32)


def cast_as_deepspeed(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """The model as a DeepSpeed engine holds it for `training.precision`: its parameters in the training dtype,
    its buffers as they were (a rotary model's inv_freq stays fp32: casting it too moves bf16 losses in the
    third decimal)."""
    dtype = weights_dtype(precision)
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    return model


def require_gguf_file(folder: str, name: str) -> None:
    """model.gguf_file must be a file in model.path: else a one-line error naming the GGUF files it holds."""
    if not os.path.isfile(os.path.join(folder, name)):
        present = sorted(f for f in os.listdir(folder) if f.endswith(".gguf")) if os.path.isdir(folder) else []
        raise UserError(f"model.gguf_file: no {name} in {folder}" + (f"; it holds {', '.join(present)}" if present
                                                                   else "; it holds no .gguf file"))


def auto_class(task: str):
    """The transformers Auto class that builds a model for a dstune task."""
    import transformers
    return getattr(transformers, get_task(task).auto_class)


def recipe_config(cfg: RunConfig, tokenizer=None, labels: list | None = None) -> Any:
    """The recipe's model config, nothing loaded (training and `dstune estimate` both start here): a tiny
    config, or the folder's config.json, with `model.config_overrides`; the classification head's labels
    (two when the estimate knows none); special token ids from the tokenizer, if there is one."""
    m = cfg.model
    task = get_task(cfg.task)
    task_kwargs = task.model_config_kwargs(labels)
    if m.tiny:
        # no tokenizer (random token data, or an estimate): model.config_overrides gives the vocabulary
        special = {k: getattr(tokenizer, k) for k in ("pad_token_id", "bos_token_id", "eos_token_id")
                   if getattr(tokenizer, k, None) is not None}
        vocab = len(tokenizer) if tokenizer is not None else m.config_overrides.get("vocab_size", 32000)
        config = tiny_config(m.tiny, vocab, special, {**task_kwargs, **m.config_overrides})
    else:
        if not os.path.isdir(m.path):
            raise UserError(f"model.path: not a folder: {m.path}")
        if m.gguf_file:
            require_gguf_file(m.path, m.gguf_file)
        entry = gguf_cache.entry_for(m.path, m.gguf_file) if m.gguf_file else None
        keep = lambda tmp: gguf_cache.keep_config(_read_config(m, m.path, m.gguf_file), tmp)  # noqa: E731
        with (gguf_cache.sound_folder(entry / "config", keep) if entry else contextlib.nullcontext()) as kept:
            # the config a GGUF file gave, read once and kept as config.json (models/gguf_cache.py)
            config = _read_config(m, str(kept), None, **task_kwargs) if kept else \
                _read_config(m, m.path, m.gguf_file, **task_kwargs)
        for k, v in m.config_overrides.items():
            setattr(config, k, v)
    if getattr(config, "pad_token_id", None) is None and (tokenizer is not None or not task.generative):
        # a classification head finds each row's last token by the pad id
        config.pad_token_id = tokenizer.pad_token_id if tokenizer is not None else 0
    return config


def _read_config(m, folder: str, gguf_file: str | None, **kwargs):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, gguf_file=gguf_file, local_files_only=True,
                                          trust_remote_code=m.trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"model.path: cannot read a model config in {folder}: {first_line(e)}") from None
    except ImportError as e:  # transformers reads GGUF files with the `gguf` package
        raise UserError(f"model.gguf_file: reading {gguf_file} needs the gguf package "
                        f"(pip install 'gguf>=0.10'): {first_line(e)}") from None


def check_positions(cfg: RunConfig, config) -> None:
    """data.max_length must fit the model's positions: a table (GPT-2, BERT) would be indexed past its end
    mid-run; a rotary model (Llama, Qwen, ...) runs longer rows but was trained on at most
    max_position_embeddings, and packing would fill such rows with many documents."""
    rotary = any(getattr(config, a, None) is not None for a in ("rope_theta", "rope_parameters", "rope_scaling"))
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and cfg.data.max_length > limit:
        extend = (" (or extend its context: model.config_overrides with rope_scaling and max_position_embeddings)"
                  if rotary else "")
        raise UserError(f"data.max_length: {cfg.data.max_length:,} tokens do not fit the model's {limit:,} positions "
                        f"({config.model_type}); use at most {limit:,}{extend}")


def check_buildable(cfg: RunConfig, config) -> None:
    """With model.config_overrides (or a tiny model), build the model once on the meta device, allocating
    nothing: a shape that cannot exist (a width that the heads do not divide, ...) is named now, not in a
    traceback on every rank."""
    if not (cfg.model.config_overrides or cfg.model.tiny):
        return
    try:
        with torch.device("meta"):
            auto_class(cfg.task).from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - whatever the model's constructor refuses
        raise UserError(f"model.config_overrides: the model cannot be built with {cfg.model.config_overrides}: "
                        f"{first_line(e)}") from None


def load_model(cfg: RunConfig, tokenizer, labels: list | None = None, device=None) -> torch.nn.Module:
    """Instantiate the task model in fp32 (DeepSpeed casts for bf16/fp16 and keeps fp32 master weights), its
    linear layers quantized on `device` (default: the CPU) when the recipe or the checkpoint says so.

    Under ZeRO-3 the caller must hold a `HfDeepSpeedConfig` first, so weights are created partitioned (a
    quantized base loads whole and deepspeed.initialize partitions it).
    """
    config = recipe_config(cfg, tokenizer, labels)
    auto = auto_class(cfg.task)
    m = cfg.model
    mode = quantize_mode(cfg, config)
    quant = (mode, weights_dtype(cfg.training.precision), device or "cpu") if mode else None
    if m.tiny:
        torch.manual_seed(cfg.training.seed)  # the random weights are the recipe's: a run dir rebuilds the same base
        model, info = auto.from_config(config, dtype=torch.float32), {}
    else:
        from safetensors import SafetensorError
        try:
            with held_load_report():
                model, info = (_load_gguf(m, auto, config, quant) if m.gguf_file
                               else _load_folder(m, auto, config, m.path, quant))
        except (OSError, SafetensorError) as e:  # no weights, only a .bin (pickles are not loaded), a cut-off file
            raise UserError(f"model.path: cannot load the weights in {m.path}: {first_line(e)}") from None
        except RuntimeError as e:
            if "mismatched_sizes" not in str(e):
                raise
            raise UserError(f"model.config_overrides: {m.config_overrides} change the shapes of the weights in "
                            f"{m.path} (transformers' report above lists them); override only what keeps them "
                            "(dropout, ...), or train a new model with model.tiny") from None
    if quant and not quantize.quantized_names(model):  # built or dequantized in full precision: one more pass
        config = model.config
        with quantize.saved_for_loading(model) as folder:
            del model  # freed before the quantized copy loads
            model, _ = _load_folder(m, auto, config, folder, quant)
    model.dstune_new_weights = sorted(info.get("missing_keys") or [])
    return model


def quantize_mode(cfg: RunConfig, config) -> str | None:
    """How the base is quantized: `model.quantize`, or what a checkpoint saved quantized declares (the two
    must agree); None for a full-precision base."""
    saved = quantize.checkpoint_mode(config)
    asked = cfg.model.quantize
    if saved and asked and saved != asked:
        raise UserError(f"model.quantize: {asked}, but {cfg.model.path} holds weights saved quantized as "
                        f"{saved}; set model.quantize: {saved} (or leave it out)")
    return asked or saved


def _load_folder(m, auto, config, folder: str, quant: tuple | None = None):
    """(model, loading info) from a folder of safetensors weights (pickles are not loaded); `quant`: (mode,
    dtype, device) to quantize the linear layers as they load."""
    if quant:
        return quantize.load_quantized(auto, folder, config, *quant, trust_remote_code=m.trust_remote_code)
    return auto.from_pretrained(folder, config=config, local_files_only=True, trust_remote_code=m.trust_remote_code,
                                dtype=torch.float32, use_safetensors=True, output_loading_info=True)


def _load_gguf(m, auto, config, quant: tuple | None = None):
    """(model, loading info) from the GGUF file's dequantized copy in the cache (models/gguf_cache.py): read
    where it is sound, else dequantized from the file by transformers and kept there."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    entry = gguf_cache.entry_for(m.path, m.gguf_file)
    if entry is None:
        return _dequantize(m, auto, config)
    loaded = []

    def keep(tmp):
        loaded.append(_dequantize(m, auto, config))
        gguf_cache.keep_weights(loaded[0][0], sorted(loaded[0][1].get("missing_keys") or []), tmp)
        print(f"[dstune] {m.gguf_file}: dequantized once, kept in {entry} for later loads "
              "(DSTUNE_MODEL_CACHE=off keeps none)", file=sys.stderr, flush=True)

    # under ZeRO-3 the weights load partitioned: such a model cannot be saved whole, only read from the cache
    with gguf_cache.sound_folder(entry / auto.__name__, None if is_deepspeed_zero3_enabled() else keep) as kept:
        if loaded:
            return loaded[0]
        if kept is None:
            return _dequantize(m, auto, config)
        model, info = _load_folder(m, auto, config, str(kept), quant)
    model.config.name_or_path = m.path  # as a load from the GGUF file names it
    return model, info


def _dequantize(m, auto, config):
    """(model, loading info) from the GGUF file itself, through transformers."""
    model, info = auto.from_pretrained(m.path, config=config, gguf_file=m.gguf_file, local_files_only=True,
                                       trust_remote_code=m.trust_remote_code, dtype=torch.float32,
                                       output_loading_info=True)
    # GGUF weights arrive dequantized to fp32, but the model stays marked as quantized, which makes
    # save_pretrained refuse it (merged export); they are plain tensors, so drop the mark
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    return model, info


def new_weights_line(model: torch.nn.Module) -> str | None:
    """One line naming the weights the checkpoint lacked (a new task head), or None."""
    names = getattr(model, "dstune_new_weights", [])
    if not names:
        return None
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return f"not in model.path, initialised at random: {shown}"


@contextlib.contextmanager
def held_load_report():
    """transformers logs a table of every weight missing from the checkpoint, and a new task head always is
    (on every eval of a run dir too, whose own file then fills it): the table is held back, and shown only
    when loading fails (a shape mismatch is explained there); `new_weights_line` says it in one line."""
    log = logging.getLogger("transformers.modeling_utils")
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            held.append(record)
            return False
        return True

    log.addFilter(hold)
    try:
        yield
    except BaseException:
        log.removeFilter(hold)
        for record in held:
            log.handle(record)
        raise
    finally:
        log.removeFilter(hold)


WEIGHT_FILES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
EDGE = 1 << 20  # bytes read at each end of a weight file for its fingerprint


def base_fingerprint(cfg: RunConfig) -> str:
    """What identifies the frozen base a run trains on, cheaply enough for a 70B model: a random tiny model's
    family, config and seed; else the model folder's config and, for each weight file, its name, size and a
    hash of its first and last MiB (where safetensors keeps its header and GGUF its metadata and last
    tensors). Checkpoints hold only what trains, so a resume must find the same base."""
    import hashlib
    import json

    m, h = cfg.model, hashlib.blake2b(digest_size=12)
    if m.tiny:
        h.update(json.dumps([m.tiny, m.config_overrides, cfg.training.seed], sort_keys=True, default=str).encode())
        return h.hexdigest()
    names = sorted(n for n in os.listdir(m.path) if n == "config.json" or n.endswith(WEIGHT_FILES))
    for name in names:
        path = os.path.join(m.path, name)
        size = os.path.getsize(path)
        h.update(f"{name}\0{size}\0".encode())
        with open(path, "rb") as f:
            h.update(f.read(EDGE))
            f.seek(max(size - EDGE, 0))
            h.update(f.read(EDGE))
    return h.hexdigest()


def base_is_loadable(cfg: RunConfig) -> bool:
    """Whether `model.path` is a folder `from_pretrained` loads as it is (no GGUF file, no random tiny config)."""
    return not cfg.model.tiny and not cfg.model.gguf_file


def prepare_for_training(model: torch.nn.Module, cfg: RunConfig) -> None:
    """The chunked loss, lean activations and activation checkpointing the recipe asks for (training and the
    estimate's trace)."""
    from dstune.models.lean_activations import use_lean_activations
    from dstune.models.losses import use_chunked_loss

    t = cfg.training
    if get_task(cfg.task).shifts_labels and t.loss_chunk_tokens:
        use_chunked_loss(model, t.loss_chunk_tokens)
    if t.lean_activations:
        use_lean_activations(model)
    if t.activation_checkpointing is True:  # "auto" is decided before (planning/fit.py)
        # a model with several adapters (methods/routing.py) recomputes each layer as the adapter it ran for
        kwargs = {"use_reentrant": False, **getattr(model, "dstune_checkpoint_kwargs", {})}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs,
                                                  every_n_layers=t.activation_checkpointing_every)
        else:  # transformers before 5.23 calls it gradient_checkpointing_enable
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs,
                                                every_n_layers=t.activation_checkpointing_every)


def compile_layers(model: torch.nn.Module, zero_stage: int) -> int:
    """torch.compile every transformer layer in place (one compiled graph serves all identical layers);
    returns how many. Embeddings, the head and the loss stay eager, as do methods outside the layers."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    if zero_stage == 3:
        raise UserError("training.compile: ZeRO-3 gathers parameters in module hooks torch.compile cannot trace; "
                        "use ZeRO 0-2 or compile: false")
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise UserError(f"training.compile: found no transformer layers to compile in {type(model).__name__}")
    for layer in layers:
        layer.compile()
    return len(layers)
