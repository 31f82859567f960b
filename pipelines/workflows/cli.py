"""Run, watch and resume the Dagster pipelines from a shell.

    python pipelines/workflows/cli.py run full_pipeline --run-config run.yaml
    python pipelines/workflows/cli.py run finetune_pipeline --run-config run.yaml --webserver http://127.0.0.1:3000
    python pipelines/workflows/cli.py status RUN_ID
    python pipelines/workflows/cli.py resume RUN_ID [--webserver URL] [--mark-failed]

Runs are recorded in the Dagster instance at DAGSTER_HOME (default .dagster, SQLite),
the one `make pipelines-up` serves. Without --webserver a run executes in this process
(each step a Ray job at RAY_ADDRESS, or a local process without it); with it, the run goes to the webserver's
queue and the daemon launches it.

`resume` re-executes a failed run from its failed steps: finished steps are not run
again (their outputs are read from the failed run), the Ray job of a step that was still
running is found by its submission id and awaited, and a training step resumes its run
from the newest checkpoint (the run name comes from the root run id). A run whose
orchestrator process was killed stays STARTED in the instance; `--mark-failed` records it
as failed first (only when that process is really gone).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # `python pipelines/workflows/cli.py` puts only its folder on the path


def instance():
    """The Dagster instance at DAGSTER_HOME (default ./.dagster, made with the project's
    instance config when new)."""
    from dagster import DagsterInstance

    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path(".dagster").absolute())))
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        shutil.copyfile(ROOT / "pipelines" / "workflows" / "dagster.yaml", home / "dagster.yaml")
    return DagsterInstance.get()


def _job(name: str):
    from dagster import reconstructable

    from pipelines.workflows import definitions

    job = getattr(definitions, name, None)
    if job is None or name not in ("full_pipeline", "finetune_pipeline"):
        raise SystemExit(f"error: unknown pipeline {name!r} (full_pipeline, finetune_pipeline)")
    return reconstructable(job)


def _graphql(url: str):
    from urllib.parse import urlparse

    from dagster_graphql import DagsterGraphQLClient

    parsed = urlparse(url)
    return DagsterGraphQLClient(parsed.hostname, port_number=parsed.port)


def run(args) -> int:
    import yaml

    run_config = yaml.safe_load(Path(args.run_config).read_text()) if args.run_config else {}
    if args.webserver:
        run_id = _graphql(args.webserver).submit_job_execution(args.pipeline, run_config=run_config)
        print(f"queued run {run_id}: {args.webserver}/runs/{run_id}")
        return 0
    from dagster import execute_job

    with instance() as inst:
        result = execute_job(_job(args.pipeline), instance=inst, run_config=run_config)
        print(f"run {result.run_id}: {'SUCCESS' if result.success else 'FAILURE'}")
        return 0 if result.success else 1


def status(args) -> int:
    with instance() as inst:
        found = inst.get_run_by_id(args.run_id)
        if found is None:
            print(f"error: no run {args.run_id} in {os.environ['DAGSTER_HOME']}", file=sys.stderr)
            return 2
        print(f"run {found.run_id} ({found.job_name}): {found.status.value}"
              + (f", re-execution of {found.parent_run_id}" if found.parent_run_id else ""))  # fmt: skip
        for stats in inst.get_run_step_stats(args.run_id):
            took = (f" {stats.end_time - stats.start_time:.0f} s"
                    if stats.end_time and stats.start_time else "")  # fmt: skip
            print(f"  {stats.step_key}: {stats.status.value if stats.status else 'running'}{took}")
    return 0


def resume(args) -> int:
    from dagster import DagsterRunStatus, ReexecutionOptions, execute_job

    with instance() as inst:
        parent = inst.get_run_by_id(args.run_id)
        if parent is None:
            print(f"error: no run {args.run_id} in {os.environ['DAGSTER_HOME']}", file=sys.stderr)
            return 2
        if parent.status == DagsterRunStatus.STARTED and args.mark_failed:
            inst.report_run_failed(parent, "marked failed by `cli.py resume --mark-failed`: "
                                   "its orchestrator process is gone")  # fmt: skip
        if args.webserver:
            return _resume_through_webserver(args.webserver, parent)
        options = ReexecutionOptions.from_failure(args.run_id, inst)
        # The parent's run config and own tags (as the UI's re-execution copies them):
        # execute_job starts from empty ones, and the steps' config is required.
        tags = {k: v for k, v in parent.tags.items() if not k.startswith("dagster/")}
        # and the tags by which the UI groups a run with its re-executions
        tags.update({"dagster/parent_run_id": parent.run_id,
                     "dagster/root_run_id": parent.root_run_id or parent.run_id})  # fmt: skip
        result = execute_job(_job(parent.job_name), instance=inst, run_config=parent.run_config,
                             tags=tags, reexecution_options=options)  # fmt: skip
        print(f"run {result.run_id} (re-execution of {args.run_id}): "
              f"{'SUCCESS' if result.success else 'FAILURE'}")  # fmt: skip
        return 0 if result.success else 1


REEXECUTE = """
mutation($params: ReexecutionParams!) {
  launchPipelineReexecution(reexecutionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConflict { message }
    ... on InvalidStepError { invalidStepKey }
    ... on UnauthorizedError { message }
  }
}"""


def _resume_through_webserver(url: str, parent) -> int:
    """The UI's "Re-execute from failure" button: the webserver's GraphQL API."""
    import json
    import urllib.request

    body = json.dumps({"query": REEXECUTE, "variables": {
        "params": {"parentRunId": parent.run_id, "strategy": "FROM_FAILURE"}}}).encode()  # fmt: skip
    request = urllib.request.Request(f"{url.rstrip('/')}/graphql", body,
                                     {"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.loads(response.read())["data"]["launchPipelineReexecution"]
    if answer["__typename"] != "LaunchRunSuccess":
        print(f"error: {answer}", file=sys.stderr)
        return 1
    print(f"queued run {answer['run']['runId']} (re-execution of {parent.run_id} from failure)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="start a pipeline run")
    p.add_argument("pipeline", help="full_pipeline or finetune_pipeline")
    p.add_argument("--run-config", help="YAML run config (ops: {STEP: {config: ...}})")
    p.add_argument("--webserver", help="queue the run on this Dagster webserver")
    p.set_defaults(fn=run)
    p = sub.add_parser("status", help="a run's status and its steps'")
    p.add_argument("run_id")
    p.set_defaults(fn=status)
    p = sub.add_parser("resume", help="re-execute a failed run from its failed steps")
    p.add_argument("run_id")
    p.add_argument("--webserver", help="resume through this Dagster webserver")
    p.add_argument("--mark-failed", action="store_true",
                   help="record a run left STARTED by a killed orchestrator as failed first")  # fmt: skip
    p.set_defaults(fn=resume)
    args = parser.parse_args(argv)
    os.environ.setdefault("PYTHONPATH", str(ROOT))  # for the step processes Dagster starts
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
