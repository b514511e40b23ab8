//! What a SQL string does, read from PostgreSQL's own parse tree
//! (libpg_query), and what a route's rules say about it.
//!
//! The whole tree is walked, every node, rather than through pg_query's
//! summary helpers: those visit a subset of node types (they miss a
//! function called inside `ARRAY[...]` and the statement inside `PREPARE`).

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
};

use serde_json::Value;

use crate::policy::route::{Mask, Matcher, NameGlob, Route, StatementKind};

/// A table or function as a statement names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Name {
    /// The schema, when the statement gives one.
    pub schema: Option<String>,
    /// The name.
    pub name: String,
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.schema {
            Some(schema) => write!(f, "{schema}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// What one SQL string (one or more statements) does.
#[derive(Debug, Clone, Default)]
pub struct Analysis {
    /// Every statement kind in it, nested ones included (a `DELETE` in a
    /// `WITH`, under `EXPLAIN ANALYZE` or `PREPARE`).
    pub kinds: BTreeSet<String>,
    /// `delete`/`update` without a condition on any column.
    pub unbounded: BTreeSet<String>,
    /// Tables (and views, sequences) named.
    pub tables: BTreeSet<Name>,
    /// Functions called.
    pub functions: BTreeSet<Name>,
    /// Why its effect cannot be known before it runs, if it cannot.
    pub opaque: Vec<String>,
    /// It changes how unqualified names resolve (`search_path`, the role).
    pub changes_resolution: bool,
    /// It copies table data out to the client (`COPY ... TO STDOUT`).
    pub copies_out: bool,
    /// Column names it references (lower case).
    pub columns: BTreeSet<String>,
    /// It may put whole rows into a computed value (`row_to_json(u)`,
    /// `f(t.*)`), so a computed column may carry any column.
    pub whole_rows: bool,
    /// SQL-level prepared statements it creates, executes and drops
    /// (`None`: `DEALLOCATE ALL`).
    pub prepares: Vec<String>,
    /// Names `EXECUTE` runs.
    pub executes: Vec<String>,
    /// Names `DEALLOCATE` drops.
    pub deallocates: Vec<Option<String>>,
    /// Cursors (portals) `DECLARE` opens, and whether each is `WITH HOLD`
    /// (it outlives its transaction). Only a statement of its own opens
    /// one: `EXPLAIN DECLARE` does not.
    pub declares: Vec<(String, bool)>,
    /// Cursors `FETCH` and `MOVE` read.
    pub fetches: Vec<String>,
    /// Cursors `CLOSE` closes (`None`: `CLOSE ALL`).
    pub closes: Vec<Option<String>>,
    /// How many times it copies rows in from the client (`COPY ... FROM STDIN`).
    pub copies_in: usize,
    /// How many statements the string holds.
    pub statements: usize,
}

impl Analysis {
    /// Does judging it depend on the connection's prepared statements and
    /// cursors at the time: what `EXECUTE` runs, whether a name `PREPARE`
    /// or `DECLARE` takes is free, what `FETCH` reads?
    pub fn depends_on_names(&self) -> bool {
        !(self.executes.is_empty() && self.prepares.is_empty() && self.declares.is_empty() && self.fetches.is_empty())
    }

    /// Adds what `other` does (a prepared statement an `EXECUTE` runs).
    pub fn absorb(&mut self, other: &Analysis) {
        self.kinds.extend(other.kinds.iter().cloned());
        self.unbounded.extend(other.unbounded.iter().cloned());
        self.tables.extend(other.tables.iter().cloned());
        self.functions.extend(other.functions.iter().cloned());
        self.opaque.extend(other.opaque.iter().cloned());
        self.columns.extend(other.columns.iter().cloned());
        self.changes_resolution |= other.changes_resolution;
        self.copies_out |= other.copies_out;
        self.whole_rows |= other.whole_rows;
    }
}

/// Functions that run SQL (or read a table) given to them as text: what
/// they do is in a string the parse tree does not open.
const RUNS_TEXT_AS_SQL: &[&str] = &[
    "query_to_xml",
    "query_to_xmlschema",
    "query_to_xml_and_xmlschema",
    "cursor_to_xml",
    "cursor_to_xmlschema",
    "table_to_xml",
    "table_to_xmlschema",
    "table_to_xml_and_xmlschema",
    "schema_to_xml",
    "schema_to_xmlschema",
    "schema_to_xml_and_xmlschema",
    "database_to_xml",
    "database_to_xmlschema",
    "database_to_xml_and_xmlschema",
    "ts_stat",
    "ts_rewrite",
    "dblink",
    "dblink_exec",
    "dblink_open",
    "dblink_send_query",
];

/// Functions that change how names resolve.
const CHANGES_RESOLUTION: &[&str] = &["set_config"];

/// Settings that change how names resolve.
const RESOLUTION_SETTINGS: &[&str] = &["search_path", "role", "session_authorization"];

/// Parses `sql` with PostgreSQL's parser and reads what it does. A string
/// the parser rejects is an error (the caller refuses it).
pub fn analyze(sql: &str) -> Result<Analysis, String> {
    let parsed = pg_query::parse(sql).map_err(|e| e.to_string())?;
    let tree = serde_json::to_value(&parsed.protobuf).map_err(|e| format!("cannot read the parse tree: {e}"))?;
    let mut analysis = Analysis { statements: parsed.protobuf.stmts.len(), ..Analysis::default() };
    let mut walk = Walk { analysis: &mut analysis, single_names: BTreeSet::new(), relations: BTreeSet::new() };
    walk.value(&tree, "", "");
    let Walk { single_names, relations, .. } = walk;
    for statement in &parsed.protobuf.stmts {
        if let Some(pg_query::NodeEnum::DeclareCursorStmt(declare)) =
            statement.stmt.as_ref().and_then(|node| node.node.as_ref())
        {
            // CURSOR_OPT_HOLD in PostgreSQL's parsenodes.h.
            let hold = declare.options & 0x0020 != 0;
            analysis.declares.push((declare.portalname.clone(), hold));
        }
    }
    // A bare name that is also a relation (or its alias) is a whole-row reference.
    if single_names.iter().any(|name| relations.contains(name)) {
        analysis.whole_rows = true;
    }
    Ok(analysis)
}

struct Walk<'a> {
    analysis: &'a mut Analysis,
    /// One-part column references (`u` in `SELECT u FROM users u`).
    single_names: BTreeSet<String>,
    /// Relation names and aliases.
    relations: BTreeSet<String>,
}

fn text<'v>(value: &'v Value, key: &str) -> &'v str {
    value.get(key).and_then(Value::as_str).unwrap_or_default()
}

