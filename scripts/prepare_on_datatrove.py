"""Prepares a training config's data on datatrove's executors: stage 1 (rows checked and tokenized) as N tasks
on this machine, on a Slurm cluster or on a Ray cluster; stage 2 (duplicates decided in order, shards written)
after it, in one process. The result is the one `sftlab data prepare` gives, found by `sftlab train` with the
same config. SFTLAB_HOME (the prepared-data cache) must be on a filesystem every task reaches.

    python scripts/prepare_on_datatrove.py --config my.yaml --tasks 2 --executor local
    python scripts/prepare_on_datatrove.py --config my.yaml --tasks 64 --executor slurm --partition cpu \
        --time 04:00:00 --cpus_per_task 2 --mem_per_cpu_gb 4
    python scripts/prepare_on_datatrove.py --config my.yaml --tasks 32 --executor ray   # ray start --head first

On Slurm, stage 1 is a job array and stage 2 a job that depends on it (datatrove submits both and returns).
"""

import argparse
import os
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="The training config (the data fields, model, max_length).")
    parser.add_argument("--tasks", type=int, required=True, help="Stage 1 tasks: the input's batches are dealt "
                        "among them.")
    parser.add_argument("--executor", choices=("local", "slurm", "ray"), default="local")
    parser.add_argument("--workers", type=int, default=-1, help="Tasks at a time (-1: all; local: one per core).")
    parser.add_argument("--partition", help="Slurm partition.")
    parser.add_argument("--time", default="04:00:00", help="Slurm time limit of a task.")
    parser.add_argument("--cpus_per_task", type=int, default=1)
    parser.add_argument("--mem_per_cpu_gb", type=int, default=4)
    parser.add_argument("--venv_path", default=os.path.join(sys.prefix, "bin", "activate"),
                        help="Slurm: the environment each job activates.")
    args = parser.parse_args()

    from sftlab.chat_format import ChatRenderer
    from sftlab.config import parse_verb
    from sftlab.data import pipeline
    from sftlab.data.prepare import work_folder
    from sftlab.model.load import load_tokenizer, resolve_model_path
    from sftlab.train.sft import ARGUMENTS, PARSER

    model_args, data_args, clean_args, train_args = parse_verb(
        "prepare_on_datatrove", ARGUMENTS, ["--config", args.config, "--datatrove_tasks", str(args.tasks)], PARSER)
    renderer = ChatRenderer(load_tokenizer(resolve_model_path(model_args.model_name_or_path)), train_args.max_length,
                            data_args.overflow)
    folder = work_folder(data_args, clean_args, renderer)
    folder.mkdir(parents=True, exist_ok=True)
    steps = pipeline.check_steps(data_args.data_files, folder, clean_args, renderer.tokenizer.name_or_path,
                                 renderer.max_length, renderer.overflow, data_args.system_prompt, data_args.split_seed)
    logs = pipeline.start_stage(folder, args.tasks)  # where `sftlab data prepare` looks for the completed tasks
    decide = ["sftlab", "data", "prepare", "--config", os.path.abspath(args.config),
              "--datatrove_tasks", str(args.tasks)]
    if args.executor == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        stage1 = SlurmPipelineExecutor(pipeline=steps, tasks=args.tasks, workers=args.workers, time=args.time,
                                       partition=args.partition, cpus_per_task=args.cpus_per_task,
                                       mem_per_cpu_gb=args.mem_per_cpu_gb, logging_dir=logs,
                                       job_name="sftlab-check", venv_path=args.venv_path)
        stage2 = SlurmPipelineExecutor(pipeline=[RunCommand(decide)], tasks=1, time=args.time, depends=stage1,
                                       partition=args.partition, cpus_per_task=1, mem_per_cpu_gb=8,
                                       logging_dir=logs + "-decide", job_name="sftlab-decide",
                                       venv_path=args.venv_path)
        stage2.run()  # submits stage 1 first (its dependency), then stage 2
        print(f"submitted: stage 1 ({args.tasks} tasks) and stage 2; logs in {logs}")
        return 0
    if args.executor == "ray":
        import ray
        from datatrove.executor import RayPipelineExecutor

        ray.init(address=os.environ.get("RAY_ADDRESS") or None)  # a running cluster's, else a local one
        RayPipelineExecutor(pipeline=steps, tasks=args.tasks, workers=args.workers, logging_dir=logs,
                            cpus_per_task=args.cpus_per_task, mem_per_cpu_gb=args.mem_per_cpu_gb).run()
    else:
        pipeline.run_locally(steps, folder, args.tasks, None if args.workers == -1 else args.workers)
    return RunCommand(decide).call()


class RunCommand:
    """A pipeline step (a callable, as datatrove takes them) that runs one command: stage 2 as a Slurm job."""

    def __init__(self, command: list[str]):
        self.command = command

    def __call__(self, data=None, rank: int = 0, world_size: int = 1):
        code = self.call()
        if code:
            raise SystemExit(code)
        return iter(())

    def call(self) -> int:
        from sftlab.cli import main

        return main(self.command[1:])


if __name__ == "__main__":
    sys.exit(main())
