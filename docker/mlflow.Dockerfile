# The team's MLflow tracking server: runs in Postgres, artifacts served through the server
# (--serve-artifacts), so no Ray node needs the server's disk. Same MLflow as the sweep's image.
FROM python:3.11-slim-bookworm
RUN pip install --no-cache-dir mlflow==3.17.2 psycopg2-binary==2.9.10 \
 && useradd --create-home --uid 1000 mlflow \
 && mkdir -p /mlartifacts && chown mlflow:mlflow /mlartifacts
USER mlflow
EXPOSE 5000
