# Production-like image: the pinned dependency set plus the project (DAGs, plugins, package).
FROM python:3.11-slim-bookworm
ENV PIP_NO_CACHE_DIR=1 \
    AIRFLOW_HOME=/opt/airflow \
    AIRFLOW__CORE__DAGS_FOLDER=/opt/project/dags \
    AIRFLOW__CORE__PLUGINS_FOLDER=/opt/project/plugins \
    AIRFLOW__CORE__LOAD_EXAMPLES=False \
    PROFILE_ENGINE_LAKE=/data/lake
WORKDIR /opt/project
COPY requirements.txt constraints.txt pyproject.toml README.md ./
RUN pip install -r requirements.txt -c constraints.txt \
        "apache-airflow[celery,postgres,redis]==3.3.2" -c constraints.txt
COPY include ./include
COPY dags ./dags
COPY plugins ./plugins
RUN pip install --no-deps --no-build-isolation -e . && useradd --uid 50000 --create-home airflow \
    && mkdir -p /data/lake /opt/airflow && chown -R airflow /data /opt/airflow
USER airflow
