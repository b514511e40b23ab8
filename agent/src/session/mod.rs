//! Sessions: a verified identity, a cgroup, the rules the kernel enforces
//! for it, and its lifecycle from the first process to the last.

pub mod cgroup;
mod registry;
pub mod peer;

pub use registry::{ActiveSession, Registry};
