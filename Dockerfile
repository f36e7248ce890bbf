# The production image: the official Airflow image plus the project's pinned dependencies
# (TensorFlow, Great Expectations, DuckDB, ... are not in it) and the project itself.
# Every Airflow service of docker-compose.yaml runs this image. Build: docker compose build
# (or docker build -t profile-engine:3.3.2 .). Details: docs/deployment.md.
FROM apache/airflow:3.3.2-python3.11

# The official image runs as the "airflow" user (uid 50000, group 0) with AIRFLOW_HOME=/opt/airflow,
# DAGs in /opt/airflow/dags and plugins in /opt/airflow/plugins; the project keeps that layout, so
# the package's PROJECT_ROOT (include/..) is /opt/airflow and include/config is found beside it.
USER airflow
ENV AIRFLOW__CORE__LOAD_EXAMPLES=False \
    PROFILE_ENGINE_LAKE=/data/lake \
    PIP_NO_CACHE_DIR=1
WORKDIR /opt/airflow

# Dependencies first (their layer is rebuilt only when the pins change): the runtime part of
# requirements.txt (above its "# development and tests" line), every package pinned by
# constraints.txt, and apache-airflow pinned to the image's version so pip never swaps Airflow
# itself (the official advice for extending the image). The extras name the image's providers the
# stack uses (CeleryExecutor, Postgres, Redis, the FAB auth manager), so pip resolves them together
# with the project's pins and fails the build on a conflict instead of breaking a provider.
COPY --chown=airflow:0 requirements.txt constraints.txt /opt/airflow/
RUN sed '/^# development and tests/,$d' requirements.txt > /tmp/requirements-runtime.txt \
    && pip install "apache-airflow[celery,postgres,redis,fab]==3.3.2" -r /tmp/requirements-runtime.txt \
        -c constraints.txt \
    && rm /tmp/requirements-runtime.txt

# The package, installed editable like in the development venv (import name profile_engine).
COPY --chown=airflow:0 pyproject.toml README.md /opt/airflow/
COPY --chown=airflow:0 include/ /opt/airflow/include/
RUN pip install --no-deps -e /opt/airflow

# DAGs, the UI plugin, and the secrets check that airflow-init runs with the published examples.
COPY --chown=airflow:0 dags/ /opt/airflow/dags/
COPY --chown=airflow:0 plugins/ /opt/airflow/plugins/
COPY --chown=airflow:0 docker/ /opt/airflow/docker/
COPY --chown=airflow:0 .env.example /opt/airflow/.env.example

# The lake's mount point, owned by airflow so that a new named volume mounted there inherits it.
USER root
RUN mkdir -p /data/lake && chown -R airflow:0 /data && chmod -R g+rwX /data
USER airflow
