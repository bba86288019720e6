"""Launch material for a chosen plan: `hone train` settings, torchrun, Slurm, Megatron-LM arguments."""

from __future__ import annotations

import shlex

from hone.errors import HoneError, Preempted
from hone.plan.config import Config
from hone.plan.hardware import Cluster
from hone.plan.layout import train_fields
from hone.plan.memory import stage_layout
from hone.plan.shapes import ModelShape


def hone_train_settings(rec: dict, seq: int, global_batch: int) -> dict:
    """The recipe's ``[train]`` fields for this plan (names as ``hone.recipe.TrainConfig``)."""
    return {"seq_len": seq, "batch_size": global_batch, **train_fields(rec), "mixed_precision": "bf16"}


def hone_train_notes(rec: dict) -> list[str]:
    """Where `hone train` does not do exactly what the plan models (it has DDP / FSDP2, TP with
    sequence parallelism, pipelines with 1F1B / interleaved 1F1B, and full recompute)."""
    notes = []
    if rec["zero"] in (1, 2):
        way = ("under a pipeline hone train shards everything with fsdp (zero=3)" if rec["pp"] > 1 else
               "data_parallel=ddp keeps the optimizer state unsharded, fsdp shards everything (zero=3)")
        notes.append(f"zero={rec['zero']} has no hone train equivalent: {way}")
    if rec["zero"] == 0 and rec["pp"] > 1 and rec["dp"] > 1:
        notes.append("zero=0 under a pipeline: hone train's data parallelism there is fsdp (zero=3)")
    if rec["recompute"] == "selective":
        notes.append("hone train recomputes whole layers (activation_checkpointing); selective recompute is Megatron's")
    if rec["recompute"] == "op":
        notes.append("hone train recomputes whole layers (activation_checkpointing); recompute=op is torchtitan's "
                     "per-op "
                     "selective checkpointing (--activation_checkpoint.mode selective "
                     "--activation_checkpoint.selective_ac_option op)")
    return notes


def hone_train_toml(settings: dict) -> str:
    val = lambda v: str(v).lower() if isinstance(v, bool) else f'"{v}"' if isinstance(v, str) else str(v)  # noqa: E731
    return "[train]\n" + "".join(f"{k} = {val(v)}\n" for k, v in settings.items())


def recipe_section(rec: dict, seq: int, global_batch: int, index: int) -> str:
    """The ``[train]`` section of a recipe for one configuration the planner printed (``index``,
    1-based), with what the plan predicted and where `hone train` differs as comments."""
    head = [f"# hone plan configuration #{index}: {_label(rec)}",
            f"# predicted: {rec['tokens_per_s']:.0f} tokens/s, MFU {rec['mfu']:.1%}, "
            f"{rec['memory_gib_per_gpu']:.1f} GiB/GPU on {rec['gpus']} GPUs (torchrun --nproc-per-node x nodes)"]
    head += [f"# note: {n}" for n in hone_train_notes(rec)]
    return "\n".join(head) + "\n" + hone_train_toml(hone_train_settings(rec, seq, global_batch))


WORKER_MODULE = "hone.train.worker"  # the torchrun entry point of a training worker
# torchrun through Hone's wrapper: a preemption signal reaches the workers (plain torchrun
# kills them on SIGTERM and dies of SIGUSR1) and their "preempted" status comes back.
LAUNCHER_MODULE = "hone.train.torchrun"
TORCHRUN = f"python -m {LAUNCHER_MODULE}"
GRACE_S = 120  # Slurm's notice before the kill: one step plus one checkpoint must fit in it


def torchrun_line(nnodes: int, nproc: str | int, workdir: str, recipe: str | None = None) -> str:
    """The torchrun line that starts ``nproc`` training workers on each of ``nnodes`` nodes.

    Several nodes meet at ``$MASTER_ADDR:$MASTER_PORT`` (c10d rendezvous, job id ``$JOB_ID``,
    port 29500 unless set); the recipe may be left out when the run directory already holds its
    validated ``recipe.json``.
    """
    rdzv = (" --rdzv-backend c10d --rdzv-endpoint $MASTER_ADDR:${MASTER_PORT:-29500} --rdzv-id $JOB_ID"
            if nnodes > 1 else "")
    target = f"{shlex.quote(recipe)} " if recipe else ""
    return (f"{TORCHRUN} --nnodes {nnodes} --nproc-per-node {nproc}{rdzv} -m {WORKER_MODULE} "
            f"{target}--workdir {shlex.quote(workdir)}")


