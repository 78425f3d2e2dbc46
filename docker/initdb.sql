-- The profile's three databases, named as docker/prod.env names them (SHOPGUIDE_PG_DB_PREFIX + airflow | mlflow |
-- feast): Airflow's metadata (also the Celery result backend and the @champion lock), MLflow's backend store, Feast's
-- SQL registry and offline tables. Run once, by the postgres image, on an empty data volume; compose's init service
-- (pipelines.prod.prepare_stores) creates any that are missing anyway, as `shopguide prod up` does.
CREATE DATABASE shopguide_airflow;
CREATE DATABASE shopguide_mlflow;
CREATE DATABASE shopguide_feast;
