#!/usr/bin/env bash
# Instructions the coordinator executes per 3-step HTTP saga, counted by
# callgrind: the steady measure of the server's own work (the same count
# run after run, whatever else the machine does; wall-clock figures on this
# machine move by 1.5x within the hour). System calls are not counted, nor
# the SQLite checkpointer thread (its work follows wall time; see below).
# Usage: bench/server-instructions.sh BINARY [SAGAS]   (needs valgrind, python3)
# With KEEP=FILE the counted dump is kept there, for callgrind_annotate.
# Sagas are run one at a time over one keep-alive connection; 50 warm up
# first and are not counted.
set -euo pipefail
bin="$(realpath "$1")"; n="${2:-300}"
dir="$(mktemp -d)"; cd "$dir"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
sp="$(port)"; vp="$(port)"
"$bin" bench-service --listen "127.0.0.1:$vp" >/dev/null 2>&1 & svc=$!
valgrind --tool=callgrind --callgrind-out-file="$dir/cg.out" \
  "$bin" serve --listen "127.0.0.1:$sp" --store "sqlite://$dir/j.db" >/dev/null 2>"$dir/serve.err" & vg=$!
trap 'kill $vg $svc 2>/dev/null; wait $vg 2>/dev/null; rm -rf "$dir"' EXIT
python3 - "$sp" "$vp" "$n" <<'PY'
import http.client, json, socket, subprocess, sys, time
sp, vp, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
for _ in range(300):
    try:
        socket.create_connection(("127.0.0.1", sp), 0.2).close(); break
    except OSError:
        time.sleep(0.2)
c = http.client.HTTPConnection("127.0.0.1", sp, timeout=60)
def post(path, body):
    c.request("POST", path, json.dumps(body), {"content-type": "application/json"})
    r = c.getresponse(); return r.status, json.loads(r.read())
url = f"http://127.0.0.1:{vp}/ok"
step = lambda s: {"name": s, "action": {"url": url}, "compensation": {"url": url}}
assert post("/v1/sagas", {"name": "ok", "steps": [step("a"), step("b"), step("c")]})[0] in (200, 201)
def run(k):
    for _ in range(k):
        s, v = post("/v1/executions?wait=30", {"saga": "ok", "input": None})
        assert v["status"] == "completed", v
run(50)
subprocess.run(["callgrind_control", "-z"], capture_output=True, check=True)
run(n)
subprocess.run(["callgrind_control", "-d"], capture_output=True, check=True)
PY
sleep 1
if [ -n "${KEEP:-}" ]; then cp "$(ls "$dir"/cg.out.* | head -1)" "$KEEP"; fi
total="$(grep -h '^summary:' "$dir"/cg.out.* | awk '{s+=$2} END {print s}')"
# The checkpointer thread copies WAL frames a fixed time after commits, so
# its share follows wall time (valgrind's slowness), not the sagas: the
# steady figure leaves it out.
ck=0
for f in "$dir"/cg.out.*; do
  c="$(callgrind_annotate --inclusive=yes --threshold=100 "$f" 2>/dev/null |
    awk '/:sagatx::store::sqlite::checkpointer( |$)/ { gsub(",", "", $1); if ($1 + 0 > m) m = $1 + 0 } END { print m + 0 }')"
  ck=$((ck + c))
done
if [ "$ck" = 0 ]; then
  echo "warning: no instructions found under sagatx::store::sqlite::checkpointer: the figure below includes the checkpointer thread" >&2
fi
echo "$(basename "$bin"): $(((total - ck) / n)) instructions per saga without the checkpointer thread ($((total / n)) with it; $n sagas, total $total)"
