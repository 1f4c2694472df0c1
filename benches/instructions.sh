#!/usr/bin/env bash
# User-space instructions per request, counted by valgrind's callgrind: pos-crm-proxy against
# nginx (and against an older proxy binary, to judge a change).
#
# Why: on a shared VM the req/s and CPU figures of `cargo bench --bench compare` move by ±20 %
# from run to run, more than most single optimisations gain. Instructions executed in user space
# do not depend on the neighbours, so a change that saves 5 % shows as 5 % here. Kernel work
# (about 60 % of the proxy's CPU on loopback, the same syscalls as nginx) is not counted, and an
# instruction is not a nanosecond: this complements `compare`, it does not replace it.
#
# Usage: benches/instructions.sh [--secs N] [BASELINE_BINARY]
#   needs: apt-get install -y valgrind wrk nginx
#   BASELINE_BINARY: e.g. a release build of an earlier commit
#   (git worktree add /tmp/base <commit> && (cd /tmp/base && cargo build --release)).
#
# It starts `cargo bench --bench compare -- --serve` for the upstream, the fake CRM and the wrk
# scripts, then runs each target alone under callgrind on CPU 1 (wrk on CPU 0), with the same
# config as the benchmark: warm-up, counters zeroed, `wrk -t1 -c8` for N seconds (default 6),
# counters dumped, instructions / requests. Everything listens on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."

secs=6
baseline=""
while [ $# -gt 0 ]; do
  case "$1" in
    --secs) secs="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) baseline="$1"; shift ;;
  esac
done
for tool in valgrind callgrind_control wrk nginx taskset curl; do
  command -v "$tool" >/dev/null || PATH="$PATH:/usr/sbin" command -v "$tool" >/dev/null || {
    echo "missing $tool: apt-get install -y valgrind wrk nginx curl" >&2; exit 1; }
done
PATH="$PATH:/usr/sbin"
if [ -n "$baseline" ]; then
  [ -x "$baseline" ] || { echo "baseline binary $baseline is not an executable" >&2; exit 1; }
  baseline=$(realpath "$baseline")
fi

