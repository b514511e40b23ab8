//! Event delivery: events the kernel does not deliver are counted for
//! their session and shown in that session's record; none disappear
//! silently. A session that floods cannot push out another session's
//! events, even with the smallest ring buffer the config accepts.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use harness::session_log::{argv, events_of_kind, pretty};
use harness::{Daemon, RunOutput};
use serde_json::Value;

const POLICY: &str = r#"identities:
  - name: flood-bots
    issuer: tollgate-dev
    allow_root: true
grants:
  - name: flood-bots-egress
    identity: flood-bots
    network:
      allow: ["0.0.0.0/0"]
      deny: ["127.0.0.2/32"]
"#;

/// The smallest ring buffer the config accepts.
const SMALLEST_BUFFER: &str = "event_buffer_kib: 16";

/// One flood at a time. Each flood keeps a core busy; two at once (the
/// suite runs two tests side by side) on a 2-core host left each daemon
/// under test a fraction of a core, behind another daemon and its flood,
/// which is not the host these tests describe: one session flooding.
static FLOODING: Mutex<()> = Mutex::new(());

fn one_flood_at_a_time() -> MutexGuard<'static, ()> {
    FLOODING.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Denied connects a flooding session makes in a tight loop: each one is a kernel event.
const ATTEMPTS: u64 = 20_000;

/// A python flood of `ATTEMPTS` denied connects; it fails if one succeeds.
fn flood_script() -> String {
    format!("import socket\n{}", flood_loop(""))
}

/// Python lines, each indented by `indent`: `ATTEMPTS` denied connects,
/// failing if one succeeds.
fn flood_loop(indent: &str) -> String {
    let lines = [
        format!("for _ in range({ATTEMPTS}):"),
        "    s = socket.socket()".to_owned(),
        "    try:".to_owned(),
        "        s.connect(('127.0.0.2', 9))".to_owned(),
        "    except PermissionError:".to_owned(),
        "        pass".to_owned(),
        "    else:".to_owned(),
        "        raise SystemExit('connect to a denied address succeeded')".to_owned(),
        "    s.close()".to_owned(),
    ];
    lines.iter().map(|line| format!("{indent}{line}\n")).collect()
}

/// How many events of `kind` the session's record says were not delivered, and why.
fn lost_in_record(show: &Value, kind: &str) -> (u64, Vec<String>) {
    let lost: Vec<&Value> = events_of_kind(show, "lost").into_iter().filter(|e| e["lost_kind"] == kind).collect();
    let count = lost.iter().filter_map(|e| e["count"].as_u64()).sum();
    let reasons = lost.iter().filter_map(|e| e["reason"].as_str().map(str::to_owned)).collect();
    (count, reasons)
}

/// How long a flooding session's record may take to reach its end.
const FLOOD_END_WAIT: Duration = Duration::from_secs(60);

/// Once the session's end is recorded, its recorded connects and its
/// recorded losses add up to the `attempts`: nothing went missing silently,
/// and what the kernel could not deliver is in its record before its end.
/// Returns (recorded, lost).
fn assert_accounted(daemon: &Daemon, id: &str, attempts: u64) -> (u64, u64) {
    // A flood's tens of thousands of records take a debug build's writer,
    // on a busy host, longer than the harness's usual wait.
    let show = daemon.show_within(id, "the session's end", FLOOD_END_WAIT, |s| s["session"]["ended_at"].is_string());
    let recorded = events_of_kind(&show, "connect").len() as u64;
    let (lost, _) = lost_in_record(&show, "connect");
    assert_eq!(
        recorded + lost,
        attempts,
        "{recorded} recorded + {lost} lost != {attempts} attempts by the session's end: events went missing, or their loss was recorded after the end\n{}",
        daemon.log()
    );
    (recorded, lost)
}

