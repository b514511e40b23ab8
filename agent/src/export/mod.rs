//! Getting records out to other systems, in the order the ledger holds
//! them: JSON lines for log shippers (`tollgate export`), and OTLP/HTTP logs
//! for an OpenTelemetry collector ([`otlp`]).

pub mod otlp;
