#!/usr/bin/env bash
# Installs the Debian packages that hold the embedded data (real spoken digits, noise, a speech
# synthesiser), Fashion-MNIST (the README's own-data example) and tcmalloc. Needs root (or sudo).
# Does nothing when they are all present.
set -euo pipefail
packages=(
  asterisk-core-sounds-en-wav asterisk-core-sounds-es-wav asterisk-core-sounds-fr-wav
  asterisk-core-sounds-it-wav asterisk-core-sounds-ru-wav asterisk-moh-opsound-wav
  asterisk-core-sounds-en asterisk-core-sounds-es asterisk-core-sounds-fr asterisk-core-sounds-it
  asterisk-core-sounds-ru
  espeak-ng libtcmalloc-minimal4 sonic-pi-samples pocketsphinx-testdata dataset-fashion-mnist
)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing Debian packages: ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
