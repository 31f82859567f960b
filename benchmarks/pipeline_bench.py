"""What orchestration costs: a pipeline run's wall time against the sum of its jobs' own
times in the same run, per step.

    .venv/bin/python benchmarks/pipeline_bench.py            # the newest run in .dagster (the demo's)
    .venv/bin/python benchmarks/pipeline_bench.py RUN_ID [--home DAGSTER_HOME]
    .venv/bin/python benchmarks/pipeline_bench.py --demo     # run `make demo`'s pipeline first

A step's job time is what the job itself took: Ray's start and end times of its Ray job
(submission to end, so a runtime environment's set-up counts as the job's), or the life of
its local process on the embedded default; a step that ran no job (make_shards on a
finished dataset) has none. Everything else in the run is orchestration: Dagster's run and
step start-up, event and output storage, the step's own checks, waiting for the job's end
(polling), and the gaps between steps. Reads only what Dagster recorded, so it measures
any run, also one the daemon launched.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GOAL_S = 5.0  # orchestration per step, on the development machine


def measure(instance, run_id: str) -> dict:
    """{"run": seconds, "steps": [(step, step seconds, job seconds or None)], "status",
    "launch": seconds from the run's creation to its start (the queue and the launch of
    its process, for a run the daemon started)} of a finished run, from its run record,
    step stats and the steps' output metadata (`job_seconds`)."""
    record = instance.get_run_record_by_id(run_id)
    if record is None or not record.end_time:
        raise SystemExit(f"error: no finished run {run_id} in {os.environ['DAGSTER_HOME']}")
    jobs = {}
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event and event.event_type_value == "STEP_OUTPUT":
            seconds = event.step_output_data.metadata.get("job_seconds")
            jobs[entry.step_key] = seconds.value if seconds is not None else None
    steps = [(s.step_key, s.end_time - s.start_time, jobs.get(s.step_key))
             for s in sorted(instance.get_run_step_stats(run_id), key=lambda s: s.start_time)]  # fmt: skip
    return {"run": record.end_time - record.start_time, "steps": steps,
            "status": record.dagster_run.status.value,
            "launch": record.start_time - record.create_timestamp.timestamp()}  # fmt: skip


def report(run_id: str, figures: dict) -> str:
    lines = [f"run {run_id} ({figures['status']}): {figures['run']:.1f} s wall from its start; "
             f"{figures['launch']:.1f} s before it, from its creation (queue, launch)",
             f"{'step':<24}{'step s':>9}{'job s':>9}{'orchestration s':>17}"]  # fmt: skip
    for step, took, job in figures["steps"]:
        lines.append(f"{step:<24}{took:9.1f}{(job or 0):9.1f}{took - (job or 0):17.1f}"
                     + ("" if job is not None else "  (no job)"))  # fmt: skip
    jobs = sum(job or 0 for _, _, job in figures["steps"])
    within = sum(took for _, took, _ in figures["steps"])
    overhead = figures["run"] - jobs
    n = len(figures["steps"])
    lines += [
        f"jobs' own time {jobs:.1f} s; outside the steps (run start-up, between steps, "
        f"finish) {figures['run'] - within:.1f} s",
        f"orchestration {overhead:.1f} s in all, {overhead / n:.1f} s per step over {n} steps "
        f"(goal <= {GOAL_S:g} s per step): {'met' if overhead / n <= GOAL_S else 'NOT met'}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_id", nargs="?", help="a finished run (default: the newest)")
    parser.add_argument("--home", help="DAGSTER_HOME (default: $DAGSTER_HOME or .dagster)")
    parser.add_argument("--demo", action="store_true", help="run the demo's pipeline first")
    args = parser.parse_args(argv)
    if args.home:
        os.environ["DAGSTER_HOME"] = str(Path(args.home).absolute())
    from pipelines.workflows.cli import instance

    run_id = args.run_id
    if args.demo:
        from pipelines.demo import run_pipeline

        run_id, _, _ = run_pipeline()
    with instance() as inst:
        if run_id is None:
            runs = inst.get_runs(limit=1)
            if not runs:
                raise SystemExit(f"error: no run in {os.environ['DAGSTER_HOME']} (make demo)")
            run_id = runs[0].run_id
        print(report(run_id, measure(inst, run_id)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
