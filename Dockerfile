# GPU image: the official vLLM 0.32.0 image plus this project.
# (Kubernetes, compose and a CPU image arrive with the deploy work.)
FROM vllm/vllm-openai:v0.32.0

WORKDIR /opt/antidistill
COPY pyproject.toml README.md ./
COPY proxy_worker ./proxy_worker
COPY server ./server
RUN pip install --no-cache-dir --no-deps . \
    && useradd --create-home --uid 10001 antidistill
USER antidistill
# The V1 model runner is the path our logits processor is tested on (see ARCHITECTURE.md §3).
ENV VLLM_USE_V2_MODEL_RUNNER=0
ENTRYPOINT ["python", "-m"]
CMD ["proxy_worker.gradient", "--help"]
