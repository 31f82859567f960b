"""The pipelines' Dagster instance on a real PostgreSQL, as the Helm chart deploys it
(infra/k8s/dagster/values.yaml): runs, events and schedules in the database, its schema
migrated on start, no address or password in the instance file."""

import psycopg
import pytest
from dagster import DagsterEventType, DagsterInstance
from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage
from test_data_helpers import make_image_folder

from infra.local.dagster import POSTGRES_VARIABLES, create_storage, prepare_home
from pipelines.workflows import definitions
from vit_core.data import make_shards


def test_pipelines_instance_runs_on_postgres(postgres, tmp_path, monkeypatch):
    for name in POSTGRES_VARIABLES.values():
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="DAGSTER_PG_HOST, DAGSTER_PG_PORT"):
        prepare_home(tmp_path / "home", db="postgres")
    for name, value in postgres.dagster_env().items():
        monkeypatch.setenv(name, value)
    home = prepare_home(tmp_path / "home", db="postgres")
    instance_file = (home / "dagster.yaml").read_text()
    assert postgres.password not in instance_file and str(postgres.port) not in instance_file
    create_storage(home)  # what `make pipelines-up DB=postgres` does first: the migrations

    # The first step of the scheduled fine-tune, on a dataset of six images: a real step of
    # the project's job, which needs no Ray cluster.
    location = str(tmp_path / "dataset")
    images = make_image_folder(tmp_path / "images", per_class=2)
    index = make_shards(str(images), location, executor="local", progress=False)
    with DagsterInstance.from_config(str(home)) as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
        result = definitions.finetune_pipeline.execute_in_process(
            run_config={"ops": {"dataset_version": {"config": {"location": location}}}},
            instance=instance, op_selection=["dataset_version"],
        )  # fmt: skip
        assert result.success
        assert result.output_for_node("dataset_version")["version"] == index.version
        run_id = result.run_id

    # Read back by a new instance, as the webserver and the daemon read what a run pod wrote.
    with DagsterInstance.from_config(str(home)) as instance:
        run = instance.get_run_by_id(run_id)
        assert run.is_success and run.tags[definitions.PIPELINE_TAG] == "finetune"
        logged = instance.all_logs(run_id)
        events = [e.dagster_event for e in logged if e.dagster_event]
        assert {e.step_key for e in events if e.event_type == DagsterEventType.STEP_SUCCESS} == {
            "dataset_version"
        }
        assert instance.all_instigator_state() == []  # schedule storage answers too

    # It was PostgreSQL that held them, in Dagster's own database.
    with psycopg.connect(
        host="127.0.0.1", port=postgres.port, user=postgres.user,
        password=postgres.password, dbname=postgres.dagster_database,
    ) as conn, conn.cursor() as cur:  # fmt: skip
        cur.execute("SELECT status FROM runs WHERE run_id = %s", (run_id,))
        assert cur.fetchone() == ("SUCCESS",)
        cur.execute("SELECT count(*) FROM event_logs WHERE run_id = %s", (run_id,))
        assert cur.fetchone()[0] == len(logged)
        cur.execute("SELECT version_num FROM alembic_version")
        assert cur.fetchone()[0]
