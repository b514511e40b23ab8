//! tollgate: a host enforcement agent for machines that run CI runners,
//! sandboxes and AI agents that start other agents.
//!
//! Data flows one way: kernel events -> [`store`]; [`policy`] -> kernel maps
//! and proxy rules. Imports point down: [`cli`] -> [`api`] -> the domain
//! modules ([`session`], [`approval`], [`store`], [`policy`], [`identity`]);
//! [`proxy`] and [`dns`] -> the domain modules; [`daemon`] only wires them. The binary
//! (`main.rs`) only parses arguments and calls into [`cli`].
#![deny(missing_docs)]

pub mod api;
pub mod approval;
pub mod bpf;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dns;
pub mod export;
pub mod identity;
pub mod memory;
pub mod policy;
pub mod proxy;
pub mod report;
pub mod review;
pub mod session;
pub mod store;
pub mod yaml;

#[cfg(test)]
mod layering;
