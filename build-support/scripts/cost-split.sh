#!/bin/bash
# Where a 4k request's CPU goes, ours beside kublk and rublk: for each row
# (null and loop, random reads and writes, one queue, depth 128, fio 4k at
# qd32, scheduler none) and server, the daemon's user and kernel time per
# I/O (its io-wq workers apart), fio's, and the guest's whole busy time, over
# a 4 s window of a 6 s fio run. The daemon's user time is all that a
# server's own code can save; the rest is the kernel's work for the ublk
# protocol (the same commands for all three servers), the backing file's and
# fio's.
# The guest runs fio from the host's root (`cargo xtask test` installs it).
# Build first: cargo build --release -p ublk-tools --bin ublk; cargo xtask peers
# Run:   cargo xtask vm --kernel sid -- env ROUNDS="1 2 3" "$PWD/build-support/scripts/cost-split.sh"
# OURS_B=PATH adds a server `ours_b`: a second build of `ublk` (another
# profile, say), run like ours in the same rounds, for an A/B.
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
# Each build of ours lives in /tmp/SERVER/ublk (its process name is `ublk`).
mkdir -p /tmp/ours; cp "$ROOT/target/release/ublk" /tmp/ours/ublk
SERVERS="ours kublk rublk"
if [ -n "$OURS_B" ]; then
  mkdir -p /tmp/ours_b; cp "$OURS_B" /tmp/ours_b/ublk; SERVERS="ours ours_b kublk rublk"
fi
KUBLK=/tmp/kublk; cp "$(ls -d "$HOME"/.cache/ublk-rs-rig/peers/kublk-*/bin/kublk | tail -1)" $KUBLK
RUBLK=/tmp/rublk; cp "$(ls -d "$HOME"/.cache/ublk-rs-rig/peers/rublk-*/bin/rublk | tail -1)" $RUBLK
FILE=/tmp/backing.img
[ -f $FILE ] || dd if=/dev/zero of=$FILE bs=1M count=1024 status=none
cd /tmp
ticks() { # pid: "user kernel iowq" ticks summed over threads
  local u=0 s=0 w=0 t
  for t in /proc/$1/task/*; do
    f=($(sed 's/.*) //' $t/stat 2>/dev/null)); [ ${#f[@]} -gt 12 ] || continue
    if grep -q '^iou-wrk' $t/comm 2>/dev/null; then w=$((w + f[11] + f[12]))
    else u=$((u + f[11])); s=$((s + f[12])); fi
  done
  echo $u $s $w
}
busy() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9}' /proc/stat; }
add() { # server target
  case $1 in
    ours*) /tmp/$1/ublk add -t $2 -q 1 -d 128 --quiet $([ $2 = loop ] && echo -f $FILE) ;;
    kublk) $KUBLK add -t $2 -q 1 -d 128 $([ $2 = loop ] && echo $FILE) ;;
    rublk) $RUBLK add $2 -q 1 -d 128 $([ $2 = loop ] && echo -f $FILE) ;;
  esac </dev/null >/dev/null 2>&1
}
del() {
  case $1 in
    ours*) /tmp/$1/ublk del -a ;; kublk) $KUBLK del -a ;; rublk) $RUBLK del -a ;;
  esac >/dev/null 2>&1
}
# Columns: IOPS, then µs of CPU per I/O: the daemon's user time, its
# kernel time (threads other than io-wq workers), its io-wq workers', fio's
# (its own report), and the whole guest's busy time (/proc/stat; under TCG
# it disagrees with the processes' own ticks, below them on one host and
# above on another, so it is shown, not used).
# share = the daemon's user time / (daemon + fio): an upper bound of what a
# server's own code is of a request's CPU (interrupt work is left out).
HEAD=$(printf "%-6s %-14s %7s %7s %7s %7s %7s %7s" server row iops d_user d_kern iowq fio guest)
echo "$HEAD"
: > /tmp/split.txt
run() { # server target rw
  local srv=$1 tgt=$2 rw=$3
  add $srv $tgt
  for _ in $(seq 50); do [ -b /dev/ublkb0 ] && break; sleep 0.2; done
  sleep 1
  echo none > /sys/block/ublkb0/queue/scheduler
  local pid=$(pgrep -n -x $(case $srv in ours*) echo ublk ;; *) echo $srv ;; esac))
  fio --name=b --filename=/dev/ublkb0 --direct=1 --ioengine=io_uring --rw=$rw --bs=4k --iodepth=32 --time_based --runtime=6 --output-format=terse --terse-version=3 > /tmp/fio.out 2>&1 &
  local fpid=$!
  sleep 1
  local d0=($(ticks $pid)) b0=$(busy)
  sleep 4
  local d1=($(ticks $pid)) b1=$(busy)
  wait $fpid
  # fio's IOPS and its own CPU (user + system, % of one CPU over its run).
  local iops=$(awk -F';' '/^3;/{print ($8>0)?$8:$49}' /tmp/fio.out)
  local fcpu=$(awk -F';' '/^3;/{print $88+$89}' /tmp/fio.out)
  local n=$((iops * 4))
  us() { echo "scale=1; $1 * 10000 / $n" | bc; }
  printf "%-6s %-14s %7d %7s %7s %7s %7s %7s\n" $srv "$tgt-$rw" $iops \
    $(us $((d1[0] - d0[0]))) $(us $((d1[1] - d0[1]))) $(us $((d1[2] - d0[2]))) \
    $(echo "scale=1; $fcpu * 10000 / $iops" | bc) $(us $((b1 - b0))) | tee -a /tmp/split.txt
  del $srv
  sleep 1.5
}
for r in ${ROUNDS:-1 2 3}; do
  for row in "null randread" "null randwrite" "loop randread" "loop randwrite"; do
    for srv in $SERVERS; do run $srv $row; done
  done
done
echo; echo "medians over the rounds"
echo "$HEAD   share"
for row in null-randread null-randwrite loop-randread loop-randwrite; do
  for srv in $SERVERS; do
    awk -v s=$srv -v r=$row '
      $1 == s && $2 == r { n++; for (c = 3; c <= 8; c++) v[c, n] = $c; name = $1; row = $2 }
      END {
        if (!n) exit
        printf "%-6s %-14s", name, row
        for (c = 3; c <= 8; c++) {
          for (i = 1; i <= n; i++) a[i] = v[c, i]
          for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
          m[c] = (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
          printf (c == 3) ? " %7d" : " %7.1f", m[c]
        }
        printf "   %4.1f%%\n", 100 * m[4] / (m[4] + m[5] + m[6] + m[7])
      }' /tmp/split.txt
  done
done
