FROM python:3.12-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PORT=4001

RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin finstep
WORKDIR /app
COPY custom_finstep.py .
# Run from bytecode compiled here: CPython keeps a script's whole syntax tree (about 4 MB) in
# memory for as long as the script runs, but not a module's, so the image runs it as a module.
RUN python -m compileall -q custom_finstep.py
USER finstep

EXPOSE 4001
# Slim images have no curl; the health check follows PORT when it is changed with -e PORT=...
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '4001'), timeout=4)"]

CMD ["python", "-m", "custom_finstep"]
