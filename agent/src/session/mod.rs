//! Sessions: a verified identity, a cgroup, the rules the kernel enforces
//! for it, and its lifecycle from the first process to the last.

pub mod cgroup;
pub mod peer;
mod registry;

pub use registry::{ActiveSession, Registry};
