# One image for the three rlmq services: handler, sandbox pool, orchestrator (docs/deployment.md).
#
# The project and its dependencies are installed from a wheelhouse built on the host, so the
# build itself needs no network:
#   python3.11 -m pip wheel --wheel-dir wheels .     # the project and every dependency
#   docker build -t rlmq .                           # FROM the official python:3.11-slim
# Without an image registry (scripts/build-base-image makes a Debian base locally):
#   docker build --network none --build-arg BASE_IMAGE=rlmq-base:bookworm -t rlmq .
# APT_PACKAGES adds Debian packages (needs network), e.g. bubblewrap for isolation = "bwrap".
# Debian's redis-server is installed unless the base image has it (the compose file's `redis`
# service runs it from this image): that needs network too, or a base image that has it
# (scripts/compose-test makes one).
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
COPY wheels/ /wheels/
# A virtualenv under /opt, world-readable: sandbox workers drop to other uids and must still
# read the interpreter and the packages.
RUN python3 -m venv /opt/rlmq \
 && /opt/rlmq/bin/pip install --no-index --find-links /wheels --no-cache-dir --disable-pip-version-check rlmq \
 && /opt/rlmq/bin/python -c "import rlmq.lmhandler, rlmq.orchestrator, rlmq.protocol.security, rlmq.sandbox.cli" \
 && chmod -R a+rX /opt/rlmq

FROM ${BASE_IMAGE}
ARG APT_PACKAGES=""
# /run/rlmq holds the ipc sockets (a volume the services share): group rlmq may create sockets
# there, others (the sandbox workers' uids) may only reach sockets by name. /var/lib/rlmq is the
# orchestrator's working directory (trajectories go to rlmq-runs/ in it).
# policy-rc.d: a package's install script must not start its service inside the build.
RUN pkgs="$APT_PACKAGES"; \
    command -v redis-server >/dev/null || pkgs="$pkgs redis-server"; \
    if [ -n "$(echo $pkgs)" ]; then \
      printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d \
      && { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $pkgs \
           || { echo "cannot install$pkgs: this build has no network to a Debian mirror; build with" \
                "network or from a base image that has them" >&2; exit 1; }; } \
      && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /usr/sbin/policy-rc.d; \
    fi \
 && groupadd --system --gid 10001 rlmq \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/rlmq --no-create-home \
      --shell /usr/sbin/nologin rlmq \
 && install -d -o 10001 -g 10001 -m 0775 /run/rlmq \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/rlmq
COPY --from=build /opt/rlmq /opt/rlmq
COPY deploy/docker/rlmq-entrypoint /usr/local/bin/rlmq-entrypoint
COPY deploy/docker/rlmq_health.py /usr/local/bin/rlmq-health
ENV PATH=/opt/rlmq/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /var/lib/rlmq
USER 10001:10001
ENTRYPOINT ["rlmq-entrypoint"]
CMD ["rlmq", "--help"]
