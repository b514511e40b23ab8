//! What one event of a session is, as the session log stores it: a typed
//! kind and verdict (spelled once, here and in `tollgate_common`) and
//! kind-specific detail.

use serde::{Serialize, Serializer};
use serde_json::{Map, Value};
use tollgate_common::{EventKind, Verdict};

/// What an event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// Reported by the kernel programs.
    Kernel(EventKind),
    /// One HTTP exchange through the proxy.
    Http,
    /// One TLS passthrough connection through the proxy.
    Tls,
    /// A held request: asked, decided, or timed out.
    Approval,
    /// The session itself: revoked by a reviewer, or past its identity's `max_session`.
    Session,
    /// Events of the session that were counted instead of delivered.
    Lost,
    /// A grant the session held stopped being honoured (expired unused, or revoked).
    Grant,
    /// Terminal output of the session's command, as its terminal showed it.
    Output,
    /// One SQL statement (or connection) through the PostgreSQL proxy.
    Sql,
    /// One DNS query a session's resolver answered (or refused).
    Dns,
}

impl RecordKind {
    /// Every kind, in the order the docs list them.
    pub const ALL: [Self; 14] = [
        Self::Kernel(EventKind::Exec),
        Self::Kernel(EventKind::Fork),
        Self::Kernel(EventKind::Exit),
        Self::Kernel(EventKind::Connect),
        Self::Kernel(EventKind::Socket),
        Self::Http,
        Self::Tls,
        Self::Approval,
        Self::Session,
        Self::Lost,
        Self::Grant,
        Self::Output,
        Self::Sql,
        Self::Dns,
    ];

    /// The kind a stored name stands for.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == name)
    }

    /// The name stored in the `kind` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kernel(kind) => kind.name(),
            Self::Http => "http",
            Self::Tls => "tls",
            Self::Approval => "approval",
            Self::Session => "session",
            Self::Lost => "lost",
            Self::Grant => "grant",
            Self::Output => "output",
            Self::Sql => "sql",
            Self::Dns => "dns",
        }
    }
}

/// What was decided, where an event is a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordVerdict {
    /// The kernel's decision on an exec, connect or socket.
    Kernel(Verdict),
    /// The proxy refused a request by a block rule.
    Block,
    /// A held request waits for a reviewer.
    Pending,
    /// A reviewer approved a held request.
    Approved,
    /// A reviewer denied a held request.
    Denied,
    /// Nobody decided a held request in time.
    TimedOut,
    /// A reviewer ended the session.
    Revoked,
    /// The session ran as long as its identity allows.
    Expired,
    /// No daemon ran for a while: the session was adopted, or closed.
    DaemonGap,
}

impl RecordVerdict {
    /// Let through (the kernel's or the proxy's allow).
    pub const ALLOW: Self = Self::Kernel(Verdict::Allow);
    /// Refused (the kernel's EPERM, or the proxy's refusal of a request).
    pub const DENY: Self = Self::Kernel(Verdict::Deny);

    /// The name stored in the `verdict` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kernel(verdict) => verdict.as_str(),
            Self::Block => "block",
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::Denied => "denied",
            Self::TimedOut => "timed-out",
            Self::Revoked => "revoked",
            Self::Expired => "expired",
            Self::DaemonGap => "daemon-gap",
        }
    }
}

impl Serialize for RecordKind {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl Serialize for RecordVerdict {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// One event of a session, in the order it was reported.
#[derive(Debug, Clone)]
pub struct EventRecord {
    /// RFC 3339.
    pub at: String,
    /// What it reports.
    pub kind: RecordKind,
    /// The process (0 for what the proxy saw: a connection, not a process).
    pub pid: u32,
    /// The decision, where the event is one.
    pub verdict: Option<RecordVerdict>,
    /// Kind-specific fields.
    pub detail: Detail,
}

/// An event's kind-specific fields: a map, or JSON text already: rendered
/// where userspace records it, or typed and serialized once for the kernel
/// events that come by the hundred thousand a second.
#[derive(Debug, Clone)]
pub enum Detail {
    /// Fields the writer serializes.
    Fields(Map<String, Value>),
    /// A JSON object, with the grant rules it names (`grant_rules`) apart,
    /// for the usage counts.
    Json {
        /// The object.
        text: String,
        /// (grant, rule) of each rule named.
        grant_rules: Vec<(String, String)>,
    },
}

impl Detail {
    /// Serializes `fields`, which name `grant_rules` (their `grant_rules`
    /// field, if any).
    pub fn json<T: Serialize>(fields: &T, grant_rules: Vec<(String, String)>) -> serde_json::Result<Self> {
        Ok(Self::Json { text: to_json_text(fields)?, grant_rules })
    }

