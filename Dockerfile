# syntax=docker/dockerfile:1.7
#
# One image for every service of the mesh: `mesh router`, `mesh agent NAME`, `mesh sts`.
# The Kubernetes manifests (k8s/) pass the subcommand as `args`; ENTRYPOINT is `mesh`.
#
#   docker build -t ghcr.io/example/grpc-agent-mesh:0.1.0 .
#
# Dependencies come from uv.lock exactly as `make setup` installs them (`uv sync --frozen`:
# the lockfile is never re-resolved), minus what a server does not run: the dev group
# (--no-dev) and the `llama` extra (llama-cpp-python compiles from source and needs a C/C++
# toolchain; in a cluster, run a llama.cpp/vLLM server and use the OpenAI-compatible
# provider instead). tests/k8s/test_dockerfile.py holds this relation.
# Kubernetes probes the pods over native gRPC health, so there is no HEALTHCHECK here.

ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9

FROM ${UV_IMAGE} AS uv

# -- build: resolve nothing, install the locked wheels into /app/.venv ------------------------
FROM ${PYTHON_IMAGE} AS build
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3.11 \
    UV_PROJECT_ENVIRONMENT=/app/.venv
WORKDIR /src
# Dependencies first (a layer that only changes with the lockfile) ...
COPY pyproject.toml uv.lock ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-install-project
# ... then the project itself, installed as a wheel (not editable: /src is not copied on).
COPY README.md ./
COPY mesh ./mesh
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable

# -- runtime: the venv, the default mesh's tool modules, a non-root user ------------------------
FROM ${PYTHON_IMAGE} AS runtime
# Numeric UID/GID so that the pod's `runAsNonRoot: true` can verify it (k8s/ uses 10001).
RUN groupadd --system --gid 10001 mesh \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin mesh \
 && mkdir -p /data /etc/mesh/config \
 && chown 10001:10001 /data
COPY --from=build /app/.venv /app/.venv
# Tool modules (`billing.tools:lookup_invoice`) are imported from PYTHONPATH; the mesh file
# itself is mounted from a ConfigMap at $MESH_CONFIG.
COPY services /app/services
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONPATH=/app/services \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MESH_CONFIG=/etc/mesh/config/mesh.yaml \
    MESH_DATA_DIR=/data
WORKDIR /app
USER 10001:10001
EXPOSE 50040 50050 50061 50062 50063 50064 50065
ENTRYPOINT ["mesh"]
CMD ["--help"]
