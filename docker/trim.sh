#!/usr/bin/env bash
# Runs in the image after the Python packages are installed (bentofile `docker.setup_script`): removes the
# compilers and git that BentoML's base layer installs for building wheels. The linker stays: concrete
# links each circuit into a shared library (`ld`) when the server loads a model.
set -euo pipefail
if command -v apt-get >/dev/null; then
  apt-mark manual binutils libc6-dev >/dev/null
  apt-get purge -y --auto-remove build-essential gcc g++ cpp make git gnupg2 >/dev/null
  rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb
fi
rm -rf /root/.cache
