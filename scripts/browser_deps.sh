#!/usr/bin/env bash
# Install what the browser test needs when it is missing: Debian's Chromium and an emoji font
# (Playwright drives /usr/bin/chromium and never downloads a browser of its own).
set -euo pipefail
packages=(chromium fonts-noto-color-emoji)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ "${#missing[@]}" -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null; then
  echo "[setup] the browser test needs ${missing[*]}: install them with your package manager" >&2
  exit 0
fi
sudo_=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo_="sudo"; else
    echo "[setup] the browser test needs ${missing[*]}: run 'sudo apt-get install ${packages[*]}'" >&2
    exit 0
  fi
fi
echo "[setup] installing ${missing[*]} for the browser test"
install=($sudo_ apt-get install -y -q --no-install-recommends "${missing[@]}")
"${install[@]}" >/dev/null || { $sudo_ apt-get update -q >/dev/null && "${install[@]}" >/dev/null; }
