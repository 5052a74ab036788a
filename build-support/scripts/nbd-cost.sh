#!/bin/bash
# Where the CPU of an nbd read goes: ours (default copy, --auto_zc) against
# the kernel's client nbd.ko, on one `nbdkit memory` server over a Unix
# socket; fio io_uring direct, 4k random reads at depth 32 and 1 MiB reads
# at depth 8, 5 s each, rounds interleaved. Per I/O: the whole guest's busy
# CPU (/proc/stat), nbdkit's and our daemon's (/proc/PID/stat, 10 ms ticks;
# the daemon's user time also apart: all that our own code could save), all
# over one window mid-run; fio's (its own usr+sys over its run); and the
# guest's context switches in the window (perf stat).
#
# The guest runs fio, nbdkit and nbd-client from the host's root: on a
# fresh host, `cargo xtask bench` (once) installs them.
#   cargo build --release -p ublk-tools --bin ublk
#   cargo xtask vm --kernel sid -- env ROUNDS="1 2 3" "$PWD/build-support/scripts/nbd-cost.sh"
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OURS=/tmp/ours-ublk; cp "$ROOT/target/release/ublk" $OURS
SOCK=/tmp/nbd-cost.sock; rm -f $SOCK
cd /tmp
modprobe ublk_drv; modprobe nbd nbds_max=1
# "all user" ticks of a process (utime+stime, utime), from one read.
ticks() { [ -n "$1" ] && awk '{print $14+$15, $14}' /proc/$1/stat || echo 0 0; }
busy() { awk '/^cpu /{print $2+$3+$4+$7+$8}' /proc/stat; }
run() { # name dev daemon-pid bs rw qd
  local name=$1 dev=$2 pid=$3 bs=$4 rw=$5 qd=$6
  fio --name=b --filename=$dev --direct=1 --ioengine=io_uring --rw=$rw --bs=$bs --iodepth=$qd --time_based --runtime=5 --output-format=json > /tmp/nbd-cost.fio 2>/tmp/nbd-cost.err &
  sleep 1
  local t0=$(date +%s.%N) b0=$(busy) k0=($(ticks $NBDKIT)) d0=($(ticks $pid))
  perf stat -a -x, -e context-switches -o /tmp/nbd-cost.perf -- sleep 2.5 2>/dev/null
  local t1=$(date +%s.%N) b1=$(busy) k1=($(ticks $NBDKIT)) d1=($(ticks $pid))
  wait
  # fio's IOPS and its own CPU per I/O (usr + sys over its run).
  local r=$(python3 -c 'import json,sys; j=json.load(open(sys.argv[1]))["jobs"][0]; r=j["read"]["iops"]; print(int(r), (j["usr_cpu"]+j["sys_cpu"])*1e4/r)' /tmp/nbd-cost.fio)
  local iops=${r% *} fio_us=${r#* }
  local cs=$(awk -F, '/context-switches/{print $1}' /tmp/nbd-cost.perf)
  # Ticks of 10 ms over the window's I/Os (at fio's mean rate): µs per I/O.
  awk -v n="$name" -v bs=$bs -v qd=$qd -v i=$iops -v t=$(echo "$t1 - $t0" | bc -l) -v b=$((b1-b0)) -v k=$((k1[0]-k0[0])) -v d=$((d1[0]-d0[0])) -v du=$((d1[1]-d0[1])) -v f=$fio_us -v cs=$cs 'BEGIN {
    io = i * t; u = 10000 / io
    printf "%-5s qd%-2s %-16s iops=%6d  guest_us/io=%6.0f nbdkit=%6.0f daemon=%6.0f (user %4.1f) fio=%5.0f rest=%5.0f  ctxsw/io=%5.1f\n",
      bs, qd, n, i, b*u, k*u, d*u, du*u, f, b*u-k*u-d*u-f, cs/io }'
}
nbdkit -U $SOCK -t 16 memory 1G; sleep 1; NBDKIT=$(pgrep -n -x nbdkit)
for r in ${ROUNDS:-1 2}; do
  for job in "4k randread 32" "1M read 8"; do
    set -- $job
    for mode in default auto_zc; do
      flag=; [ $mode = auto_zc ] && flag=--auto_zc
      $OURS add -t nbd -q 1 -d 128 $flag --quiet "nbd+unix:///?socket=$SOCK" >/dev/null
      echo none > /sys/block/ublkb0/queue/scheduler
      run "ours-$mode" /dev/ublkb0 "$(pgrep -n -x ours-ublk)" "$@"
      $OURS del -n 0
    done
    nbd-client -unix $SOCK /dev/nbd0 -b 512 -C 1 >/dev/null 2>&1
    echo none > /sys/block/nbd0/queue/scheduler
    run nbd.ko /dev/nbd0 "" "$@"
    nbd-client -d /dev/nbd0 >/dev/null 2>&1
  done
done
kill $NBDKIT
