#!/bin/sh
# Headless Chromium for tests/test_report.py (it renders the run report and checks the screenshot).
#
# Installs Debian's `chromium` when it is missing and apt-get is usable as root; otherwise says
# why not and exits 0, so `make test` goes on and the report test skips with that reason.
# On the 2-core Debian 12 box the install took 41 s (apt-get update included).
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_chromium: no apt-get here; the report's screenshot test will skip"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "ensure_chromium: not root, chromium not installed; the report's screenshot test will skip"
    exit 0
fi
echo "ensure_chromium: installing Debian's chromium (about a minute)"
start=$(date +%s)
if DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; then
    echo "ensure_chromium: chromium installed in $(($(date +%s) - start)) s"
else
    echo "ensure_chromium: apt-get failed; the report's screenshot test will skip"
fi
exit 0