#[test]
fn undelivered_events_are_counted_in_their_sessions_record_and_every_one_is_accounted_for() {
    let _flood = one_flood_at_a_time();
    let daemon = Daemon::builder().policy(POLICY).config_line(SMALLEST_BUFFER).start();
    let token = daemon.mint("flood-bot", &[]);
    let out = daemon.run(&token, &["python3", "-c", &flood_script()]);
    assert_eq!(out.code(), Some(0), "the flood did not run as expected: {out}");
    let id = daemon.last_session_id();
    let (recorded, lost) = assert_accounted(&daemon, &id, ATTEMPTS);
    assert!(lost > 0, "a 16 KiB ring buffer kept up with {ATTEMPTS} connects; the test proves nothing");
    // Past the next tick of the loss watcher, which reports every session's
    // counts: what the end reported is not reported again.
    thread::sleep(Duration::from_millis(1500));
    let show = daemon.show(&id);
    let (lost_later, reasons) = lost_in_record(&show, "connect");
    assert_eq!(lost_later, lost, "losses reported at the end were reported again after it: {}", pretty(&show));
    assert!(reasons.iter().all(|r| r == "throttled" || r == "ring-buffer-full"), "{reasons:?}");
    let status = daemon.status();
    let total = status["events_lost_by_kind"]["connect"].as_u64().unwrap_or_else(|| panic!("{status}"));
    assert_eq!(total, lost, "status counts what the record says was lost: {status}");
    assert!(daemon.log().contains("were not delivered"), "the loss was not logged:\n{}", daemon.log());
    // The daemon's log shows a few refusals a second and counts the rest
    // (once each second has ended): a session refused in a loop does not
    // flood it, and every refusal delivered is a line or counted.
    let in_log = |log: &str| {
        let lines = log.lines().filter(|l| l.contains("connect denied") && l.contains(id.as_str())).count() as u64;
        let counted: u64 = log
            .lines()
            .filter(|l| l.contains("refusals not logged one by one") && l.contains(id.as_str()))
            .filter_map(|l| l.split("count=").nth(1)?.split_whitespace().next()?.parse::<u64>().ok())
            .sum();
        (lines, counted)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let (lines, counted) = loop {
        let (lines, counted) = in_log(&daemon.log());
        if lines + counted >= recorded || Instant::now() > deadline {
            break (lines, counted);
        }
        thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(lines + counted, recorded, "{lines} lines and {counted} counted for {recorded} denied connects");
    assert!((1..=100).contains(&lines), "{lines} lines of denied connects for {recorded}: the log is flooded");
}

/// While one session floods, a quiet session's events all arrive: every
/// one of its execs is recorded and nothing of it is counted as lost. The
/// control socket answers throughout.
#[test]
fn a_flooding_session_cannot_push_out_another_sessions_events() {
    let daemon = Daemon::builder().policy(POLICY).config_line(SMALLEST_BUFFER).start();
    let mut status_times = Vec::new();
    let (flood, quiet) = quiet_beside_a_flood(&daemon, || {
        let asked = Instant::now();
        let status = daemon.tollgate(&["status"]);
        assert!(status.success(), "status failed during the flood: {status}");
        status_times.push(asked.elapsed());
    });
    // For the record of this run, not an assertion: speed is for benchmarks.
    eprintln!("{}; status during the flood answered in {status_times:?}", flood.stdout.trim());
    let lost = assert_quiet_whole_and_flood_accounted(&daemon, &flood, &quiet);
    assert!(lost > 0, "the flood lost nothing; the test proves nothing");
}

/// While the session log's writer is behind, kernel events wait in the
/// ring buffer, where each session has its share, and are not dropped at
/// the writer's queue: with a queue of 64 records, a flooding session costs
/// a quiet one none of its events, and nothing of either is lost for want
/// of room in the queue.
#[test]
fn a_flooding_session_cannot_crowd_another_sessions_events_out_of_the_log_queue() {
    let daemon = Daemon::builder().policy(POLICY).config_line("log_queue_records: 64").start();
    let (flood, quiet) = quiet_beside_a_flood(&daemon, || {});
    assert_quiet_whole_and_flood_accounted(&daemon, &flood, &quiet);
    for id in [quiet.first_line().to_owned(), flood_session(&daemon, quiet.first_line())] {
        let show = daemon.show(&id);
        let (queue_lost, _) = lost_in_record_for(&show, "log-queue-full");
        assert_eq!(queue_lost, 0, "events of {id} were dropped at the log's queue: {}", pretty(&show));
    }
}

/// Runs a quiet session (`ROUNDS` execs, 20 ms apart) wholly inside a
/// session flooding denied connects, calling `during` every 100 ms while the
/// quiet one runs; returns the flood's and the quiet session's `run`.
fn quiet_beside_a_flood(daemon: &Daemon, mut during: impl FnMut()) -> (RunOutput, RunOutput) {
    let _flood = one_flood_at_a_time();
    let token = daemon.mint("flood-bot", &[]);
    let quiet_token = daemon.mint("quiet-bot", &[]);
    let stop = daemon.dir().join("stop-flooding");
    // Floods until told to stop, then says how many connects it tried.
    let flood_until_stopped = format!(
        "import os, socket\nn = 0\nwhile not os.path.exists({stop:?}):\n    s = socket.socket()\n    try:\n        s.connect(('127.0.0.2', 9))\n    except PermissionError:\n        pass\n    else:\n        raise SystemExit('connect to a denied address succeeded')\n    s.close()\n    n += 1\nprint(n)\n"
    );
    thread::scope(|scope| {
        let flood = scope.spawn(|| daemon.run(&token, &["python3", "-c", &flood_until_stopped]));
        // The quiet session runs wholly inside the flood.
        thread::sleep(Duration::from_millis(500));
        let quiet = scope.spawn(|| {
            let script = format!(
                "echo \"$TOLLGATE_SESSION\"; for n in $(seq 1 {ROUNDS}); do /bin/echo quiet-round-$n > /dev/null; sleep 0.02; done"
            );
            daemon.run(&quiet_token, &["/bin/sh", "-c", script.as_str()])
        });
        while !quiet.is_finished() {
            during();
            thread::sleep(Duration::from_millis(100));
        }
        std::fs::write(&stop, "").expect("stop file");
        let flood: RunOutput = flood.join().expect("flood thread");
        let quiet: RunOutput = quiet.join().expect("quiet thread");
        (flood, quiet)
    })
}

/// Execs of the quiet session in [`quiet_beside_a_flood`].
const ROUNDS: usize = 40;

/// The quiet session has every exec and lost nothing; every connect the
/// flood tried is recorded or counted lost in its own record. Returns how
/// many the flood lost.
fn assert_quiet_whole_and_flood_accounted(daemon: &Daemon, flood: &RunOutput, quiet: &RunOutput) -> u64 {
    assert_eq!(flood.code(), Some(0), "{flood}");
    assert_eq!(quiet.code(), Some(0), "{quiet}");
    let attempts: u64 = flood.stdout.trim().parse().unwrap_or_else(|_| panic!("the flood said no count: {flood}"));
    let quiet_id = quiet.first_line().to_owned();
    let show = daemon.show_until(&quiet_id, "the quiet session's end", |s| s["session"]["ended_at"].is_string());
    let rounds: Vec<String> = events_of_kind(&show, "exec")
        .into_iter()
        .filter_map(|e| argv(e).get(1).map(|arg| (*arg).to_owned()))
        .filter(|arg| arg.starts_with("quiet-round-"))
        .collect();
    assert_eq!(rounds.len(), ROUNDS, "the quiet session lost execs to the flood: {}", pretty(&show));
    assert!(events_of_kind(&show, "lost").is_empty(), "the quiet session lost events: {}", pretty(&show));
    let flood_id = flood_session(daemon, &quiet_id);
    let (_, lost) = assert_accounted(daemon, &flood_id, attempts);
    lost
}

/// How many events of any kind the session's record counts as lost for `reason`.
fn lost_in_record_for(show: &Value, reason: &str) -> (u64, usize) {
    let lost: Vec<&Value> = events_of_kind(show, "lost").into_iter().filter(|e| e["reason"] == reason).collect();
    (lost.iter().filter_map(|e| e["count"].as_u64()).sum(), lost.len())
}

/// The session that is not `other`.
fn flood_session(daemon: &Daemon, other: &str) -> String {
    daemon
        .sessions()
        .iter()
        .filter_map(|s| s["id"].as_str())
        .find(|id| *id != other)
        .expect("the flood's session")
        .to_owned()
}

/// A loopback UDP port for connect loops (a UDP connect sends nothing; the
/// port just exists while the socket is kept).
fn udp_target() -> (std::net::UdpSocket, u16) {
    let target = std::net::UdpSocket::bind("127.0.0.1:0").expect("a UDP port");
    let port = target.local_addr().expect("its address").port();
    (target, port)
}

/// Python lines (with `socket` imported) that connect a UDP socket to
/// 127.0.0.1:`port` `count` times, each time a new socket.
fn udp_connect_loop(count: usize, port: u16) -> String {
    format!(
        "for _ in range({count}):\n    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n    s.connect(('127.0.0.1', {port}))\n    s.close()\n"
    )
}

/// Busy loops outside any session, one per CPU, stopped (by pid) when dropped.
struct BusyCpus(Vec<std::process::Child>);

impl BusyCpus {
    fn start() -> Self {
        let cpus = thread::available_parallelism().map_or(2, usize::from);
        let spin =
            || std::process::Command::new("/bin/sh").args(["-c", "while :; do :; done"]).spawn().expect("a busy loop");
        Self((0..cpus).map(|_| spin()).collect())
    }
}

impl Drop for BusyCpus {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A host whose every CPU is busy must not starve the session log: a
/// session still opens, and every one of its connects becomes a row while
/// the session still runs (nobody waits on the log) and the CPUs stay busy,
/// with nothing counted as lost.
#[test]
fn a_host_with_every_cpu_busy_still_opens_sessions_and_stores_every_record() {
    const CONNECTS: usize = 20_000;
    let daemon = Daemon::builder().policy(POLICY).start();
    let token = daemon.mint("busy-host-bot", &[]);
    let (_target, port) = udp_target();
    let stop = daemon.dir().join("stop-waiting");
    let script = format!(
        "import os, socket, sys, time\n{}print(os.environ['TOLLGATE_SESSION'])\nsys.stdout.flush()\nwhile not os.path.exists({stop:?}):\n    time.sleep(0.05)\n",
        udp_connect_loop(CONNECTS, port)
    );
    let db = daemon.state_dir().join("sessions.db");
    let stored = |id: &str| {
        let mut cmd = std::process::Command::new("sqlite3");
        cmd.arg(&db).arg(format!("SELECT count(*) FROM events WHERE session_id = '{id}' AND kind = 'connect'"));
        let out = harness::run_with_timeout(&mut cmd, Duration::from_secs(30)).expect("sqlite3 runs");
        out.stdout.trim().parse::<usize>().unwrap_or(0)
    };
    let (out, rows) = thread::scope(|scope| {
        let busy = BusyCpus::start();
        let session = scope.spawn(|| daemon.run(&token, &["python3", "-c", &script]));
        // Within the harness's 60 s for the command; it takes seconds.
        let deadline = Instant::now() + Duration::from_secs(45);
        let mut id = None;
        while id.is_none() && Instant::now() < deadline && !session.is_finished() {
            id = daemon.sessions().iter().find_map(|s| s["id"].as_str().map(str::to_owned));
            thread::sleep(Duration::from_millis(100));
        }
        let id = id.expect("a session opened while every CPU was busy");
        while stored(&id) < CONNECTS && Instant::now() < deadline && !session.is_finished() {
            thread::sleep(Duration::from_millis(200));
        }
        let rows = stored(&id);
        drop(busy);
        std::fs::write(&stop, "").expect("stop file");
        (session.join().expect("session thread"), rows)
    });
    assert_eq!(out.code(), Some(0), "the connect loop did not run: {out}");
    assert_eq!(rows, CONNECTS, "connect rows stored while the session ran and every CPU was busy\n{}", daemon.log());
    let status = daemon.status();
    assert_eq!(status["events_lost"].as_u64(), Some(0), "{status}");
}

/// A session ends when its last process exits, not when its main command
/// does, and by the time `run` returns its record already holds every event
/// those processes made, the last one's exit included: nobody has to poll.
/// Five sessions in a row, since the last events' race with the end is won
/// or lost by milliseconds.
#[test]
fn when_run_returns_the_session_has_ended_with_every_event_of_its_last_process_in_its_record() {
    const CONNECTS: usize = 3_000;
    let daemon = Daemon::builder().policy(POLICY).start();
    let token = daemon.mint("short-lived-bot", &[]);
    let (_target, port) = udp_target();
    for round in 0..5 {
        let done = daemon.dir().join(format!("straggler-done-{round}"));
        // The main command leaves a straggler behind and exits at once; the
        // straggler connects, writes a marker and exits.
        let straggler = format!(
            "import os, socket, time\ntime.sleep(0.2)\n{}print(os.getpid(), file=open({done:?}, 'w'))\n",
            udp_connect_loop(CONNECTS, port)
        );
        let script = "python3 -c \"$1\" > /dev/null 2>&1 &\necho \"$TOLLGATE_SESSION\"";
        let out = daemon.run(&token, &["/bin/sh", "-c", script, "sh", &straggler]);
        assert_eq!(out.code(), Some(0), "the main command failed: {out}");
        let id = out.first_line().to_owned();
        let straggler_pid: u64 = std::fs::read_to_string(&done)
            .unwrap_or_else(|e| panic!("`run` returned before the straggler finished ({e}): {out}"))
            .trim()
            .parse()
            .expect("the straggler's pid");

        // Read once, right away.
        let show = daemon.show(&id);
        assert!(
            !show["session"]["ended_at"].is_null(),
            "round {round}: the session is still open after `run` returned:\n{}",
            pretty(&show)
        );
        let connects = harness::session_log::connects_to(&show, "127.0.0.1", port).len();
        assert_eq!(connects, CONNECTS, "round {round}: connects in the record when `run` returned\n{}", daemon.log());
        assert!(
            harness::session_log::exit_of(&show, straggler_pid).is_some(),
            "round {round}: the straggler's exit is not in the record when `run` returned:\n{}",
            pretty(&Value::Array(events_of_kind(&show, "exit").into_iter().cloned().collect()))
        );
    }
}

/// The kernel's loss counters are pinned with the maps and outlive the
/// daemon: what a killed daemon reported of them is not reported again by
/// the next one, which adopts the session and reports only what came after.
/// The session's record still adds up to every connect it tried.
#[test]
fn losses_a_killed_daemon_reported_are_not_reported_again_by_the_next() {
    let _flood = one_flood_at_a_time();
    let mut daemon = Daemon::builder().policy(POLICY).config_line(SMALLEST_BUFFER).start();
    assert_eq!(daemon.status()["enforcement_survives_daemon"], true, "{}", pretty(&daemon.status()));
    let token = daemon.mint("flood-bot", &[]);
    let steps = daemon.dir().join("steps");
    std::fs::create_dir(&steps).expect("steps dir");
    // Names its session, then at each go-N floods and says done-N.
    let script = format!(
        "import os, socket, time\nd = {steps:?}\nopen(d + '/id.tmp', 'w').write(os.environ['TOLLGATE_SESSION'])\nos.rename(d + '/id.tmp', d + '/id')\nfor n in (1, 2):\n    while not os.path.exists(f'{{d}}/go-{{n}}'):\n        time.sleep(0.02)\n{}    open(f'{{d}}/done-{{n}}', 'w').close()\n",
        flood_loop("    ")
    );
    let wait_for = |name: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !steps.join(name).exists() {
            assert!(Instant::now() < deadline, "the session never wrote {name}");
            thread::sleep(Duration::from_millis(20));
        }
    };
    let round = |n: u32| {
        std::fs::write(steps.join(format!("go-{n}")), "").expect("go");
        wait_for(&format!("done-{n}"));
    };
    let mut run = std::process::Command::new(harness::tollgate_bin());
    run.arg("--socket").arg(daemon.socket()).arg("run").arg("--token-file").arg(&token);
    run.args(["--", "python3", "-c", script.as_str()]);
    let session = thread::spawn(move || harness::run_with_timeout(&mut run, Duration::from_secs(120)).expect("run"));
    wait_for("id");
    let id = std::fs::read_to_string(steps.join("id")).expect("the session's id");

    round(1);
    let accounted = |show: &Value| events_of_kind(show, "connect").len() as u64 + lost_in_record(show, "connect").0;
    let first = daemon.show_until(&id, "round 1 recorded and its losses reported", |s| accounted(s) == ATTEMPTS);
    let (lost_first, _) = lost_in_record(&first, "connect");
    assert!(lost_first > 0, "round 1 lost nothing; the test proves nothing: {}", pretty(&first));

    daemon.kill_hard();
    daemon.restart();
    assert_eq!(daemon.status()["sessions_active"], 1, "the session was not adopted: {}", pretty(&daemon.status()));
    round(2);
    let out = session.join().expect("the session's thread");
    assert_eq!(out.code(), Some(0), "{out}");

    // Reported twice, round 1's losses would make the sum exceed the attempts.
    assert_accounted(&daemon, &id, 2 * ATTEMPTS);
}
