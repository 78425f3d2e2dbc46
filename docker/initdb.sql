-- The MLflow backend store lives beside Airflow's metadata DB in the same PostgreSQL server.
CREATE DATABASE mlflow OWNER shopguide;
