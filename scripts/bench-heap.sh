#!/usr/bin/env bash
# Where an idle connection's memory goes (S1): runs S1 against the release server under
# heaptrack with CONNECTIONS (5,000) connections, then prints the heap still held at the peak
# per connection, by allocation site (the innermost frame that is not the allocator or a
# collection growing). Needs heaptrack (Debian package `heaptrack`, installed when missing).
#
#   scripts/bench-heap.sh                  # release build, 5,000 connections
#   CONNECTIONS=10000 scripts/bench-heap.sh
#   SERVER=holdfast-sse scripts/bench-heap.sh   # another transport or encoding
#   KEEP=1 scripts/bench-heap.sh               # keep the trace and folded stacks (path printed)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v heaptrack >/dev/null || { apt-get update -q && apt-get install -y -q heaptrack; }
n="${CONNECTIONS:-5000}"
server="${SERVER:-holdfast}"
cargo build --release -q --bins
work="$(mktemp -d -t holdfast-heap-XXXX)"
trap '[ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
mkdir -p "$work/bin"
cat > "$work/bin/holdfast" <<EOF
#!/usr/bin/env bash
exec heaptrack -o "$work/trace" "$PWD/target/release/holdfast" "\$@"
EOF
chmod +x "$work/bin/holdfast"
taskset -c 1 target/release/holdfast-bench bench --scenarios s1 --servers "$server" --runs 1 \
  --connections "$n" --bin-dir "$work/bin" --out "$work/results" > /dev/null
# The bench kills the wrapper (heaptrack's script), not the server under it: stop the server
# gracefully so heaptrack finishes its trace, then wait for heaptrack's processes to end.
pkill -TERM -f "^$PWD/target/release/holdfast serve" || true
for _ in $(seq 1 300); do
  pgrep -f "heaptrack.*$work/trace" > /dev/null || pgrep -f "^$PWD/target/release/holdfast serve" > /dev/null || break
  sleep 0.2
done
[ -s "$work/trace.zst" ] || { echo "heaptrack left no trace" >&2; exit 1; }
heaptrack_print --flamegraph-cost-type peak -F "$work/peak.folded" "$work/trace.zst" > /dev/null
N="$n" python3 - "$work/peak.folded" <<'PY'
import collections, os, re, sys
n = int(os.environ["N"])
# Frames that only say "memory was allocated / a collection grew", not who wanted it.
plumbing = re.compile(
    r"^(_R|__rust|__rdl|alloc|allocate|box_new|new_uninit|do_alloc|new_uninitialized|reserve|"
    r"with_capacity|finish_grow|grow_|do_reserve|try_allocate|resize|prepare_resize|"
    r"fallible_with_capacity|insert|entry|rustc_entry|find_or_find_insert|malloc|aligned_malloc|"
    r"new<> \((sync|boxed)\.rs\)|from_iter|extend|clone|to_vec|to_owned|push|copy_from_slice|"
    r"from<>|from \(|into<>|collect|spec_|default<>)"
)
by = collections.Counter()
total = 0
for line in open(sys.argv[1]):
    stack, _, cost = line.rstrip().rpartition(" ")
    cost = int(cost)
    total += cost
    frames = stack.split(";")
    site = next((f for f in reversed(frames) if f and not plumbing.match(f)), frames[-1])
    by[site[:110]] += cost
print(f"heap at the peak: {total / n:,.0f} bytes per connection ({n:,} connections)")
for site, cost in by.most_common(25):
    if cost / n < 16:
        break
    print(f"{cost / n:8,.0f}  {site}")
PY
[ -z "${KEEP:-}" ] || echo "kept: $work (trace.zst, peak.folded)" >&2
