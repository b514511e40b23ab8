//! PostgreSQL through the proxy (`protocol: postgres`): the client's
//! startup ends at the proxy, which logs in upstream with the route's
//! credential; then every statement, simple or extended protocol, is judged
//! with PostgreSQL's own parser before the server sees it, and results are
//! masked on the way back.
//!
//! A refused statement never reaches the server: in its place the proxy
//! sends a fixed text that fails to parse, and turns the server's error for
//! it into its own (SQLSTATE 42501, naming the rule). The server thereby
//! keeps the protocol's state exactly as after any failed statement: it
//! skips to the next Sync, aborts a transaction block, and says so in its
//! ReadyForQuery, so clients go on as after any error.
//!
//! Responses are matched to what caused them by order: every message sent
//! upstream that the server answers leaves an [`Expect`] in a queue the
//! response side reads from, and what the server skips after an error is
//! dropped from it by the server's own rules. An answer that does not fit
//! ends the connection: the proxy would no longer know what runs.

mod catalog;
mod names;
mod startup;
mod wire;

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, ReadHalf, WriteHalf},
    net::TcpStream,
    sync::{mpsc, watch},
};

use self::{
    names::{Bound, Change, ChangeId, Desync, Lookup, Names, Outcome, Portal, Statement},
    startup::{Opening, Startup, Stream},
    wire::{Fields, Message},
};
use super::{
    Governed, ProxyCtx,
    record::{ProxyRecord, Unapproved},
};
use crate::{
    approval,
    policy::{
        route::{Mask, Route},
        sql::{self as statement, Analysis, AnalysisCache, SearchPath, Verdict},
    },
    store::{FieldList, RecordKind, RecordVerdict, SessionId},
};

/// Sent upstream in place of a refused statement: it never parses, so the
/// server fails it the way it fails any statement, and runs nothing.
const REFUSED_MARKER: &str = "tollgate_refused_this_statement";

/// SQLSTATE of a refusal by policy: insufficient_privilege.
const REFUSED_CODE: &str = "42501";

/// Prepared statements and cursors one string may name: each is looked up
/// or becomes a change to follow (a bound on the work one message makes).
const MAX_NAMES_PER_STATEMENT: usize = 64;

/// Why a name is not looked up while the server's answers that decide it are on their way.
const UNSETTLED: &str = "what it holds depends on messages the server has not answered yet; \
    wait for their answers (the ReadyForQuery after Sync) before using it";

/// What the PostgreSQL path shares across connections.
#[derive(Default)]
pub struct Shared {
    client_tls: startup::ClientTls,
    cancels: Mutex<HashMap<(i32, i32), CancelTarget>>,
}

/// Where a cancel key the proxy gave out leads.
struct CancelTarget {
    session: SessionId,
    upstream: SocketAddr,
    key: (i32, i32),
}

/// Serves one governed PostgreSQL connection (its stream has TCP_NODELAY
/// from the proxy's listener).
pub async fn serve(ctx: Arc<ProxyCtx>, governed: Governed, stream: TcpStream) {
    let mut client: Stream = Box::new(stream);
    let opening = match startup::open_client(&ctx.postgres.client_tls, &mut client).await {
        Ok(opening) => opening,
        Err(why) => {
            refuse_connection(&ctx, &governed, &mut client, "08P01", &why.to_string(), None).await;
            return;
        }
    };
    match opening {
        Opening::Cancel { pid, secret } => cancel(&ctx, &governed, pid, secret).await,
        Opening::Session(startup) => session(ctx, governed, client, startup).await,
    }
}

/// Ends a connection before its session started: a FATAL error for the
/// client, a record and a log line for the host.
async fn refuse_connection(
    ctx: &ProxyCtx,
    governed: &Governed,
    client: &mut Stream,
    code: &str,
    why: &str,
    startup: Option<&Startup>,
) {
    tracing::warn!(session = %governed.session, destination = %governed.destination, %why, "PostgreSQL connection refused");
    let _ = client.write_all(&wire::fatal(code, &format!("tollgate: {why}"))).await;
    let _ = client.shutdown().await;
    let mut record = ProxyRecord::new(RecordKind::Sql, governed, connection_fields(startup));
    record.set("outcome", "refused");
    record.set("error", why);
    record.finish(&ctx.log, governed, RecordVerdict::DENY);
}

fn connection_fields(startup: Option<&Startup>) -> FieldList {
    let mut fields = FieldList::new();
    fields.set("event", "connect");
    if let Some(startup) = startup {
        fields.set("user", startup.user.clone());
        fields.set("database", startup.database.clone());
    }
    fields
}

/// A cancel request: passed to the server behind the key, if the key is
/// one this proxy gave to the same session.
async fn cancel(ctx: &ProxyCtx, governed: &Governed, pid: i32, secret: i32) {
    let target = ctx.postgres.cancels.lock().ok().and_then(|cancels| {
        cancels
            .get(&(pid, secret))
            .filter(|target| target.session == governed.session)
            .map(|target| (target.upstream, target.key))
    });
    let mut record = ProxyRecord::new(RecordKind::Sql, governed, FieldList::new());
    record.set("event", "cancel");
    match target {
        Some((upstream, (pid, secret))) => {
            if let Err(e) = startup::cancel(upstream, pid, secret).await {
                record.set("error", e.to_string());
            }
            record.set("outcome", "forwarded");
            record.finish(&ctx.log, governed, RecordVerdict::ALLOW);
        }
        None => {
            record.set("outcome", "refused");
            record.set("error", "no connection of this session has that cancel key");
            record.finish(&ctx.log, governed, RecordVerdict::DENY);
        }
    }
}

/// Removes a connection's cancel key when it ends.
struct CancelKey<'a> {
    shared: &'a Shared,
    key: (i32, i32),
}

impl Drop for CancelKey<'_> {
    fn drop(&mut self) {
        if let Ok(mut cancels) = self.shared.cancels.lock() {
            cancels.remove(&self.key);
        }
    }
}