/// The `sval`s of a list of `String` nodes (`funcname`, `fields`).
fn strings(list: &Value) -> Vec<Option<String>> {
    list.as_array()
        .into_iter()
        .flatten()
        .map(|item| item.pointer("/node/String/sval").and_then(Value::as_str).map(str::to_owned))
        .collect()
}

fn qualified(parts: Vec<String>) -> Option<Name> {
    let mut parts = parts;
    let name = parts.pop()?;
    Some(Name { schema: parts.pop(), name })
}

/// Does an expression refer to a column at all (`WHERE true` does not)?
fn references_a_column(value: &Value) -> bool {
    match value {
        Value::Object(map) => map.iter().any(|(key, v)| key == "ColumnRef" || references_a_column(v)),
        Value::Array(items) => items.iter().any(references_a_column),
        _ => false,
    }
}

impl Walk<'_> {
    /// Walks `value`, found under `key` of a node of type `parent`.
    fn value(&mut self, value: &Value, parent: &str, key: &str) {
        match value {
            Value::Object(map) => {
                // Struct-typed fields hold nodes without their type's name:
                // recognise range variables and calls by their fields.
                if map.contains_key("relname") && map.contains_key("schemaname") {
                    self.range_var(value);
                }
                if map.contains_key("funcname") && map.contains_key("funcformat") {
                    self.call(value);
                }
                for (field, inner) in map {
                    if field.chars().next().is_some_and(|c| c.is_ascii_uppercase()) {
                        self.node(field, inner, parent, key);
                        self.value(inner, field, "");
                    } else if field == "node" {
                        // A node wrapper: what it holds sits in the same slot.
                        self.value(inner, parent, key);
                    } else {
                        let slot_parent = if key.is_empty() { parent } else { "" };
                        self.value(inner, slot_parent, field);
                    }
                }
            }
            Value::Array(items) => {
                for item in items {
                    self.value(item, parent, key);
                }
            }
            _ => {}
        }
    }

    /// A typed node `kind` with fields `node`, found under `key` of `parent`.
    fn node(&mut self, kind: &str, node: &Value, parent: &str, key: &str) {
        let analysis = &mut *self.analysis;
        if let Some(mut statement) = StatementKind::of_node(kind) {
            if statement == "grant" && node.get("is_grant").and_then(Value::as_bool) == Some(false) {
                statement = "revoke";
            }
            analysis.kinds.insert(statement.to_owned());
        }
        match kind {
            "DeleteStmt" | "UpdateStmt" => {
                let condition = node.get("where_clause").filter(|w| !w.is_null());
                if !condition.is_some_and(references_a_column) {
                    let statement = if kind == "DeleteStmt" { "delete" } else { "update" };
                    analysis.unbounded.insert(statement.to_owned());
                }
            }
            "SelectStmt" if node.get("into_clause").is_some_and(|into| !into.is_null()) => {
                analysis.kinds.insert("create".to_owned());
            }
            // A cursor's rows are those of a query judged when it was
            // declared, or inside a function: any computed column may
            // carry a masked one.
            "FetchStmt" => {
                analysis.whole_rows = true;
                analysis.fetches.push(text(node, "portalname").to_owned());
            }
            "DoStmt" => analysis.opaque.push("a DO block runs code the proxy cannot see before it runs".to_owned()),
            "CallStmt" => {
                analysis.opaque.push("CALL runs a procedure whose statements the proxy cannot see".to_owned())
            }
            "CopyStmt" => {
                // COPY FROM writes rows as INSERT does, COPY TO reads them:
                // rules on those kinds cover it too.
                let from = node.get("is_from") == Some(&Value::Bool(true));
                analysis.kinds.insert(if from { "insert" } else { "select" }.to_owned());
                let file = !text(node, "filename").is_empty() || node.get("is_program") == Some(&Value::Bool(true));
                if file {
                    analysis.opaque.push("COPY to or from a server file or program".to_owned());
                } else if from {
                    analysis.copies_in += 1;
                } else {
                    analysis.copies_out = true;
                }
            }
            "VariableSetStmt" => {
                let name = text(node, "name").to_ascii_lowercase();
                // RESET ALL has no name.
                if name.is_empty() || RESOLUTION_SETTINGS.contains(&name.as_str()) {
                    analysis.changes_resolution = true;
                }
            }
            "PrepareStmt" => analysis.prepares.push(text(node, "name").to_owned()),
            "ExecuteStmt" => analysis.executes.push(text(node, "name").to_owned()),
            "DeallocateStmt" => {
                let name = text(node, "name");
                analysis.deallocates.push((!name.is_empty()).then(|| name.to_owned()));
            }
            "ClosePortalStmt" => {
                let name = text(node, "portalname");
                analysis.closes.push((!name.is_empty()).then(|| name.to_owned()));
            }
            // DISCARD ALL drops every prepared statement and closes every cursor.
            "DiscardStmt"
                if node.get("target").and_then(Value::as_i64)
                    == Some(pg_query::protobuf::DiscardMode::DiscardAll as i64) =>
            {
                analysis.deallocates.push(None);
                analysis.closes.push(None);
            }
            "ColumnRef" => {
                let fields = node.get("fields").and_then(Value::as_array).cloned().unwrap_or_default();
                let star = fields.last().is_some_and(|f| f.pointer("/node/AStar").is_some());
                let names: Vec<Option<String>> = strings(&Value::Array(fields.clone()));
                if star {
                    // `SELECT *` and `SELECT t.*` give table columns as they
                    // are; a star anywhere else (`f(t.*)`) folds rows into a value.
                    if !(parent == "ResTarget" && key == "val") {
                        analysis.whole_rows = true;
                    }
                } else if let Some(Some(last)) = names.last() {
                    analysis.columns.insert(last.to_ascii_lowercase());
                    if names.len() == 1 {
                        self.single_names.insert(last.to_ascii_lowercase());
                    }
                }
            }
            _ => {}
        }
    }

    fn range_var(&mut self, node: &Value) {
        let name = text(node, "relname");
        if name.is_empty() {
            return;
        }
        let schema = Some(text(node, "schemaname")).filter(|s| !s.is_empty()).map(str::to_owned);
        self.relations.insert(name.to_ascii_lowercase());
        if let Some(alias) = node.pointer("/alias/aliasname").and_then(Value::as_str) {
            self.relations.insert(alias.to_ascii_lowercase());
            // Column aliases rename table columns in the result.
            if node.pointer("/alias/colnames").and_then(Value::as_array).is_some_and(|c| !c.is_empty()) {
                self.analysis.whole_rows = true;
            }
        }
        self.analysis.tables.insert(Name { schema, name: name.to_owned() });
    }

    fn call(&mut self, node: &Value) {
        let parts: Vec<String> = strings(node.get("funcname").unwrap_or(&Value::Null)).into_iter().flatten().collect();
        let Some(function) = qualified(parts) else { return };
        let bare = function.name.to_ascii_lowercase();
        if RUNS_TEXT_AS_SQL.contains(&bare.as_str()) {
            self.analysis.opaque.push(format!("{bare}() runs SQL given to it as text"));
        }
        if CHANGES_RESOLUTION.contains(&bare.as_str()) {
            self.analysis.changes_resolution = true;
        }
        self.analysis.functions.insert(function);
    }
}

