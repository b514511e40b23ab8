# tollgate %postun: on erase remove the state and anything left pinned.
if [ "$1" -eq 0 ]; then
    rm -rf /var/lib/tollgate /run/tollgate /sys/fs/bpf/tollgate 2>/dev/null || :
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