async fn session(ctx: Arc<ProxyCtx>, governed: Governed, mut client: Stream, startup: Startup) {
    let route = governed.route.route.clone();
    let upstream = match startup::login(&ctx, &governed, &startup, Some(&mut client)).await {
        Ok(upstream) => upstream,
        Err(startup::LoginError::Server(message, body)) => {
            tracing::warn!(session = %governed.session, %message, "the PostgreSQL server refused the proxy's login");
            let _ = client.write_all(&wire::frame(b'E', &body)).await;
            let mut record = ProxyRecord::new(RecordKind::Sql, &governed, connection_fields(Some(&startup)));
            record.set("outcome", "error");
            record.set("error", format!("the server refused the login: {message}"));
            record.finish(&ctx.log, &governed, RecordVerdict::DENY);
            return;
        }
        Err(startup::LoginError::Other(why)) => {
            refuse_connection(&ctx, &governed, &mut client, "08006", &why, Some(&startup)).await;
            return;
        }
    };
    let startup::Upstream { stream: mut server, key, greeting, status, role } = upstream;

    // Unqualified table names resolve through the search path: table rules
    // need the connection's, and the proxy refuses statements that change it.
    let table_rules = route.block.iter().chain(&route.approve).chain(&route.allow).any(|m| !m.table.is_empty());
    let search_path = if table_rules {
        match catalog::search_path(&mut server).await {
            Ok(path) => SearchPath(Some(path)),
            Err(why) => {
                refuse_connection(&ctx, &governed, &mut client, "08006", &why, Some(&startup)).await;
                return;
            }
        }
    } else {
        SearchPath::default()
    };

    let proxy_key = (rand::random::<i32>() & i32::MAX, rand::random::<i32>());
    if let (Some(server_key), Ok(mut cancels)) = (key, ctx.postgres.cancels.lock()) {
        cancels.insert(
            proxy_key,
            CancelTarget { session: governed.session.clone(), upstream: governed.destination, key: server_key },
        );
    }
    let _cancel_key = CancelKey { shared: &ctx.postgres, key: proxy_key };

    let mut hello = wire::authentication_ok();
    for message in &greeting {
        message.write_to(&mut hello);
    }
    hello.extend_from_slice(&wire::backend_key(proxy_key.0, proxy_key.1));
    hello.extend_from_slice(&wire::ready(status));
    if client.write_all(&hello).await.is_err() {
        return;
    }
    let mut opened = ProxyRecord::new(RecordKind::Sql, &governed, connection_fields(Some(&startup)));
    opened.set("role", role);
    opened.set("outcome", "connected");
    opened.finish(&ctx.log, &governed, RecordVerdict::ALLOW);

    let (client_read, client_write) = tokio::io::split(client);
    let (server_read, server_write) = tokio::io::split(server);
    let (expect_tx, expect_rx) = mpsc::unbounded_channel();
    let names = Names::default();
    let (copy_tx, copy_rx) = watch::channel((0, Copying::Over));
    let mut front = Front {
        ctx: &ctx,
        governed: &governed,
        route: &route,
        reader: BufReader::new(client_read),
        server: server_write,
        outgoing: Vec::new(),
        expect: expect_tx,
        search_path,
        names: &names,
        analyses: AnalysisCache::default(),
        described: None,
        copy_window: None,
        copies: 0,
        copying: copy_rx,
    };
    let mut back = Back {
        ctx: &ctx,
        governed: &governed,
        route: &route,
        reader: BufReader::new(server_read),
        client: client_write,
        outgoing: Vec::new(),
        expect: expect_rx,
        names: &names,
        queue: VecDeque::new(),
        plan: None,
        catalog: catalog::Catalog::new(&startup),
        skipping: false,
        copying: copy_tx,
    };
    let mut backward = Box::pin(back.run());
    let ended = tokio::select! {
        ended = front.run() => Some(ended),
        _ = &mut backward => None,
    };
    if let Some(ended) = &ended {
        // The client is done (or broke the protocol): end the server's side
        // and let the answers already on their way finish their records.
        front.outgoing.extend_from_slice(&wire::frame(b'X', &[]));
        let _ = front.flush().await;
        let _ = front.server.shutdown().await;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), &mut backward).await;
        drop(backward);
        if let Err(why) = ended {
            tracing::warn!(session = %governed.session, %why, "PostgreSQL client broke the protocol; connection closed");
            back.outgoing.extend_from_slice(&wire::fatal("08P01", &format!("tollgate: {why}")));
            let _ = back.flush().await;
        }
    } else {
        drop(backward);
    }
    drop(front);
    back.finish_all("the connection ended before the server answered");
}

/// What the server will answer to something sent upstream, in order.
enum Expect {
    /// `ParseComplete`, `BindComplete` or `CloseComplete`, which confirm
    /// the change to the names the message makes.
    Done(ChangeId),
    /// A statement's description: `ParameterDescription`, then `RowDescription` or `NoData`.
    DescribeStatement(Option<Arc<Analysis>>),
    /// A portal's description (`swallow`: the proxy asked, not the client).
    DescribePortal { analysis: Option<Arc<Analysis>>, swallow: bool },
    /// An execution: rows, then its completion.
    Execute(Box<Running>),
    /// A simple query: results until `ReadyForQuery`.
    Query(Box<Running>),
    /// `ReadyForQuery` after the client's Sync; the server skips to it
    /// after an error in an extended-protocol message.
    Sync,
    /// The marker Parse sent for a refused statement: its error is replaced.
    Refused(Box<Refusal>),
    /// The marker Query sent for a refused Query: its error is replaced,
    /// and its `ReadyForQuery` ([`Expect::Ready`]) follows.
    RefusedQuery(Box<Refusal>),
    /// The `ReadyForQuery` that ends a refused Query.
    Ready,
}

/// Whether a `COPY ... FROM STDIN` the client started is taking data, by
/// the copy's number: the server ignores a Sync while it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Copying {
    Active,
    Over,
}

/// A statement on its way, with its record.
struct Running {
    record: ProxyRecord,
    analysis: Option<Arc<Analysis>>,
    /// What it does to the prepared statements and cursors (`PREPARE`,
    /// `DEALLOCATE`, `DECLARE`, `CLOSE`), confirmed when it completes.
    changes: Option<ChangeId>,
    /// The number of the `COPY ... FROM STDIN` it is.
    copy: Option<u64>,
    rows: u64,
    masked: u64,
    commands: Vec<String>,
    error: Option<String>,
    /// The server's error said a prepared statement or cursor is not there.
    name_missing: bool,
    /// Set when its rows were withheld: the error the client gets instead.
    withheld: Option<String>,
}

/// What the client is told instead of a refused statement.
struct Refusal {
    record: ProxyRecord,
    code: &'static str,
    message: String,
    verdict: RecordVerdict,
    outcome: &'static str,
}

impl Refusal {
    /// A statement refused by the route's rules (42501, the rule noted in
    /// the record) or, when it did not `parse`, by PostgreSQL's parser (42601).
    fn of_statement(mut record: ProxyRecord, parsed: bool, why: String) -> Self {
        if !parsed {
            return Self { record, code: "42601", message: why, verdict: RecordVerdict::DENY, outcome: "refused" };
        }
        record.hit(&why);
        let message = format!("statement refused by policy ({why})");
        Self { record, code: REFUSED_CODE, message, verdict: RecordVerdict::Block, outcome: "blocked" }
    }

    /// A held statement that was not approved.
    fn denied(record: ProxyRecord, message: String) -> Self {
        Self { record, code: REFUSED_CODE, message, verdict: RecordVerdict::DENY, outcome: "denied" }
    }

    fn finish(self, ctx: &ProxyCtx, governed: &Governed) {
        let Self { mut record, code, message, verdict, outcome } = self;
        tracing::warn!(session = %governed.session, destination = %governed.destination, code, %message, "statement refused");
        record.set("outcome", outcome);
        record.set("error", message);
        record.finish(&ctx.log, governed, verdict);
    }
}

impl Running {
    fn new(record: ProxyRecord, analysis: Option<Arc<Analysis>>) -> Self {
        Self {
            record,
            analysis,
            changes: None,
            copy: None,
            rows: 0,
            masked: 0,
            commands: Vec::new(),
            error: None,
            name_missing: false,
            withheld: None,
        }
    }

    /// Writes the record: forwarded (with the server's error, if it failed)
    /// or withheld, or cut short by `ended`.
    fn finish(self, ctx: &ProxyCtx, governed: &Governed, ended: Option<&str>) {
        let Self { mut record, rows, masked, commands, error, withheld, .. } = self;
        record.set("rows", rows);
        if masked > 0 {
            record.set("masked", masked);
        }
        if !commands.is_empty() {
            let affected: u64 = commands.iter().filter_map(|c| c.rsplit(' ').next()?.parse::<u64>().ok()).sum();
            record.set("affected", affected);
            record.set("commands", commands);
        }
        let (outcome, verdict) = match (&withheld, &error, ended) {
            (Some(why), _, _) => {
                record.set("error", why.clone());
                ("withheld", RecordVerdict::DENY)
            }
            (None, Some(error), _) => {
                record.set("error", error.clone());
                ("error", RecordVerdict::ALLOW)
            }
            (None, None, Some(ended)) => {
                record.set("error", ended);
                ("incomplete", RecordVerdict::ALLOW)
            }
            (None, None, None) => ("forwarded", RecordVerdict::ALLOW),
        };
        record.set("outcome", outcome);
        record.finish(&ctx.log, governed, verdict);
    }
}

