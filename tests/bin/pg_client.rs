//! A PostgreSQL client on the extended protocol (tokio-postgres), for the
//! tests to run inside sessions: `pg-client CONNINFO [--cancel-after-ms N]
//! SQL...` runs each statement on one connection, in order, as a prepared
//! statement with binary results, and prints one JSON line for each: its
//! rows (every value as text) or its error (SQLSTATE and message).

use std::time::Duration;

use serde_json::{Value, json};
use tokio_postgres::{NoTls, Row, types::Type};

fn value(row: &Row, index: usize) -> Value {
    let column = &row.columns()[index];
    let text = match *column.type_() {
        Type::INT4 => row.try_get::<_, Option<i32>>(index).map(|v| v.map(|v| v.to_string())),
        Type::INT8 => row.try_get::<_, Option<i64>>(index).map(|v| v.map(|v| v.to_string())),
        Type::BOOL => row.try_get::<_, Option<bool>>(index).map(|v| v.map(|v| v.to_string())),
        Type::JSON | Type::JSONB => row.try_get::<_, Option<Value>>(index).map(|v| v.map(|v| v.to_string())),
        _ => row.try_get::<_, Option<String>>(index),
    };
    match text {
        Ok(Some(text)) => Value::String(text),
        Ok(None) => Value::Null,
        Err(e) => json!({ "undecodable": e.to_string() }),
    }
}

fn error(e: &tokio_postgres::Error) -> Value {
    match e.as_db_error() {
        Some(db) => json!({ "error": { "code": db.code().code(), "message": db.message() } }),
        None => json!({ "error": { "code": null, "message": e.to_string() } }),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(!args.is_empty(), "usage: pg-client CONNINFO [--cancel-after-ms N] SQL...");
    let conninfo = args.remove(0);
    let cancel_after = match args.first().map(String::as_str) {
        Some("--cancel-after-ms") => {
            args.remove(0);
            Some(Duration::from_millis(args.remove(0).parse()?))
        }
        _ => None,
    };
    let (client, connection) = match tokio_postgres::connect(&conninfo, NoTls).await {
        Ok(connected) => connected,
        Err(e) => {
            println!("{}", json!({ "connect": error(&e) }));
            return Ok(());
        }
    };
    tokio::spawn(connection);
    if let Some(after) = cancel_after {
        let token = client.cancel_token();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = token.cancel_query(NoTls).await;
        });
    }
    for sql in args {
        let line = match client.query(sql.as_str(), &[]).await {
            Ok(rows) => {
                let rows: Vec<Value> =
                    rows.iter().map(|row| Value::Array((0..row.len()).map(|i| value(row, i)).collect())).collect();
                json!({ "rows": rows })
            }
            Err(e) => error(&e),
        };
        println!("{line}");
    }
    Ok(())
}