/// Analyses of the statements a connection sent, by their normalized
/// text. What [`analyze`] reads (statement kinds, names, columns, clauses)
/// never depends on a constant's value, and normalizing replaces only
/// constants, so statements that differ in constants alone (`WHERE id = 1`,
/// `WHERE id = 2`) share one analysis: parsing and walking the tree is most
/// of the proxy's time per statement, normalizing a small part of it.
///
/// A text sent again as it was (a driver's unnamed prepared statement,
/// parsed anew for every execution; a health check) is not normalized
/// again: normalizing is a parse of its own, a tenth of the proxy's time.
/// And the verdict on an analysis is kept with it: the route and the
/// search path a connection's statements are judged by are fixed for the
/// connection.
#[derive(Debug, Default)]
pub struct AnalysisCache {
    analyses: HashMap<String, Known>,
    /// Bytes of the normalized texts `analyses` is keyed by.
    analysis_bytes: usize,
    /// Texts seen, and their normalized form.
    texts: HashMap<String, String>,
    /// Bytes of the texts kept and of their normalized forms.
    text_bytes: usize,
}

/// What the cache knows of one normalized statement.
#[derive(Debug)]
struct Known {
    analysis: Result<Arc<Analysis>, String>,
    /// The route's verdict, once asked for.
    verdict: Option<Verdict>,
}

