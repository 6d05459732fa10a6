"""dstune command line. Each subcommand is a function; its docstring is its help text."""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import sys
from pathlib import Path

from dstune.errors import UserError
from dstune.tasks import TASKS


def cmd_init(args: argparse.Namespace) -> int:
    """Write a commented recipe to start from: dstune init --model PATH --data FILE [--method lora] [--out FILE]

    Reads the model folder's files, no weights (a Hugging Face folder; a folder holding one .gguf file, or
    the file, sets model.gguf_file), and the data file, whose columns give the task unless --task names
    it: chosen and rejected replies (or a completion with a true/false label) are preference (dpo, or kto);
    a label column is classification; source and target, seq2seq; plain text, prompt/response pairs or chat
    data (OpenAI messages, ShareGPT, Alpaca), causal_lm. Writes a recipe (default recipe.yaml;
    an existing file only with --force) whose every key is commented with its description from the
    recipe schema; --method (default lora; comma-separated to combine) is written with every option at
    its default. Packing, batch sizes and the held-out share follow the data's size, the learning rate
    is the method's usual start (a tenth of it for preference tuning). At a terminal it asks for a missing --model or --data. Prints what it
    found and the command that trains.
    """
    from dstune.planning.recipe_init import init

    for line in init(args.model, args.data, args.task, args.method, args.out, args.force):
        print(line)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Fine-tune a model: dstune train RECIPE.yaml [key=value ...]

    The recipe (YAML) names the task, model, tokenizer, data, tuning methods, DeepSpeed config,
    training and evaluation settings and output_dir; `key=value` overrides any field, e.g.
    `training.lr=1e-4 deepspeed=zero3 methods='[{name: full}]'`. Run it as it is for one process,
    or under a launcher (`deepspeed`, `torchrun`, srun) for many: the same recipe works on all.
    """
    from dstune.config import load_config

    cfg = load_config(args.recipe, args.overrides)  # a recipe error answers before torch is imported
    from dstune.engine.trainer import train
    from dstune.planning.fit import resolve_checkpointing
    train(cfg, resolve_checkpointing)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Train a grid of settings in one job and rank them: dstune sweep RECIPE --grid KEY=V1,V2 [KEY=...] [key=value ...]

    Every combination of the --grid values becomes one adapter of a job over the recipe's base and data
    (docs/how-to/many-adapters.md), named after its values (lr1e-4_r8): the base is loaded once and every
    setting trains as a run of its own would. A grid key is one an adapter may set: training.{lr,
    weight_decay, betas, eps, lr_schedule, warmup_steps, max_steps, epochs, micro_batch_size, max_grad_norm,
    nan_policy}, evaluation.*, data.*, or methods[i].OPTION (an option of the recipe's i-th method, e.g.
    methods[0].r). The recipe needs held-out rows (data.eval or data.eval_fraction). Prints the settings
    ranked by the held-out metric (early stopping's when the recipe has it, else the task's: accuracy,
    perplexity), the best marked, with each one's run dir (output_dir/adapters/NAME), and writes sweep.md and
    sweep.png (every setting's held-out curve; set evaluation.every for more than two points).
    """
    from dstune.config import load_config
    from dstune.sweep.grid import sweep_recipe

    cfg = sweep_recipe(load_config(args.recipe, args.overrides), args.grid)
    from dstune.engine.trainer import train
    from dstune.planning.fit import resolve_checkpointing
    from dstune.sweep.report import write_report

    summary = train(cfg, resolve_checkpointing)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[dstune] sweep of {len(cfg.adapters)} settings ({Path(cfg.output_dir) / 'sweep.md'}, sweep.png):\n"
              + write_report(cfg, summary["adapters"]), flush=True)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """Tokenize (and pack) a recipe's data ahead of the job: dstune prepare RECIPE.yaml [key=value ...]

    Writes the prepared Arrow cache that `dstune train` with the same data, tokenizer and data settings
    then memory-maps on every rank without preparing again (e.g. run it on a CPU node before the GPU job;
    point data.cache_dir, or $DSTUNE_DATA_CACHE, at a filesystem the nodes share or copy it to each).
    data.augment's copies are made here too (paraphrase and back-translation run on a GPU when there is
    one). Prints the cache entry's folder, its rows and tokens.
    """
    from dstune.config import load_config

    cfg = load_config(args.recipe, args.overrides)
    from dstune.models.tokenizers import recipe_tokenizer
    from dstune.prepare.cache import prepared_data, summary
    from dstune.rundir.as_base import base_from_run
    cfg = base_from_run(cfg)
    tokenizer = recipe_tokenizer(cfg)
    for name, run in cfg.adapter_runs():  # with adapters: each one's data (those that share it, once)
        data, entry = prepared_data(run, tokenizer)
        if entry is None:
            raise UserError("data.train: `random` data is made on the fly; there is nothing to prepare")
        print(f"{name}: " * bool(name) + summary(data, entry), flush=True)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a finished run: dstune eval RUN_DIR [--data FILE] [key=value ...]

    Scores the trained model on FILE (default: the run's data.eval, or the rows it held out of
    data.train with data.eval_fraction) and prints a table of its metrics (--json: one JSON object):
    loss, accuracy and macro-F1 (classification), perplexity (causal_lm, seq2seq), and BLEU/ROUGE when
    evaluation.generate is on. The weights are held in the precision the run trained in, so the scores equal the
