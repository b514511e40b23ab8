//! PostgreSQL routes: a real server (Debian's, on loopback), real clients (psql, pgbench, and
//! tokio-postgres on the extended protocol) inside sessions. Each test checks what the server
//! holds and logged, not only what the client printed.

use std::path::PathBuf;
use std::thread;

use serde_json::Value;

use harness::postgres::{Database, Postgres, server};
use harness::proxy::{BUILD_BOTS, LONG_APPROVAL_TIMEOUT, REVIEWERS, Secret, approval_id, policy, wait_for_approvals};
use harness::session_log::{events_of_kind, pretty};
use harness::{Daemon, RunOutput};

/// The route of the issue that asked for PostgreSQL governance, with masks for the test tables.
const DOCUMENTED_RULES: &str = r#"          block:
            - { statement: [drop, truncate, alter, grant, revoke] }
            - { statement: [delete, update], without_where: true }
            - { table: "audit.*" }
            - { function: [pg_read_file, lo_import, dblink] }
          approve:
            - { statement: [delete, update, insert] }
          mask:
            - { column: "email|phone|score" }
            - { regex: "\\b\\d{4}-\\d{4}-\\d{4}-\\d{4}\\b", replace: "****" }
"#;

/// Tables of every test database, created by the superuser outside any session.
const TABLES: &str = "CREATE TABLE orders (id int PRIMARY KEY, item text); \
    INSERT INTO orders VALUES (1, 'apple'), (2, 'pear'), (3, 'plum'); \
    CREATE SCHEMA audit; CREATE TABLE audit.log (id int, what text); INSERT INTO audit.log VALUES (1, 'created'); \
    CREATE TABLE users (id int, email text, phone text, note text, score int); \
    INSERT INTO users VALUES (1, 'ann@example.com', '555-0100', 'card 4111-1111-1111-1111', 7);";

struct Pg {
    daemon: Daemon,
    _secret: Secret,
    db: Database,
    token: PathBuf,
    pg: &'static Postgres,
}

impl Pg {
    /// A database with the test tables, a daemon whose route to the server (both loopbacks)
    /// has `rules` and logs in as the database's role (`role_prefix`), and a token.
    fn start(rules: &str, role_prefix: &str, config: &[&str]) -> Pg {
        let pg = server();
        let secret = Secret::private();
        let db = pg.database(role_prefix, &secret.value);
        pg.sql(&db.name, TABLES);
        pg.sql(
            &db.name,
            &format!(
                "GRANT USAGE ON SCHEMA audit TO {role}; GRANT ALL ON ALL TABLES IN SCHEMA public, audit TO {role}",
                role = db.role
            ),
        );
        let mut routes = String::new();
        for to in [format!("127.0.0.1/32:{}", pg.port), format!("[::1]/128:{}", pg.port)] {
            routes.push_str(&format!(
                "        - to: \"{to}\"\n          protocol: postgres\n          credential: {{ user: {}, password_file: {} }}\n{rules}",
                db.role,
                secret.path.display()
            ));
        }
        let mut builder = Daemon::builder().policy(&policy(&routes, ""));
        for line in config {
            builder = builder.config_line(line);
        }
        let daemon = builder.start();
        let token = daemon.mint("db-bot", BUILD_BOTS);
        Pg { daemon, _secret: secret, db, token, pg }
    }

    fn conninfo(&self, host: &str, extra: &str) -> String {
        format!("host={host} port={} dbname={} user=whoever {extra}", self.pg.port, self.db.name)
    }

    /// psql in a session, each statement its own Query, going on after errors, SQLSTATEs shown.
    fn psql_on(&self, conninfo: &str, statements: &[&str]) -> RunOutput {
        let mut argv: Vec<String> = vec![
            self.pg.binary("psql").to_string_lossy().into_owned(),
            conninfo.to_owned(),
            "-X".into(),
            "-A".into(),
            "-t".into(),
            "-v".into(),
            "VERBOSITY=verbose".into(),
        ];
        for statement in statements {
            argv.push("-c".into());
            argv.push((*statement).to_owned());
        }
        self.daemon.run(&self.token, &argv)
    }

    fn psql(&self, statements: &[&str]) -> RunOutput {
        self.psql_on(&self.conninfo("127.0.0.1", "sslmode=disable"), statements)
    }

    /// tokio-postgres in a session: one JSON line per statement.
    fn extended(&self, args: &[&str]) -> (RunOutput, Vec<Value>) {
        let mut argv = vec![env!("CARGO_BIN_EXE_pg-client").to_owned(), self.conninfo("127.0.0.1", "")];
        argv.extend(args.iter().map(|a| (*a).to_owned()));
        let out = self.daemon.run(&self.token, &argv);
        let lines = out.stdout.lines().map(|l| serde_json::from_str(l).unwrap_or(Value::Null)).collect();
        (out, lines)
    }

    /// The server's log since `offset`: the lines of this test's role only
    /// (the server is shared).
    fn role_log_since(&self, offset: usize) -> String {
        let role = format!("user={} ", self.db.role);
        self.pg.log_since(offset).lines().filter(|line| line.contains(&role)).map(|line| format!("{line}\n")).collect()
    }

    /// What the server holds, asked outside any session.
    fn outside(&self, sql: &str) -> String {
        self.pg.sql(&self.db.name, sql)
    }

    /// The sql records of the latest session, once `count` statements are recorded.
    fn statements(&self, count: usize) -> (Value, Vec<Value>) {
        let id = self.daemon.last_session_id();
        let show = self.daemon.show_until(&id, "the statements' records", |show| {
            events_of_kind(show, "sql").iter().filter(|e| e["event"] == "statement").count() >= count
        });
        let events = events_of_kind(&show, "sql").into_iter().filter(|e| e["event"] == "statement").cloned().collect();
        (show, events)
    }
}

