# The gateway image: `docker build -t image-gateway .`
# Builder: installs the gateway and its runtime dependencies into /opt/venv (a venv without
# pip); the final image gets only that venv, on the same base image so its interpreter matches.
FROM python:3.11-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
RUN python -m venv --without-pip /opt/venv
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip --python /opt/venv/bin/python install --no-cache-dir . \
    && /opt/venv/bin/python -I -c "import gateway.cli.main, uvloop, httptools"


FROM python:3.11-slim

LABEL org.opencontainers.image.title="image-gateway" \
      org.opencontainers.image.description="OpenAI-compatible image-generation gateway in front of TTAPI" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric UID, so Kubernetes can check runAsNonRoot.
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --no-log-init --uid 10001 --gid gateway --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin gateway \
    && mkdir -p /tmp/prometheus /var/lib/gateway /etc/gateway \
    && chown gateway:gateway /tmp/prometheus /var/lib/gateway

COPY --from=builder /opt/venv /opt/venv
COPY config/gateway.docker.yaml /etc/gateway/gateway.yaml

# Workers: one per usable core (CPU affinity, capped by the container's CPU limit); GATEWAY_WORKERS overrides.
# PROMETHEUS_MULTIPROC_DIR: the workers' metric files (emptied by the gateway at start).
# /var/lib/gateway: the usage spool (usage.spool_path), to be kept on a volume.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GATEWAY_CONFIG=/etc/gateway/gateway.yaml \
    PROMETHEUS_MULTIPROC_DIR=/tmp/prometheus
VOLUME ["/var/lib/gateway"]

USER 10001:10001
# 8080: the API; 9091: /metrics (metrics.port of the image's default config).
EXPOSE 8080 9091

HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]

# SIGTERM starts the graceful shutdown: in-flight requests finish, pending usage is flushed.
# Give the container a long stop timeout (image calls last up to 600 s), see deploy/README.md.
STOPSIGNAL SIGTERM
ENTRYPOINT ["gateway"]
CMD ["serve", "--config", "/etc/gateway/gateway.yaml", "--host", "0.0.0.0", "--port", "8080"]