impl AnalysisCache {
    /// Entries kept at most; past that the cache starts over.
    const LIMIT: usize = 512;
    /// Bytes of texts kept at most, and the longest text kept; bytes of
    /// normalized texts keyed by at most: a connection's cache stays small
    /// whatever its client sends.
    const TEXT_BYTES: usize = 256 << 10;
    const LONGEST_TEXT: usize = 8 << 10;
    const ANALYSIS_BYTES: usize = 1 << 20;

    /// The normalized form of `sql` (see [`normalize`]) and what
    /// [`analyze`] says of it.
    pub fn analyze(&mut self, sql: &str) -> (String, Result<Arc<Analysis>, String>) {
        let key = match self.texts.get(sql) {
            Some(normalized) => normalized.clone(),
            None => {
                let normalized = normalize(sql);
                self.remember_text(sql, &normalized);
                normalized
            }
        };
        if let Some(known) = self.analyses.get(&key) {
            let analysis = known.analysis.clone();
            return (key, analysis);
        }
        let analysis = analyze(sql).map(Arc::new);
        if key.len() > Self::ANALYSIS_BYTES {
            return (key, analysis);
        }
        if self.analyses.len() >= Self::LIMIT || self.analysis_bytes + key.len() > Self::ANALYSIS_BYTES {
            self.analyses.clear();
            self.analysis_bytes = 0;
        }
        self.analysis_bytes += key.len();
        self.analyses.insert(key.clone(), Known { analysis: analysis.clone(), verdict: None });
        (key, analysis)
    }

    /// The verdict on the statement `normalized` (as [`Self::analyze`]
    /// gave it), made by `judge` the first time it is asked for. `judge`
    /// must depend on the analysis alone, as [`judge`] does for one route
    /// and search path.
    pub fn verdict(&mut self, normalized: &str, judge: impl FnOnce(&Analysis) -> Verdict) -> Option<Verdict> {
        let known = self.analyses.get_mut(normalized)?;
        let analysis = known.analysis.as_ref().ok()?;
        Some(known.verdict.get_or_insert_with(|| judge(analysis)).clone())
    }

    fn remember_text(&mut self, sql: &str, normalized: &str) {
        if sql.len() > Self::LONGEST_TEXT {
            return;
        }
        let bytes = sql.len() + normalized.len();
        if self.texts.len() >= Self::LIMIT || self.text_bytes + bytes > Self::TEXT_BYTES {
            self.texts.clear();
            self.text_bytes = 0;
        }
        self.text_bytes += bytes;
        self.texts.insert(sql.to_owned(), normalized.to_owned());
    }
}

/// The normalized form of a statement (constants replaced by `$n`), for
/// records and reviewers; the text itself when the normalizer fails.
pub fn normalize(sql: &str) -> String {
    pg_query::normalize(sql).unwrap_or_else(|_| sql.to_owned())
}

/// What a route's rules say about a statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// It may run.
    Pass,
    /// It waits for a reviewer; the rule that holds it.
    Hold(String),
    /// It is refused; the rule (or reason) that refuses it.
    Refuse(String),
}

/// Where unqualified names resolve: the connection's schemas in search
/// order, or unknown (then a rule on `schema.table` covers the table in
/// any schema: wider, so it refuses more, never less).
#[derive(Debug, Clone, Default)]
pub struct SearchPath(pub Option<Vec<String>>);

impl SearchPath {
    /// Does `glob` cover `name`, as this path resolves it?
    fn covers(&self, glob: &NameGlob, name: &Name) -> bool {
        if !glob.qualified() {
            return glob.matches(&name.name);
        }
        match (&name.schema, &self.0) {
            (Some(schema), _) => glob.matches(&format!("{schema}.{}", name.name)),
            (None, Some(schemas)) => schemas.iter().any(|schema| glob.matches(&format!("{schema}.{}", name.name))),
            (None, None) => glob.table_part_matches(&name.name),
        }
    }
}