def slurm_script(nnodes: int, gpus_per_node: int, run: str, *, job: str = "hone", comments: list[str] = (),
                 setup: list[str] = (), after: list[str] = (), grace_s: int = GRACE_S,
                 requeue_failures: int = 0) -> str:
    """A Slurm batch script that runs ``run`` (a torchrun line) once per node with ``srun``.

    Preemption: Slurm signals the script ``grace_s`` seconds before the time limit (SIGUSR1) or
    on preemption (SIGTERM); the script passes it to the workers, which finish their step, write
    a checkpoint and exit with status 75 (:mod:`hone.train.preempt`); the script then requeues the
    job, and the requeued job resumes from that checkpoint. With ``requeue_failures`` it also
    requeues a failed job that many times (``$SLURM_RESTART_COUNT``), except for a recipe or data
    error, which fails the same way every time.
    """
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job}", f"#SBATCH --nodes={nnodes}", "#SBATCH --ntasks-per-node=1",
             f"#SBATCH --gpus-per-node={gpus_per_node}", "#SBATCH --exclusive",
             f"#SBATCH --signal=B:USR1@{grace_s}", "#SBATCH --requeue", "#SBATCH --open-mode=append",
             *[f"# {c}" for c in comments],
             "set -uo pipefail  # no -e: the step's status decides between requeue and failure"]
    if nnodes > 1:
        lines += ['export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
                  "export JOB_ID=$SLURM_JOB_ID"]
    run_step = [f"srun {run} &",
                'pid=$! signalled=0',
                "trap 'signalled=1; kill -USR1 \"$pid\" 2>/dev/null' USR1 TERM",
                'wait "$pid"; status=$?',
                '# a trapped signal ends `wait` early: wait again for the workers\' own status',
                'while [ "$signalled" = 1 ]; do signalled=0; wait "$pid"; status=$?; done',
                f'if [ "$status" -eq {Preempted.exit_code} ]; then',
                '  echo "preempted: checkpoint written; requeueing job $SLURM_JOB_ID to resume from it"',
                '  scontrol requeue "$SLURM_JOB_ID"']
    if requeue_failures:
        n = requeue_failures
        run_step += [f'elif [ "$status" -ne 0 ] && [ "$status" -ne {HoneError.exit_code} ] '
                     f'&& [ "${{SLURM_RESTART_COUNT:-0}}" -lt {n} ]; then',
                     f'  echo "failed with status $status: requeueing job $SLURM_JOB_ID (restart '
                     f'$((${{SLURM_RESTART_COUNT:-0}} + 1)) of {n}) to resume from the newest checkpoint"',
                     '  scontrol requeue "$SLURM_JOB_ID"']
    run_step.append("fi")
    return "\n".join(lines + list(setup) + run_step + list(after) + ['exit "$status"']) + "\n"


def multinode_commands(recipe: str, workdir: str, nnodes: int, nproc: int, job: str = "hone",
                       requeue_failures: int = 0) -> dict:
    """`hone train --nnodes N`: the torchrun line for every node and a Slurm script that runs it
    (``requeue_failures``: `--supervise`'s restarts, see :func:`slurm_script`)."""
    run = torchrun_line(nnodes, nproc, workdir, recipe)
    comments = [f"Run the data stages once before submitting: hone tokenize {recipe} --workdir {workdir}",
                "The run directory must be on a file system every node sees (checkpoints are written by all ranks)."]
    return {"torchrun": run, "slurm": slurm_script(nnodes, nproc, run, job=job, comments=comments,
                                                   requeue_failures=requeue_failures)}


def torchrun_command(cluster: Cluster, nodes: int, recipe: str = "recipe.toml", workdir: str = "run") -> str:
    """One node: ``hone train --nproc`` starts torchrun itself; several: the line to run on every node."""
    if nodes == 1:
        return f"hone train {recipe} --nproc {cluster.gpus_per_node}"
    return torchrun_line(nodes, cluster.gpus_per_node, workdir, recipe)


def plan_slurm_script(cluster: Cluster, nodes: int, rec: dict, recipe: str = "recipe.toml", job: str = "hone",
                      workdir: str = "run") -> str:
    """The Slurm script for a plan: its predictions as comments."""
    comments = [f"plan: {_label(rec)}  ({rec['tokens_per_s']:.0f} tokens/s, MFU {rec['mfu']:.1%}, "
                f"{rec['memory_gib_per_gpu']:.1f} GiB/GPU predicted)",
                f"Run the data stages once before submitting: hone tokenize {recipe} --workdir {workdir}"]
    return slurm_script(nodes, cluster.gpus_per_node, torchrun_line(nodes, cluster.gpus_per_node, workdir, recipe),
                        job=job, comments=comments)


