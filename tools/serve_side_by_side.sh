#!/usr/bin/env bash
# lstream serve against llama-server on one machine, the same load test and client (tools/load_test.py,
# the openai client, greedy, -n tokens per request): one request at a time, then N at once, the same
# prompts. Usage: tools/serve_side_by_side.sh LLAMA_SERVER_BINARY [N=8] [TOTAL=16] [-n 48] [-t 2]
# (run from the repository's parent folder's python env with lstream importable).
set -u
LS_BIN=${1:?path to llama-server}; N=${2:-8}; TOTAL=${3:-16}; NTOK=${4:-48}; T=${5:-2}
M=$(python -c "from lstream.loaders.registry import pull; print(pull('smollm2-135m', quiet=True))")
wait_up() { for _ in $(seq 300); do curl -sf "$1/health" >/dev/null && return 0; sleep 1; done; return 1; }
load() { python "$(dirname "$0")/load_test.py" --base-url "$1/v1" -c 1,$N --total $TOTAL -n $NTOK --same \
  --json "$2.json" --label "$2"; }
echo "== $(date -u +%H:%M:%S) load $(cut -d' ' -f1 /proc/loadavg): lstream serve -np $N -c 4096 -t $T"
python -m lstream.cli serve -m "$M" --port 8181 -np $N -c 4096 -t $T >/tmp/ls_serve.log 2>&1 &
P=$!; wait_up http://127.0.0.1:8181 && load http://127.0.0.1:8181 lstream; kill -INT $P; wait $P
echo "== $(date -u +%H:%M:%S) load $(cut -d' ' -f1 /proc/loadavg): llama-server -np $N -c 4096 -t $T"
"$LS_BIN" -m "$M" --port 8182 -np $N -c 4096 -t $T >/tmp/llama_serve.log 2>&1 &
P=$!; wait_up http://127.0.0.1:8182 && load http://127.0.0.1:8182 llama-server; kill -INT $P; wait $P