fn count_of(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

#[test]
fn guardrails_refuse_with_42501_and_nothing_of_a_refused_statement_reaches_the_server() {
    let fx = Pg::start(DOCUMENTED_RULES, "agent", &[]);
    let refused = [
        "DROP TABLE orders",
        "DELETE FROM orders",
        "DELETE FROM orders WHERE true",
        "SELECT * FROM audit.log",
        "SELECT ARRAY[pg_read_file('/etc/hostname')]",
        "SELECT 1; DROP TABLE orders",
        "WITH d AS (DELETE FROM orders RETURNING *) SELECT count(*) FROM d",
        "EXPLAIN ANALYZE DELETE FROM orders",
        "DO $$ BEGIN DELETE FROM orders; END $$",
        "SET search_path = audit, public",
    ];
    let mut statements = vec!["SELECT item FROM orders ORDER BY id"];
    statements.extend(refused);
    statements.extend(["SELEC 1", "SELECT count(*) FROM orders"]);
    let log_start = fx.pg.log_len();
    let out = fx.psql(&statements);
    assert!(out.stdout.starts_with("apple\npear\nplum\n"), "reads pass:\n{out}");
    assert!(out.stdout.trim_end().ends_with('3'), "the connection serves after every refusal:\n{out}");
    assert_eq!(count_of(&out.stderr, "ERROR:  42501: tollgate: "), refused.len(), "{out}");
    assert!(out.stderr.contains("block[0]: statement drop|truncate|alter|grant|revoke"), "{out}");
    assert!(out.stderr.contains("ERROR:  42601: tollgate: the statement does not parse"), "{out}");

    // The server holds what it held, and never saw a refused statement's text.
    assert_eq!(fx.outside("SELECT count(*) FROM orders"), "3");
    assert_eq!(fx.outside("SELECT what FROM audit.log"), "created");
    let log = fx.role_log_since(log_start);
    for text in ["DROP TABLE orders", "pg_read_file", "audit.log", "DELETE FROM orders", "SELEC 1"] {
        assert!(!log.contains(text), "the server saw '{text}':\n{log}");
    }
    assert!(log.contains(&format!("connection authorized: user={}", fx.db.role)), "the route's role logs in:\n{log}");

    let (show, events) = fx.statements(statements.len());
    let blocked: Vec<&Value> = events.iter().filter(|e| e["outcome"] == "blocked").collect();
    assert_eq!(blocked.len(), refused.len(), "{}", pretty(&show));
    assert!(blocked.iter().all(|e| e["verdict"] == "block"), "{}", pretty(&show));
    let drop = events.iter().find(|e| e["sql"] == "DROP TABLE orders").expect("the DROP's record");
    assert!(drop["rules"][0].as_str().is_some_and(|r| r.starts_with("block[0]")), "{}", pretty(drop));
    let replay = fx.daemon.tollgate(&["replay", &fx.daemon.last_session_id(), "--instant", "--only", "sql"]);
    assert!(replay.stdout.contains("DROP TABLE orders -> blocked"), "{replay}");
    let read = events.iter().find(|e| e["sql"] == "SELECT item FROM orders ORDER BY id").expect("the read's record");
    assert_eq!((read["outcome"].as_str(), read["rows"].as_u64()), (Some("forwarded"), Some(3)), "{}", pretty(read));
}

#[test]
fn a_refusal_inside_a_transaction_aborts_it_as_any_error_would() {
    let fx = Pg::start(DOCUMENTED_RULES, "agent", &[]);
    let out = fx.psql(&["BEGIN", "SELECT 1", "DROP TABLE orders", "SELECT 2", "COMMIT", "SELECT count(*) FROM orders"]);
    assert!(out.stderr.contains("ERROR:  42501: tollgate: statement refused by policy"), "{out}");
    assert!(out.stderr.contains("ERROR:  25P02"), "the server knows the transaction failed:\n{out}");
    assert!(out.stdout.contains("ROLLBACK"), "COMMIT of a failed transaction rolls back:\n{out}");
    assert!(out.stdout.trim_end().ends_with('3'), "{out}");
    assert_eq!(fx.outside("SELECT count(*) FROM orders"), "3");
}

#[test]
fn the_other_address_family_and_tls_from_the_client_are_governed_alike() {
    let fx = Pg::start(DOCUMENTED_RULES, "agent", &[]);
    let out = fx.psql_on(&fx.conninfo("::1", "sslmode=require"), &["SELECT current_user", "DROP TABLE orders"]);
    assert_eq!(out.stdout.trim(), fx.db.role, "the route's role, over TLS to the proxy:\n{out}");
    assert!(out.stderr.contains("ERROR:  42501"), "{out}");
    assert_eq!(fx.outside("SELECT count(*) FROM orders"), "3");
}

#[test]
fn the_credential_logs_in_with_scram_or_md5_and_the_session_never_holds_it() {
    for prefix in ["agent", "md5_agent"] {
        let fx = Pg::start("", prefix, &[]);
        let out = fx.psql(&["SELECT current_user, session_user"]);
        assert_eq!(out.stdout.trim(), format!("{role}|{role}", role = fx.db.role), "{out}");
        assert!(!out.stdout.contains(&fx._secret.value) && !out.stderr.contains(&fx._secret.value), "{out}");
        let log = fx.pg.log_text();
        assert!(log.contains(&format!("connection authorized: user={}", fx.db.role)), "{log}");
    }
}

#[test]
fn the_extended_protocol_is_judged_at_parse_and_its_binary_results_masked() {
    let fx = Pg::start(DOCUMENTED_RULES, "agent", &[]);
    let (out, lines) = fx.extended(&[
        "SELECT id, email, phone, note FROM users",
        "SELECT email AS e FROM users",
        "SELECT lower(email) FROM users",
        "SELECT row_to_json(u) FROM users u",
        "SELECT score FROM users",
        "DROP TABLE users",
        "SELECT * FROM audit.log",
        "SELECT count(*) FROM users",
    ]);
    let context = format!("{out}");
    assert_eq!(lines.len(), 8, "{context}");
    assert_eq!(lines[0]["rows"][0], serde_json::json!(["1", "****", "****", "card ****"]), "{context}");
    assert_eq!(lines[1]["rows"][0][0], "****", "an alias reads the same column: {context}");
    assert_eq!(lines[2]["rows"][0][0], "****", "a computed value of it: {context}");
    assert_eq!(lines[3]["rows"][0][0], "\"****\"", "a whole row folded into JSON: {context}");
    assert_eq!(lines[4]["error"]["code"], "42501", "a masked int in binary is refused: {context}");
    assert_eq!(lines[5]["error"]["code"], "42501", "{context}");
    assert_eq!(lines[6]["error"]["code"], "42501", "{context}");
    assert_eq!(lines[7]["rows"][0][0], "1", "the connection still serves: {context}");
    assert_eq!(fx.outside("SELECT email FROM users"), "ann@example.com", "masking changes what the client sees only");

    let (show, events) = fx.statements(8);
    let masked: u64 = events.iter().filter_map(|e| e["masked"].as_u64()).sum();
    assert!(masked >= 6, "masked values are counted:\n{}", pretty(&show));
}

/// The proxy keeps, per connection, what it made of each text and the
/// verdict on it: a text sent again must meet the same rules, and a name
/// that `EXECUTE` runs is judged by what it names at the time.
#[test]
fn a_statement_sent_again_meets_the_same_rules_and_execute_follows_what_its_name_holds_now() {
    let fx = Pg::start(DOCUMENTED_RULES, "agent", &[]);
    let statements = [
        "PREPARE p AS SELECT email FROM users",
        "EXECUTE p",
        "DEALLOCATE p",
        "PREPARE p AS DELETE FROM orders",
        "EXECUTE p",
        "DROP TABLE users",
        "DROP TABLE users",
        "SELECT email FROM users",
        "SELECT email FROM users",
    ];
    let log_start = fx.pg.log_len();
    let (out, lines) = fx.extended(&statements);
    let context = format!("{out}");
    assert_eq!(lines.len(), statements.len(), "{context}");
    assert_eq!(lines[1]["rows"][0][0], "****", "{context}");
    assert_eq!(lines[3]["error"]["code"], "42501", "the new p is refused: {context}");
    assert_eq!(lines[4]["error"]["code"], "42501", "EXECUTE of a p no longer prepared: {context}");
    assert!(
        lines[4]["error"]["message"].as_str().is_some_and(|m| m.contains("no statement of that name")),
        "{context}"
    );
    assert_eq!(
        (&lines[5]["error"]["code"], &lines[6]["error"]["code"]),
        (&"42501".into(), &"42501".into()),
        "{context}"
    );
    assert_eq!((&lines[7]["rows"][0][0], &lines[8]["rows"][0][0]), (&"****".into(), &"****".into()), "{context}");

    assert_eq!(fx.outside("SELECT count(*) FROM orders"), "3");
    assert_eq!(fx.outside("SELECT count(*) FROM users"), "1");
    let log = fx.role_log_since(log_start);
    for text in ["DELETE FROM orders", "DROP TABLE users"] {
        assert!(!log.contains(text), "the server saw '{text}':\n{log}");
    }
    let (show, events) = fx.statements(statements.len());
    let outcomes: Vec<(&str, &str)> =
        events.iter().map(|e| (e["sql"].as_str().unwrap_or(""), e["outcome"].as_str().unwrap_or(""))).collect();
    let blocked = |sql: &str| outcomes.iter().filter(|&&(s, o)| s == sql && o == "blocked").count();
    assert_eq!(blocked("DROP TABLE users"), 2, "{}", pretty(&show));
    assert_eq!(blocked("EXECUTE p"), 1, "{}", pretty(&show));
    let reads = outcomes.iter().filter(|&&(s, o)| s == "SELECT email FROM users" && o == "forwarded").count();
    assert_eq!(reads, 2, "{}", pretty(&show));
}

#[test]
fn held_statements_wait_for_a_reviewer_who_approves_denies_or_lets_them_time_out() {
    let fx = Pg::start(DOCUMENTED_RULES, "agent", &[REVIEWERS, LONG_APPROVAL_TIMEOUT]);
    for (id, decision) in [(1, "approve"), (2, "deny")] {
        let statement = format!("DELETE FROM orders WHERE id = {id}");
        let before = fx.outside("SELECT count(*) FROM orders");
        thread::scope(|scope| {
            let held = scope.spawn(|| fx.psql(&[statement.as_str()]));
            let pending = wait_for_approvals(&fx.daemon, 1);
            assert_eq!(pending[0]["method"], "SQL", "{}", pretty(&pending[0]));
            assert_eq!(pending[0]["path"], "DELETE FROM orders WHERE id = $1", "{}", pretty(&pending[0]));
            assert!(
                pending[0]["body_start"].as_str().is_some_and(|b| b.contains(&statement)),
                "{}",
                pretty(&pending[0])
            );
            assert_eq!(fx.outside("SELECT count(*) FROM orders"), before, "nothing runs while it is held");
            let answer = fx.daemon.tollgate(&[decision, approval_id(&pending[0]).as_str()]);
            assert!(answer.success(), "{answer}");
            let out = held.join().expect("the held client");
            match decision {
                "approve" => assert!(out.stdout.contains("DELETE 1"), "{out}"),
                _ => assert!(out.stderr.contains("ERROR:  42501: tollgate: statement denied by"), "{out}"),
            }
        });
    }
    assert_eq!(fx.outside("SELECT string_agg(id::text, ',' ORDER BY id) FROM orders"), "2,3");
}

#[test]
fn a_held_statement_nobody_decides_is_refused_when_its_time_is_up() {
    let fx = Pg::start(DOCUMENTED_RULES, "agent", &[REVIEWERS, "approval_timeout: 2s"]);
    let out = fx.psql(&["UPDATE orders SET item = 'x' WHERE id = 1", "SELECT item FROM orders WHERE id = 1"]);
    assert!(out.stderr.contains("nobody approved the statement within 2s"), "{out}");
    assert_eq!(out.stdout.trim(), "apple", "{out}");
    assert_eq!(fx.outside("SELECT item FROM orders WHERE id = 1"), "apple");
}

/// Sends each packet on a new connection and prints what came back, for a
/// session to run. A packet is hex, or steps `N:hex,N:hex,...`: each sent
/// once the answers to the one before it came: N ReadyForQuery messages, or
/// where N is a letter, one message of that type.
const RAW_CLIENT: &str = r#"
import socket, sys
port = int(sys.argv[1])
for packet in sys.argv[2:]:
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(10)
    steps = [step.split(":") for step in packet.split(",")] if ":" in packet else [["0", packet]]
    got, parsed, ready = b"", 0, 0
    try:
        for wanted, data in steps:
            s.sendall(bytes.fromhex(data))
            tag, count = (b"Z", int(wanted)) if wanted.isdigit() else (wanted.encode(), 1)
            seen = 0
            while seen < count:
                length = int.from_bytes(got[parsed + 1:parsed + 5], "big") if len(got) >= parsed + 5 else None
                if length is None or len(got) < parsed + 1 + length:
                    chunk = s.recv(65536)
                    if not chunk:
                        raise EOFError
                    got += chunk
                    continue
                seen += got[parsed:parsed + 1] == tag
                parsed += 1 + length
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    except (socket.timeout, EOFError):
        pass
    print(repr(got))
"#;

/// A startup message (protocol 3.0) with `params` ("name value ..."), in hex.
fn startup(params: &str) -> String {
    let mut body = vec![0, 3, 0, 0];
    for part in params.split(' ') {
        body.extend_from_slice(part.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend(body);
    hex(&packet)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Frontend messages of the extended protocol, in hex.
mod message {
    fn framed(tag: u8, body: &[u8]) -> String {
        let mut message = vec![tag];
        message.extend(((body.len() + 4) as u32).to_be_bytes());
        message.extend(body);
        super::hex(&message)
    }

    fn strings(parts: &[&str]) -> Vec<u8> {
        parts.iter().flat_map(|part| part.bytes().chain([0])).collect()
    }

    pub fn query(sql: &str) -> String {
        framed(b'Q', &strings(&[sql]))
    }

    /// No parameter types.
    pub fn parse(name: &str, sql: &str) -> String {
        framed(b'P', &[strings(&[name, sql]), vec![0, 0]].concat())
    }

    /// No parameters, results as text.
    pub fn bind(portal: &str, statement: &str) -> String {
        framed(b'B', &[strings(&[portal, statement]), vec![0; 6]].concat())
    }

    pub fn execute(portal: &str) -> String {
        framed(b'E', &[strings(&[portal]), vec![0; 4]].concat())
    }

    /// At most `rows` rows (then PortalSuspended).
    pub fn execute_rows(portal: &str, rows: u32) -> String {
        framed(b'E', &[strings(&[portal]), rows.to_be_bytes().to_vec()].concat())
    }

    pub fn close_statement(name: &str) -> String {
        framed(b'C', &[b"S".to_vec(), strings(&[name])].concat())
    }

    pub fn describe_portal(name: &str) -> String {
        framed(b'D', &[b"P".to_vec(), strings(&[name])].concat())
    }

    pub fn flush() -> String {
        framed(b'H', &[])
    }

    pub fn copy_data(data: &str) -> String {
        framed(b'd', data.as_bytes())
    }

    pub fn copy_done() -> String {
        framed(b'c', &[])
    }

    pub fn sync() -> String {
        framed(b'S', &[])
    }

    pub fn terminate() -> String {
        framed(b'X', &[])
    }
}

/// The proxy judges a portal by the statement the server will run: a name
/// the server keeps is not taken over by a Parse it refuses, SQL's
/// `PREPARE` and `DEALLOCATE` share names with the protocol's statements, a
/// portal runs what it was bound to, and `EXECUTE` runs what its name holds
/// at the time.
/// One conversation: batches of messages (hex), each with what answers it
/// (see [`RAW_CLIENT`]).
type Conversation = Vec<(Wait, String)>;

/// What a batch waits for: `1`, `2`... ReadyForQuery messages, or `E`, `G`:
/// one message of that type.
type Wait = char;

/// Runs each conversation on a connection of its own in one session,
/// waiting for each batch's answers; with `at_once`, then again with each
/// sent all at once. Gives what each connection got, in that order.
fn converse(fx: &Pg, conversations: &[Conversation], at_once: bool) -> (RunOutput, Vec<String>) {
    let hello = startup(&format!("user x database {}", fx.db.name));
    let mut argv = vec!["python3".to_owned(), "-c".into(), RAW_CLIENT.into(), fx.pg.port.to_string()];
    for conversation in conversations {
        let mut steps = vec![format!("1:{hello}")];
        steps.extend(conversation.iter().map(|(wait, messages)| format!("{wait}:{messages}")));
        steps.push(format!("0:{}", message::terminate()));
        argv.push(steps.join(","));
    }
    if at_once {
        for conversation in conversations {
            let messages: String = conversation.iter().map(|(_, messages)| messages.as_str()).collect();
            argv.push(format!("{hello}{messages}{}", message::terminate()));
        }
    }
    let out = fx.daemon.run(&fx.token, &argv);
    let answers: Vec<String> = out.stdout.lines().map(str::to_owned).collect();
    let expected = conversations.len() * if at_once { 2 } else { 1 };
    assert_eq!(answers.len(), expected, "{out}");
    assert_eq!(
        fx.outside("SELECT string_agg(id::text, ',' ORDER BY id) FROM orders"),
        "1,2,3",
        "no held DELETE ran unapproved:\n{out}"
    );
    for (index, answer) in answers.iter().enumerate() {
        assert!(!answer.contains("ann@example.com"), "conversation {index} got a masked value:\n{out}");
    }
    (out, answers)
}

/// The proxy judges a portal by the statement the server will run: a name
/// the server keeps is not taken over by a Parse it refuses, SQL's
/// `PREPARE` and `DEALLOCATE` share names with the protocol's statements, a
/// portal runs what it was bound to, and `EXECUTE` runs what its name holds
/// at the time.
#[test]
fn a_portal_is_judged_by_the_statement_the_server_runs_whatever_the_names_do() {
    let fx = Pg::start(DOCUMENTED_RULES, "agent", &[REVIEWERS, "approval_timeout: 2s"]);
    use message::*;
    let conversations = [
        // A held DELETE under a name, then a harmless text under the same name.
        vec![
            ('1', parse("s", "DELETE FROM orders WHERE id = 1") + &sync()),
            ('1', parse("s", "SELECT 1") + &sync()),
            ('1', bind("", "s") + &execute("") + &sync()),
        ],
        // A held DELETE under a name, then a refused text under the same name.
        vec![
            ('1', parse("t", "DELETE FROM orders WHERE id = 2") + &sync()),
            ('1', parse("t", "DROP TABLE orders") + &sync()),
            ('1', bind("", "t") + &execute("") + &sync()),
        ],
        // The unnamed statement parsed again between a portal's Bind and Execute.
        vec![(
            '1',
            parse("", "DELETE FROM orders WHERE id = 3")
                + &bind("p", "")
                + &parse("", "SELECT 1")
                + &execute("p")
                + &sync(),
        )],
        // A protocol statement dropped by SQL's DEALLOCATE, its name taken by PREPARE.
        vec![
            ('1', parse("u", "SELECT 1") + &sync()),
            ('1', query("DEALLOCATE u")),
            ('1', query("PREPARE u AS SELECT lower(email) FROM users")),
            ('1', bind("", "u") + &execute("") + &sync()),
        ],
        // A protocol statement that runs EXECUTE, its name's statement changed after.
        vec![
            ('1', query("PREPARE q AS SELECT 1")),
            ('1', parse("v", "EXECUTE q") + &sync()),
            ('1', query("DEALLOCATE q")),
            ('1', query("PREPARE q AS SELECT lower(email) FROM users")),
            ('1', bind("", "v") + &execute("") + &sync()),
        ],
    ];
    let (out, answers) = converse(&fx, &conversations, false);
    assert!(answers[0].contains("may exist already") && answers[0].contains("nobody approved"), "{out}");
    assert!(answers[3].contains("****") && answers[4].contains("****"), "the rows came, masked:\n{out}");
}

/// The proxy changes what it knows of the server's names only when the
/// server's answer confirms the change. After an error the server skips
/// the rest of the batch, a `DEALLOCATE` in a Query or a Close too, and a
/// string of statements stops at the first that fails; a name freed only
/// in the proxy's mind and taken again would have the proxy judge one
/// statement while the server runs another. Each conversation is sent
/// twice: waiting for each batch's answers, and all at once.
#[test]
fn a_change_to_the_names_the_server_skipped_is_not_believed() {
    let fx = Pg::start(DOCUMENTED_RULES, "agent", &[REVIEWERS, "approval_timeout: 2s"]);
    use message::*;
    let failing = "SELECT * FROM no_such_table";
    // A held DELETE under a name; a failing batch that drops the name
    // (`drop`); a harmless text under the name, and an Execute of it.
    let dropped_in_a_failing_batch = |name: &str, id: u32, drop: String| {
        vec![
            ('1', parse(name, &format!("DELETE FROM orders WHERE id = {id}")) + &sync()),
            ('1', parse("", failing) + &drop + &sync()),
            ('1', parse(name, "SELECT 1") + &sync()),
            ('1', bind("", name) + &execute("") + &sync()),
        ]
    };
    let conversations = [
        // DEALLOCATE as a Query.
        dropped_in_a_failing_batch("s", 1, query("DEALLOCATE s")),
        // The unnamed statement parsed again in a failing batch.
        vec![
            ('1', parse("", "DELETE FROM orders WHERE id = 2") + &sync()),
            ('1', parse("x", failing) + &parse("", "SELECT 1") + &sync()),
            ('1', bind("", "") + &execute("") + &sync()),
        ],
        dropped_in_a_failing_batch("c", 3, close_statement("c")),
        // A string of statements that stops before its DEALLOCATE; the
        // name taken again for a statement that reads nothing masked.
        vec![
            ('1', query("PREPARE m AS SELECT lower(email) FROM users")),
            ('1', query("SELECT 1/0; DEALLOCATE m")),
            ('1', query("PREPARE m AS SELECT 1")),
            ('1', query("EXECUTE m")),
        ],
        // A DEALLOCATE in a transaction block that an error aborted.
        vec![
            ('1', query("PREPARE n AS SELECT lower(email) FROM users")),
            ('1', query("BEGIN")),
            ('1', query("SELECT 1/0")),
            ('1', query("DEALLOCATE n")),
            ('1', query("ROLLBACK")),
            ('1', query("PREPARE n AS SELECT 1")),
            ('1', query("EXECUTE n")),
        ],
    ];
    let (out, answers) = converse(&fx, &conversations, true);
    // Waiting for the answers, the proxy knows what the server holds: the
    // DELETE, held for a reviewer; the masked column, masked.
    for held in &answers[..3] {
        assert!(held.contains("nobody approved"), "the DELETE was judged:\n{out}");
    }
    for reused in [0, 2, 3, 4] {
        assert!(answers[reused].contains("may exist already"), "{out}");
    }
    assert!(answers[3].contains("****") && answers[4].contains("****"), "the rows came, masked:\n{out}");
    // All at once, a name whose batch the server has not answered either
    // is known (nothing, or the one statement it may hold) or is refused.
    assert!(answers[5].contains("nobody approved") && answers[7].contains("nobody approved"), "{out}");
    assert!(
        answers[6].contains("nobody approved") || answers[6].contains("not answered yet"),
        "the unnamed statement is the DELETE or unknown:\n{out}"
    );
    assert!(answers[8].contains("****") && answers[9].contains("****"), "{out}");
}

/// The proxy matches each answer to the message it answers, whatever the
/// server skips: messages sent after an error it already reported, a
/// refused Query in a failed batch (the server answers neither), many
/// messages held up behind a failed one. A portal the server dropped at
/// the end of its transaction, or one SQL closed, is not mistaken for the
/// cursor `DECLARE` opens under its name.
#[test]
fn answers_are_matched_to_what_was_sent_whatever_the_server_skips() {
    let fx = Pg::start(DOCUMENTED_RULES, "agent", &[REVIEWERS, "approval_timeout: 2s"]);
    use message::*;
    let fails = || bind("", "no_such_statement");
    let conversations = [
        // A refused Query after a failed Bind: neither is answered.
        vec![
            ('1', fails() + &query("(") + &sync()),
            ('1', parse("", "SELECT 1") + &parse("", "DELETE FROM orders WHERE id > 0") + &sync()),
            ('1', close_statement("x") + &sync()),
            ('1', bind("", "") + &execute("") + &sync()),
        ],
        // The error already came (Flush) when the client sends on.
        vec![
            ('1', parse("", "DELETE FROM orders WHERE id = 2") + &sync()),
            ('E', fails() + &flush()),
            ('1', parse("", "SELECT 1") + &sync()),
            ('1', bind("", "") + &execute("") + &sync()),
        ],
        vec![
            ('1', parse("s", "DELETE FROM orders WHERE id = 3") + &sync()),
            ('E', fails() + &flush()),
            ('1', query("DEALLOCATE s") + &sync()),
            ('1', parse("s", "SELECT 1") + &sync()),
            ('1', bind("", "s") + &execute("") + &sync()),
        ],
        // More changes behind a failed message than the proxy waits on.
        vec![
            ('E', fails() + &flush()),
            ('1', close_statement("x").repeat(1100) + &sync()),
            ('1', query("SELECT 'still here'")),
        ],
        // A portal gone with its transaction; one closed by SQL.
        vec![
            ('1', parse("", "SELECT 42 AS id") + &bind("p", "") + &sync()),
            ('1', query("DECLARE p CURSOR WITH HOLD FOR SELECT lower(email) AS e FROM users")),
            ('1', execute("p") + &sync()),
        ],
        vec![
            ('1', query("BEGIN")),
            ('1', parse("", "SELECT 42 AS id") + &bind("p", "") + &sync()),
            ('1', query("CLOSE p")),
            ('1', query("DECLARE p CURSOR FOR SELECT lower(email) AS e FROM users")),
            ('1', execute("p") + &sync()),
        ],
        // Names to follow in one string are bounded.
        vec![('1', query(&"DEALLOCATE x; ".repeat(65)))],
        // Running a statement of SQL's PREPARE does not replay what the
        // rest of its string did (CLOSE ALL would have the proxy forget p).
        vec![
            ('1', query("PREPARE x AS SELECT 1; CLOSE ALL")),
            (
                '1',
                parse("d", "DELETE FROM orders WHERE id = 1")
                    + &bind("p", "d")
                    + &bind("q", "x")
                    + &execute("q")
                    + &execute("p")
                    + &sync(),
            ),
        ],
        // A second COPY in the string would need its own window.
        vec![('1', query("COPY orders FROM STDIN; COPY orders FROM STDIN"))],
        // A WITH HOLD cursor outlives its transaction; a Bind of its name
        // fails while the proxy waits for the answer.
        vec![
            ('1', query("DECLARE h CURSOR WITH HOLD FOR SELECT lower(email) AS x FROM users")),
            (
                '2',
                parse("t", "SELECT 1 AS x")
                    + &bind("h", "t")
                    + &sync()
                    + &describe_portal("h")
                    + &execute("h")
                    + &sync(),
            ),
        ],
        // A string that failed after its PREPARE: the statement exists.
        vec![
            ('1', query("PREPARE y AS SELECT lower(email) FROM users; SELECT 1/0")),
            ('2', parse("y", "SELECT 1") + &sync() + &query("EXECUTE y")),
        ],
    ];
    let (out, answers) = converse(&fx, &conversations, false);
    for held in [&answers[0], &answers[1], &answers[2]] {
        assert!(held.contains("nobody approved"), "the DELETE was judged:\n{out}");
    }
    assert!(answers[2].contains("may exist already"), "{out}");
    assert!(answers[3].contains("still here"), "{out}");
    assert!(answers[4].contains("****") && answers[5].contains("****"), "the cursor's rows, masked:\n{out}");
    assert!(answers[6].contains("it names 65 prepared statements or cursors"), "{out}");
    assert!(answers[7].contains("nobody approved"), "the DELETE was judged:\n{out}");
    assert!(answers[8].contains("more than one COPY FROM STDIN"), "{out}");
    assert!(answers[9].contains("****") || answers[9].contains("not answered yet"), "{out}");
    assert!(answers[10].contains("may exist already") && answers[10].contains("****"), "{out}");
    for answer in &answers {
        assert!(!answer.contains("no longer follow"), "{out}");
    }
}

/// What the server takes for one name the proxy takes for one too (it
/// keeps 63 bytes of a name), FETCH does not run a portal the protocol
/// bound, `EXPLAIN DECLARE` opens no cursor, and a portal described before
/// its `EXECUTE` is judged again is masked by what runs, and so is one run
/// on after its row limit. A cursor without HOLD and a PREPARE that failed
/// leave their names free, and a failed CLOSE or DEALLOCATE frees one.
#[test]
fn names_fetch_and_descriptions_follow_what_the_server_runs() {
    let fx = Pg::start(DOCUMENTED_RULES, "agent", &[REVIEWERS, "approval_timeout: 2s"]);
    fx.outside("INSERT INTO users VALUES (2, 'bob@example.com', '555-0101', 'n', 3)");
    use message::*;
    let long = |last: char| format!("{}{last}", "a".repeat(63));
    let conversations = [
        vec![(
            '1',
            parse("d", "DELETE FROM orders WHERE id = 2") + &bind(&long('1'), "d") + &execute(&long('2')) + &sync(),
        )],
        vec![(
            '1',
            parse(&long('1'), "SELECT 1 AS e")
                + &close_statement(&long('2'))
                + &parse(&long('3'), "SELECT lower(email) AS e FROM users")
                + &bind("", &long('1'))
                + &execute("")
                + &sync(),
        )],
        vec![('1', parse("\u{e9}", "SELECT 1") + &sync())],
        vec![
            (
                '1',
                parse("d", "DELETE FROM orders WHERE id = 3 RETURNING id")
                    + &bind("p", "d")
                    + &query("FETCH ALL FROM p"),
            ),
            ('1', sync()),
        ],
        vec![
            ('1', parse("s", "EXPLAIN DECLARE p CURSOR FOR SELECT 1") + &sync()),
            (
                '1',
                parse("d", "DELETE FROM orders WHERE id = 1")
                    + &bind("p", "d")
                    + &bind("q", "s")
                    + &execute("q")
                    + &execute("p")
                    + &sync(),
            ),
        ],
        vec![
            ('1', query("PREPARE z AS SELECT 1 AS a")),
            ('1', parse("s", "EXECUTE z") + &sync()),
            ('1', query("DEALLOCATE z")),
            ('1', query("PREPARE z AS SELECT lower(email) AS a FROM users")),
            ('1', bind("p", "s") + &describe_portal("p") + &execute("p") + &sync()),
        ],
        vec![
            ('1', query("BEGIN; DECLARE cc CURSOR FOR SELECT 1; COMMIT")),
            ('1', query("BEGIN; DECLARE cc CURSOR FOR SELECT 2; COMMIT")),
            ('1', query("PREPARE zz AS SELECT no_such_column")),
            ('1', query("PREPARE zz AS SELECT 3")),
            ('1', query("EXECUTE zz")),
        ],
        // A portal run on after its row limit returns rows of what it ran
        // first, whatever the name holds now.
        vec![
            ('1', query("BEGIN")),
            ('1', query("PREPARE s AS SELECT lower(email) AS v FROM users ORDER BY id")),
            ('1', parse("q", "EXECUTE s") + &bind("p", "q") + &execute_rows("p", 1) + &sync()),
            ('1', query("DEALLOCATE s")),
            ('1', query("PREPARE s AS SELECT 'z'::text AS v")),
            ('1', execute("p") + &sync()),
        ],
        vec![
            ('1', query("BEGIN; DECLARE h CURSOR WITH HOLD FOR SELECT 1; ROLLBACK")),
            ('1', query("CLOSE h")),
            ('1', query("DECLARE h CURSOR WITH HOLD FOR SELECT 2")),
        ],
        vec![
            ('1', query("SELECT 1/0; PREPARE w AS SELECT 1")),
            ('1', query("DEALLOCATE w")),
            ('1', query("PREPARE w AS SELECT 3")),
            ('1', query("EXECUTE w")),
        ],
        // A DEALLOCATE or DISCARD ALL that failed for another reason (an
        // aborted transaction, a transaction block) leaves the names known.
        vec![
            ('1', parse("s5", "DELETE FROM orders WHERE id = 1") + &sync()),
            ('1', query("BEGIN")),
            ('1', query("SELECT 1/0")),
            ('1', query("DEALLOCATE s5")),
            ('1', query("ROLLBACK")),
            ('2', query("PREPARE s5 AS SELECT 1") + &query("EXECUTE s5")),
        ],
        vec![
            ('1', parse("s6", "DELETE FROM orders WHERE id = 2") + &sync()),
            ('1', query("BEGIN")),
            ('1', query("DISCARD ALL")),
            ('1', query("ROLLBACK")),
            ('2', query("PREPARE s6 AS SELECT 1") + &query("EXECUTE s6")),
        ],
        // So does a CLOSE of a cursor that failed in an aborted transaction.
        vec![
            ('1', query("DECLARE c5 CURSOR WITH HOLD FOR SELECT lower(email) AS v FROM users")),
            ('1', query("BEGIN")),
            ('1', query("SELECT 1/0")),
            ('1', query("CLOSE c5")),
            ('1', query("ROLLBACK")),
            ('1', parse("q5", "SELECT 'z'::text AS v") + &sync()),
            ('2', bind("c5", "q5") + &sync() + &execute("c5") + &sync()),
        ],
    ];
    let (out, answers) = converse(&fx, &conversations, false);
    assert!(answers[0].contains("nobody approved"), "one portal to the server, one to the proxy:\n{out}");
    assert!(answers[1].contains("****"), "{out}");
    assert!(answers[2].contains("other than ASCII"), "{out}");
    assert!(answers[3].contains("FETCH p: it is a portal the protocol bound"), "{out}");
    assert!(answers[4].contains("nobody approved"), "EXPLAIN DECLARE opened no cursor p:\n{out}");
    assert!(answers[5].contains("****"), "{out}");
    assert!(!answers[6].contains("may exist") && answers[6].contains("SELECT 1"), "names freed:\n{out}");
    assert!(!answers[7].contains("bob@example.com") && count_of(&answers[7], "****") == 2, "{out}");
    for freed in [8, 9] {
        assert!(!answers[freed].contains("may exist") && !answers[freed].contains("tollgate"), "{out}");
    }
    for kept in [10, 11] {
        assert!(answers[kept].contains("may exist") && answers[kept].contains("nobody approved"), "{out}");
    }
    assert!(!answers[12].contains("bob@example.com"), "{out}");
}

/// A savepoint's rollback drops the portals bound since; an Execute of one
/// fails with "portal does not exist", which says nothing of the names its
/// statement would drop (here on a route with no masks, where the proxy
/// sends no Describe of its own first).
#[test]
fn an_execute_of_a_portal_a_savepoint_dropped_frees_no_name() {
    let fx = Pg::start(
        "          approve:\n            - { statement: [delete] }\n",
        "agent",
        &[REVIEWERS, "approval_timeout: 2s"],
    );
    use message::*;
    let conversation = vec![
        ('1', parse("s", "DELETE FROM orders WHERE id = 1") + &sync()),
        ('1', query("BEGIN")),
        ('1', query("SAVEPOINT a")),
        ('1', parse("d", "DEALLOCATE s") + &bind("p", "d") + &sync()),
        ('1', query("ROLLBACK TO a")),
        ('1', execute("p") + &sync()),
        ('1', query("ROLLBACK")),
        ('2', query("PREPARE s AS SELECT 1") + &query("EXECUTE s")),
    ];
    let (out, answers) = converse(&fx, &[conversation], false);
    assert!(answers[0].contains("34000"), "the portal was gone:\n{out}");
    assert!(answers[0].contains("nobody approved"), "EXECUTE s was judged as the DELETE:\n{out}");
}

/// On the extended protocol a client sends Sync right after a COPY's
/// Execute, which the server ignores while it takes the data, and another
/// after the data (libpq does). The proxy keeps its answers in step, and
/// a COPY that fails before it starts leaves the Sync a real one.
#[test]
fn copy_from_stdin_on_the_extended_protocol_keeps_answers_in_step() {
    let fx = Pg::start("", "agent", &[]);
    use message::*;
    let copy = |table: &str| parse("", &format!("COPY {table} FROM STDIN")) + &bind("", "") + &execute("") + &sync();
    let conversations = [
        vec![
            ('G', copy("audit.log")),
            ('1', copy_data("2\tread\n") + &copy_done() + &sync()),
            ('1', query("SELECT 'after the copy'")),
        ],
        vec![('1', copy("no_such_table")), ('1', query("SELECT 'after the copy'"))],
    ];
    let (out, answers) = converse(&fx, &conversations, false);
    assert_eq!(fx.outside("SELECT count(*) FROM audit.log"), "2", "{out}");
    assert!(answers[0].contains("COPY 1"), "{out}");
    assert!(answers[1].contains("no_such_table"), "{out}");
    for answer in &answers {
        assert!(answer.contains("after the copy") && !answer.contains("no longer follow"), "{out}");
    }
}

/// A client may send far more than the server has answered: past a
/// bound on the changes to the names on their way, the proxy waits for the
/// server's answers (asking for them with a Flush), then goes on.
#[test]
fn a_client_that_sends_without_reading_gets_every_answer() {
    let fx = Pg::start(DOCUMENTED_RULES, "agent", &[]);
    let parses = 3 * 1024;
    let conversation = vec![('1', message::parse("", "SELECT 1").repeat(parses) + &message::sync())];
    let (out, answers) = converse(&fx, &[conversation], false);
    assert_eq!(count_of(&answers[0], "1\\x00\\x00\\x00\\x04"), parses, "a ParseComplete each:\n{out}");
    // Python quotes the bytes with ' or ", whichever they hold less of.
    assert!(answers[0].trim_end_matches(['\'', '"']).ends_with("Z\\x00\\x00\\x00\\x05I"), "{out}");
}

/// A cursor's rows are masked whether SQL's FETCH or the protocol's
/// Execute reads them: its query was judged at DECLARE, and a computed
/// column in it may carry a masked one.
#[test]
fn rows_of_a_cursor_are_masked_however_they_are_fetched() {
    let fx = Pg::start(DOCUMENTED_RULES, "agent", &[]);
    use message::*;
    let declare = "DECLARE c CURSOR WITH HOLD FOR SELECT lower(email), email, (SELECT phone FROM users) FROM users";
    let conversations = [
        vec![('1', query(declare)), ('1', query("FETCH ALL c"))],
        vec![('1', query(declare)), ('1', execute("c") + &sync())],
    ];
    let (out, answers) = converse(&fx, &conversations, false);
    for answer in &answers {
        assert_eq!(count_of(answer, "****"), 3, "every column masked:\n{out}");
    }
}

#[test]
fn malformed_startups_and_messages_get_an_error_and_the_proxy_keeps_serving() {
    let fx = Pg::start(DOCUMENTED_RULES, "agent", &[]);
    let packets = [
        "0000000800090000".to_owned(), // protocol 9.0
        "7fffffff00030000".to_owned(), // a 2 GB startup
        startup("user"),               // no value for user
        startup(&format!("user x database {} options -csearch_path=audit", fx.db.name)), // settings outside SQL
        format!("{}{}", startup(&format!("user x database {}", fx.db.name)), "5100000002"), // a Query of length 2
    ];
    let mut argv = vec!["python3".to_owned(), "-c".into(), RAW_CLIENT.into(), fx.pg.port.to_string()];
    argv.extend(packets);
    let out = fx.daemon.run(&fx.token, &argv);
    let answers: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(answers.len(), 5, "{out}");
    assert!(answers[0].contains("unsupported frontend protocol 9.0"), "{out}");
    assert!(answers[1].contains("SFATAL"), "{out}");
    assert!(answers[2].contains("SFATAL"), "{out}");
    assert!(answers[3].contains("startup parameter 'options'"), "{out}");
    assert!(answers[4].contains("08P01"), "a message shorter than its length field: {out}");
    let after = fx.psql(&["SELECT count(*) FROM orders"]);
    assert_eq!(after.stdout.trim(), "3", "the proxy still serves:\n{after}");
}

#[test]
fn pgbench_runs_through_the_proxy_with_every_statement_recorded() {
    let fx = Pg::start(DOCUMENTED_RULES, "agent", &[]);
    let pgbench = fx.pg.binary("pgbench").to_string_lossy().into_owned();
    let init = std::process::Command::new(&pgbench)
        .args(["-i", "-s", "1", "-q", "-h"])
        .arg(fx.pg.socket_dir())
        .args(["-p", &fx.pg.port.to_string(), "-U", "postgres", &fx.db.name])
        .output()
        .expect("pgbench -i");
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    fx.outside(&format!("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {}", fx.db.role));
    let port = fx.pg.port.to_string();
    let out = fx.daemon.run(
        &fx.token,
        &[
            &pgbench,
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "whoever",
            "-n",
            "-S",
            "-M",
            "prepared",
            "-c",
            "2",
            "-t",
            "50",
            &fx.db.name,
        ],
    );
    assert!(out.success() && out.stdout.contains("number of transactions actually processed: 100/100"), "{out}");
    let (show, events) = fx.statements(100);
    let selects = events
        .iter()
        .filter(|e| e["sql"].as_str().is_some_and(|s| s.contains("pgbench_accounts")) && e["outcome"] == "forwarded")
        .count();
    assert_eq!(selects, 100, "{}", pretty(&show));

    // libpq's pipeline mode: statements prepared in one batch and run in
    // the next before the first is answered.
    let script = tempfile::NamedTempFile::new().expect("a pgbench script");
    std::fs::write(
        script.path(),
        "\\set a random(1, 100000)\n\\startpipeline\n\
         SELECT abalance FROM pgbench_accounts WHERE aid = :a;\n\
         SELECT abalance FROM pgbench_accounts WHERE aid = :a + 1;\n\\endpipeline\n",
    )
    .expect("writing the script");
    let script_path = script.path().to_string_lossy().into_owned();
    let argv = [&pgbench, "-h", "127.0.0.1", "-p", &port, "-U", "whoever", "-n", "-f", &script_path, "-M", "prepared"];
    let out = fx.daemon.run(&fx.token, &[&argv[..], &["-c", "2", "-t", "20", &fx.db.name]].concat());
    assert!(out.success() && out.stdout.contains("number of transactions actually processed: 40/40"), "{out}");
    assert!(out.stdout.contains("number of failed transactions: 0"), "{out}");
}

#[test]
fn cancel_requests_reach_the_backend_behind_the_proxy() {
    let fx = Pg::start("", "agent", &[]);
    let log_start = fx.pg.log_len();
    let (out, lines) = fx.extended(&["--cancel-after-ms", "1000", "SELECT pg_sleep(60)", "SELECT 1"]);
    assert_eq!(lines.first().map(|l| &l["error"]["code"]), Some(&Value::from("57014")), "{out}");
    // The server itself cancelled the backend, not the proxy giving up on it.
    let log = fx.pg.log_since(log_start);
    let role = format!("user={} ", fx.db.role);
    assert!(log.lines().any(|l| l.contains(&role) && l.contains("canceling statement due to user request")), "{log}");
    assert_eq!(lines.get(1).map(|l| &l["rows"][0][0]), Some(&Value::from("1")), "{out}");
}

#[test]
fn explain_judges_a_statement_and_policies_refuse_fields_of_another_protocol() {
    let fx = Pg::start(DOCUMENTED_RULES, "agent", &[]);
    let to = format!("127.0.0.1:{}", fx.pg.port);
    let explain =
        |sql: &str| fx.daemon.tollgate(&["policy", "explain", "--identity", "build-bots", "--to", &to, "--sql", sql]);
    let drop = explain("DROP TABLE orders");
    assert!(drop.stdout.contains("refused") && drop.stdout.contains("block[0]"), "{drop}");
    let delete = explain("DELETE FROM orders WHERE id = 1");
    assert!(delete.stdout.contains("held for approval") && delete.stdout.contains("approve[0]"), "{delete}");
    let read = explain("SELECT * FROM orders");
    assert!(read.stdout.contains("passes"), "{read}");

    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("bad.yaml");
    let bad = policy(
        "        - to: \"127.0.0.1/32:5432\"\n          protocol: postgres\n          block: [{ method: DELETE }]\n        - to: \"127.0.0.1/32:80\"\n          protocol: http\n          block: [{ statement: drop }]\n",
        "",
    );
    std::fs::write(&file, bad).expect("writing the policy");
    let check = fx.daemon.tollgate(&["policy", "check", file.to_str().expect("utf-8")]);
    assert!(!check.success(), "{check}");
    let said = format!("{}{}", check.stdout, check.stderr);
    assert!(said.contains("method applies to HTTP routes, not postgres"), "{check}");
    assert!(said.contains("statement applies to postgres routes, not http"), "{check}");
}

#[test]
fn copy_is_judged_as_the_insert_or_the_read_it_is() {
    let rows = tempfile::NamedTempFile::new().expect("a CSV file");
    std::fs::write(rows.path(), "4,fig\n5,kiwi\n").expect("writing the rows");
    let copy_in = format!("\\copy orders FROM '{}' CSV", rows.path().display());

    let governed = Pg::start(DOCUMENTED_RULES, "agent", &[REVIEWERS, "approval_timeout: 2s"]);
    let out = governed.psql(&[copy_in.as_str(), "COPY orders TO STDOUT", "SELECT count(*) FROM orders"]);
    assert!(out.stderr.contains("nobody approved the statement"), "COPY FROM waits as an insert does:\n{out}");
    assert!(out.stderr.contains("COPY ... TO STDOUT sends rows the route's masks cannot rewrite"), "{out}");
    assert_eq!(out.stdout.trim(), "3", "{out}");
    assert_eq!(governed.outside("SELECT count(*) FROM orders"), "3");

    let open = Pg::start("", "agent", &[]);
    let out = open.psql(&[copy_in.as_str(), "COPY orders TO STDOUT"]);
    assert!(out.stdout.contains("4\tfig") && out.stdout.contains("1\tapple"), "{out}");
    assert_eq!(open.outside("SELECT count(*) FROM orders"), "5");
}

#[test]
fn the_proxy_speaks_verified_tls_to_the_server_when_the_route_says_so() {
    let pg = server();
    let verified = Pg::start(
        &format!("          upstream_tls: {{ mode: require, ca_file: {} }}\n", pg.ca.display()),
        "agent",
        &[],
    );
    let out = verified.psql(&["SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"]);
    assert_eq!(out.stdout.trim(), "t", "the proxy's connection to the server is TLS:\n{out}");

    // A CA that did not sign the server's certificate: no login, so no credential is sent.
    let dir = tempfile::tempdir().expect("temp dir");
    let other = harness::pki::Pki::new(dir.path(), "IP:127.0.0.1");
    let unverified = Pg::start(
        &format!("          upstream_tls: {{ mode: require, ca_file: {} }}\n", other.ca.display()),
        "agent",
        &[],
    );
    let log_start = pg.log_len();
    let out = unverified.psql(&["SELECT 1"]);
    assert!(out.stderr.contains("TLS to the upstream failed"), "{out}");
    let log = pg.log_since(log_start);
    assert!(!log.contains(&format!("connection authorized: user={}", unverified.db.role)), "{log}");
}