impl Expect {
    /// The change to the names its answer confirms.
    fn change(&self) -> Option<ChangeId> {
        match self {
            Self::Done(id) => Some(*id),
            Self::Execute(running) | Self::Query(running) => running.changes,
            _ => None,
        }
    }

    /// Writes the record an answer will never complete.
    fn abandon(self, ctx: &ProxyCtx, governed: &Governed, why: &str) {
        match self {
            Self::Execute(running) | Self::Query(running) => running.finish(ctx, governed, Some(why)),
            Self::Refused(refusal) | Self::RefusedQuery(refusal) => refusal.finish(ctx, governed),
            _ => {}
        }
    }
}

/// The client-to-server side: reads each message, judges statements, and
/// sends on what may go (or the marker in place of what may not).
struct Front<'a> {
    ctx: &'a ProxyCtx,
    governed: &'a Governed,
    route: &'a Route,
    reader: BufReader<ReadHalf<Stream>>,
    server: WriteHalf<Stream>,
    /// Written upstream when the client has nothing more buffered.
    outgoing: Vec<u8>,
    expect: mpsc::UnboundedSender<Expect>,
    search_path: SearchPath,
    /// The prepared statements and portals, so what a portal or `EXECUTE`
    /// runs is judged.
    names: &'a Names,
    /// What the statements sent so far do, by their normalized text.
    analyses: AnalysisCache,
    /// The portal the client's previous message described.
    described: Option<String>,
    /// The `COPY ... FROM STDIN` sent last, by number, until the client
    /// ends its data; and what the server's side says of it.
    copy_window: Option<u64>,
    /// COPY FROM STDIN statements sent so far (their numbers).
    copies: u64,
    copying: watch::Receiver<(u64, Copying)>,
}