run's own final evaluation on the same rows. Overrides apply to the run's saved config (e.g.
evaluation.max_samples=100, training.precision=fp32).
    """
    import torch

    from dstune.engine.evaluate import evaluate, results_table
    from dstune.prepare.pipeline import prepare_eval, prepare_held_out
    from dstune.rundir.load import load_run

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = load_run(args.run_dir, device, args.overrides, checkpoint=args.checkpoint)
    cfg, tokenizer, model, labels = run.cfg, run.tokenizer, run.model, run.labels
    path = args.data or cfg.data.eval
    if path:
        data = prepare_eval(cfg, tokenizer, os.path.abspath(path), labels, key="--data")
    elif cfg.data.eval_fraction > 0:
        data = prepare_held_out(cfg, tokenizer, labels)
    else:
        raise UserError("--data: the run has no data.eval or data.eval_fraction; name an evaluation file")
    objective = None
    if cfg.preference:  # scored against its reference, as training scored it
        from dstune.preference.objective import objective_for_run
        objective = objective_for_run(cfg, run.methods, tokenizer, device)
    result = evaluate(model, data, cfg, tokenizer, objective=objective)
    if args.json:
        print(json.dumps(result, indent=1), file=args.print_to)
    else:
        best = f"the best state (step {run.best_step()}) on " if run.best_step() is not None else ""
        print(f"{best}{os.path.abspath(path) if path else 'the rows held out of data.train'} ({len(data.eval):,} rows):\n"
              f"{results_table({'score': result})}")
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    """Pick the rows worth labelling: dstune select RUN_DIR --pool FILE --strategy S --k N --out FILE

    Scores every row of the pool with the trained run and writes the k most informative, best first, as
    JSON lines (the row's own columns plus pool_row, score and strategy). classification: entropy, margin
    or least-confidence of the predicted distribution; causal_lm / seq2seq: nll, the mean negative
    log-likelihood per token of each row's reference (response / target), or of the model's own greedy
    reply (evaluation.max_new_tokens) for rows that hold only a prompt / source; random: a seeded sample,
    the baseline. Under a launcher (torchrun, deepspeed) the ranks share the scoring; rank 0 writes.
    """
    import torch

    from dstune.prepare.pipeline import prepare_pool
    from dstune.rundir.load import load_run
    from dstune.active.select import check_strategy, score_rows, write_selection

    out = os.path.abspath(args.out)
    if os.path.isdir(out) or not os.path.isdir(os.path.dirname(out)):
        raise UserError(f"--out: {args.out} must be a file in an existing folder")
    if args.k < 1:
        raise UserError(f"--k: must be at least 1, got {args.k}")
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch.distributed as dist
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")
    run = load_run(args.run_dir, device, checkpoint=args.checkpoint)
    cfg, tokenizer, model, labels = run.cfg, run.tokenizer, run.model, run.labels
    check_strategy(cfg.task, args.strategy)
    if not os.path.exists(args.pool):
        raise UserError(f"--pool: not found: {args.pool}")
    raw, rows = prepare_pool(cfg, tokenizer, labels, os.path.abspath(args.pool))
    if args.k > len(raw):
        raise UserError(f"--k: {args.k} is more than the pool's {len(raw):,} rows")
    scores = score_rows(model, rows, cfg.task, tokenizer, device, args.batch_size, args.strategy, args.seed,
                        rank, world, cfg.evaluation.max_new_tokens)
    if rank == 0:
        n = write_selection(raw, scores, args.k, out, args.strategy)
        print(f"[dstune] {n} of {len(raw):,} rows by {args.strategy} (scores {scores.min():.4g} to "
              f"{scores.max():.4g}) -> {out}", flush=True)
    return 0


def cmd_active_learn(args: argparse.Namespace) -> int:
    """Simulate active learning on a labelled pool: dstune active-learn RECIPE --pool FILE --rounds R --per-round K

    The pool's own labels are the oracle. For every strategy and seed: --initial random rows, then each
    round train the recipe on the labelled rows, score the rest of the pool with the trained run (as
    dstune select does) and label the --per-round most informative. --retrain base trains every round from
    the recipe's model; continue starts each round from the last one's, its methods merged into the weights
    (full, freeze, LoRA, IA3, BitFit, ...). Writes OUT/curve.json, curve.md (held-out metric per
    labelled-set size, mean ± sd over seeds) and curve.png; every round's run dir and picks stay under
    OUT/STRATEGY/seedN, and a rerun with the same settings resumes where the loop stopped. The recipe
    needs data.eval (the held-out set the curve is measured on).
    """
    from dstune.active.loop import run_loop

    for name in ("rounds", "per_round", "initial"):
        if getattr(args, name) < (0 if name == "rounds" else 1):
            raise UserError(f"--{name.replace('_', '-')}: must be positive, got {getattr(args, name)}")
    if not os.path.exists(args.pool):
        raise UserError(f"--pool: not found: {args.pool}")
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_loop(os.path.abspath(args.recipe), args.overrides, os.path.abspath(args.pool), args.rounds, args.per_round,
             args.initial, args.strategies.split(","), seeds, out.resolve(), args.batch_size, args.retrain)
    print((out / "curve.md").read_text(), end="")
    print(f"[dstune] learning curve: {out / 'curve.json'}, {out / 'curve.md'}, {out / 'curve.png'}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate text with a finished causal_lm or seq2seq run: dstune generate RUN_DIR --prompt TEXT

    Greedy by default; --sample with --temperature/--top-p samples. Prompts go through the
    tokenizer's chat template when it has one, as in training; --system TEXT puts a system message
    before each (causal_lm runs with a chat template). Prints each prompt (after `>>> `), its
    reply and a `---` line; --jsonl prints one {"prompt", "reply"} JSON object per line instead.
    """
    import torch

    from dstune.rundir.chat import needs_chat
    from dstune.rundir.load import load_run
    from dstune.tasks import get_task

    decoding = _decoding(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = load_run(args.run_dir, device, check=None if args.system is None else needs_chat("--system", args.system),
                   checkpoint=args.checkpoint)
    cfg, tokenizer, model = run.cfg, run.tokenizer, run.model
    task = get_task(cfg.task)
    if not task.generative:
        raise UserError(f"{args.run_dir}: a {cfg.task} run does not generate; use dstune eval")
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    torch.manual_seed(args.seed)
    for prompt in prompts:
        ids = task.prompt_ids(tokenizer, prompt, system=args.system)
        reply = tokenizer.decode(task.reply(model, tokenizer, ids, decoding), skip_special_tokens=True).strip()
        if args.jsonl:
            print(json.dumps({"prompt": prompt, "reply": reply}, ensure_ascii=False), file=args.print_to, flush=True)
        else:
            print(f">>> {prompt}\n{reply}\n---", flush=True)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Chat with a finished causal_lm run in the terminal: dstune chat RUN_DIR [--system TEXT]

    A multi-turn conversation through the run's chat template (the run needs one): each line you type
    is a user turn, the reply prints as it is generated, and the whole history (your turns and the
    model's replies, rendered by the template as training rendered them) is the next reply's prompt.
    When it outgrows the model's positions the oldest exchanges are dropped, the system message kept.
    Commands: /reset (clear the history), /system TEXT (a new system message; the history is cleared),
    /help, /exit or /quit (so do Ctrl-D and Ctrl-C). Reads lines from stdin, so input may be piped
    (`you> ` prompts only at a terminal). Greedy by default; --sample with --temperature/--top-p samples.
    """
    import torch

    from dstune.rundir.chat import chat, needs_chat
    from dstune.rundir.load import load_run

    decoding = _decoding(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = load_run(args.run_dir, device, check=needs_chat(args.run_dir, args.system), checkpoint=args.checkpoint)
    torch.manual_seed(args.seed)
    return chat(run.model, run.tokenizer, args.system, decoding, args.run_dir)


def _decoding(args: argparse.Namespace):
    """generate's and chat's decoding flags, checked."""
    from dstune.tasks.base import Decoding

    given = [flag for flag in SAMPLING if getattr(args, flag) is not None]
    if given and not args.sample:
        flag = "--" + given[0].replace("_", "-")
        raise UserError(f"{flag}: greedy decoding has no {flag}; add --sample to sample with it")
    for flag, default in SAMPLING.items():
        setattr(args, flag, default if getattr(args, flag) is None else getattr(args, flag))
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens: must be at least 1, got {args.max_new_tokens}")
    if args.sample and args.temperature <= 0:
        raise UserError(f"--temperature: must be above 0 to sample (greedy: leave out --sample), got "
                        f"{args.temperature}")
    if args.sample and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p: must be in (0, 1], got {args.top_p}")
    return Decoding(args.max_new_tokens, args.sample, args.temperature, args.top_p)


def cmd_export(args: argparse.Namespace) -> int:
    """Export a finished run: dstune export RUN_DIR --format peft|merged --out DIR

    peft: adapter_config.json + adapter_model.safetensors that `peft.PeftModel.from_pretrained(base, DIR)`
    loads (LoRA, IA3, prompt, prefix). A base loaded from a GGUF file, or a random tiny one, is saved
    in DIR/base (plain safetensors) and the adapter names it, so `AutoPeftModel*.from_pretrained(DIR)` works.
    merged: a plain Hugging Face model folder with what trained folded into the base weights (full, freeze,
    layerwise_lr, BitFit, LoRA, IA3; GGUF bases dequantized); adapters, prompts and prefixes cannot merge.
    """
    from dstune.rundir.export import export

    out = export(args.run_dir, args.out, args.format, args.checkpoint)
    print(f"{args.format} export written to {out}")
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    """Predict per-GPU memory before a run: dstune estimate RECIPE [key=value ...] [--world-size N] [--json]

    Reads only the model config (no weights): weights, gradients, optimizer states, activations, buffers
    and optimizer-step temporaries per rank for the recipe's model, methods, ZeRO stage, offload, precision,
    micro-batch and sequence length (data.max_length, or --seq-len). Frozen parameters hold weights only;
    activations come from one training step traced on fake tensors. Prints a table with DeepSpeed's own
    estimate beside it, or with --json one object per rank with integer byte fields (total = the peak;
    checkpoint_all_ranks = the size of one checkpoint on disk).
    """
    from dstune.config import load_config

    cfg = load_config(args.recipe, args.overrides)
    from dstune.engine.precision import resolve
    from dstune.planning.estimate import base_alternatives, deepspeed_estimate, estimate
    from dstune.planning.report import base_table, estimate_table

    from dstune.rundir.as_base import base_model_of_run
    cfg = base_model_of_run(cfg.with_training(precision=resolve(cfg.training.precision, cuda=not args.cpu)[0]))
    tokenizer = None
    if cfg.model.tiny and cfg.tokenizer.path:
        from dstune.models.tokenizers import load_tokenizer
        tokenizer = load_tokenizer(cfg.tokenizer.path)
    per_rank, table, info = estimate(cfg, args.world_size, args.seq_len, cuda=not args.cpu, tokenizer=tokenizer)
    if info["activations_after_forward"] is None:
        print(f"dstune: warning: activations by {info['activations_source']}", file=sys.stderr)
    if args.json:
        print(json.dumps([{**r.as_dict(), "checkpoint_all_ranks": info["checkpoint_bytes"]} for r in per_rank]),
              file=args.print_to)
        return 0
    theirs = deepspeed_estimate(table, info["zero_stage"], args.world_size, info["offload_optimizer"],
                                info["largest_param"])
    print(estimate_table(cfg, per_rank[0], table, info, args.world_size, theirs))
    if rows := base_alternatives(cfg, per_rank[0], table, args.world_size, args.seq_len, not args.cpu, tokenizer):
        from dstune.planning.fit import MARGIN
        print("\n" + base_table(rows, MARGIN))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Compare methods side by side: dstune bench RECIPE --methods full,lora,prefix [--steps 10] [--out DIR]

    Runs each method in its own process on the recipe's model, data and shapes: a name the recipe's methods
    hold runs the recipe's own method with its options, other names the method's preset (each row says which,
    e.g. `lora (recipe: r=8, target_modules=q_proj,v_proj)`). Then writes DIR/bench.md (table), DIR/bench.json
    (a list of objects with method, ran, methods, trainable_params, tokens_per_s, step_s, mfu, peak_bytes,
    estimate_bytes) and DIR/bench.png (memory by part per method, estimate beside
    the measured peak; tokens/s). Peak is the CUDA allocator's on a GPU, the process RSS on CPU.
    With --peer SCRIPT (the HF + PEFT + DeepSpeed baseline, e.g. recipes/bench_llama_1b.yaml with
    --peer benchmarks/peer_bench.py) the baseline runs first for each method on the same shapes, and the
    table adds tokens/s and peak-memory ratios; it refuses when the peer's model has another parameter
    count; the peer runs once per tuning method (prefix-split, prefix tuning on the split attention path,
    shares prefix's). Each child's whole output is kept in DIR/METHOD.log (and DIR/METHOD-peer.log).
    --replot DIR/bench.json writes bench.md and bench.png again from a finished bench's JSON.
    --adapters N[,N...] (instead of --methods) measures N adapters of the recipe's methods in one job against
    the same N trained as jobs one after another, each adapter on its own share of the training rows:
    wall-clock, training-loop time, peak memory summed over --ranks ranks, and the job's tokens/s against
    one adapter on as many rows (DIR/adapters.md, DIR/adapters.json).
    """
    from dstune.planning.bench import bench, replot

    if args.adapters:
        from dstune.planning.bench_adapters import bench_adapters
        if args.recipe is None:
            raise UserError("bench: name a recipe")
        counts = [int(n) for n in args.adapters.split(",") if n.strip().isdigit() and int(n) > 0]
        if len(counts) != len(args.adapters.split(",")):
            raise UserError(f"--adapters: counts of adapters, e.g. 4,8 (got {args.adapters!r})")
        bench_adapters(args.recipe, args.overrides, counts, args.out, args.steps, args.ranks)
        print((Path(args.out) / "adapters.md").read_text())
        return 0

    if args.replot:
        where = replot(args.replot)
        print((where / "bench.md").read_text())
        print(f"[dstune] bench report written again: {where / 'bench.md'}, {where / 'bench.png'}")
        return 0
    if args.recipe is None:
        raise UserError("bench: name a recipe (or --replot a bench.json)")
    rows = bench(args.recipe, args.overrides, args.methods.split(","), args.out, args.steps, args.peer, args.peer_size)
    print((Path(args.out) / "bench.md").read_text())
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    """Launch training on many GPUs or nodes: dstune launch --launcher deepspeed|torchrun|slurm RECIPE [key=value ...]

    Checks the recipe, hostfile and node counts first, writes the hostfile (from --hosts) into the
    run's output_dir, then runs the real launcher through launch/deepspeed.sh, launch/torchrun.sh or
    `sbatch launch/slurm.sbatch`. --dry-run prints the exact command instead. For example:
      dstune launch --launcher deepspeed --procs-per-node 8 RECIPE            (one node, 8 GPUs)
      dstune launch --launcher deepspeed --hostfile hosts RECIPE              (N nodes over ssh, run once)
      dstune launch --launcher deepspeed --hostfile hosts --no-ssh --node-rank R RECIPE   (on every node)
      dstune launch --launcher torchrun --nodes N --node-rank R --master-addr node1 RECIPE (on every node)
      dstune launch --launcher slurm --nodes N --procs-per-node 8 --sbatch-arg=--gpus-per-node=8 RECIPE
    """
    from dstune.config import load_config
    from dstune.launch import describe, execute, plan_launch

    if not Path(args.recipe).is_file():
        raise UserError(f"{args.recipe}: recipe not found")
    cfg = load_config(args.recipe, args.overrides)
    plan = plan_launch(args.launcher, args.recipe, args.overrides, cfg.output_dir, cfg.training.dist_timeout_s,
                       nodes=args.nodes, procs_per_node=args.procs_per_node, hostfile=args.hostfile,
                       hosts=args.hosts.split(",") if args.hosts else None, node_rank=args.node_rank,
                       master_addr=args.master_addr, master_port=args.master_port, no_ssh=args.no_ssh,
                       sbatch_args=args.sbatch_arg)
    if args.dry_run:
        print(describe(plan))
        return 0
    execute(plan)
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    """List tuning methods with their options (built-ins and `dstune.methods` entry points)."""
    from dstune.methods import available

    for name, cls in sorted(available().items()):
        print(f"{name:14s} {cls.description}")
        for field, info in cls.Options.model_fields.items():
            default = "" if info.is_required() else f" (default: {info.get_default(call_default_factory=True)!r})"
            print(f"    {field}: {info.description or ''}{default}")
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    """Train a SentencePiece tokenizer on text files: dstune tokenizer train FILE... --out DIR

    Writes tokenizer.model plus Hugging Face tokenizer files to DIR; point tokenizer.path at DIR.
    """
    from dstune.models.tokenizers import train_sentencepiece

    out = train_sentencepiece(args.files, args.out, args.vocab_size, args.model_type)
    print(f"tokenizer written to {out}")
    return 0


def cmd_kernels_build(args: argparse.Namespace) -> int:
    """Build dstune's CUDA extensions now instead of on first use: dstune kernels build

    Compiles every extension in dstune/kernels/csrc with nvcc for sm_80 and sm_90 into the JIT cache
    (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), e.g. while building a cluster image, so
    jobs start without compiling. Needs a CUDA device and toolkit.
    """
    from dstune.kernels.build import build_all, unavailable_reason

    reason = unavailable_reason()
    if reason:
        raise UserError(f"kernels build: {reason}")
    for name in build_all():
        print(f"built {name}")
    return 0


MACHINE_FLAGS = ("json", "jsonl")  # an eval/estimate --json, a generate --jsonl: stdout is for machines


@contextlib.contextmanager
def _machine_output(args: argparse.Namespace):
    """`args.print_to`: where a command prints what it outputs. With --json or --jsonl that is the real stdout and
    nothing else may reach it: whatever else writes there while the command runs (a library's log line at
    import, a C++ warning on file descriptor 1) goes to stderr instead."""
    if not any(getattr(args, flag, None) is True for flag in MACHINE_FLAGS):
        args.print_to = sys.stdout
        yield
        return
    before = sys.stdout
    before.flush()
    real = os.dup(1)
    os.dup2(2, 1)
    args.print_to, sys.stdout = open(real, "w", encoding="utf-8"), sys.stderr
    try:
        yield
    finally:
        args.print_to.flush()
        sys.stdout.flush()
        os.dup2(real, 1)
        args.print_to.close()
        sys.stdout = before


class _Parser(argparse.ArgumentParser):
    """argparse, its errors one line like every other dstune error (the usage is what --help shows)."""

    def error(self, message: str):
        self.exit(2, f"dstune: error: {message}; see {self.prog} --help\n")


def _help(fn) -> tuple[str, str]:
    doc = (fn.__doc__ or "").strip()
    return doc.splitlines()[0], doc


def _checkpoint_flag(sp: argparse.ArgumentParser) -> None:
    from dstune.rundir.trainable import CHECKPOINTS
    sp.add_argument("--checkpoint", choices=CHECKPOINTS, help="which trained state: the best-scoring one "
                    "(evaluation.keep_best) or the last step's (default: best where the run kept it, else last)")


SAMPLING = {"temperature": 0.8, "top_p": 0.95}  # --sample's defaults


def _decoding_flags(sp: argparse.ArgumentParser) -> None:
    """The flags generate and chat share: the system message and how replies are decoded."""
    sp.add_argument("--system", metavar="TEXT", help="system message rendered through the run's chat template "
                                                     "before the conversation (causal_lm runs with a chat template)")
    sp.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="longest reply, in tokens")
    sp.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    sp.add_argument("--temperature", type=float, metavar="T",
                    help=f"with --sample: softmax temperature (default: {SAMPLING['temperature']})")
    sp.add_argument("--top-p", type=float, metavar="P",
                    help=f"with --sample: nucleus (top-p) cut (default: {SAMPLING['top_p']})")
    sp.add_argument("--seed", type=int, default=0, metavar="S", help="with --sample: seed of the draws")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dstune", description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    # the `deepspeed` launcher passes --local_rank=N before the subcommand (it also sets LOCAL_RANK)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, fn, parent=sub):
        short, long = _help(fn)
        sp = parent.add_parser(name, help=short, description=long,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.set_defaults(func=fn)
        return sp

    sp = add("init", cmd_init)
    sp.add_argument("--model", metavar="PATH", help="local model folder: Hugging Face files, or a .gguf file (or "
                                                     "the GGUF file itself)")
    sp.add_argument("--data", metavar="FILE", help="training data: .jsonl, .json, .csv, .tsv, .parquet or a saved "
                                                   "datasets folder")
    sp.add_argument("--task", choices=sorted(TASKS), help="the task (default: found from the data's columns)")
    sp.add_argument("--method", default="lora", metavar="NAME", help="tuning method, or several comma-separated "
                                                                    "(dstune methods lists them)")
    sp.add_argument("--out", default="recipe.yaml", metavar="FILE", help="the recipe file to write")
    sp.add_argument("--force", action="store_true", help="replace --out if it exists")

    sp = add("train", cmd_train)
    sp.add_argument("recipe", help="YAML recipe (see recipes/)")
    sp.add_argument("overrides", nargs="*", help="key=value overrides, e.g. training.lr=1e-4")

    sp = add("sweep", cmd_sweep)
    sp.add_argument("recipe", help="YAML recipe (see recipes/)")
    sp.add_argument("--grid", nargs="+", required=True, metavar="KEY=V1,V2",
                    help="the values each key takes, e.g. training.lr=1e-4,3e-4 methods[0].r=8,16")
    sp.add_argument("overrides", nargs="*", help="key=value overrides of the recipe, e.g. training.max_steps=200")

    sp = add("prepare", cmd_prepare)
    sp.add_argument("recipe", help="YAML recipe (see recipes/)")
    sp.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.max_length=2048")

    sp = add("eval", cmd_eval)
    sp.add_argument("run_dir")
    _checkpoint_flag(sp)
    sp.add_argument("--data", help="evaluation file (default: the run's data.eval)")
    sp.add_argument("--json", action="store_true", help="the metrics as one JSON object, nothing else")
    sp.add_argument("overrides", nargs="*", help="key=value overrides of the run's config")

    sp = add("select", cmd_select)
    sp.add_argument("run_dir")
    _checkpoint_flag(sp)
    sp.add_argument("--pool", required=True, help="rows to choose from (.jsonl/.csv/...; labels not needed)")
    sp.add_argument("--strategy", required=True, help="entropy, margin, least-confidence (classification); nll "
                                                       "(causal_lm, seq2seq); random (any)")
    sp.add_argument("--k", type=int, required=True, help="rows to pick")
    sp.add_argument("--out", required=True, help="JSON lines file for the picked rows")
    sp.add_argument("--batch-size", type=int, default=32)
    sp.add_argument("--seed", type=int, default=0, help="random: the sample's seed")

    sp = add("active-learn", cmd_active_learn)
    sp.add_argument("recipe")
    sp.add_argument("overrides", nargs="*", help="key=value overrides of every round's recipe")
    sp.add_argument("--pool", required=True, help="labelled rows to draw from (their labels are the oracle)")
    sp.add_argument("--rounds", type=int, required=True, help="selection rounds after the initial set")
    sp.add_argument("--per-round", type=int, required=True, help="rows labelled per round")
    sp.add_argument("--initial", type=int, default=100, help="random rows labelled before the first round")
    sp.add_argument("--strategies", default="entropy,random", help="comma-separated (see dstune select)")
    sp.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (initial rows, training)")
    sp.add_argument("--out", default="runs/active", help="output folder")
    sp.add_argument("--batch-size", type=int, default=32, help="scoring batch size")
    sp.add_argument("--retrain", choices=["base", "continue"], default="base",
                    help="each round trains from the recipe's model, or continues from the last round's")

    sp = add("generate", cmd_generate)
    sp.add_argument("run_dir")
    sp.add_argument("--prompt", action="append", help="prompt text (repeatable; default: one per stdin line)")
    _decoding_flags(sp)
    _checkpoint_flag(sp)
    sp.add_argument("--jsonl", action="store_true", help='one {"prompt": ..., "reply": ...} object per line')

    sp = add("chat", cmd_chat)
    sp.add_argument("run_dir", help="a finished causal_lm run (dstune train's output_dir) with a chat template")
    _decoding_flags(sp)
    _checkpoint_flag(sp)

    sp = add("export", cmd_export)
    sp.add_argument("run_dir")
    sp.add_argument("--format", choices=["peft", "merged"], required=True)
    sp.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    _checkpoint_flag(sp)

    sp = add("estimate", cmd_estimate)
    sp.add_argument("recipe")
    sp.add_argument("overrides", nargs="*", help="key=value overrides, e.g. deepspeed=zero3 training.precision=bf16")
    sp.add_argument("--world-size", type=int, default=1, help="data-parallel ranks (GPUs) in total")
    sp.add_argument("--seq-len", type=int, help="tokens per example (default: data.max_length)")
    sp.add_argument("--cpu", action="store_true", help="no CUDA context in the buffers (CPU ranks)")
    sp.add_argument("--json", action="store_true", help="one JSON object per rank with integer byte fields")

    sp = add("bench", cmd_bench)
    sp.add_argument("recipe", nargs="?")
    sp.add_argument("overrides", nargs="*", help="key=value overrides applied to every method's run")
    sp.add_argument("--methods", default="full,lora,prefix,prompt", help="comma-separated method names")
    sp.add_argument("--steps", type=int, default=10, help="optimizer steps per method (the first 2 are warm-up)")
    sp.add_argument("--out", default="runs/bench", help="output folder")
    sp.add_argument("--json", help="also write the result list to this file")
    sp.add_argument("--peer", metavar="SCRIPT", help="peer baseline script (prints `RESULT {json}`) run side by side")
    sp.add_argument("--peer-size", default="1b", help="the peer's model size name (its --size)")
    sp.add_argument("--replot", metavar="BENCH_JSON", help="only write bench.md and bench.png again from this "
                                                         "bench.json (no recipe, nothing runs)")
    sp.add_argument("--adapters", metavar="N[,N]", help="instead of --methods: N adapters of the recipe's methods "
                                                        "in one job against N jobs (e.g. 4,8)")
    sp.add_argument("--ranks", type=int, default=1, help="--adapters: processes per run (torch.distributed.run)")

    sp = add("launch", cmd_launch)
    sp.add_argument("recipe")
    sp.add_argument("overrides", nargs="*", help="key=value overrides, passed on to every rank")
    sp.add_argument("--launcher", choices=["deepspeed", "torchrun", "slurm"], default="deepspeed")
    sp.add_argument("--nodes", type=int, help="number of nodes (default: the hostfile's hosts, else 1)")
    sp.add_argument("--procs-per-node", type=int,
                    help="ranks per node, one per GPU (default: hostfile slots, else the GPUs here, else 1)")
    sp.add_argument("--hostfile", help="DeepSpeed hostfile: one 'HOST slots=N' line per node")
    sp.add_argument("--hosts", help="comma-separated node names; writes OUTPUT_DIR/hostfile (Slurm: --nodelist)")
    sp.add_argument("--node-rank", type=int, help="this node's index (torchrun, deepspeed --no-ssh)")
    sp.add_argument("--master-addr", help="address of node 0 (default: the first host)")
    sp.add_argument("--master-port", type=int, default=29500)
    sp.add_argument("--no-ssh", action="store_true", help="deepspeed: one launcher per node instead of pdsh/ssh")
    sp.add_argument("--sbatch-arg", action="append", default=[],
                    help="extra sbatch option, repeatable: --sbatch-arg=--partition=gpu --sbatch-arg=--time=4:00:00")
    sp.add_argument("--dry-run", action="store_true", help="print the command (and files it writes), run nothing")

    add("methods", cmd_methods)

    tok = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="tok_command", required=True)
    sp = add("train", cmd_tokenizer_train, tok)
    sp.add_argument("files", nargs="+", help="plain-text files, one sentence or document per line")
    sp.add_argument("--out", required=True, help="output folder")
    sp.add_argument("--vocab-size", type=int, default=8000)
    sp.add_argument("--model-type", choices=["unigram", "bpe", "char", "word"], default="unigram")

    kern = sub.add_parser("kernels", help="CUDA extensions").add_subparsers(dest="kernels_command", required=True)
    add("build", cmd_kernels_build, kern)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one dstune command (`argv`: the arguments after `dstune`, default sys.argv[1:]); returns its exit
    code: 0, or 2 after a one-line error (argparse's own errors exit with 2 too)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may follow options too (`dstune estimate R --world-size 8 deepspeed=zero3`)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        with _machine_output(args):
            return args.func(args)
    except UserError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"dstune: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        print(f"dstune: error: no space left on the device{f' writing {e.filename}' if e.filename else ''}; "
              "free some (old run dirs, training.keep_checkpoints) and rerun: training resumes from the last "
              "complete checkpoint", file=sys.stderr)
        return 2


def entry() -> None:
    """The `dstune` console script and `python -m dstune`: run the command, then leave without interpreter
    teardown. C++ destructors of DeepSpeed/gloo background threads sometimes abort there ("terminate called
    without an active exception") and would turn a finished run into exit code 134; everything is written
    and flushed by then."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
