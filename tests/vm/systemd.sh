#!/bin/sh
# Runs once in a booted Debian 12 with systemd as init (tollgate-vm-test.service):
# the package as an SRE uses it. Prints "TOLLGATE-VM: PASS name" or
# "TOLLGATE-VM: FAIL name: why" per check on the serial console, then powers off.
exec > /dev/ttyS0 2>&1
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
pass() { echo "TOLLGATE-VM: PASS $1"; }
fail() { echo "TOLLGATE-VM: FAIL $1: $2"; }
check() { # name, command...: pass when the command succeeds
    name=$1; shift
    if out=$("$@" 2>&1); then pass "$name"; else fail "$name" "$(echo "$out" | tail -3 | tr '\n' ' ')"; fi
}
wait_for() { # seconds, command...
    n=$1; shift; i=0
    while [ $i -lt $((n * 10)) ]; do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; i=$((i + 1)); done
    return 1
}
count_progs() { bpftool prog show 2>/dev/null | grep -c '^[0-9]'; }
count_links() { bpftool link show 2>/dev/null | grep -c '^[0-9]'; }

echo "TOLLGATE-VM: BOOTED $(uname -r) systemd $(systemctl --version | head -1 | cut -d' ' -f2)"
ip link set lo up
progs_before=$(count_progs)
links_before=$(count_links)

# Install: the postinst starts the service on the packaged config, which trusts no issuer.
check install-deb apt install -y -q /root/tollgate.deb
check service-starts wait_for 60 systemctl is-active --quiet tollgate.service
systemctl is-active --quiet tollgate.service || journalctl -u tollgate.service -n 15 --no-pager | sed 's/^/TOLLGATE-VM: JOURNAL /'
check state-is-root-only sh -c '[ "$(stat -c %a /var/lib/tollgate)" = 700 ]'
check exposure-at-most-5 sh -c 'systemd-analyze security tollgate.service | tail -1 | awk "{ exit !(\$(NF-2) + 0 <= 5.0) }"'
check log-writer-yields sh -c 'journalctl -u tollgate.service -o cat --no-pager | grep -q "yields the CPU to sessions"'
check no-issuer-trusted sh -c 'tollgate status --format json | grep -q "\"dev_issuer\": false"'

# An SRE adds an issuer (the dev one, for this test) and a policy, then reloads.
sed -i 's/^dev_issuer: false/dev_issuer: true/' /etc/tollgate/config.yaml
cat > /etc/tollgate/policies/vm.yaml <<'POLICY'
identities:
  - name: vm-bots
    issuer: tollgate-dev
    allow_root: true
grants:
  - name: vm-egress
    identity: vm-bots
    network:
      allow: ["127.0.0.0/8"]
      deny: ["127.0.0.3/32"]
POLICY
loaded=$(tollgate status --format json | grep policies_loaded_at)
check reload systemctl reload tollgate.service
check reload-took wait_for 20 sh -c "[ \"\$(tollgate status --format json | grep policies_loaded_at)\" != '$loaded' ]"
tollgate token mint --config /etc/tollgate/config.yaml --sub vm > /root/token 2>/tmp/mint.err || fail token-mint "$(cat /tmp/mint.err)"
check governed-session sh -c 'tollgate run --token-file /root/token -- sh -c "echo governed-\$TOLLGATE_SESSION" | grep -q "^governed-s-"'
out=$(tollgate run --token-file /root/token -- bash -c 'exec 3<>/dev/tcp/127.0.0.3/80' 2>&1)
case "$out" in *"denied by grant vm-egress (network.deny 127.0.0.3/32)"*) pass denial-explained ;; *) fail denial-explained "$out" ;; esac

# A reload picks up a new policy file.
check explain-before sh -c 'tollgate policy explain --identity vm-bots --to 10.9.9.9:80 | grep -q "^deny"'
cat > /etc/tollgate/policies/extra.yaml <<'POLICY'
grants:
  - name: vm-extra
    identity: vm-bots
    network: { allow: ["10.9.9.9/32:80"] }
POLICY
loaded=$(tollgate status --format json | grep policies_loaded_at)
systemctl reload tollgate.service
wait_for 20 sh -c "[ \"\$(tollgate status --format json | grep policies_loaded_at)\" != '$loaded' ]"
check reload-picks-up-new-policy sh -c 'tollgate policy explain --identity vm-bots --to 10.9.9.9:80 | grep -q "^allow (vm-extra"'

# Logs reach the journal without colour and with their priority.
check journal-has-priorities sh -c 'journalctl -u tollgate.service -o json --no-pager | grep -q "\"PRIORITY\":\"4\""'
check journal-has-no-colour sh -c '! journalctl -u tollgate.service -o cat --no-pager | grep -q "$(printf "\033")"'

# An upgrade (the same package again) hands the running session over: it stays governed.
mkdir -p /run/vmtest
tollgate run --token-file /root/token -- bash -c 'while [ ! -e /run/vmtest/go ]; do sleep 0.2; done; if (exec 3<>/dev/tcp/127.0.0.3/80); then echo reached > /run/vmtest/result; else echo refused > /run/vmtest/result; fi' 2>/dev/null &
wait_for 20 sh -c 'tollgate sessions | grep -q running'
check upgrade apt install -y -q --reinstall /root/tollgate.deb
check service-back-after-upgrade wait_for 60 systemctl is-active --quiet tollgate.service
check session-adopted-after-upgrade wait_for 20 sh -c 'tollgate status --format json | grep -q "\"sessions_active\": 1"'
touch /run/vmtest/go
wait_for 20 test -s /run/vmtest/result
check session-governed-across-upgrade grep -q refused /run/vmtest/result

# Stop, then purge: no program, link, pin, cgroup or file is left.
check stop systemctl stop tollgate.service
check no-programs-left sh -c "[ \$(bpftool prog show | grep -c '^[0-9]') -eq $progs_before ]"
check no-links-left sh -c "[ \$(bpftool link show | grep -c '^[0-9]') -eq $links_before ]"
check no-pins-left sh -c '! ls /sys/fs/bpf | grep -q tollgate'
check no-cgroups-left test ! -e /sys/fs/cgroup/tollgate
# Remove (not purge) with the service running: the prerm stops it, nothing is left
# running or pinned, the configuration and state stay for a reinstall.
check start-again systemctl start tollgate.service
check remove apt-get remove -y -q tollgate
check remove-stops-service sh -c '! systemctl is-active --quiet tollgate.service'
check remove-leaves-no-programs sh -c "[ \$(bpftool prog show | grep -c '^[0-9]') -eq $progs_before ]"
check remove-leaves-no-links sh -c "[ \$(bpftool link show | grep -c '^[0-9]') -eq $links_before ]"
check remove-leaves-no-pins sh -c '! ls /sys/fs/bpf | grep -q tollgate'
check remove-keeps-config-and-state sh -c 'test -e /etc/tollgate/config.yaml && test -d /var/lib/tollgate && test ! -e /usr/bin/tollgate'
check purge apt-get purge -y -q tollgate
check purge-removes-state test ! -e /var/lib/tollgate
check purge-removes-config test ! -e /etc/tollgate
check purge-removes-binary-and-unit sh -c 'test ! -e /usr/bin/tollgate && test ! -e /lib/systemd/system/tollgate.service'

echo "TOLLGATE-VM: DONE"
systemctl poweroff --no-block
