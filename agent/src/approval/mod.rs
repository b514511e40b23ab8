//! Approvals: requests held for a reviewer, who may decide them, the
//! webhook that announces them, and the record of every decision.
//!
//! The proxy asks ([`Reviews::ask`]); a reviewer answers over the control
//! socket ([`Reviews::decide`]); the proxy's wait ends with the decision, or
//! with a denial when the timeout passes.

mod held;
mod reviews;

pub use held::{
    Abandon, ApprovalError, Approvals, Decision, MAX_HELD_PER_SESSION, MAX_WINDOW, OpenWindow, Pending, Request, key_of,
};
pub use reviews::{Answer, Decided, ReviewError, Reviews};
