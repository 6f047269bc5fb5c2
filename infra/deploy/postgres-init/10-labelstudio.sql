-- Run once by the postgres image on an empty data volume (/docker-entrypoint-initdb.d), as POSTGRES_USER:
-- Label Studio's database beside Airflow's on the same server, as tests/test_airflow_celery.py runs it.
CREATE DATABASE labelstudio;