impl Front<'_> {
    /// Until the client ends; an error is a protocol violation, for the client.
    async fn run(&mut self) -> Result<(), String> {
        loop {
            let message = match wire::read(&mut self.reader, wire::MAX_CLIENT_MESSAGE).await {
                Ok(Some(message)) => message,
                Ok(None) | Err(wire::ReadError::Io(_)) => return Ok(()),
                Err(e) => return Err(e.to_string()),
            };
            let described = self.described.take();
            if self.names.crowded() {
                self.wait_for_answers().await.map_err(|e| format!("the server connection failed: {e}"))?;
            }
            if self.copy_window.is_some() && !matches!(message.tag, b'd' | b'c' | b'f' | b'H' | b'X') {
                let copying = self.copy_state().await.map_err(|e| format!("the server connection failed: {e}"))?;
                match (copying, message.tag) {
                    // The server ignores it: it would answer nothing.
                    (Copying::Active, b'S') => continue,
                    (Copying::Active, other) => {
                        return Err(format!(
                            "message type '{}' during COPY FROM STDIN, which takes only CopyData, CopyDone, CopyFail, Flush and Sync",
                            char::from(other)
                        ));
                    }
                    (Copying::Over, _) => self.copy_window = None,
                }
            }
            match message.tag {
                b'Q' => {
                    self.query(&message).await.map_err(|e| e.to_string())?;
                    // Its statements' failure does not stop what follows.
                    self.names.end_batch();
                }
                b'P' => self.parse(&message).map_err(|e| e.to_string())?,
                b'B' => self.bind(&message).map_err(|e| e.to_string())?,
                b'E' => self.execute(&message, described).await.map_err(|e| e.to_string())?,
                b'D' => self.describe(&message).map_err(|e| e.to_string())?,
                b'C' => self.close(&message).map_err(|e| e.to_string())?,
                b'S' => {
                    self.forward(Expect::Sync, &message);
                    self.names.end_batch();
                }
                // Flush, and the data of a COPY FROM STDIN the rules let start.
                b'H' | b'd' => message.write_to(&mut self.outgoing),
                b'c' | b'f' => {
                    self.copy_window = None;
                    message.write_to(&mut self.outgoing);
                }
                b'X' => return Ok(()),
                b'F' => {
                    let refusal = Refusal {
                        record: self.record(None, None),
                        code: REFUSED_CODE,
                        message: "the fast-path function call names a function by number, which no rule can judge"
                            .to_owned(),
                        verdict: RecordVerdict::Block,
                        outcome: "blocked",
                    };
                    self.send_refusal(refusal, b'Q');
                }
                other => return Err(format!("unexpected message type '{}' from the client", char::from(other))),
            }
            if self.reader.buffer().is_empty() {
                self.flush().await.map_err(|e| format!("the server connection failed: {e}"))?;
            }
        }
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.outgoing.is_empty() {
            self.server.write_all(&self.outgoing).await?;
            self.outgoing.clear();
        }
        self.server.flush().await
    }

    /// Whether the server takes data for the `COPY ... FROM STDIN` sent
    /// last: it answers that at once (CopyInResponse or an error, both
    /// flushed), and the server's side says so.
    async fn copy_state(&mut self) -> std::io::Result<Copying> {
        let Some(copy) = self.copy_window else { return Ok(Copying::Over) };
        self.flush().await?;
        match self.copying.wait_for(|(number, _)| *number == copy).await {
            Ok(state) => Ok(state.1),
            Err(_) => Err(std::io::Error::other("the server's side ended")),
        }
    }

    /// Sends what the client sent so far with a Flush, so the server
    /// answers it, and waits until enough of the changes to the names are
    /// settled (a client that sends without reading waits here).
    async fn wait_for_answers(&mut self) -> std::io::Result<()> {
        while self.names.crowded() {
            self.outgoing.extend_from_slice(&wire::frame(b'H', &[]));
            self.flush().await?;
            self.names.settled().await;
        }
        Ok(())
    }

    /// Queues what the server will answer to the client's `message`, then the message.
    fn forward(&mut self, expect: Expect, message: &Message) {
        let _ = self.expect.send(expect);
        message.write_to(&mut self.outgoing);
    }

    /// Queues what the server will answer to `bytes`, then `bytes`.
    fn send(&mut self, expect: Expect, bytes: &[u8]) {
        // The response side ends only with the connection; then nothing waits.
        let _ = self.expect.send(expect);
        self.outgoing.extend_from_slice(bytes);
    }

    /// Judges SQL text: parsed, with what `EXECUTE` runs, by the route's
    /// rules. Also gives the text normalized, for the record.
    fn judge(&mut self, sql: &str) -> (String, Result<Arc<Analysis>, String>, Verdict) {
        let (normalized, analysis) = self.analyses.analyze(sql);
        let mut analysis = match analysis {
            Ok(analysis) => analysis,
            Err(e) => {
                let verdict = Verdict::Refuse(format!("the statement does not parse: {e}"));
                return (normalized, Err(e), verdict);
            }
        };
        let names: Vec<&str> = (analysis.prepares.iter().chain(&analysis.executes).chain(&analysis.fetches))
            .chain(analysis.deallocates.iter().flatten())
            .chain(analysis.closes.iter().flatten())
            .chain(analysis.declares.iter().map(|(name, _)| name))
            .map(String::as_str)
            .collect();
        if names.len() > MAX_NAMES_PER_STATEMENT {
            let why = format!(
                "it names {} prepared statements or cursors; the proxy follows at most {MAX_NAMES_PER_STATEMENT} in one string",
                names.len()
            );
            return (normalized, Ok(analysis), Verdict::Refuse(why));
        }
        if let Some(name) = names.iter().find(|name| wire::server_name(name) != Some(**name)) {
            let why = format!(
                "the name {name:?} is not ASCII of at most {} bytes, which the server could read as another",
                wire::MAX_NAME
            );
            return (normalized, Ok(analysis), Verdict::Refuse(why));
        }
        // A portal the protocol bound runs its statement when FETCH reads it.
        if let Some(name) = analysis.fetches.iter().find(|name| match self.names.portal(name) {
            Lookup::Absent => false,
            Lookup::Known(portal) => !matches!(portal.as_ref(), Portal::Cursor { .. }),
            Lookup::Unsettled => true,
        }) {
            let why = format!("FETCH {name}: it is a portal the protocol bound, which Execute runs");
            return (normalized, Ok(analysis), Verdict::Refuse(why));
        }
        // The server would refuse a name in use and keep what it holds;
        // the proxy must know what that is.
        if let Some(name) = analysis.prepares.iter().find(|name| self.statement_may_exist(name)) {
            let why = format!("PREPARE {name}: a statement of that name may exist already");
            return (normalized, Ok(analysis), Verdict::Refuse(why));
        }
        if let Some((name, _)) =
            analysis.declares.iter().find(|(name, _)| !matches!(self.names.portal(name), Lookup::Absent))
        {
            let why = format!("DECLARE {name}: a portal of that name may exist already");
            return (normalized, Ok(analysis), Verdict::Refuse(why));
        }
        // The client's side tells one copy's data from the next's only by
        // the CopyDone that ends it.
        if analysis.copies_in > 1 {
            let why = "more than one COPY FROM STDIN in one string".to_owned();
            return (normalized, Ok(analysis), Verdict::Refuse(why));
        }
        if analysis.executes.is_empty() {
            let (route, path) = (self.route, &self.search_path);
            if let Some(verdict) =
                self.analyses.verdict(&normalized, |analysis| statement::judge(route, analysis, path))
            {
                return (normalized, Ok(analysis), verdict);
            }
        } else {
            // What `EXECUTE` runs depends on the connection's prepared
            // statements at the time: judged anew each time.
            let mut whole = Analysis::clone(&analysis);
            for name in &analysis.executes {
                let why = match self.names.statement(name) {
                    Lookup::Known(prepared) => {
                        whole.absorb(&prepared.analysis);
                        continue;
                    }
                    Lookup::Absent => {
                        format!("EXECUTE {name}: no statement of that name was prepared through the proxy")
                    }
                    Lookup::Unsettled => format!("EXECUTE {name}: {UNSETTLED}"),
                };
                return (normalized, Ok(Arc::new(whole)), Verdict::Refuse(why));
            }
            analysis = Arc::new(whole);
        }
        let verdict = statement::judge(self.route, &analysis, &self.search_path);
        (normalized, Ok(analysis), verdict)
    }

    /// The prepared statements and cursors a statement on its way creates
    /// and drops, to be confirmed when it completes. SQL's `PREPARE` and
    /// `DEALLOCATE` share their names with the protocol's prepared
    /// statements, `DECLARE` and `CLOSE` with its portals.
    fn note_names(&mut self, analysis: &Arc<Analysis>) -> Option<ChangeId> {
        if analysis.deallocates.is_empty()
            && analysis.prepares.is_empty()
            && analysis.declares.is_empty()
            && analysis.closes.is_empty()
        {
            return None;
        }
        let dropped = analysis.deallocates.iter().map(|name| match name {
            Some(name) => Change::Statement(name.clone(), None),
            None => Change::NoStatements,
        });
        // Each is judged by the whole string's reads and writes (which part
        // is its body is not told apart), but a body names no prepared
        // statement or cursor and copies nothing in: running it must not
        // replay what the rest of the string does to names.
        let body = (!analysis.prepares.is_empty()).then(|| {
            Arc::new(Analysis {
                prepares: Vec::new(),
                executes: Vec::new(),
                deallocates: Vec::new(),
                declares: Vec::new(),
                closes: Vec::new(),
                fetches: Vec::new(),
                copies_in: 0,
                ..Analysis::clone(analysis)
            })
        });
        let prepared = analysis.prepares.iter().filter_map(|name| {
            let statement = Statement { sql: format!("EXECUTE {name}"), analysis: body.clone()?, judged: None };
            Some(Change::Statement(name.clone(), Some(Arc::new(statement))))
        });
        let closed = analysis.closes.iter().map(|name| match name {
            Some(name) => Change::Portal(name.clone(), None),
            None => Change::NoPortals,
        });
        let declared = analysis
            .declares
            .iter()
            .map(|(name, hold)| Change::Portal(name.clone(), Some(Arc::new(Portal::Cursor { hold: *hold }))));
        Some(self.names.change(dropped.chain(prepared).chain(closed).chain(declared)))
    }

    /// A statement let through, with what it does to names and whether it
    /// is a COPY taking data.
    fn on_its_way(&mut self, record: ProxyRecord, analysis: Arc<Analysis>) -> Box<Running> {
        let changes = self.note_names(&analysis);
        let copy = self.note_copy(&analysis);
        let mut running = Running::new(record, Some(analysis));
        (running.changes, running.copy) = (changes, copy);
        Box::new(running)
    }

    /// Opens the window of a `COPY ... FROM STDIN` on its way: its number.
    fn note_copy(&mut self, analysis: &Analysis) -> Option<u64> {
        if analysis.copies_in == 0 {
            return None;
        }
        self.copies += 1;
        self.copy_window = Some(self.copies);
        Some(self.copies)
    }

    /// May the server hold a prepared statement under `name`?
    fn statement_may_exist(&self, name: &str) -> bool {
        !matches!(self.names.statement(name), Lookup::Absent)
    }

    /// A statement's record; `normalized`: its text with constants as `$n`
    /// (the record keeps what was asked, not the data in it).
    fn record(&self, normalized: Option<String>, analysis: Option<&Analysis>) -> ProxyRecord {
        let mut fields = FieldList::new();
        fields.set("event", "statement");
        if let Some(normalized) = normalized {
            fields.set("sql", normalized);
        }
        if let Some(analysis) = analysis {
            fields.set("statements", json!(analysis.kinds));
        }
        ProxyRecord::new(RecordKind::Sql, self.governed, fields)
    }

    async fn query(&mut self, message: &Message) -> Result<(), wire::Malformed> {
        let sql = Fields::new(&message.body).cstr("Query")?;
        let (normalized, analysis, verdict) = self.judge(&sql);
        let mut record = self.record(Some(normalized), analysis.as_deref().ok());
        let analysis = match (analysis, verdict) {
            (analysis, Verdict::Refuse(why)) => {
                self.send_refusal(Refusal::of_statement(record, analysis.is_ok(), why), b'Q');
                return Ok(());
            }
            (Ok(analysis), Verdict::Hold(rule)) => {
                record.hit(&rule);
                let shown = mask_text(self.route, &sql).0;
                if let Err(message) = self.approve(&mut record, &rule, &sql, Some(format!("sql: {shown}"))).await {
                    self.send_refusal(Refusal::denied(record, message), b'Q');
                    return Ok(());
                }
                analysis
            }
            (Ok(analysis), Verdict::Pass) => analysis,
            // Only a statement that parsed can be held or passed.
            (Err(_), _) => return Ok(()),
        };
        let running = self.on_its_way(record, analysis);
        self.forward(Expect::Query(running), message);
        Ok(())
    }

    /// Sends the marker in the form of the refused message: a Query (then
    /// the server's ReadyForQuery ends it) or a Parse.
    fn send_refusal(&mut self, refusal: Refusal, form: u8) {
        if form == b'Q' {
            self.send(Expect::RefusedQuery(Box::new(refusal)), &wire::query(REFUSED_MARKER));
        } else {
            // The Parse fails whatever the name, so it creates nothing.
            self.send(Expect::Refused(Box::new(refusal)), &wire::parse("tollgate_refused", REFUSED_MARKER));
        }
    }

    fn parse(&mut self, message: &Message) -> Result<(), wire::Malformed> {
        let mut fields = Fields::new(&message.body);
        let name = fields.name("Parse")?;
        let sql = fields.cstr("Parse")?;
        let (normalized, analysis, mut verdict) = self.judge(&sql);
        // The server refuses a name in use and keeps what it holds; were
        // the proxy to take the new text, it would judge what does not run.
        if !name.is_empty() && self.statement_may_exist(&name) {
            verdict = Verdict::Refuse(format!("a statement named {name} may exist already"));
        }
        match (verdict, analysis) {
            // Parsing runs nothing: a held statement waits at its Execute,
            // where its parameters are known.
            (verdict @ (Verdict::Pass | Verdict::Hold(_)), Ok(analysis)) => {
                let statement = Statement { sql, analysis, judged: Some((normalized, verdict)) };
                let id = self.names.change([Change::Statement(name, Some(Arc::new(statement)))]);
                self.forward(Expect::Done(id), message);
            }
            (verdict, analysis) => {
                let why = match verdict {
                    Verdict::Refuse(why) => why,
                    // A statement that does not parse is refused by judge().
                    _ => "the statement does not parse".to_owned(),
                };
                let record = self.record(Some(normalized), analysis.as_deref().ok());
                let refusal = Refusal::of_statement(record, analysis.is_ok(), why);
                // Under the client's own name: the server drops the unnamed
                // statement at any Parse, and keeps a named one whose new
                // Parse fails. (The proxy may go on knowing the unnamed one:
                // a name it knows holds what it judged, or nothing.)
                self.send(Expect::Refused(Box::new(refusal)), &wire::parse(&name, REFUSED_MARKER));
            }
        }
        Ok(())
    }

    fn bind(&mut self, message: &Message) -> Result<(), wire::Malformed> {
        let mut fields = Fields::new(&message.body);
        let portal = fields.name("Bind")?;
        let statement = fields.name("Bind")?;
        let format_count = fields.i16("Bind")?.max(0) as usize;
        let formats = (0..format_count).map(|_| fields.i16("Bind")).collect::<Result<Vec<_>, _>>()?;
        let value_count = fields.i16("Bind")?.max(0) as usize;
        let mut parameters = Vec::with_capacity(value_count);
        for index in 0..value_count {
            let format = match formats.len() {
                0 => 0,
                1 => formats[0],
                _ => formats.get(index).copied().unwrap_or(0),
            };
            let shown = match fields.value("Bind")? {
                None => "NULL".to_owned(),
                Some(value) if format == 0 => mask_text(self.route, &String::from_utf8_lossy(&value)).0,
                Some(value) => format!("\\x{}", value.iter().map(|b| format!("{b:02x}")).collect::<String>()),
            };
            parameters.push(shown);
        }
        // The server binds the portal to what the name holds now.
        let bound = match self.names.statement(&statement) {
            Lookup::Known(statement) => Portal::Bound(Bound { statement, parameters }),
            Lookup::Absent => Portal::Unjudged("its statement is not one the proxy knows".to_owned()),
            Lookup::Unsettled => Portal::Unjudged(format!("its statement {statement:?}: {UNSETTLED}")),
        };
        let id = self.names.change([Change::Portal(portal, Some(Arc::new(bound)))]);
        self.forward(Expect::Done(id), message);
        Ok(())
    }

    async fn execute(&mut self, message: &Message, described: Option<String>) -> Result<(), wire::Malformed> {
        let portal = Fields::new(&message.body).name("Execute")?;
        let found = self.names.portal(&portal);
        let bound = match &found {
            Lookup::Known(known) => match known.as_ref() {
                Portal::Bound(bound) => Ok(Some(bound)),
                Portal::Cursor { .. } => Ok(None),
                Portal::Unjudged(why) => Err(why.as_str()),
            },
            Lookup::Absent => Ok(None),
            Lookup::Unsettled => Err(UNSETTLED),
        };
        let bound = match bound {
            Ok(bound) => bound,
            // What would run cannot be judged.
            Err(why) => {
                let why = format!("portal {portal:?}: {why}");
                self.send_refusal(Refusal::of_statement(self.record(None, None), true, why), b'P');
                return Ok(());
            }
        };
        let Some(Bound { statement, parameters }) = bound else {
            // Not a portal the proxy bound: none (the server says so
            // itself), or a cursor, whose query was judged at its DECLARE.
            // Its columns are masked as a query the proxy does not know.
            let record = self.record(None, None);
            if !self.route.mask.is_empty() {
                let expect = Expect::DescribePortal { analysis: None, swallow: true };
                self.send(expect, &wire::describe_portal(&portal));
            }
            self.forward(Expect::Execute(Box::new(Running::new(record, None))), message);
            return Ok(());
        };
        let sql = &statement.sql;
        // What `EXECUTE` runs is looked up by the server as it runs, and
        // whether a name is free is known only now.
        let rejudged = statement.judged.is_some() && statement.analysis.depends_on_names();
        let (normalized, analysis, verdict) = match &statement.judged {
            Some((normalized, verdict)) if !rejudged => {
                (normalized.clone(), statement.analysis.clone(), verdict.clone())
            }
            Some(_) => match self.judge(sql) {
                (normalized, Ok(analysis), verdict) => (normalized, analysis, verdict),
                (normalized, Err(_), verdict) => (normalized, statement.analysis.clone(), verdict),
            },
            None => (
                statement::normalize(sql),
                statement.analysis.clone(),
                statement::judge(self.route, &statement.analysis, &self.search_path),
            ),
        };
        let mut record = self.record(Some(normalized), Some(&analysis));
        if !parameters.is_empty() {
            record.set("parameters", parameters.clone());
        }
        match verdict {
            Verdict::Refuse(rule) => {
                self.send_refusal(Refusal::of_statement(record, true, rule), b'P');
                return Ok(());
            }
            Verdict::Hold(rule) => {
                record.hit(&rule);
                let shown = format!("parameters: [{}]", parameters.join(", "));
                if let Err(message) = self.approve(&mut record, &rule, sql, Some(shown)).await {
                    self.send_refusal(Refusal::denied(record, message), b'P');
                    return Ok(());
                }
            }
            Verdict::Pass => {}
        }
        // Masks need the result's columns: ask for them unless the client
        // just did and its Describe was planned with this analysis.
        if !self.route.mask.is_empty() && (rejudged || described.as_deref() != Some(portal.as_str())) {
            let analysis = masked_by(&analysis);
            let expect = Expect::DescribePortal { analysis, swallow: true };
            self.send(expect, &wire::describe_portal(&portal));
        }
        let running = self.on_its_way(record, analysis);
        self.forward(Expect::Execute(running), message);
        Ok(())
    }

    fn describe(&mut self, message: &Message) -> Result<(), wire::Malformed> {
        let mut fields = Fields::new(&message.body);
        let what = fields.u8("Describe")?;
        let name = fields.name("Describe")?;
        let expect = if what == b'S' {
            let analysis = match self.names.statement(&name) {
                Lookup::Known(statement) => masked_by(&statement.analysis),
                Lookup::Absent | Lookup::Unsettled => None,
            };
            Expect::DescribeStatement(analysis)
        } else {
            let analysis = match self.names.portal(&name) {
                Lookup::Known(portal) => match portal.as_ref() {
                    Portal::Bound(bound) => masked_by(&bound.statement.analysis),
                    Portal::Unjudged(_) | Portal::Cursor { .. } => None,
                },
                Lookup::Absent | Lookup::Unsettled => None,
            };
            self.described = Some(name);
            Expect::DescribePortal { analysis, swallow: false }
        };
        self.forward(expect, message);
        Ok(())
    }

    fn close(&mut self, message: &Message) -> Result<(), wire::Malformed> {
        let mut fields = Fields::new(&message.body);
        let what = fields.u8("Close")?;
        let name = fields.name("Close")?;
        // The protocol's and SQL's prepared statements share names.
        let change = if what == b'S' { Change::Statement(name, None) } else { Change::Portal(name, None) };
        let id = self.names.change([change]);
        self.forward(Expect::Done(id), message);
        Ok(())
    }

    /// Holds a statement for a reviewer (unless a JIT window covers it).
    /// On refusal: what the client is told.
    async fn approve(
        &mut self,
        record: &mut ProxyRecord,
        rule: &str,
        sql: &str,
        shown: Option<String>,
    ) -> Result<(), String> {
        // What the client sent before this reaches the server while it waits.
        let _ = self.flush().await;
        let request = self.governed.held(rule, "SQL", statement::normalize(sql), shown, None);
        match record.answered(self.ctx.reviews.ask(request).await) {
            Ok(()) => Ok(()),
            Err(Unapproved::Denied { id, by, reason }) => {
                let why = reason.map_or(String::new(), |r| format!(": {r}"));
                Err(format!("statement denied by {by} (approval {id}){why}"))
            }
            Err(Unapproved::TimedOut { id, timeout }) => {
                Err(format!("nobody approved the statement within {}s (approval {id})", timeout.as_secs()))
            }
            Err(Unapproved::TooMany) => Err(format!(
                "too many statements of this session wait for approval (at most {})",
                approval::MAX_HELD_PER_SESSION
            )),
        }
    }
}

