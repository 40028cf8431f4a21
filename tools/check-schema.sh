#!/usr/bin/env bash
# Schema checks: buf lint (STANDARD), buf format, and buf breaking against the
# schema as it was before its newest change.
set -euo pipefail
BUF=${BUF:-.tools/node_modules/.bin/buf}

"$BUF" lint
"$BUF" format -d --exit-code

# Compare with the parent of the newest commit that touched the schema, so a
# breaking change is caught even when later commits do not touch protos/.
last=$(git log -1 --format=%H -- protos buf.yaml 2>/dev/null || true)
if [[ -z $last ]]; then
  echo "buf breaking: skipped (the schema has no history yet)"
elif [[ -n $(git status --porcelain -- protos buf.yaml) ]]; then
  "$BUF" breaking --against ".git#ref=HEAD"
  echo "buf breaking: working tree against HEAD: ok"
elif ! git cat-file -e "$last~1:buf.yaml" 2>/dev/null; then
  echo "buf breaking: skipped (${last:0:12} introduced the schema)"
else
  "$BUF" breaking --against ".git#ref=$last~1"
  echo "buf breaking: against ${last:0:12}~1: ok"
fi
