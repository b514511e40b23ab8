# tollgate %post: state root-only. On install the distribution's preset
# decides whether the service is enabled (as %systemd_post does). On
# upgrade rpm runs this script before the old package's %preun, while the
# old daemon still runs: hand its sessions over here (SIGUSR2: they stay
# governed by the pinned programs), then start the new daemon, which
# adopts them. The old package's %preun does nothing on upgrade.
install -d -m 0700 /var/lib/tollgate
install -d -m 0755 /etc/tollgate /etc/tollgate/policies
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -eq 1 ]; then
        systemctl --no-reload preset tollgate.service >/dev/null 2>&1 || :
    elif systemctl is-active --quiet tollgate.service; then
        systemctl kill --signal=SIGUSR2 --kill-whom=main tollgate.service >/dev/null 2>&1 || :
        i=0
        while systemctl is-active --quiet tollgate.service && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
        systemctl start tollgate.service >/dev/null 2>&1 || :
    fi
fi
