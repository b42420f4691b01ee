# GPU image: the official vLLM 0.32.0 image plus this project (compose/Helm arrive with the deploy work).
FROM vllm/vllm-openai:v0.32.0

WORKDIR /opt/antidistill
COPY pyproject.toml README.md ./
COPY proxy_worker ./proxy_worker
COPY server ./server
# vllm itself comes from the base image (no [gpu] extra here, so pip does not touch it)
RUN pip install --no-cache-dir . \
    && useradd --create-home --uid 10001 antidistill
USER antidistill
# The V1 model runner is the path our logits processor is tested on (README: Serving).
ENV VLLM_USE_V2_MODEL_RUNNER=0
EXPOSE 8000
ENTRYPOINT ["antidistill", "serve"]
CMD ["--help"]
