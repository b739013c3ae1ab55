#!/bin/sh
# The real compose stack on this machine, for a short run (make compose-smoke; not in make test):
# starts dockerd if none answers, builds the images offline when they are missing, brings the
# stack up with host networking, waits for the trainer to finish 5 steps, checks every service's
# /metrics, and takes it all down again (volumes included).
set -eu
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
COMPOSE=${COMPOSE:-docker-compose}
FILES="-f deploy/docker-compose.yml -f deploy/docker-compose.hostnet.yml"
STARTED_DOCKERD=""
if ! docker info >/dev/null 2>&1; then
  dockerd >/tmp/slipstream-dockerd.log 2>&1 &
  STARTED_DOCKERD=$!
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
fi
cleanup() {
  $COMPOSE $FILES logs --no-color > /tmp/slipstream-compose-smoke.log 2>&1 || true
  $COMPOSE $FILES down -v >/dev/null 2>&1 || true
  [ -n "$STARTED_DOCKERD" ] && kill "$STARTED_DOCKERD" || true
}
trap cleanup EXIT
docker image inspect slipstream:cpu >/dev/null 2>&1 || make images-offline
docker image inspect "${REDIS_IMAGE:-redis:7.4}" >/dev/null 2>&1 || export REDIS_IMAGE=local/redis:7
rm -f /tmp/slipstream-compose-metrics.log
$COMPOSE $FILES up -d
echo "waiting for the trainer (logs: $COMPOSE $FILES logs -f)"
for _ in $(seq 600); do
  id=$($COMPOSE $FILES ps -q trainer)
  state=$(docker inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$id")
  case "$state" in
    "exited 0") break ;;
    exited*) echo "trainer failed: $state"; exit 1 ;;
  esac
  for port in 9401 9402 9403 9404; do curl -sf "http://127.0.0.1:$port/metrics" >/dev/null && echo "metrics :$port ok" >> /tmp/slipstream-compose-metrics.log || true; done
  sleep 1
done
$COMPOSE $FILES ps
echo "metrics endpoints answered: $(sort -u /tmp/slipstream-compose-metrics.log | tr '\n' ' ')"
$COMPOSE $FILES run --rm --no-deps --entrypoint cat trainer /runs/compose/summary.json
echo "compose smoke: OK"
