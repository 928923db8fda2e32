#!/usr/bin/env bash
# System tools some tests use for real checks: Prometheus' promtool (lints metrics text and
# alert rules) and the prometheus server (scrapes a live trainer). Installed with Debian's
# apt when this runs as root on Debian/Ubuntu (CI, dev containers); elsewhere the tests that
# need them are skipped with a message that says how to install them.
set -u
if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "note: prometheus/promtool not installed; the tests that need them will be skipped" \
       "(sudo apt-get install --no-install-recommends prometheus)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 \
  || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1; } \
  || echo "note: could not install prometheus with apt-get; the tests that need it will be skipped" >&2
exit 0
