#!/usr/bin/env bash
# Screenshots of the real app in a virtual X display (for the README): the demo project as a first start opens
# it, trained with Start training; the Training workspace mid-run, the Samples workspace when it has finished,
# the Dataset workspace.
# Needs: xvfb xauth x11-apps xdotool imagemagick (Debian packages) and a release build.
# The click positions are those of the 1280x820 window's layout; check the shots after a layout change.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$(realpath "${BIN:-target/release/lora-studio}")
export HOME=$(mktemp -d)   # a fresh settings folder: a first start, which opens the demo project
mkdir -p docs/screenshots
xvfb-run -a -s "-screen 0 1280x820x24" bash -c "
  shot() { xwd -root -silent | convert xwd:- docs/screenshots/\$1.png; }
  '$BIN' gui & sleep 8
  xdotool mousemove 826 87 click 1; sleep ${MID_RUN_S:-22}; xdotool mousemove 1270 810; sleep 1
  shot training
  sleep ${FINISH_S:-60}
  xdotool mousemove 40 125 click 1; sleep 2
  xdotool mousemove 150 160 click 1; sleep 2; xdotool mousemove 1270 810; sleep 1
  shot samples
  xdotool mousemove 38 79 click 1; sleep 4; xdotool mousemove 1270 810; sleep 1
  shot dataset
  kill %1"
rm -rf "$HOME"
