#!/bin/bash
# A/B of the daemon's session: 2-queue null disk (depth 128, scheduler none),
# fio randread 4k, 2 jobs x qd32, 6 s; ours as a daemon (own session, setsid),
# ours --foreground in the caller's session (what the daemon was before),
# kublk (setsid itself); then the same with autogroup off.
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
# Build first: cargo build --release -p ublk-tools --bin ublk; cargo xtask peers
OURS=/tmp/ours-ublk; cp "$ROOT/target/release/ublk" $OURS
KUBLK=/tmp/kublk; cp "$(ls -d "$HOME"/.cache/ublk-rs-rig/peers/kublk-*/bin/kublk | tail -1)" $KUBLK
cd /tmp
run() { # name mode bin
  local name=$1 mode=$2 bin=$3
  if [ "$mode" = fg ]; then $bin add -t null -q 2 -d 128 --foreground </dev/null >/dev/null 2>&1 &
  else $bin add -t null -q 2 -d 128 </dev/null >/dev/null 2>&1; fi
  sleep 1.5
  echo none > /sys/block/ublkb0/queue/scheduler
  local pid=$(pgrep -n -x "$(basename $bin)")
  fio --name=b --filename=/dev/ublkb0 --direct=1 --ioengine=io_uring --rw=randread --bs=4k --iodepth=32 --numjobs=2 --time_based --runtime=6 --group_reporting --output-format=terse --terse-version=3 > /tmp/$name.fio 2>&1 &
  local fpid=$!
  sleep 1
  local s0=$(grep -h ^voluntary_ctxt /proc/$pid/task/*/status | awk '{s+=$2} END{print s}')
  local t0=$(awk '{print $14+$15}' /proc/$pid/stat)
  sleep 4
  local t1=$(awk '{print $14+$15}' /proc/$pid/stat)
  local s1=$(grep -h ^voluntary_ctxt /proc/$pid/task/*/status | awk '{s+=$2} END{print s}')
  local sid=$(ps -o sid= -p $pid | tr -d ' ') mysid=$(ps -o sid= -p $$ | tr -d ' ')
  wait $fpid
  local iops=$(awk -F';' '/^3;/{print $8}' /tmp/$name.fio)
  printf "%-22s autogroup=%s iops=%6d cpu_us_per_io=%5.1f req_per_wakeup=%4.1f own_session=%s\n" $name $(cat /proc/sys/kernel/sched_autogroup_enabled) $iops $(echo "($t1-$t0)*10000/($iops*4)" | bc -l) $(echo "$iops*4/($s1-$s0)" | bc -l) $([ "$sid" != "$mysid" ] && echo yes || echo no)
  $bin del -n 0 >/dev/null 2>&1
  sleep 1.5
}
for r in ${ROUNDS:-1 2 3}; do
  echo 1 > /proc/sys/kernel/sched_autogroup_enabled
  run ours-daemon d $OURS
  run ours-foreground fg $OURS
  run kublk d $KUBLK
  echo 0 > /proc/sys/kernel/sched_autogroup_enabled
  run ours-daemon d $OURS
  run kublk d $KUBLK
done
echo 1 > /proc/sys/kernel/sched_autogroup_enabled