    /// The JSON text, as stored.
    pub fn text(&self) -> serde_json::Result<std::borrow::Cow<'_, str>> {
        // Serialized straight to bytes: `Value`'s Display goes through
        // fmt::Write, far slower.
        match self {
            Self::Fields(fields) => serde_json::to_string(fields).map(Into::into),
            Self::Json { text, .. } => Ok(text.as_str().into()),
        }
    }

    /// (grant, rule) of each rule its `grant_rules` names.
    pub fn grant_rules(&self) -> Vec<(&str, &str)> {
        match self {
            Self::Fields(fields) => grant_rules_in(fields.get("grant_rules")).collect(),
            Self::Json { grant_rules, .. } => grant_rules.iter().map(|(g, r)| (g.as_str(), r.as_str())).collect(),
        }
    }

    /// `fields` as JSON text now, on the recording thread: the writer then
    /// gets one string to store and free, not a map of allocations made on
    /// another thread.
    pub fn rendered<F: RecordFields>(fields: F) -> Self {
        let grant_rules =
            grant_rules_in(fields.field("grant_rules")).map(|(g, r)| (g.to_owned(), r.to_owned())).collect();
        Self::render(&fields, grant_rules)
    }

    /// `fields`, typed, as JSON text now, naming `grant_rules`; a record
    /// that cannot be rendered is kept, saying so.
    pub fn render<T: Serialize>(fields: &T, grant_rules: Vec<(String, String)>) -> Self {
        // Not expected (no map with non-string keys is recorded).
        let text =
            to_json_text(fields).unwrap_or_else(|e| serde_json::json!({ "unrenderable": e.to_string() }).to_string());
        Self::Json { text, grant_rules }
    }
}

impl From<Map<String, Value>> for Detail {
    fn from(fields: Map<String, Value>) -> Self {
        Self::Fields(fields)
    }
}

/// `fields` as JSON text, written into a buffer that holds an exec's, a
/// connect's or an HTTP exchange's detail at once (`serde_json::to_string`
/// starts at 128 bytes and grows: a copy or two per record). Up to the
/// log's queue of records waits in these buffers, so a small one (a fork,
/// an exit) gives back what it does not use.
fn to_json_text<T: Serialize>(fields: &T) -> serde_json::Result<String> {
    let mut text = Vec::with_capacity(384);
    serde_json::to_writer(&mut text, fields)?;
    if text.len() < 96 {
        text.shrink_to_fit();
    }
    // serde_json writes valid UTF-8 only.
    Ok(String::from_utf8(text).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
}

/// The (grant, rule) pairs of a `grant_rules` field.
fn grant_rules_in(field: Option<&Value>) -> impl Iterator<Item = (&str, &str)> {
    let rules = match field {
        Some(Value::Array(rules)) => rules.as_slice(),
        _ => &[],
    };
    rules.iter().filter_map(|rule| Some((rule.get("grant")?.as_str()?, rule.get("rule")?.as_str()?)))
}

/// What a userspace record's fields are kept in: a JSON object once
/// serialized, whose fields can be looked up by name.
pub trait RecordFields: Serialize {
    /// The field `key`, if set.
    fn field(&self, key: &str) -> Option<&Value>;
}

impl RecordFields for Map<String, Value> {
    fn field(&self, key: &str) -> Option<&Value> {
        self.get(key)
    }
}

/// A record's fields in the order they were set, under names the code
/// spells: what the proxy fills per exchange, with no key to allocate and
/// no map to hash (a map cost the proxy about a twentieth of its time).
#[derive(Debug, Clone)]
pub struct FieldList(Vec<(&'static str, Value)>);

impl FieldList {
    /// No fields yet (and nothing allocated until one is set).
    pub fn new() -> Self {
        Self(Vec::new())
    }

    /// Sets `key` (where it was, if it was set before).
    pub fn set(&mut self, key: &'static str, value: impl Into<Value>) {
        let value = value.into();
        match self.get_mut(key) {
            Some(slot) => *slot = value,
            None => self.0.push((key, value)),
        }
    }

    /// The field `key`, if set.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.iter().find(|(name, _)| *name == key).map(|(_, value)| value)
    }

    /// The field `key`, to change, if set.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut Value> {
        self.0.iter_mut().find(|(name, _)| *name == key).map(|(_, value)| value)
    }

    /// Every field, in the order set.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &Value)> {
        self.0.iter().map(|(name, value)| (*name, value))
    }
}

impl Default for FieldList {
    fn default() -> Self {
        Self::new()
    }
}

impl RecordFields for FieldList {
    fn field(&self, key: &str) -> Option<&Value> {
        self.get(key)
    }
}

impl Serialize for FieldList {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (key, value) in &self.0 {
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_names_come_from_the_shared_contract() {
        assert_eq!(RecordKind::Kernel(EventKind::Exec).as_str(), "exec");
        assert_eq!(RecordVerdict::Kernel(Verdict::Killed).as_str(), "killed");
        assert_eq!(RecordVerdict::DENY.as_str(), "deny");
        assert_eq!(serde_json::to_value(RecordVerdict::TimedOut).ok(), Some(Value::from("timed-out")));
        for kind in RecordKind::ALL {
            assert_eq!(RecordKind::from_name(kind.as_str()), Some(kind), "names read back as their kind");
        }
        assert_eq!(RecordKind::from_name("unknown"), None);
    }

