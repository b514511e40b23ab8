#!/bin/sh
# The kernel-matrix suite: the real daemon and programs on a distribution
# kernel. Prints "TOLLGATE-VM: PASS name" or "TOLLGATE-VM: FAIL name: why"
# per check. The expected exec enforcement mode comes from the kernel
# command line (tollgate.expect=lsm|kill-on-exec).

T=/bin/tollgate
S=/run/tollgate.sock
expect=$(sed -n 's/.*tollgate\.expect=\([a-z-]*\).*/\1/p' /proc/cmdline)

pass() { echo "TOLLGATE-VM: PASS $1"; }
fail() { echo "TOLLGATE-VM: FAIL $1: $2"; }
check() { # name, command...: pass when the command succeeds
    name=$1; shift
    if "$@"; then pass "$name"; else fail "$name" "$(cat /tmp/why 2>/dev/null)"; fi
}

mkdir -p /etc/tollgate/policies /www
# A copy of busybox under an applet's name: another file than /bin/busybox,
# and one that still knows what to do when run.
mkdir -p /tmp/denied
cp /bin/busybox /tmp/denied/echo
chmod 755 /tmp/denied/echo
echo 'allowed-content' > /www/allowed.txt
echo '{"users":[{"name":"a","email":"a@example.com"}]}' > /www/users.json
# Declared as JSON: a masked route refuses what it cannot read with certainty.
echo '.json:application/json' > /etc/httpd.conf
busybox httpd -p 127.0.0.1:8081 -h /www -c /etc/httpd.conf
busybox httpd -p 127.0.0.1:8082 -h /www -c /etc/httpd.conf

cat > /etc/tollgate/config.yaml <<YAML
state_dir: /tmp/state
socket: $S
policies: [/etc/tollgate/policies]
dev_issuer: true
YAML
# An allow list: busybox and one script, whose interpreter is not listed.
mkdir -p /tmp/unlisted
cp /bin/busybox /tmp/unlisted/sh
printf '#!/tmp/unlisted/sh\necho LISTED-SCRIPT-RAN\n' > /tmp/listed.sh
chmod 755 /tmp/listed.sh
cat > /etc/tollgate/policies/listed.yaml <<YAML
identities:
  - name: vm-listed
    issuer: tollgate-dev
    allow_root: true
    claims: { team: listed }
grants:
  - name: vm-listed-exec
    identity: vm-listed
    exec:
      allow: [/bin/busybox, /tmp/listed.sh]
YAML
cat > /etc/tollgate/policies/vm.yaml <<YAML
identities:
  - name: vm-bots
    issuer: tollgate-dev
    allow_root: true
grants:
  - name: vm-egress
    identity: vm-bots
    exec:
      deny: [/tmp/denied/echo]
    network:
      allow: ["127.0.0.0/8"]
      deny: ["127.0.0.2/32"]
      proxy:
        - to: "127.0.0.1/32:8082"
          protocol: http
          block:
            - { path: "^/admin/" }
          mask:
            - { json_path: "\$.users[*].email" }
YAML

$T daemon --config /etc/tollgate/config.yaml > /tmp/daemon.log 2>&1 &
daemon_pid=$!
i=0
until $T --socket $S status > /dev/null 2>&1; do
    i=$((i + 1))
    if [ $i -gt 600 ]; then
        fail daemon-starts "not ready after 60 s: $(tail -5 /tmp/daemon.log)"
        return 0 2>/dev/null || exit 0
    fi
    sleep 0.1
done
pass daemon-starts

status=$($T --socket $S status --format json)
mode=$(echo "$status" | sed -n 's/.*"exec_enforcement": "\([a-z-]*\)".*/\1/p')
echo "TOLLGATE-VM: MODE $mode"
[ "$mode" = kill-on-exec ] && echo "TOLLGATE-VM: WHY $(echo "$status" | sed -n 's/.*"lsm_unavailable": "\(.*\)".*/\1/p')"
if [ "$mode" = "$expect" ]; then pass "exec-enforcement-is-$expect"; else fail "exec-enforcement-is-$expect" "status says $mode: $(echo "$status" | grep lsm_unavailable | tail -c 1500)"; fi

$T token mint --config /etc/tollgate/config.yaml --sub vm-bot > /tmp/token
run() { $T --socket $S run --token-file /tmp/token -- "$@"; }

# Denied exec: never runs. LSM refuses it with EPERM (126 from the shell's
# view of tollgate run); kill-on-exec kills it before it runs (137).
out=$(run /tmp/denied/echo DENIED-MARKER 2>/tmp/err); code=$?
want=126; [ "$expect" = kill-on-exec ] && want=137
if [ "$code" = "$want" ] && ! echo "$out" | grep -q DENIED-MARKER; then pass denied-exec-never-runs
else fail denied-exec-never-runs "exit $code (want $want), output: $out $(cat /tmp/err)"; fi

# From a shell in the session: LSM makes the exec itself fail with EPERM in
# the caller (status 126); kill-on-exec kills the child (137).
out=$(run sh -c '/tmp/denied/echo NESTED-MARKER; echo "status=$?"' 2>&1)
if echo "$out" | grep -q "status=$want" && ! echo "$out" | grep -q NESTED-MARKER; then pass denied-exec-status-in-caller
else fail denied-exec-status-in-caller "want status=$want: $out"; fi

