# tollgate %preun: on erase stop cleanly (sessions end, programs and pins
# go). On upgrade nothing: the new package's %post has handed over already.
if [ -d /run/systemd/system ] && [ "$1" -eq 0 ]; then
    systemctl --no-reload disable --now tollgate.service >/dev/null 2>&1 || :
fi
