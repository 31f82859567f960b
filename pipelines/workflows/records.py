"""Where the steps' outputs live: small JSON records in the project's storage.

Each step returns a record (URIs, run ids, model versions, dataset versions). Dagster
keeps step outputs with an IO manager; its default one pickles them into the instance's
local directory, which a run re-executed in another pod (Kubernetes' run launcher) cannot
read and which runs code when read back. This one writes JSON under `base` (a directory
or an `s3://` prefix, through vit_core.storage), so a re-execution from failure reads its
parent run's records wherever it runs, and reading one executes nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import dagster as dg

from vit_core import storage


def records_base() -> str:
    """`VIT_WORKFLOWS_RECORDS` (a directory or s3:// prefix), else `$DAGSTER_HOME/records`
    (`.dagster/records` when DAGSTER_HOME is unset)."""
    home = Path(os.environ.get("DAGSTER_HOME", ".dagster"))
    return os.environ.get("VIT_WORKFLOWS_RECORDS") or str((home / "records").absolute())


class RecordIOManager(dg.ConfigurableIOManager):
    """Step outputs as `<base>/<run id>/<step key>/<output name>.json` (Dagster's output
    identifier). Outputs must be JSON values (the steps' records are dicts of strings and
    numbers); a re-executed run reads the outputs of the run it re-executes."""

    base: str

    def _location(self, context: dg.OutputContext) -> str:
        *parts, last = context.get_identifier()
        return storage.join(self.base, *parts, f"{last}.json")

    def handle_output(self, context: dg.OutputContext, obj) -> None:
        storage.write_bytes(self._location(context), json.dumps(obj, sort_keys=True).encode())

    def load_input(self, context: dg.InputContext):
        return json.loads(storage.read_bytes(self._location(context.upstream_output)))
