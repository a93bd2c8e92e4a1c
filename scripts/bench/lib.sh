# Shared helpers for clip's benchmark scripts (sourced).
set -euo pipefail
ROOT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CLIP=${CLIP_BIN:-$ROOT_DIR/target/release/clip}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_registry DIR -> sets REGISTRY (host:port) and REGISTRY_PID
start_registry() {
  local dir=$1 port; port=$(free_port)
  mkdir -p "$dir"
  cat >"$dir/config.yml" <<YML
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $dir/data
http:
  addr: 127.0.0.1:$port
YML
  docker-registry serve "$dir/config.yml" >"$dir/registry.log" 2>&1 &
  REGISTRY_PID=$!
  REGISTRY=127.0.0.1:$port
  for _ in $(seq 100); do
    if (echo >/dev/tcp/127.0.0.1/$port) 2>/dev/null; then return 0; fi
    kill -0 "$REGISTRY_PID" 2>/dev/null || { echo "docker-registry failed to start:" >&2; cat "$dir/registry.log" >&2; return 1; }
    sleep 0.1
  done
  echo "docker-registry did not listen on $port" >&2; return 1
}

push_layout() { # LAYOUT TAG NAME
  skopeo copy --quiet --dest-tls-verify=false "oci:$1:$2" "docker://$REGISTRY/$3:$2"
}

median() { sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
now() { date +%s.%N; }
