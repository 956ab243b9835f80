FROM python:3.11-slim
WORKDIR /app
# The locked tree first, every package checked against its hash (requirements/update.sh
# makes the lock), in a layer of its own that a code change does not rebuild; then the
# project alone, with nothing left to resolve.
COPY requirements/runtime.txt ./requirements/runtime.txt
RUN pip install --no-cache-dir --require-hashes -r requirements/runtime.txt
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY config ./config
# A fixed numeric UID, so that Kubernetes' runAsNonRoot can check it (deploy/kubernetes/).
RUN pip install --no-cache-dir --no-deps . && pip check \
    && useradd --create-home --uid 10001 forwarder
USER 10001
ENV REPORT_FORWARDER_LOG_FORMAT=json \
    REPORT_FORWARDER_WORKER_METRICS_PORT=9808
EXPOSE 9808
# Liveness of the default command (the worker): /healthz on its metrics port answers 200
# while the process and its consumer loop are alive, 503 otherwise. The image has no curl,
# so Python asks. A container running another command (`serve`) sets its own healthcheck
# (docker-compose.yml does).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9808/healthz', timeout=3)"]
ENTRYPOINT []
CMD ["report-forwarder", "worker"]
