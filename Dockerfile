# One image for the daemon and the workers; docker-compose.yml picks the command.
FROM python:3.11-slim

# bubblewrap is what the sandbox (issue 3) builds on; procps gives `ps` and `pgrep`
# for looking inside a running container. No compilers, no network tools.
RUN apt-get update \
 && apt-get install -y --no-install-recommends bubblewrap libseccomp2 procps \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY setup.cfg pyproject.toml README.md ./
COPY sless ./sless
COPY sless_daemon ./sless_daemon
RUN pip install --no-cache-dir .

# Inside the container the daemon must listen beyond loopback for the published
# port to reach it; compose publishes it on the host's loopback only.
ENV SLESS_HOST=0.0.0.0 \
    SLESS_PORT=3000 \
    PYTHONUNBUFFERED=1
EXPOSE 3000
CMD ["sless", "daemon"]