/// Does `matcher` cover the statement? Every field given must.
fn covers(matcher: &Matcher, analysis: &Analysis, path: &SearchPath) -> bool {
    let kinds: Vec<&str> = matcher.statement.iter().map(|k| k.0.as_str()).collect();
    if matcher.without_where {
        let unbounded = analysis.unbounded.iter().any(|k| kinds.is_empty() || kinds.contains(&k.as_str()));
        if !unbounded {
            return false;
        }
    } else if !kinds.is_empty() && !analysis.kinds.iter().any(|k| kinds.contains(&k.as_str())) {
        return false;
    }
    if !matcher.table.is_empty()
        && !analysis.tables.iter().any(|table| matcher.table.iter().any(|glob| path.covers(glob, table)))
    {
        return false;
    }
    if !matcher.function.is_empty()
        && !analysis.functions.iter().any(|function| matcher.function.iter().any(|glob| path.covers(glob, function)))
    {
        return false;
    }
    true
}

/// Judges a statement by the route's rules: block rules first, then what
/// cannot be judged (refused unless an allow rule names it), then approvals.
pub fn judge(route: &Route, analysis: &Analysis, path: &SearchPath) -> Verdict {
    if let Some((index, rule)) = route.block.iter().enumerate().find(|(_, m)| covers(m, analysis, path)) {
        return Verdict::Refuse(format!("block[{index}]: {rule}"));
    }
    let allowed = || route.allow.iter().any(|m| covers(m, analysis, path));
    if let Some(why) = analysis.opaque.first()
        && !allowed()
    {
        return Verdict::Refuse(format!("{why}; only an allow rule that names it lets it run"));
    }
    let table_rules = route.block.iter().chain(&route.approve).any(|m| !m.table.is_empty());
    if analysis.changes_resolution && table_rules {
        return Verdict::Refuse(
            "changing search_path or the role would change which tables unqualified names mean, and this route has table rules"
                .to_owned(),
        );
    }
    if analysis.copies_out && !route.mask.is_empty() {
        return Verdict::Refuse("COPY ... TO STDOUT sends rows the route's masks cannot rewrite".to_owned());
    }
    if let Some((index, rule)) = route.approve.iter().enumerate().find(|(_, m)| covers(m, analysis, path)) {
        return Verdict::Hold(format!("approve[{index}]: {rule}"));
    }
    Verdict::Pass
}

/// Do the route's column masks apply to a result column? `source` is the
/// table column it reads, when it reads one directly.
pub fn column_masked<'r>(route: &'r Route, name: &str, source: Option<&str>) -> Option<&'r str> {
    route.mask.iter().find_map(|mask| match mask {
        Mask::Column { column, replace }
            if column.0.is_match(name) || source.is_some_and(|source| column.0.is_match(source)) =>
        {
            Some(replace.as_str())
        }
        _ => None,
    })
}

