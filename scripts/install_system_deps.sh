#!/usr/bin/env bash
# Debian packages the tests need (run as root; skipped when already present).
set -euo pipefail
need=()
command -v espeak-ng >/dev/null || need+=(espeak-ng)   # synthesised speech for the ASR tests
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then echo "install as root: apt-get install ${need[*]}" >&2; exit 1; fi
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