/// The analysis a statement's result columns are masked by: its own, or
/// none (every computed column masked) when what it runs depends on the
/// names at the time. A portal suspended at its row limit and run on
/// returns rows of what its first Execute ran, whatever the names hold now.
fn masked_by(analysis: &Arc<Analysis>) -> Option<Arc<Analysis>> {
    (!analysis.depends_on_names()).then(|| analysis.clone())
}

/// Applies the route's regex masks to text; returns it and how many matched.
fn mask_text(route: &Route, text: &str) -> (String, u64) {
    let mut current = std::borrow::Cow::Borrowed(text);
    let mut count = 0;
    for mask in &route.mask {
        if let Mask::Regex { regex, replace } = mask {
            let found = regex.0.find_iter(&current).count();
            if found > 0 {
                count += found as u64;
                current = regex.0.replace_all(&current, replace.as_str()).into_owned().into();
            }
        }
    }
    (current.into_owned(), count)
}

/// Type OIDs whose binary form is their text (so a mask can rewrite it).
const TEXTUAL_TYPES: &[i32] = &[25, 1043, 1042, 19, 18, 114, 142, 705, 3802];
const JSON: i32 = 114;
const JSONB: i32 = 3802;

/// What the masks do to each column of a result.
struct Plan {
    columns: Vec<Column>,
}