/// May a computed result column (one that reads no table column directly)
/// carry a masked column's values? When the statement references a masked
/// column or folds whole rows into values, it may.
pub fn computed_may_carry_masked(route: &Route, analysis: &Analysis) -> Option<String> {
    route.mask.iter().find_map(|mask| match mask {
        Mask::Column { column, replace } => {
            (analysis.whole_rows || analysis.columns.iter().any(|c| column.0.is_match(c))).then(|| replace.clone())
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(rules: &str) -> Route {
        serde_yaml_ng::from_str(&format!("to: \"127.0.0.1/32:5432\"\nprotocol: postgres\n{rules}")).expect("route")
    }

    /// The route of the issue, without its credential.
    fn documented() -> Route {
        route(
            "block:\n  - { statement: [drop, truncate, alter, grant, revoke] }\n  - { statement: [delete, update], without_where: true }\n  - { table: \"audit.*\" }\n  - { function: [pg_read_file, lo_import, dblink] }\napprove:\n  - { statement: [delete, update, insert] }\n",
        )
    }

    fn verdict(sql: &str) -> Verdict {
        let analysis = analyze(sql).expect("parses");
        judge(&documented(), &analysis, &SearchPath(Some(vec!["pg_catalog".into(), "public".into()])))
    }

    fn refused(sql: &str) -> String {
        match verdict(sql) {
            Verdict::Refuse(rule) => rule,
            other => panic!("{sql}: {other:?}"),
        }
    }

    #[test]
    fn statements_that_name_prepared_statements_and_cursors_say_which() {
        let of = |sql: &str| analyze(sql).expect("parses");
        let both = of("PREPARE p AS SELECT 1; EXECUTE p; DEALLOCATE p; DEALLOCATE ALL");
        assert_eq!(both.prepares, ["p"]);
        assert_eq!(both.executes, ["p"]);
        assert_eq!(both.deallocates, [Some("p".to_owned()), None]);
        let cursors = of("DECLARE c CURSOR WITH HOLD FOR SELECT 1; DECLARE d CURSOR FOR SELECT 1; CLOSE c; CLOSE ALL");
        assert_eq!(cursors.declares, [("c".to_owned(), true), ("d".to_owned(), false)]);
        assert_eq!(cursors.closes, [Some("c".to_owned()), None]);
        assert!(of("EXPLAIN DECLARE e CURSOR FOR SELECT 1").declares.is_empty(), "EXPLAIN opens no cursor");
        assert_eq!(of("FETCH ALL FROM c; MOVE 1 IN d").fetches, ["c", "d"]);
        let discard = of("DISCARD ALL");
        assert_eq!((discard.deallocates, discard.closes), (vec![None], vec![None]));
        assert!(of("DISCARD PLANS").closes.is_empty());
        assert_eq!(of("COPY orders FROM STDIN; COPY users FROM STDIN").copies_in, 2);
        assert_eq!(of("COPY orders TO STDOUT").copies_in, 0);
    }

    #[test]
    fn a_cached_analysis_is_what_a_fresh_one_says_and_constants_alone_share_it() {
        // Every feature the walk reads, each with variants that differ only
        // in constants. Where the normalizer replaces those constants the
        // variants share an entry; where it keeps them (a COPY file name, a
        // PREPARE body) each has its own.
        let families: &[&[&str]] = &[
            &[
                "SELECT abalance FROM pgbench_accounts WHERE aid = 1",
                "SELECT abalance FROM pgbench_accounts WHERE aid = 99",
            ],
            &["DELETE FROM orders WHERE id = 1", "DELETE FROM orders WHERE id = 'x'"],
            &["DELETE FROM orders WHERE 1 = 1", "DELETE FROM orders WHERE 2 = 3"],
            &["UPDATE orders SET total = 5", "UPDATE orders SET total = 7"],
            &["SELECT set_config('search_path', 'evil', false)", "SELECT set_config('application_name', 'x', false)"],
            &["SET search_path = 'evil'", "SET search_path = 'public'"],
            &["SET application_name = 'a'", "SET application_name = 'b'"],
            &["COPY orders TO '/tmp/a'", "COPY orders TO '/tmp/b'"],
            &["COPY orders TO STDOUT"],
            &["COPY orders FROM PROGRAM 'id'", "COPY orders FROM PROGRAM 'true'"],
            &["PREPARE p AS DELETE FROM orders WHERE id = 1", "PREPARE p AS DELETE FROM orders WHERE id = 2"],
            &["EXECUTE p(1)", "EXECUTE p(2)"],
            &["DEALLOCATE p"],
            &["DO $$ BEGIN PERFORM 1; END $$", "DO $$ BEGIN DROP TABLE orders; END $$"],
            &["SELECT dblink('host=x', 'DELETE FROM orders')", "SELECT dblink('h', 'SELECT 1')"],
            &["SELECT row_to_json(u) FROM users u WHERE u.id = 1", "SELECT row_to_json(u) FROM users u WHERE u.id = 2"],
            &["SELECT f(t.*) FROM users t LIMIT 1", "SELECT f(t.*) FROM users t LIMIT 5"],
            &["SELECT * FROM audit.log WHERE at > '2026-01-01'", "SELECT * FROM audit.log WHERE at > '2027-01-01'"],
            &[
                "WITH gone AS (DELETE FROM orders WHERE id = 1 RETURNING *) SELECT 1",
                "WITH gone AS (DELETE FROM orders WHERE id = 3 RETURNING *) SELECT 9",
            ],
            &["SELECT 1; DROP TABLE orders", "SELECT 2; DROP TABLE orders"],
            &["SELECT * FROM orders o (a, b) WHERE a = 1", "SELECT * FROM orders o (a, b) WHERE a = 2"],
            &["GRANT SELECT ON orders TO bob"],
            &["REVOKE SELECT ON orders FROM bob"],
            &["SELECT pg_read_file('/etc/passwd')", "SELECT pg_read_file('/etc/shadow')"],
            &["CREATE TABLE t2 AS SELECT 1", "CREATE TABLE t2 AS SELECT 2"],
            &["SELECT 1 INTO t3", "SELECT 2 INTO t3"],
            &["SELECT * FROM orders WHERE", "SELECT * FROM orders WHERE"],
        ];
        let mut cache = AnalysisCache::default();
        for family in families {
            for sql in *family {
                let (normalized, cached) = cache.analyze(sql);
                assert_eq!(normalized, normalize(sql));
                let fresh = analyze(sql).map(Arc::new);
                assert_eq!(format!("{cached:?}"), format!("{fresh:?}"), "{sql}");
            }
        }
        let shared = |sql: &str| cache.analyses.contains_key(&normalize(sql));
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 12345",
            "DELETE FROM orders WHERE id = 5",
            "SELECT set_config('search_path', 'public', true)",
            "SET search_path = 'other'",
            "SELECT * FROM audit.log WHERE at > '2020-01-01'",
            "SELECT 5; DROP TABLE orders",
        ] {
            assert!(shared(sql), "{sql} should share an entry: {:#?}", cache.analyses.keys().collect::<Vec<_>>());
        }
        let entries = cache.analyses.len();
        // Differences other than constants are never shared.
        for sql in ["SELECT abalance FROM pgbench_branches WHERE aid = 1", "DELETE FROM orders", "COPY orders TO STDIN"]
        {
            assert_eq!(format!("{:?}", cache.analyze(sql).1), format!("{:?}", analyze(sql).map(Arc::new)), "{sql}");
        }
        assert_eq!(cache.analyses.len(), entries + 3);
    }

    #[test]
    fn a_text_is_normalized_once_and_a_verdict_made_once_per_statement() {
        let mut cache = AnalysisCache::default();
        let sql = "SELECT email FROM users WHERE id = 1";
        let (first, _) = cache.analyze(sql);
        assert_eq!(cache.texts.get(sql), Some(&first), "the text is kept with its normalized form");
        let (again, analysis) = cache.analyze(sql);
        assert_eq!(
            (again.as_str(), format!("{analysis:?}")),
            (first.as_str(), format!("{:?}", analyze(sql).map(Arc::new)))
        );

        let judged = std::cell::Cell::new(0);
        let verdict = |cache: &mut AnalysisCache, normalized: &str| {
            cache.verdict(normalized, |analysis| {
                judged.set(judged.get() + 1);
                judge(&documented(), analysis, &SearchPath(Some(vec!["public".into()])))
            })
        };
        assert_eq!(verdict(&mut cache, &first), Some(Verdict::Pass));
        let (other_constant, _) = cache.analyze("SELECT email FROM users WHERE id = 2");
        assert_eq!(verdict(&mut cache, &other_constant), Some(Verdict::Pass));
        assert_eq!(judged.get(), 1, "one verdict for the statement, whatever its constants");
        let (drop, _) = cache.analyze("DROP TABLE users");
        assert!(matches!(verdict(&mut cache, &drop), Some(Verdict::Refuse(rule)) if rule.starts_with("block[0]")));
        assert!(matches!(verdict(&mut cache, &drop), Some(Verdict::Refuse(_))), "refused again");
        assert_eq!(judged.get(), 2);
        let (unparsed, analysis) = cache.analyze("SELEC 1");
        assert!(analysis.is_err());
        assert_eq!(verdict(&mut cache, &unparsed), None, "nothing to judge: the caller refuses it");
        assert_eq!(verdict(&mut cache, "SELECT never_analyzed"), None);
    }

    #[test]
    fn the_texts_kept_stay_within_their_bounds() {
        let mut cache = AnalysisCache::default();
        let long = format!("SELECT '{}'", "x".repeat(AnalysisCache::LONGEST_TEXT));
        let (normalized, _) = cache.analyze(&long);
        assert_eq!(normalized, "SELECT $1");
        assert!(cache.texts.is_empty(), "a text past the longest kept is normalized every time");
        let texts: Vec<String> =
            (0..AnalysisCache::LIMIT * 2).map(|n| format!("SELECT {n} /* {} */", "y".repeat(1000))).collect();
        for sql in &texts {
            let _ = cache.analyze(sql);
            assert!(cache.texts.len() <= AnalysisCache::LIMIT);
            assert!(cache.text_bytes <= AnalysisCache::TEXT_BYTES);
            assert_eq!(
                cache.text_bytes,
                cache.texts.iter().map(|(text, normal)| text.len() + normal.len()).sum::<usize>()
            );
            assert!(cache.analysis_bytes <= AnalysisCache::ANALYSIS_BYTES);
        }
        let last = texts.last().expect("texts");
        assert!(cache.texts.contains_key(last), "starting over keeps the newest text");

        // Short texts, each its own statement: the count is the bound.
        let mut cache = AnalysisCache::default();
        let (mut most_texts, mut most_analyses) = (0, 0);
        for n in 0..AnalysisCache::LIMIT * 2 {
            let _ = cache.analyze(&format!("SELECT {n} AS c{n}"));
            most_texts = most_texts.max(cache.texts.len());
            most_analyses = most_analyses.max(cache.analyses.len());
        }
        assert_eq!((most_texts, most_analyses), (AnalysisCache::LIMIT, AnalysisCache::LIMIT));
        // A statement longer than all the analyses may hold is not kept.
        let huge = format!("SELECT 1 /* {} */", "z".repeat(AnalysisCache::ANALYSIS_BYTES));
        let (key, analysis) = cache.analyze(&huge);
        assert!(analysis.is_ok() && !cache.analyses.contains_key(&key));
        assert!(cache.analysis_bytes <= AnalysisCache::ANALYSIS_BYTES);
    }

    #[test]
    fn reads_pass_and_writes_wait() {
        assert_eq!(verdict("SELECT id, email FROM orders WHERE id = 1"), Verdict::Pass);
        assert!(
            matches!(verdict("DELETE FROM orders WHERE id = 1"), Verdict::Hold(rule) if rule.starts_with("approve[0]"))
        );
        assert!(matches!(verdict("insert into orders values (1)"), Verdict::Hold(_)));
    }

    #[test]
    fn every_statement_of_a_string_and_nested_writes_count() {
        assert!(refused("SELECT 1; DROP TABLE orders").starts_with("block[0]"));
        assert!(refused("WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d").starts_with("block[1]"));
        assert!(refused("EXPLAIN ANALYZE DELETE FROM orders").starts_with("block[1]"));
        assert!(refused("PREPARE p AS DELETE FROM orders").starts_with("block[1]"));
        assert!(refused("DELETE FROM orders WHERE true").starts_with("block[1]"), "a condition on no column");
        assert!(refused("REVOKE ALL ON orders FROM public").starts_with("block[0]"));
        assert!(refused("alter table orders add column x int").starts_with("block[0]"));
    }

    #[test]
    fn tables_and_functions_are_found_wherever_they_are() {
        assert!(refused("SELECT * FROM audit.log").starts_with("block[2]"));
        assert!(refused("SELECT * FROM \"audit\".\"log\"").starts_with("block[2]"));
        assert!(refused("SELECT (SELECT count(*) FROM audit.log)").starts_with("block[2]"));
        assert!(refused("SELECT ARRAY[pg_read_file('/etc/passwd')]").starts_with("block[3]"));
        assert!(refused("SELECT pg_catalog.pg_read_file('/etc/passwd')::text").starts_with("block[3]"));
        assert!(refused("SELECT * FROM lo_import('/etc/passwd')").starts_with("block[3]"));
    }

    #[test]
    fn what_cannot_be_judged_is_refused_unless_allowed() {
        assert!(refused("DO $$ BEGIN DELETE FROM orders; END $$").contains("DO block"));
        assert!(refused("CALL cleanup()").contains("CALL"));
        assert!(refused("SELECT query_to_xml('select * from audit.log', true, true, '')").contains("as text"));
        assert!(refused("COPY orders FROM PROGRAM 'id'").contains("program"));
        assert!(matches!(verdict("COPY orders FROM STDIN"), Verdict::Hold(rule) if rule.starts_with("approve[0]")));
        let allowing = route("allow:\n  - { statement: do }\n");
        let analysis = analyze("DO $$ BEGIN NULL; END $$").expect("parses");
        assert_eq!(judge(&allowing, &analysis, &SearchPath::default()), Verdict::Pass);
        assert!(analyze("SELEC 1").is_err(), "the parser's refusal is an error");
    }

    #[test]
    fn unqualified_names_resolve_through_the_search_path() {
        let analysis = analyze("SELECT * FROM log").expect("parses");
        let rules = documented();
        let on_path = SearchPath(Some(vec!["audit".into(), "public".into()]));
        assert!(matches!(judge(&rules, &analysis, &on_path), Verdict::Refuse(_)));
        let off_path = SearchPath(Some(vec!["public".into()]));
        assert_eq!(judge(&rules, &analysis, &off_path), Verdict::Pass);
        assert!(matches!(judge(&rules, &analysis, &SearchPath(None)), Verdict::Refuse(_)), "unknown path: fail closed");
        assert!(refused("SET search_path = audit").contains("search_path"));
        assert!(refused("SELECT set_config('search_path', 'audit', false)").contains("search_path"));
        assert!(refused("SET ROLE postgres").contains("role"));
    }

    #[test]
    fn masks_follow_columns_into_computed_values() {
        let masked = route("mask:\n  - { column: \"email|phone\" }\n");
        assert_eq!(column_masked(&masked, "EMAIL", None), Some("****"));
        assert_eq!(column_masked(&masked, "e", Some("email")), Some("****"));
        assert_eq!(column_masked(&masked, "email_verified", None), None, "the pattern covers whole names");
        let computed = |sql: &str| computed_may_carry_masked(&masked, &analyze(sql).expect("parses")).is_some();
        assert!(computed("SELECT lower(email) FROM users"));
        assert!(computed("SELECT row_to_json(u) FROM users u"));
        assert!(computed("SELECT to_json(u.*) FROM users u"));
        assert!(computed("SELECT x FROM users AS u(x, y)"));
        assert!(computed("FETCH ALL c"), "a cursor's query was judged at its DECLARE");
        assert!(!computed("SELECT count(*) FROM users"));
        assert!(!computed("SELECT * FROM users"));
    }
}
