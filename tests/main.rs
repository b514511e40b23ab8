//! tollgate's integration suite: the real daemon on the real kernel, as
//! root, one module per concern. See `harness` for how each test gets a
//! daemon of its own.

mod access_review;
mod attribution;
mod audit;
mod benchmark;
mod cli;
mod daemon_lifecycle;
mod delegation;
mod dns;
mod enforcement;
mod events;
mod exec_allow;
mod isolation;
mod lifetime;
mod packaging;
mod policies;
mod postgres;
mod proxy_approvals;
mod proxy_credentials;
mod proxy_hardening;
mod proxy_hosts;
mod proxy_masking;
mod proxy_redirect;
mod proxy_reviewers;
mod proxy_rules;
mod proxy_streaming;
mod proxy_upgrade;
mod reporting;
mod service;
mod survival;
mod tls;
mod tokens;