out=$(run /bin/busybox echo ALLOWED-MARKER)
if echo "$out" | grep -q ALLOWED-MARKER; then pass allowed-exec-runs; else fail allowed-exec-runs "output: $out"; fi

out=$(/tmp/denied/echo OUTSIDE-MARKER)
if echo "$out" | grep -q OUTSIDE-MARKER; then pass outside-sessions-untouched; else fail outside-sessions-untouched "output: $out"; fi

out=$(run busybox wget -q -O - http://127.0.0.1:8081/allowed.txt 2>&1)
if echo "$out" | grep -q allowed-content; then pass connect-allowed; else fail connect-allowed "$out"; fi

out=$(run busybox wget -q -O - http://127.0.0.2:8081/allowed.txt 2>&1); code=$?
if [ $code != 0 ] && echo "$out" | grep -qi "not permitted"; then pass connect-denied-eperm; else fail connect-denied-eperm "exit $code: $out"; fi

out=$(run busybox wget -q -O - http://127.0.0.1:8082/users.json 2>&1)
if echo "$out" | grep -q '"email":"\*\*\*\*"' && ! echo "$out" | grep -q a@example.com; then pass redirect-through-proxy-masks
else fail redirect-through-proxy-masks "$out"; fi

out=$(run busybox wget -q -O - http://127.0.0.1:8082/admin/x 2>&1); code=$?
if [ $code != 0 ] && echo "$out" | grep -q 403; then pass redirect-proxy-blocks; else fail redirect-proxy-blocks "exit $code: $out"; fi

sleep 1
sessions=$($T --socket $S sessions --format json)
denied_logged=0
for id in $(echo "$sessions" | sed -n 's/.*"id": "\(s-[0-9a-f]*\)".*/\1/p'); do
    if $T --socket $S show "$id" --format json | tr -d ' \n' | grep -q '"filename":"/tmp/denied/echo"'; then
        $T --socket $S show "$id" --format json | tr -d ' \n' | grep -q '"verdict":"\(deny\|killed\)"' && denied_logged=1
    fi
done
if [ $denied_logged = 1 ]; then pass denied-exec-recorded; else fail denied-exec-recorded "no exec event for /tmp/denied/echo"; fi

# Allow lists: a copy of a listed binary never runs; a listed script runs
# under LSM (judged by its own file) and is killed without it (judged by
# its interpreter, which is not listed).
$T token mint --config /etc/tollgate/config.yaml --sub vm-listed --claim team=listed > /tmp/listed-token
run_listed() { $T --socket $S run --token-file /tmp/listed-token -- "$@"; }
out=$(run_listed /bin/busybox echo LISTED-OK 2>&1)
if echo "$out" | grep -q LISTED-OK; then pass allow-list-runs-listed; else fail allow-list-runs-listed "$out"; fi
out=$(run_listed /tmp/denied/echo COPY-RAN 2>&1); code=$?
if [ "$code" = "$want" ] && ! echo "$out" | grep -q COPY-RAN; then pass allow-list-refuses-copy
else fail allow-list-refuses-copy "exit $code (want $want): $out"; fi
out=$(run_listed /tmp/listed.sh 2>&1); code=$?
if [ "$expect" = lsm ]; then
    if echo "$out" | grep -q LISTED-SCRIPT-RAN; then pass allow-list-script-judged-by-mode
    else fail allow-list-script-judged-by-mode "lsm should run a listed script: exit $code $out"; fi
else
    if [ "$code" = 137 ] && ! echo "$out" | grep -q LISTED-SCRIPT-RAN; then pass allow-list-script-judged-by-mode
    else fail allow-list-script-judged-by-mode "kill-on-exec judges the unlisted interpreter: exit $code $out"; fi
fi

# Enforcement outlives the daemon: with its programs pinned, a session
# started before a kill -9 still cannot run the denied file or reach the
# denied address while no daemon runs.
# The kill waits until the command itself runs (it writes /tmp/in-session):
# a session counted as active may not yet have been answered to its client,
# and on an emulated CPU that gap is wide.
rm -f /tmp/go /tmp/in-session
run sh -c ': > /tmp/in-session; while [ ! -e /tmp/go ]; do sleep 0.1; done; /tmp/denied/echo PINNED-MARKER; echo "exec=$?"; busybox wget -q -O - http://127.0.0.2:8081/allowed.txt; echo "connect=$?"' > /tmp/pin-out 2>&1 &
runner=$!
i=0
until [ -e /tmp/in-session ]; do
    i=$((i + 1)); [ $i -gt 600 ] && break; sleep 0.1
done
kill -9 $daemon_pid
touch /tmp/go
wait $runner
out=$(cat /tmp/pin-out)
if echo "$out" | grep -q "exec=$want" && echo "$out" | grep -q "connect=1" && ! echo "$out" | grep -q "PINNED-MARKER\|allowed-content"; then
    pass enforcement-survives-daemon-kill
else fail enforcement-survives-daemon-kill "want exec=$want and connect=1: $out"; fi

if grep -qi "error" /tmp/daemon.log; then echo "TOLLGATE-VM: LOG $(grep -i error /tmp/daemon.log | head -3 | tr '\n' ' ')"; fi