struct Column {
    name: String,
    /// Replaced whole with these bytes.
    replace: Option<Vec<u8>>,
    /// A masked column in a binary form the proxy cannot rewrite.
    refuse: bool,
    /// Regex masks apply (text format, or a textual binary form).
    textual: bool,
    /// jsonb's binary form: a version byte before the text.
    jsonb_binary: bool,
}

impl Plan {
    /// Masks one row; `None` when nothing changed.
    fn mask(&self, route: &Route, body: &Bytes) -> Option<(Vec<u8>, u64)> {
        let mut fields = Fields::new(body);
        let count = fields.i16("DataRow").ok()?.max(0) as usize;
        let mut values = Vec::with_capacity(count);
        let mut masked = 0;
        for index in 0..count {
            let value = fields.value("DataRow").ok()?;
            let column = self.columns.get(index);
            let value = match (value, column) {
                (Some(_), Some(Column { replace: Some(with), .. })) => {
                    masked += 1;
                    Some(with.clone())
                }
                (Some(value), Some(column)) if column.textual => {
                    let (head, text) = if column.jsonb_binary && !value.is_empty() {
                        (&value[..1], &value[1..])
                    } else {
                        (&value[..0], &value[..])
                    };
                    let (replaced, found) = mask_text(route, &String::from_utf8_lossy(text));
                    if found > 0 {
                        masked += found;
                        let mut out = head.to_vec();
                        out.extend_from_slice(replaced.as_bytes());
                        Some(out)
                    } else {
                        Some(value.to_vec())
                    }
                }
                (value, _) => value.map(|v| v.to_vec()),
            };
            values.push(value);
        }
        (masked > 0).then(|| (wire::data_row(&values), masked))
    }

    fn refused_column(&self) -> Option<&str> {
        self.columns.iter().find(|c| c.refuse).map(|c| c.name.as_str())
    }
}

/// The server-to-client side: masks rows, turns the marker's errors into
/// refusals, and writes each statement's record when its answer is complete.
struct Back<'a> {
    ctx: &'a ProxyCtx,
    governed: &'a Governed,
    route: &'a Route,
    reader: BufReader<ReadHalf<Stream>>,
    client: WriteHalf<Stream>,
    outgoing: Vec<u8>,
    expect: mpsc::UnboundedReceiver<Expect>,
    /// Confirmed here as the server answers.
    names: &'a Names,
    queue: VecDeque<Expect>,
    plan: Option<Plan>,
    catalog: catalog::Catalog,
    /// The server skips everything up to the client's next Sync (an
    /// extended-protocol message failed) and that Sync is not queued yet:
    /// what comes meanwhile is dropped as it comes.
    skipping: bool,
    /// Tells the client's side whether a COPY FROM STDIN takes data.
    copying: watch::Sender<(u64, Copying)>,
}

