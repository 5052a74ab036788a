#!/bin/bash
# Runs one of the kernel's ublk selftests (default stress_09) round after
# round with our server (or kublk) until it fails, hangs or N rounds pass.
# On a hang (no end within HANG_SECS), before anything is killed: the
# processes and their kernel stacks, every blocked task's stack (sysrq w,
# printed on the console: the log level is raised), the devices; the same
# again 20 s later. What to read when a test hangs once in many runs.
#
#   cargo xtask selftests --kernel sid stress_01   # builds ours and kublk once
#   cargo xtask vm --kernel sid -- env N=25 "$PWD/build-support/scripts/selftest-loop.sh"
#   (TEST=stress_09 N=25 HANG_SECS=150; SERVER=/path/to/kublk for the baseline)
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TEST=${TEST:-stress_09}; N=${N:-15}; HANG_SECS=${HANG_SECS:-150}
SERVER=${SERVER:-$ROOT/target/release/ublk}
SRC=$(ls -d "${XDG_CACHE_HOME:-$HOME/.cache}"/ublk-rs-rig/peers/kublk-*/src | tail -1)
[ -d "$SRC" ] || { echo "no kublk build in the rig's cache: run cargo xtask selftests once" >&2; exit 2; }
st=/tmp/selftest-loop; rm -rf $st; mkdir -p $st/work
cp -R "$SRC"/. $st/ && cp "$SERVER" $st/kublk || exit 2
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
cd $st; export TMPDIR=$st/work
dmesg -n 7
echo 15 > /proc/sys/kernel/hung_task_timeout_secs
diag() {
  ps -eo pid,ppid,stat,wchan:32,etimes,args | grep -v '\[' | grep -v 'ps -eo'
  for p in $(pgrep -f 'kublk|fio|ublk'); do
    echo "--- $p $(tr '\0' ' ' < /proc/$p/cmdline 2>/dev/null)"
    for t in /proc/$p/task/*; do
      echo "  task ${t##*/} $(cat $t/comm 2>/dev/null) $(awk '{print $3}' $t/stat 2>/dev/null)"
      sed 's/^/    /' $t/stack 2>/dev/null
    done
  done
  echo w > /proc/sysrq-trigger; sleep 1
  ls /dev/ublk*; ./kublk list 2>&1 | head -20
}
for i in $(seq 1 "$N"); do
  echo "=== round $i $(date +%T)"
  bash ./test_$TEST.sh > /tmp/selftest-loop.out 2>&1 </dev/null &
  tp=$!
  for _ in $(seq 1 "$HANG_SECS"); do kill -0 $tp 2>/dev/null || break; sleep 1; done
  if kill -0 $tp 2>/dev/null; then
    echo "HANG: no end after $HANG_SECS s"; grep -v chroot /tmp/selftest-loop.out | tail -20
    diag; sleep 20; echo "--- 20 s later"; diag
    exit 1
  fi
  wait $tp; rc=$?
  echo "exit $rc"; grep -v chroot /tmp/selftest-loop.out | tail -3
  [ $rc -eq 0 ] || exit 1
  timeout 60 ./kublk del -a >/dev/null 2>&1 || { echo "HANG: del -a"; diag; exit 1; }
done
echo "$N rounds of $TEST passed"
