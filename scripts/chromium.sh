# Sourced by scripts/test.sh. `ensure_chromium` finds the headless Chromium that tests/test_rag_web.py drives, or
# installs Debian's `chromium` package where this user may install packages (root, or passwordless sudo, and apt-get).
# Otherwise it prints what to install and returns 1. Nothing on PyPI ships a browser that installs offline.
#
# EMBEDKIT_TEST_UID stands in for `id -u`; it exists only so tests/test_scripts.py can play a non-root user.

ensure_chromium() {
  if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    return 0
  fi
  local uid as_root=""
  uid=${EMBEDKIT_TEST_UID:-$(id -u)}
  if [ "$uid" = 0 ]; then
    as_root=" "
  elif command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then
    as_root="sudo -n"
  fi
  if [ -n "$as_root" ] && command -v apt-get >/dev/null 2>&1; then
    echo "[test] Chromium is missing; installing Debian's chromium package for the RAG page test (apt-get, ~1 min) ..." >&2
    if $as_root apt-get update -qq && $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
        && command -v chromium >/dev/null 2>&1; then
      return 0
    fi
    echo "error: installing chromium with apt-get failed (see above); install it by hand: apt-get install chromium" >&2
    return 1
  fi
  local why="this user cannot install packages (not root, no passwordless sudo)"
  [ -n "$as_root" ] && why="there is no apt-get to install it with"
  cat >&2 <<MSG
error: the tests need Chromium (headless, for tests/test_rag_web.py) and it is not on PATH; $why.
  Debian/Ubuntu: sudo apt-get install chromium    Fedora: sudo dnf install chromium    macOS: brew install --cask chromium
  (any Chromium or Chrome named 'chromium' or 'chromium-browser' on PATH works), then run bash scripts/test.sh again.
MSG
  return 1
}