def expert_commands(edir: str, recipe_path: str | None, workdir: str, name: str) -> dict:
    """How to run one Branch-Train-Merge expert as its own cluster job (its run directory holds everything)."""
    run = torchrun_line(1, "$GPUS", edir)
    finish = (f"hone branch {shlex.quote(recipe_path)} --workdir {shlex.quote(workdir)} --only {name} --resume"
              if recipe_path else "")
    comments = ["One Branch-Train-Merge expert: no communication with the other experts' jobs.",
                "Prepared by `hone branch ... --prepare-only`; resumes from its newest checkpoint when resubmitted."]
    slurm = slurm_script(1, 8, run, job=f"hone-expert-{name}", comments=comments,
                         setup=["GPUS=${SLURM_GPUS_ON_NODE:-8}"],
                         after=[f"# then export final/ and compare: {finish}"] if finish else [])
    return {"torchrun": run, "finish": finish, "slurm": slurm}


def megatron_args(m: ModelShape, rec: dict, seq: int, global_batch: int) -> str:
    a = [f"--num-layers {m.layers}", f"--hidden-size {m.hidden}", f"--num-attention-heads {m.heads}",
         f"--ffn-hidden-size {m.ffn}", f"--seq-length {seq}", f"--max-position-embeddings {max(seq, m.max_seq)}",
         f"--micro-batch-size {rec['micro_batch']}", f"--global-batch-size {global_batch}",
         f"--tensor-model-parallel-size {rec['tp']}", f"--pipeline-model-parallel-size {rec['pp']}", "--bf16",
         "--use-flash-attn"]
    if m.kv_heads != m.heads:
        a += ["--group-query-attention", f"--num-query-groups {m.kv_heads}"]
    if m.arch == "llama":
        a += ["--swiglu", "--normalization RMSNorm", "--position-embedding-type rope", "--disable-bias-linear",
              "--untie-embeddings-and-output-weights" if not m.tied_embeddings else ""]
    a += pipeline_split_args(m, rec["pp"], rec["vpp"])
    if rec["sequence_parallel"]:
        a.append("--sequence-parallel")
    if rec["recompute"] == "selective":
        a.append("--recompute-activations")
    elif rec["recompute"] == "full":
        a += ["--recompute-granularity full", "--recompute-method uniform", "--recompute-num-layers 1"]
    # recompute=op (torchtitan's per-op policy) has no Megatron-LM flag; see the hone_train notes
    if rec["zero"] == 3:
        a.append("--use-torch-fsdp2")  # Megatron-LM has no ZeRO-3 of its own
    elif rec["zero"] >= 1:
        a += ["--use-distributed-optimizer", "--overlap-param-gather"]  # ZeRO-2 maps to this too
    a.append("--overlap-grad-reduce")
    return " ".join(x for x in a if x)

def pipeline_split_args(m: ModelShape, pp: int, vpp: int) -> list[str]:
    """Megatron-LM flags for the layer split ``hone.plan.memory.stage_layout`` assumes."""
    if pp == 1:
        return []

    chunks = pp * vpp
    if m.layers % chunks == 0:
        return [f"--num-layers-per-virtual-pipeline-stage {m.layers // chunks}"] if vpp > 1 else []
    vstages = [f"--num-virtual-stages-per-pipeline-rank {vpp}"] if vpp > 1 else []
    if (m.layers + 2) % chunks == 0:  # embedding and loss each take one layer's slot (Llama 3 405B)
        return ["--account-for-embedding-in-pipeline-split", "--account-for-loss-in-pipeline-split"] + vstages
    layout = stage_layout(m, Config(1, pp, 1, 1, vpp=vpp))
    return [f"--decoder-first-pipeline-num-layers {layout[0]}",
            f"--decoder-last-pipeline-num-layers {layout[-1]}"] + vstages


def launch(m: ModelShape, cluster: Cluster, rec: dict, seq: int, global_batch: int) -> dict:
    nodes = max(1, rec["gpus"] // cluster.gpus_per_node)
    settings = hone_train_settings(rec, seq, global_batch)
    return {"hone_train": settings, "hone_train_toml": hone_train_toml(settings),
            "hone_train_notes": hone_train_notes(rec),
            "nodes": nodes, "torchrun": torchrun_command(cluster, nodes),
            "slurm": plan_slurm_script(cluster, nodes, rec),
            "megatron_args": megatron_args(m, rec, seq, global_batch)}


def _label(rec: dict) -> str:
    return (f"tp={rec['tp']} pp={rec['pp']} dp={rec['dp']} mb={rec['micro_batch']} recompute={rec['recompute']} "
            f"zero={rec['zero']} vpp={rec['vpp']}")