work=$(mktemp -d /tmp/instructions-XXXXXX)
serve_pid=""
cleanup() {
  # the whole process group: cargo, the compare bench and what it started
  [ -n "$serve_pid" ] && kill -- "-$serve_pid" 2>/dev/null || true
  pkill -f -- "--callgrind-out-file=$work/" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

cargo build --release --quiet
setsid cargo bench --bench compare --quiet -- --serve 1800 >"$work/serve.log" 2>&1 &
serve_pid=$!
for _ in $(seq 1 600); do
  grep -q '^wrk script' "$work/serve.log" 2>/dev/null && break
  kill -0 "$serve_pid" 2>/dev/null || { cat "$work/serve.log" >&2; exit 1; }
  sleep 1
done
bench_dir=$(sed -n 's#^wrk script for .*: \(/.*\)/post[0-9]*\.lua$#\1#p' "$work/serve.log" | head -1)
[ -d "$bench_dir" ] || { echo "no serve directory in the compare output" >&2; cat "$work/serve.log" >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# run_one NAME KIND(proxy|nginx) BINARY PATH LUA -> prints instructions per request
run_one() {
  local name=$1 kind=$2 bin=$3 path=$4 lua=$5
  local dir="$work/$name-$RANDOM" port admin out vpid n ir
  mkdir -p "$dir/data"
  port=$(free_port); admin=$(free_port)
  out="--callgrind-out-file=$dir/cg.out"
  if [ "$kind" = proxy ]; then
    sed -e "s/^listen = .*/listen = \"127.0.0.1:$port\"/" \
        -e "s/^admin_listen = .*/admin_listen = \"127.0.0.1:$admin\"/" \
        -e "s#^data_dir = .*#data_dir = \"$dir/data\"#" \
        "$bench_dir/proxy/config.toml" >"$dir/config.toml"
    (cd "$dir" && CRM_API_KEY=bench-key exec taskset -c 1 valgrind --tool=callgrind "$out" \
        "$bin" --config "$dir/config.toml" >"$dir/log" 2>&1) &
  else
    for d in client_body proxy fastcgi uwsgi scgi; do mkdir -p "$dir/$d"; done
    sed -e "s#$bench_dir/nginx#$dir#g" -e 's/master_process on;/master_process off;/' \
        -e "s/listen 127.0.0.1:[0-9]*/listen 127.0.0.1:$port/" \
        "$bench_dir/nginx/nginx.conf" >"$dir/nginx.conf"
    (cd "$dir" && exec taskset -c 1 valgrind --tool=callgrind "$out" \
        nginx -c "$dir/nginx.conf" -p "$dir" >"$dir/log" 2>&1) &
  fi
  vpid=$!
  local up=""
  for _ in $(seq 1 300); do
    curl -s -o /dev/null "http://127.0.0.1:$port/small" && { up=1; break; }
    sleep 0.2
  done
  if [ -z "$up" ]; then
    echo "$name did not answer within 60 s under valgrind; its output:" >&2
    tail -20 "$dir/log" >&2
    kill "$vpid" 2>/dev/null || true
    return 1
  fi
  local args=("http://127.0.0.1:$port$path")
  [ -n "$lua" ] && args=(-s "$lua" "http://127.0.0.1:$port$path")
  taskset -c 0 wrk -t1 -c8 -d2s "${args[@]}" >/dev/null
  callgrind_control -z "$vpid" >/dev/null 2>&1
  n=$(taskset -c 0 wrk -t1 -c8 -d"${secs}s" "${args[@]}" | awk '/requests in/ {print $1}')
  callgrind_control -d "$vpid" >/dev/null 2>&1
  kill "$vpid" 2>/dev/null; wait "$vpid" 2>/dev/null || true
  ir=$(grep -h '^summary:\|^totals:' $(ls -t "$dir"/cg.out.* | head -1) | head -1 | awk '{print $2}')
  echo $((ir / n))
}

proxy_bin="$PWD/target/release/pos-crm-proxy"
scenarios=(
  "GET /small (1 KB answer)|/small|"
  "GET /large (64 KB answer)|/large|"
  "POST /echo (small body)|/echo|$bench_dir/post2.lua"
  "POST /api/sales, no customer|/api/sales|$bench_dir/post4.lua"
  "POST /api/sales, customer + instant CRM|/api/sales|$bench_dir/post3.lua"
)
echo "## User-space instructions per request (callgrind)"
echo
echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD)$(git diff --quiet || echo -dirty)"
echo "- each target alone under callgrind on CPU 1, \`wrk -t1 -c8 -d${secs}s\` on CPU 0 after a 2 s warm-up; kernel work not counted"
echo "- nginx: the benchmark's config, one process (master_process off)"
[ -n "$baseline" ] && echo "- baseline: $baseline"
echo
if [ -n "$baseline" ]; then
  echo "| scenario | pos-crm-proxy | baseline | nginx | proxy / nginx | proxy / baseline |"
  echo "|---|---:|---:|---:|---:|---:|"
else
  echo "| scenario | pos-crm-proxy | nginx | proxy / nginx |"
  echo "|---|---:|---:|---:|"
fi
for s in "${scenarios[@]}"; do
  IFS='|' read -r title path lua <<<"$s"
  p=$(run_one proxy proxy "$proxy_bin" "$path" "$lua") || exit 1
  g=$(run_one nginx nginx nginx "$path" "$lua") || exit 1
  ratio=$(python3 -c "print(f'×{$p/$g:.2f}')")
  if [ -n "$baseline" ]; then
    b=$(run_one baseline proxy "$baseline" "$path" "$lua") || exit 1
    echo "| $title | $p | $b | $g | $ratio | $(python3 -c "print(f'×{$p/$b:.3f}')") |"
  else
    echo "| $title | $p | $g | $ratio |"
  fi
done
