FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY config ./config
RUN pip install --no-cache-dir . && useradd --create-home forwarder
USER forwarder
ENV REPORT_FORWARDER_LOG_FORMAT=json
ENTRYPOINT []
CMD ["report-forwarder", "worker"]
