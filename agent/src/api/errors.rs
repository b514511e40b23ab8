//! Domain errors to replies, in one place: each error kind the CLI tells
//! apart (and picks its exit code by) is decided here and nowhere else.

use serde::Serialize;

use super::protocol::{ErrorKind, Response};
use crate::{
    approval::ReviewError,
    session::{GrantError, OpenError, RevokeError},
    store::StoreError,
};

/// A domain error as the control socket reports it.
pub trait ToReply: std::fmt::Display {
    /// Which kind of failure this is for the client.
    fn kind(&self) -> ErrorKind;
}

impl ToReply for OpenError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::Token(_) | Self::NoIdentity { .. } => ErrorKind::Token,
            Self::UnknownGrant(_) | Self::ReasonRequired(_) | Self::GrantsOutside | Self::TooDeep(_) => {
                ErrorKind::Refused
            }
            Self::UnknownParent
            | Self::ChildElsewhere
            | Self::ParentEnding
            | Self::NotHeldChild(_)
            | Self::RootRefused(_)
            | Self::NotPlaced(_) => ErrorKind::Forbidden,
            Self::Closing | Self::Cgroup(_) | Self::Maps(_) | Self::NotRecorded | Self::Internal(_) => {
                ErrorKind::Internal
            }
        }
    }
}

impl ToReply for ReviewError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::NotPending(_) | Self::NoWindow(_) => ErrorKind::NotFound,
            Self::WindowTooLong(_) => ErrorKind::BadRequest,
            Self::InsideSession
            | Self::NoUserName(_)
            | Self::BadUserName
            | Self::NotReviewer(_)
            | Self::OwnSession(_) => ErrorKind::Forbidden,
        }
    }
}

impl ToReply for RevokeError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::NotLive(_) => ErrorKind::NotFound,
            Self::AlreadyEnding(_) => ErrorKind::BadRequest,
            Self::NotKilled(..) => ErrorKind::Internal,
        }
    }
}

impl ToReply for GrantError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::Unknown(_) => ErrorKind::NotFound,
            Self::AlreadyRevoked(_) => ErrorKind::BadRequest,
        }
    }
}

impl ToReply for crate::review::AccessReviewError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::Store(e) => e.kind(),
            Self::UnknownIdentity(_) | Self::UnknownResource(_) => ErrorKind::BadRequest,
        }
    }
}

impl ToReply for crate::report::ReportError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::Store(e) => e.kind(),
            Self::Review(e) => e.kind(),
        }
    }
}

impl ToReply for StoreError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::NoSuchSession(_) => ErrorKind::NotFound,
            Self::Sqlite(_) | Self::TooNew { .. } | Self::WriterGone | Self::File { .. } | Self::Tampered(_) => {
                ErrorKind::Internal
            }
        }
    }
}

/// The reply for a domain result: its value as JSON, or its error.
pub fn reply<T: Serialize>(result: Result<T, impl ToReply>) -> Response {
    match result {
        Ok(value) => Response::Ok(serde_json::to_value(value).unwrap_or_default()),
        Err(error) => Response::error(error.kind(), error.to_string()),
    }
}
