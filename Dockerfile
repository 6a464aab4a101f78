# spotbox in one container: the MQTT broker, validation, storage, live feeds, history and the dashboard.
#   docker build -t spotbox .
#   docker run --rm -v spotbox-data:/data spotbox users add ROBOT-001 --file /data/users --password change-me
#   docker run -d --name spotbox -p 8000:8000 -p 1883:1883 -v spotbox-data:/data spotbox
# SQLite in the /data volume by default; -e DATABASE_URL=postgresql://user:pass@host:5432/db for PostgreSQL.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY spotbox ./spotbox
RUN pip install . && rm -rf /src

# A fixed uid so a bind-mounted /data can be given to it (chown 10001 DIR); a named volume inherits /data's owner.
RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin spotbox \
    && mkdir /data && chown spotbox:spotbox /data
VOLUME /data
WORKDIR /data
USER spotbox

# DATABASE_URL (not SPOTBOX_DATABASE_URL, which would win over it) so `-e DATABASE_URL=postgresql://...` replaces it.
ENV DATABASE_URL=sqlite:////data/spotbox.db
EXPOSE 8000 1883

# No curl in the slim image: ask /health with Python itself, over HTTPS when TLS is on (the certificate is for the
# public name, not 127.0.0.1, so this local liveness probe does not verify it).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, ssl, urllib.request; tls = bool(os.environ.get('SPOTBOX_TLS_CERT')); urllib.request.urlopen(('https' if tls else 'http') + '://127.0.0.1:' + os.environ.get('SPOTBOX_HTTP_PORT', '8000') + '/health', timeout=4, context=ssl._create_unverified_context() if tls else None)"]

ENTRYPOINT ["spotbox"]
# Listening on 0.0.0.0 requires users (docs/security.md): create /data/users first, as shown above.
CMD ["run", "--http-host", "0.0.0.0", "--mqtt-host", "0.0.0.0", "--users", "/data/users"]
