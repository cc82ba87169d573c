#!/usr/bin/env bash
# Browser-test dependencies (tests/test_browser.py): Debian's chromium and its matching
# chromedriver, and the selenium package in ./.venv. Run as root, after install.sh.
# Selenium is pointed at /usr/bin/chromedriver, so its driver manager downloads nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
  echo "browser-deps: .venv missing; run install.sh first" >&2
  exit 1
fi
.venv/bin/python -m pip install -q "selenium>=4.20"
echo "browser deps ready: $(chromium --version 2>/dev/null | head -1), selenium $(.venv/bin/python -c 'import selenium; print(selenium.__version__)')"
