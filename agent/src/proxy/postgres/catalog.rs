//! What the proxy asks the server itself: the connection's search path
//! (before the client's first statement), and which table column a result
//! column reads (on a side connection, so the client's stream is untouched).

use std::collections::HashMap;

use tokio::io::AsyncWriteExt;

use super::{
    startup::{self, Startup, Stream},
    wire,
};
use crate::proxy::{Governed, ProxyCtx};

/// Runs `sql` (a fixed query of the proxy's) and returns its rows as text.
async fn rows(stream: &mut Stream, sql: &str) -> Result<Vec<Vec<Option<String>>>, String> {
    stream.write_all(&wire::query(sql)).await.map_err(|e| e.to_string())?;
    stream.flush().await.map_err(|e| e.to_string())?;
    let (mut rows, mut failed) = (Vec::new(), None);
    loop {
        let message = wire::read(stream, wire::MAX_SERVER_MESSAGE)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the server closed the connection")?;
        match message.tag {
            b'D' => {
                let mut fields = wire::Fields::new(&message.body);
                let count = fields.i16("DataRow").map_err(|e| e.to_string())?.max(0);
                let mut row = Vec::new();
                for _ in 0..count {
                    let value = fields.value("DataRow").map_err(|e| e.to_string())?;
                    row.push(value.map(|v| String::from_utf8_lossy(&v).into_owned()));
                }
                rows.push(row);
            }
            b'E' => {
                let fields = wire::error_fields(&message.body);
                failed = fields.into_iter().find(|(code, _)| *code == b'M').map(|(_, text)| text);
            }
            b'Z' => break,
            _ => {}
        }
    }
    match failed {
        Some(why) => Err(format!("the server refused the proxy's query: {why}")),
        None => Ok(rows),
    }
}

/// The schemas unqualified names resolve through, in order (the implicit
/// ones included).
pub async fn search_path(server: &mut Stream) -> Result<Vec<String>, String> {
    let rows = rows(server, "SELECT pg_catalog.unnest(pg_catalog.current_schemas(true))")
        .await
        .map_err(|why| format!("cannot read the connection's search path: {why}"))?;
    Ok(rows.into_iter().filter_map(|row| row.into_iter().next().flatten()).collect())
}

/// Column names by table, looked up once per table and connection.
pub struct Catalog {
    startup: Startup,
    connection: Option<Stream>,
    tables: HashMap<u32, HashMap<i16, String>>,
}

impl Catalog {
    /// Looks up with the same login and database as the client's connection.
    pub fn new(startup: &Startup) -> Self {
        Self { startup: startup.clone(), connection: None, tables: HashMap::new() }
    }

    /// The name of column `attribute` of table `table`.
    pub async fn column(
        &mut self,
        ctx: &ProxyCtx,
        governed: &Governed,
        table: u32,
        attribute: i16,
    ) -> Result<Option<String>, String> {
        if !self.tables.contains_key(&table) {
            if self.connection.is_none() {
                let upstream = startup::login(ctx, governed, &self.startup, None).await.map_err(|e| e.to_string())?;
                self.connection = Some(upstream.stream);
            }
            let connection = self.connection.as_mut().ok_or("no catalog connection")?;
            // `table` is a number the server sent: nothing of the client's reaches this text.
            let sql = format!("SELECT attnum, attname FROM pg_catalog.pg_attribute WHERE attrelid = {table}");
            let found = match rows(connection, &sql).await {
                Ok(found) => found,
                Err(why) => {
                    self.connection = None;
                    return Err(why);
                }
            };
            let columns = found
                .into_iter()
                .filter_map(|row| match &row[..] {
                    [Some(number), Some(name)] => Some((number.parse().ok()?, name.clone())),
                    _ => None,
                })
                .collect();
            self.tables.insert(table, columns);
        }
        Ok(self.tables.get(&table).and_then(|columns| columns.get(&attribute)).cloned())
    }
}
