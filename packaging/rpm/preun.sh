# tollgate %preun: on upgrade hand over (SIGUSR2) so sessions stay governed
# by the pinned programs; on erase stop cleanly (sessions end, pins go).
if [ -d /run/systemd/system ]; then
    if [ "$1" -eq 0 ]; then
        systemctl --no-reload disable --now tollgate.service >/dev/null 2>&1 || :
    elif systemctl is-active --quiet tollgate.service; then
        systemctl kill --signal=SIGUSR2 --kill-whom=main tollgate.service >/dev/null 2>&1 || :
    fi
fi
