#!/bin/busybox sh
# liverestore test guest: load virtio, mount the data partition, verify the payload (a realistic
# boot read pattern), print BOOT-OK, then keep writing a heartbeat and obey console commands.
# The heartbeat beats in a loop of its own and commands are read with a plain blocking read: a
# `read -t` runs to a deadline and reads byte by byte, so a line that lands just before the
# deadline is cut, its first bytes dropped, and the command is lost (a demo's "verify" was).
/bin/busybox mkdir -p /proc /sys /dev /mnt /tmp
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
for m in virtio_ring virtio_pci_modern_dev virtio_pci_legacy_dev virtio virtio_pci virtio_blk \
         failover net_failover virtio_net button evdev; do
    insmod /lib/modules/$m.ko 2>/dev/null
done
n=0
while [ ! -b /dev/vda2 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
# what the VM is: the restore of a stored definition must bring back its CPUs, memory and NICs
echo "GUEST-INFO cpus=$(nproc) mem_kb=$(awk '/MemTotal/ {print $2}' /proc/meminfo) macs=$(cat /sys/class/net/eth*/address 2>/dev/null | tr '\n' ',')"
# the heartbeat stops before the file system goes read-only, so the remount finds no writer
stop_heartbeat() {
    if [ -f /tmp/heartbeat.pid ]; then
        hb=$(cat /tmp/heartbeat.pid)
        kill "$hb" 2>/dev/null
        # gone, or a zombie: the init shell reaps it only when it next waits, not while it reads
        while [ -e "/proc/$hb" ] && ! grep -q "zombie" "/proc/$hb/status" 2>/dev/null; do sleep 0.1; done
    fi
}
# the ACPI power button (virsh shutdown, QMP system_powerdown): unmount cleanly, then power off
for ev in /sys/class/input/event*; do
    if grep -q "Power Button" "$ev/device/name" 2>/dev/null; then
        (head -c 24 "/dev/input/${ev##*/}" >/dev/null; echo "ACPI-POWERDOWN"; stop_heartbeat; sync
         # a real guest's shutdown reads its disk too (unit files, binaries): read a file, past the caches
         echo 3 > /proc/sys/vm/drop_caches
         cat /mnt/MD5SUMS >/dev/null 2>&1 && echo "SHUTDOWN-READ-OK" || echo "SHUTDOWN-READ-FAIL"
         mount -o remount,ro /mnt; sync; poweroff -f) &
    fi
done
echo "GUEST-MOUNTING"
if ! mount -t ext4 -o noatime /dev/vda2 /mnt; then
    echo "BOOT-FAIL mount"
    poweroff -f
fi
verify() {
    cd /mnt/payload && md5sum -c -s /mnt/MD5SUMS && echo "$1-OK" || echo "$1-FAIL"
    cd /
}
verify BOOT
# what a restore point holds of the guest's life: the files it was told to write, its last beat
echo "MARKS $(ls /mnt/marks 2>/dev/null | tr '\n' ' ')"
echo "LASTBEAT $(tail -n 1 /mnt/heartbeat.log 2>/dev/null)"
beat=0
(
    while true; do
        sleep 2
        beat=$((beat + 1))
        echo "beat $beat $(date +%s)" >> /mnt/heartbeat.log
        sync
        echo "HEARTBEAT $beat"
    done
) &
echo $! > /tmp/heartbeat.pid
while true; do
    cmd=""
    read cmd || sleep 1  # no busy loop should the console ever report end of file
    case "$cmd" in
        verify)
            sync; echo 3 > /proc/sys/vm/drop_caches
            verify VERIFY ;;
        write)
            dd if=/dev/urandom of=/mnt/scratch.bin bs=1M count=4 2>/dev/null; sync
            echo "WRITE-OK" ;;
        mark\ *)
            name=${cmd#mark }
            mkdir -p /mnt/marks
            dd if=/dev/urandom of="/mnt/marks/$name" bs=1M count=8 2>/dev/null; sync
            echo "MARK-OK $name" ;;
        scribble\ *)
            # N MiB of fresh random data spread evenly over the raw disk vdb (backup benchmarks)
            n=${cmd#scribble }
            mb=$(( $(cat /sys/block/vdb/size) / 2048 ))
            i=0
            while [ "$i" -lt "$n" ]; do
                dd if=/dev/urandom of=/dev/vdb bs=1M count=1 seek=$(( i * mb / n )) conv=notrunc 2>/dev/null
                i=$((i + 1))
            done
            sync
            echo "SCRIBBLE-OK $n" ;;
        halt)
            stop_heartbeat; sync; mount -o remount,ro /mnt; sync
            echo "HALTED"
            poweroff -f ;;
    esac
done
