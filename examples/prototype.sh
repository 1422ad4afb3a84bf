#!/usr/bin/env bash
# The prototype's README requests, verbatim, as curl calls against a running daemon.
# Usage: examples/prototype.sh [base-url]   (default http://localhost:3000)
set -euo pipefail
BASE="${1:-${SLESS_URL:-http://localhost:3000}}"
AUTH=()
[ -n "${SLESS_API_TOKEN:-}" ] && AUTH=(-H "Authorization: Bearer $SLESS_API_TOKEN")

echo "# POST /submit"
answer=$(curl -sS "${AUTH[@]}" -X POST "$BASE/submit" -H 'Content-Type: application/json' \
  -d '{
  "code": "return input * 2;",
  "input": 21
}')
echo "$answer"
job_id=$(printf '%s' "$answer" | python3 -c 'import json, sys; print(json.load(sys.stdin)["jobId"])')

echo "# GET /status/$job_id"
for _ in $(seq 1 100); do
  status=$(curl -sS "${AUTH[@]}" "$BASE/status/$job_id")
  case "$status" in *'"state": "completed"'*|*'"state": "failed"'*) break ;; esac
  sleep 0.1
done
echo "$status"

echo "# GET /"
curl -sS "$BASE/"; echo
echo "# GET /redis"
curl -sS "${AUTH[@]}" "$BASE/redis"; echo
echo "# GET /mongo"
curl -sS "${AUTH[@]}" "$BASE/mongo"; echo
echo "# POST /execute"
curl -sS "${AUTH[@]}" -X POST "$BASE/execute" -H 'Content-Type: application/json' \
  -d '{"code": "return input * 2;", "input": 21}'; echo