    #[test]
    fn a_detail_rendered_where_it_is_recorded_stores_and_counts_as_its_fields_would() {
        let fields = serde_json::json!({
            "method": "GET",
            "path": "/a\"b\u{7}",
            "rules": ["r1", "r2"],
            "grant_rules": [{"grant": "g", "rule": "network.proxy x"}, {"grant": "h", "rule": "y"}],
            "duration_ms": 1.25,
        });
        let Value::Object(fields) = fields else { unreachable!("an object literal") };
        let as_fields = Detail::Fields(fields.clone());
        let rendered = Detail::rendered(fields);
        assert!(matches!(rendered, Detail::Json { .. }), "rendered to text");
        assert_eq!(rendered.text().ok(), as_fields.text().ok(), "the same stored text");
        assert_eq!(rendered.grant_rules(), as_fields.grant_rules(), "the same rules counted");
        assert_eq!(rendered.grant_rules(), vec![("g", "network.proxy x"), ("h", "y")]);
    }

    #[test]
    fn a_field_list_stores_and_counts_as_a_map_with_the_same_fields_would() {
        let mut list = FieldList::new();
        let mut map = Map::new();
        let fields: [(&'static str, Value); 6] = [
            ("method", "GET".into()),
            ("path", "/a\"b\u{7}".into()),
            ("rules", serde_json::json!(["r1"])),
            ("grant_rules", serde_json::json!([{"grant": "g", "rule": "network.proxy x"}])),
            ("outcome", "pending".into()),
            ("duration_ms", 1.25.into()),
        ];
        for (key, value) in fields {
            list.set(key, value.clone());
            map.insert(key.into(), value);
        }
        // Set again: the value changes where it stands, as in a map.
        list.set("outcome", "forwarded");
        map.insert("outcome".into(), "forwarded".into());
        assert_eq!(list.get("outcome"), Some(&Value::from("forwarded")));
        assert_eq!(list.get("absent"), None);
        let (from_list, from_map) = (Detail::rendered(list), Detail::rendered(map));
        assert_eq!(from_list.text().ok(), from_map.text().ok(), "the same stored text, in the same order");
        assert_eq!(from_list.grant_rules(), vec![("g", "network.proxy x")]);
        assert_eq!(from_list.grant_rules(), from_map.grant_rules());
    }
}
