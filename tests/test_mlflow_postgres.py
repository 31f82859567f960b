"""MLflow's tracking server and model registry on a real PostgreSQL, as deployed
(infra/k8s/mlflow.yaml): runs, versions and aliases in the database, artifacts in S3."""

import mlflow
import psycopg
from mlflow import MlflowClient

from infra.local.stack import MLflowServer


def test_registry_on_postgres_moves_an_alias(postgres, s3, tmp_path):
    server = MLflowServer(
        tmp_path / "mlflow", s3.env(), artifact_root="s3://mlflow/pg-artifacts",
        backend_store_uri=postgres.uri, db_env=postgres.env(),
    )  # fmt: skip
    server.start()
    try:
        client = MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)
        mlflow.set_tracking_uri(server.uri)
        mlflow.set_experiment("postgres-registry")
        with mlflow.start_run() as run:
            mlflow.log_param("lr", 0.001)
            mlflow.log_metric("top1", 0.9, step=3)
            mlflow.log_text("weights stand here", "model/weights.txt")
        client.create_registered_model("pg-model")
        source = f"{run.info.artifact_uri}/model"
        v1 = client.create_model_version("pg-model", source, run_id=run.info.run_id)
        v2 = client.create_model_version("pg-model", source, run_id=run.info.run_id)
        client.set_registered_model_alias("pg-model", "champion", v1.version)
        assert client.get_model_version_by_alias("pg-model", "champion").version == "1"
        client.set_registered_model_alias("pg-model", "champion", v2.version)  # moved
        assert client.get_model_version_by_alias("pg-model", "champion").version == "2"
        got = client.get_run(run.info.run_id)
        assert got.data.params == {"lr": "0.001"} and got.data.metrics == {"top1": 0.9}
        text = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/model/weights.txt")
        assert text == "weights stand here"
    finally:
        server.stop()
    # It was PostgreSQL that held them, in the schema the migrations made on start.
    with psycopg.connect(
        host="127.0.0.1", port=postgres.port, user=postgres.user,
        password=postgres.password, dbname=postgres.database,
    ) as conn, conn.cursor() as cur:  # fmt: skip
        cur.execute("SELECT version_num FROM alembic_version")
        assert cur.fetchone()[0]
        cur.execute(
            "SELECT version FROM registered_model_aliases WHERE name = %s AND alias = %s",
            ("pg-model", "champion"),
        )
        assert cur.fetchone() == (2,)
