# tollgate %post: state root-only; on install the distribution's preset
# decides whether the service is enabled (as %systemd_post does); on upgrade
# start the new daemon, which adopts the sessions the old one handed over.
install -d -m 0700 /var/lib/tollgate
install -d -m 0755 /etc/tollgate /etc/tollgate/policies
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -eq 1 ]; then
        systemctl --no-reload preset tollgate.service >/dev/null 2>&1 || :
    else
        systemctl start tollgate.service >/dev/null 2>&1 || :
    fi
fi
