//! Who learns of a held request and who may decide it: the approval webhook is told of each one,
//! and only reviewers outside sessions can list, approve or deny.

use std::process::Command;
use std::thread;
use std::time::Duration;

use harness::proxy::{
    ASYNC_TIMEOUT, Fixture, Handshake, LONG_APPROVAL_TIMEOUT, NOBODY, REVIEWERS, approval_events, approval_id,
    approvals, path_str, reported, wait_for_approvals,
};
use harness::session_log::pretty;
use harness::upstream::Upstream;
use harness::{Daemon, RunOutput, run_with_timeout, tollgate_bin};
use serde_json::Value;

/// Runs `tollgate --socket S ARGS...` as `uid`, outside any session.
fn tollgate_as(daemon: &Daemon, uid: u32, args: &[&str]) -> RunOutput {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid", &uid.to_string(), "--regid", &uid.to_string(), "--clear-groups"])
        .arg(tollgate_bin())
        .arg("--socket")
        .arg(daemon.socket())
        .args(args);
    run_with_timeout(&mut cmd, Duration::from_secs(30))
        .unwrap_or_else(|err| panic!("running tollgate as uid {uid}: {err:#}"))
}

#[test]
fn the_webhook_receives_each_pending_approval() {
    let webhook = Upstream::start("127.0.0.1", 200, "{}");
    let hook_url = format!("approval_webhook: {}/hook", webhook.base_url());
    let fx = Fixture::start(&[REVIEWERS, LONG_APPROVAL_TIMEOUT, &hook_url]);
    let url = fx.url("/deploy/hooked");

    let (exchange, listed, notice) = thread::scope(|scope| {
        let held = scope.spawn(|| fx.curl(&["-X", "POST", "--data", "go", &url]));
        let listed = wait_for_approvals(&fx.daemon, 1).remove(0);
        let notice = webhook.wait_for("the webhook call", ASYNC_TIMEOUT, |request| request.path == "/hook");
        let id = approval_id(&listed);
        let deny = fx.daemon.tollgate(&["deny", id.as_str(), "--reason", "seen on the webhook"]);
        assert!(deny.success(), "`tollgate deny {id}` failed: {deny}");
        (held.join().expect("the held request's thread panicked"), listed, notice)
    });

    assert_eq!(notice.method, "POST", "the webhook is POSTed:\n{notice}");
    assert!(
        notice.header_values("content-type").iter().any(|value| value.starts_with("application/json")),
        "the webhook body is JSON:\n{notice}"
    );
    let body: Value = serde_json::from_slice(&notice.body)
        .unwrap_or_else(|err| panic!("the webhook body is not JSON ({err}):\n{notice}"));
    for field in [
        "id",
        "session",
        "identity",
        "subject",
        "grant",
        "rule",
        "destination",
        "method",
        "path",
        "requested_at",
        "expires_at",
    ] {
        assert!(body[field].is_string(), "the webhook body lacks {field:?}:\n{}", pretty(&body));
        assert_eq!(body[field], listed[field], "the webhook and `approvals` disagree on {field:?}:\n{}", pretty(&body));
    }
    assert_eq!(body["session"], exchange.session, "{}", pretty(&body));
    assert_eq!(body["path"], "/deploy/hooked", "{}", pretty(&body));
    assert_eq!(
        webhook.request_lines(),
        vec!["POST /hook".to_owned()],
        "one call per held request: {}",
        webhook.describe()
    );
    exchange.assert_status(403, "denied after the webhook call");
    assert!(fx.upstream.requests().is_empty(), "{}", fx.upstream.describe());
}

#[test]
fn only_reviewers_outside_sessions_can_see_or_decide_approvals() {
    let fx = Fixture::start(&[REVIEWERS, LONG_APPROVAL_TIMEOUT]);
    let handshake = Handshake::new(&fx.daemon);
    // The session holds a request of its own, waits for the test to hand it the approval id, then
    // tries to list and approve it from inside.
    let script = format!(
        r#"echo "$TOLLGATE_SESSION"
bin=$0 socket=$1 dir=$2 url=$3
curl -sS --max-time 45 -o /dev/null -w '%{{http_code}}' -X POST --data go "$url" > "$dir/held.code" &
{wait}
"$bin" --socket "$socket" approvals --format json; echo "approvals_status=$?"
"$bin" --socket "$socket" approve "$go_value"; echo "approve_status=$?"
: > "$dir/done"
wait
echo "held_code=$(cat "$dir/held.code")"
"#,
        wait = Handshake::WAIT_FOR_GO
    );
    let bin = tollgate_bin();
    let url = fx.url("/deploy/self");

    let (out, id) = thread::scope(|scope| {
        let session = scope.spawn(|| {
            fx.daemon.run(
                &fx.token,
                &[
                    "/bin/sh",
                    "-c",
                    &script,
                    path_str(&bin),
                    path_str(fx.daemon.socket()),
                    handshake.dir(),
                    url.as_str(),
                ],
            )
        });
        let pending = wait_for_approvals(&fx.daemon, 1);
        let id = approval_id(&pending[0]);
        handshake.go(&id);
        handshake.wait_done("try to review its own request");
        assert_eq!(approvals(&fx.daemon).len(), 1, "the session's own approve must not decide anything");

        // A user who is not a reviewer, outside any session, is refused too.
        let list = tollgate_as(&fx.daemon, NOBODY, &["approvals", "--format", "json"]);
        assert_eq!(list.code(), Some(1), "a non-reviewer listed approvals: {list}");
        assert!(list.stderr.contains("not a reviewer"), "the refusal should say why: {list}");
        assert!(!list.stdout.contains("/deploy/self"), "{list}");
        let approve = tollgate_as(&fx.daemon, NOBODY, &["approve", id.as_str()]);
        assert_eq!(approve.code(), Some(1), "a non-reviewer approved: {approve}");
        assert!(approve.stderr.contains("not a reviewer"), "the refusal should say why: {approve}");
        assert_eq!(approvals(&fx.daemon).len(), 1, "a non-reviewer's approve must not decide anything");

        let deny = fx.daemon.tollgate(&["deny", id.as_str(), "--reason", "self-review attempt"]);
        assert!(deny.success(), "`tollgate deny {id}` failed: {deny}");
        (session.join().expect("the session's thread panicked"), id)
    });

    assert_eq!(reported(&out, "approvals_status"), "1", "`approvals` from inside a session must fail: {out}");
    assert_eq!(reported(&out, "approve_status"), "1", "`approve` from inside a session must fail: {out}");
    assert!(
        out.stderr.contains("processes inside a session cannot review requests"),
        "the refusal should say why: {out}"
    );
    assert!(!out.stdout.contains("/deploy/self"), "the session saw the approval list: {out}");
    assert_eq!(reported(&out, "held_code"), "403", "the request was denied, not approved: {out}");
    assert!(fx.upstream.requests().is_empty(), "{}", fx.upstream.describe());

    let show = fx.daemon.show_until(out.first_line(), "the denial", |show| !approval_events(show, "denied").is_empty());
    assert!(approval_events(&show, "approved").is_empty(), "{}", pretty(&show));
    assert_eq!(approval_events(&show, "denied")[0]["id"], id.as_str(), "{}", pretty(&show));
}
