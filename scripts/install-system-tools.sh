#!/usr/bin/env bash
# System tools some tests use for real checks: Prometheus' promtool (lints metrics text and
# alert rules) and the prometheus server (scrapes a live trainer); Chromium and its
# WebDriver (the gallery's browser tests, tests/gallery/test_browser.py). Installed with
# Debian's apt when this runs as root on Debian/Ubuntu (CI, dev containers); elsewhere the
# tests that need them are skipped with a message that says how to install them.
set -u
want=()
command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || want+=(prometheus)
command -v chromium >/dev/null 2>&1 || want+=(chromium)
command -v chromedriver >/dev/null 2>&1 || want+=(chromium-driver)
[ ${#want[@]} = 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "note: ${want[*]} not installed; the tests that need them will be skipped" \
       "(sudo apt-get install --no-install-recommends ${want[*]})" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
for package in "${want[@]}"; do
  apt-get install -y -qq --no-install-recommends "$package" >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends "$package" >/dev/null 2>&1; } \
    || echo "note: could not install $package with apt-get; the tests that need it will be skipped" >&2
done
exit 0