impl Back<'_> {
    async fn run(&mut self) {
        loop {
            // While the server skips, it answers nothing until the Sync:
            // what the client sends meanwhile is settled here as it comes,
            // so the client's side never waits on it.
            while self.skipping {
                tokio::select! {
                    biased;
                    arrived = self.reader.fill_buf() => match arrived {
                        Ok(bytes) if !bytes.is_empty() => break,
                        _ => return,
                    },
                    expect = self.expect.recv() => {
                        let Some(expect) = expect else { return };
                        if self.enqueue(expect).is_err() {
                            return self.desync().await;
                        }
                    }
                }
            }
            let message = match wire::read(&mut self.reader, wire::MAX_SERVER_MESSAGE).await {
                Ok(Some(message)) => message,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(session = %self.governed.session, error = %e, "the PostgreSQL server connection failed");
                    return;
                }
            };
            let mut handled = Ok(());
            while let Ok(expect) = self.expect.try_recv() {
                handled = handled.and_then(|()| self.enqueue(expect));
            }
            if handled.is_err() || self.handle(message).await.is_err() {
                return self.desync().await;
            }
            if self.reader.buffer().is_empty() && self.flush().await.is_err() {
                return;
            }
        }
    }

    /// Queues what the server will answer next, or settles it at once when
    /// the server skips it.
    fn enqueue(&mut self, expect: Expect) -> Result<(), Desync> {
        if !self.skipping {
            self.queue.push_back(expect);
            return Ok(());
        }
        if matches!(expect, Expect::Sync) {
            self.skipping = false;
            self.queue.push_back(expect);
            return Ok(());
        }
        self.skip(expect, Outcome::Skipped, "skipped: an earlier message of the batch failed")
    }

    /// The server's answers no longer follow what was sent: the proxy can
    /// no longer tell what runs, so the connection ends.
    async fn desync(&mut self) {
        tracing::warn!(session = %self.governed.session, "the PostgreSQL server's answers do not follow the messages sent; connection closed");
        let why = "tollgate: the server's answers no longer follow the messages sent; the connection is closed";
        self.outgoing.extend_from_slice(&wire::fatal("08P01", why));
        let _ = self.flush().await;
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.outgoing.is_empty() {
            self.client.write_all(&self.outgoing).await?;
            self.outgoing.clear();
        }
        self.client.flush().await
    }

    fn pass(&mut self, message: &Message) {
        message.write_to(&mut self.outgoing);
    }

    fn running(&mut self) -> Option<&mut Running> {
        match self.queue.front_mut() {
            Some(Expect::Execute(running) | Expect::Query(running)) => Some(running),
            _ => None,
        }
    }

    async fn handle(&mut self, message: Message) -> Result<(), Desync> {
        let (ctx, governed) = (self.ctx, self.governed);
        match message.tag {
            b'1' | b'2' | b'3' => {
                let Some(Expect::Done(id)) = self.queue.pop_front() else { return Err(Desync) };
                self.names.settle(id, Outcome::Ran)?;
                self.pass(&message);
            }
            b'G' => {
                // CopyInResponse: the COPY FROM STDIN takes data now.
                let Some(copy) = self.running().and_then(|running| running.copy) else { return Err(Desync) };
                self.copying.send_replace((copy, Copying::Active));
                self.pass(&message);
            }
            b't' => {
                self.fits(|front| matches!(front, Expect::DescribeStatement(_)))?;
                self.pass(&message);
            }
            b'T' => {
                self.fits(|front| {
                    matches!(front, Expect::DescribeStatement(_) | Expect::DescribePortal { .. } | Expect::Query(_))
                })?;
                let (analysis, swallow) = match self.queue.front() {
                    Some(Expect::DescribeStatement(analysis)) => (analysis.clone(), false),
                    Some(Expect::DescribePortal { analysis, swallow }) => (analysis.clone(), *swallow),
                    Some(Expect::Query(running)) => (running.analysis.clone(), false),
                    _ => (None, false),
                };
                if matches!(self.queue.front(), Some(Expect::DescribeStatement(_) | Expect::DescribePortal { .. })) {
                    self.queue.pop_front();
                }
                self.plan = self.plan(&message.body, analysis.as_deref()).await;
                if !swallow {
                    self.pass(&message);
                }
            }
            b'n' => {
                self.fits(|front| matches!(front, Expect::DescribeStatement(_) | Expect::DescribePortal { .. }))?;
                let swallow = matches!(self.queue.front(), Some(Expect::DescribePortal { swallow: true, .. }));
                if matches!(self.queue.front(), Some(Expect::DescribeStatement(_) | Expect::DescribePortal { .. })) {
                    self.queue.pop_front();
                }
                self.plan = None;
                if !swallow {
                    self.pass(&message);
                }
            }
            b'D' => {
                self.fits(|front| matches!(front, Expect::Execute(_) | Expect::Query(_)))?;
                let refused = self.plan.as_ref().and_then(Plan::refused_column).map(str::to_owned);
                let masked = match (&self.plan, &refused) {
                    (Some(plan), None) => plan.mask(self.route, &message.body),
                    _ => None,
                };
                let withheld = refused.map(|column| {
                    format!("column \"{column}\" is masked, and its binary form is one the proxy cannot rewrite; ask for it as text")
                });
                let mut pass = true;
                if let Some(running) = self.running() {
                    running.rows += 1;
                    if let Some((_, count)) = &masked {
                        running.masked += count;
                    }
                    if withheld.is_some() {
                        running.withheld = withheld.clone();
                        pass = false;
                    }
                } else if withheld.is_some() {
                    pass = false;
                }
                match masked {
                    _ if !pass => {}
                    Some((body, _)) => self.outgoing.extend_from_slice(&wire::frame(b'D', &body)),
                    None => self.pass(&message),
                }
            }
            b'C' | b'I' | b's' => {
                self.fits(|front| match front {
                    Expect::Execute(_) => true,
                    Expect::Query(_) => message.tag != b's',
                    _ => false,
                })?;
                let command =
                    String::from_utf8_lossy(message.body.strip_suffix(b"\0").unwrap_or(&message.body)).into_owned();
                let withheld = self.running().and_then(|r| r.withheld.clone());
                match withheld {
                    Some(why) => {
                        self.outgoing.extend_from_slice(&wire::error(REFUSED_CODE, &format!("tollgate: {why}"), None))
                    }
                    None => self.pass(&message),
                }
                if let Some(running) = self.running()
                    && message.tag == b'C'
                {
                    running.commands.push(command);
                }
                if matches!(self.queue.front(), Some(Expect::Execute(_)))
                    && let Some(Expect::Execute(running)) = self.queue.pop_front()
                {
                    // A suspended portal has not completed its statement.
                    let outcome = if message.tag == b's' { Outcome::Skipped } else { Outcome::Ran };
                    self.ended(&running, outcome)?;
                    running.finish(ctx, governed, None);
                }
                // The next result of a simple query starts afresh.
                if let Some(Expect::Query(running)) = self.queue.front_mut()
                    && let Some(why) = running.withheld.take()
                {
                    running.error.get_or_insert(why);
                }
            }
            b'E' => self.error(message)?,
            b'Z' => {
                match self.queue.pop_front() {
                    Some(Expect::Query(running)) => {
                        // A failed statement stops the rest of its string:
                        // which of its changes happened is not known.
                        // One statement that failed did nothing; of several,
                        // those before the failure ran.
                        let several = running.analysis.as_ref().is_some_and(|analysis| analysis.statements > 1);
                        let outcome = match (&running.error, several) {
                            (None, _) => Outcome::Ran,
                            (Some(_), true) => Outcome::PartWay,
                            (Some(_), false) if running.name_missing => Outcome::NotThere,
                            (Some(_), false) => Outcome::Failed,
                        };
                        self.ended(&running, outcome)?;
                        running.finish(ctx, governed, None)
                    }
                    Some(Expect::Sync | Expect::Ready) => {}
                    _ => return Err(Desync),
                }
                if message.body.first() == Some(&b'I') {
                    self.names.end_transaction();
                }
                self.plan = None;
                self.pass(&message);
            }
            b'N' => {
                let masked = self.masked_fields(&message);
                self.outgoing.extend_from_slice(&wire::frame(b'N', &masked));
            }
            _ => self.pass(&message),
        }
        Ok(())
    }

    /// Does the answer come where the queue says one of its kind may?
    fn fits(&self, fits: impl Fn(&Expect) -> bool) -> Result<(), Desync> {
        if self.queue.front().is_some_and(fits) { Ok(()) } else { Err(Desync) }
    }

    /// A statement's answer is complete: its changes to the names count as
    /// the outcome says, and a COPY it was is over.
    fn ended(&mut self, running: &Running, outcome: Outcome) -> Result<(), Desync> {
        if let Some(copy) = running.copy {
            self.copying.send_replace((copy, Copying::Over));
        }
        match running.changes {
            Some(id) => self.names.settle(id, outcome),
            None => Ok(()),
        }
    }

    /// An error or notice with the regex masks applied to its texts (a
    /// duplicate-key error quotes the row's values).
    fn masked_fields(&self, message: &Message) -> Vec<u8> {
        let fields: Vec<(u8, String)> = wire::error_fields(&message.body)
            .into_iter()
            .map(|(code, text)| if code == b'C' { (code, text) } else { (code, mask_text(self.route, &text).0) })
            .collect();
        wire::error_body(&fields)
    }

    fn error(&mut self, message: Message) -> Result<(), Desync> {
        let (ctx, governed) = (self.ctx, self.governed);
        let fields = wire::error_fields(&message.body);
        let text = |code: u8| fields.iter().find(|(c, _)| *c == code).map(|(_, t)| t.clone()).unwrap_or_default();
        let summary = format!("{}: {}", text(b'C'), mask_text(self.route, &text(b'M')).0);
        // invalid_sql_statement_name, invalid_cursor_name.
        let name_missing = matches!(text(b'C').as_str(), "26000" | "34000");
        let masked = self.masked_fields(&message);
        let refused = |refusal: &Refusal| wire::error(refusal.code, &format!("tollgate: {}", refusal.message), None);
        match self.queue.pop_front() {
            Some(Expect::Refused(refusal)) => {
                self.outgoing.extend_from_slice(&refused(&refusal));
                refusal.finish(ctx, governed);
            }
            // A simple query's error does not make the server skip: its
            // ReadyForQuery follows.
            Some(Expect::RefusedQuery(refusal)) => {
                self.outgoing.extend_from_slice(&refused(&refusal));
                refusal.finish(ctx, governed);
                self.queue.push_front(Expect::Ready);
                return Ok(());
            }
            Some(Expect::Query(mut running)) => {
                running.error = Some(summary);
                running.name_missing = name_missing;
                self.queue.push_front(Expect::Query(running));
                self.outgoing.extend_from_slice(&wire::frame(b'E', &masked));
                return Ok(());
            }
            // An error at a Sync (a commit that fails) or outside any
            // message (a FATAL before the server closes).
            Some(waiting @ (Expect::Sync | Expect::Ready)) => {
                self.queue.push_front(waiting);
                self.outgoing.extend_from_slice(&wire::frame(b'E', &masked));
                return Ok(());
            }
            None => {
                self.outgoing.extend_from_slice(&wire::frame(b'E', &masked));
                return Ok(());
            }
            Some(Expect::Execute(mut running)) => {
                running.error = Some(summary);
                // Not NotThere: the missing name may be the portal's own
                // (one a savepoint's rollback dropped), not one it drops.
                self.ended(&running, Outcome::Failed)?;
                running.finish(ctx, governed, None);
                self.outgoing.extend_from_slice(&wire::frame(b'E', &masked));
            }
            Some(failed) => {
                self.outgoing.extend_from_slice(&wire::frame(b'E', &masked));
                self.skip(failed, Outcome::Failed, "the server failed it")?;
            }
        }
        // An extended-protocol message failed: the server skips everything
        // up to the client's next Sync, a Query too.
        while let Some(next) = self.queue.front() {
            if matches!(next, Expect::Sync) {
                return Ok(());
            }
            if let Some(skipped) = self.queue.pop_front() {
                self.skip(skipped, Outcome::Skipped, "skipped: an earlier message of the batch failed")?;
            }
        }
        self.skipping = true;
        Ok(())
    }

    /// An answer that will not come, or an error in its place (`outcome`
    /// says which): its changes settle so, and its record is written.
    fn skip(&mut self, expect: Expect, outcome: Outcome, why: &str) -> Result<(), Desync> {
        let ended = match &expect {
            Expect::Execute(running) | Expect::Query(running) => self.ended(running, outcome),
            other => other.change().map_or(Ok(()), |id| self.names.settle(id, outcome)),
        };
        expect.abandon(self.ctx, self.governed, why);
        ended
    }

    /// The masking plan for a result's columns (`RowDescription`).
    async fn plan(&mut self, body: &Bytes, analysis: Option<&Analysis>) -> Option<Plan> {
        let route = self.route;
        if route.mask.is_empty() {
            return None;
        }
        let column_masks = route.mask.iter().any(|m| matches!(m, Mask::Column { .. }));
        // A computed column may carry a masked one; unknown statement: assume it does.
        let computed = match analysis {
            Some(analysis) => statement::computed_may_carry_masked(route, analysis),
            None => route.mask.iter().find_map(|m| match m {
                Mask::Column { replace, .. } => Some(replace.clone()),
                _ => None,
            }),
        };
        let mut fields = Fields::new(body);
        let count = fields.i16("RowDescription").ok()?.max(0) as usize;
        let mut columns = Vec::with_capacity(count);
        for _ in 0..count {
            let name = fields.cstr("RowDescription").ok()?;
            let table = fields.i32("RowDescription").ok()? as u32;
            let attribute = fields.i16("RowDescription").ok()?;
            let type_oid = fields.i32("RowDescription").ok()?;
            let _size = fields.i16("RowDescription").ok()?;
            let _modifier = fields.i32("RowDescription").ok()?;
            let format = fields.i16("RowDescription").ok()?;
            let direct = table != 0 && attribute > 0;
            let replace = if direct && column_masks {
                match self.catalog.column(self.ctx, self.governed, table, attribute).await {
                    Ok(source) => statement::column_masked(route, &name, source.as_deref()).map(str::to_owned),
                    Err(why) => {
                        // Which table column it is cannot be known: mask it (fail closed).
                        tracing::warn!(%why, column = %name, "cannot look up a result column's table column; masking it");
                        route.mask.iter().find_map(|m| match m {
                            Mask::Column { replace, .. } => Some(replace.clone()),
                            _ => None,
                        })
                    }
                }
            } else if direct {
                None
            } else {
                statement::column_masked(route, &name, None).map(str::to_owned).or_else(|| computed.clone())
            };
            let textual = format == 0 || TEXTUAL_TYPES.contains(&type_oid);
            let jsonb_binary = format == 1 && type_oid == JSONB;
            let (replace, refuse) = match replace {
                Some(_) if !textual => (None, true),
                Some(with) => {
                    let mut bytes = if jsonb_binary { vec![1] } else { Vec::new() };
                    if type_oid == JSON || type_oid == JSONB {
                        bytes.extend_from_slice(Value::String(with).to_string().as_bytes());
                    } else {
                        bytes.extend_from_slice(with.as_bytes());
                    }
                    (Some(bytes), false)
                }
                None => (None, false),
            };
            columns.push(Column { name, replace, refuse, textual, jsonb_binary });
        }
        Some(Plan { columns })
    }

    /// Writes the records of everything still waiting for an answer.
    fn finish_all(&mut self, why: &str) {
        while let Ok(expect) = self.expect.try_recv() {
            self.queue.push_back(expect);
        }
        while let Some(expect) = self.queue.pop_front() {
            expect.abandon(self.ctx, self.governed, why);
        }
    }
}
