//! Sessions: a verified identity, a cgroup, the rules the kernel enforces
//! for it, and its lifecycle from the first process to the last.

pub mod cgroup;
mod emptied;
pub mod grants;
mod lost;
pub mod peer;
mod recover;
mod registry;
mod sessions;
pub mod terminal;

/// Session ids are the session log's keys; the store defines them.
pub use crate::store::SessionId;
pub use emptied::EmptiedWatch;
pub use grants::{GrantError, GrantState, GrantView};
pub use lost::{LostEvents, LostTotals};
pub use recover::{Gap, LeftOpen};
pub use registry::{ActiveSession, Registry};
pub use sessions::{
    Attribution, Authority, Caller, ChainLink, GovernedRoute, Lifetime, Loaded, NamesView, Notice, OpenError,
    OpenRequest, Opened, Placement, REAP_INTERVAL, Resolvers, RevokeError, Revoked, Sessions, SessionsParts,
};
