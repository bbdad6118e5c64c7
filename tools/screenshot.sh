#!/usr/bin/env bash
# Screenshots of the real app in a virtual X display (for the README).
# Needs: xvfb xauth x11-apps xdotool imagemagick (Debian packages) and a release build.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/lora-studio}
DATA=$(mktemp -d)
export HOME=$(mktemp -d)   # a fresh settings folder, so the shot does not depend on the last session
"$BIN" bench dataset --images 60 --dir "$DATA" --frames 1 >/dev/null
mkdir -p docs/screenshots
xvfb-run -a -s "-screen 0 1280x820x24" bash -c "
  '$BIN' gui --dataset '$DATA' & sleep 8
  xdotool mousemove 313 180 click 1; sleep 3; xdotool mousemove 600 790; sleep 1
  xwd -root -silent | convert xwd:- docs/screenshots/dataset.png
  kill %1"
rm -rf "$DATA" "$HOME"
