//! The kernel side from userspace: load and attach the programs, fill their
//! maps from compiled policy, read their events.

pub mod btf;
pub mod events;
mod loader;
mod maps;
pub mod pins;

pub use loader::{ExecEnforcement, KernelLogger, Loaded, Programs, load};
pub use maps::{ConsumedBytes, EventBacklog, LostCounters, OriginalDestinations, SessionMaps};

/// Errors of loading, attaching and updating the programs.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// Kernel offsets could not be read.
    #[error(transparent)]
    Btf(#[from] btf::BtfError),
    /// The object did not load.
    #[error("cannot load eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    /// A program did not load or attach.
    #[error("eBPF program {name}: {source}")]
    Program {
        /// The program.
        name: &'static str,
        /// Why.
        source: aya::programs::ProgramError,
    },
    /// A map is missing or refused an update.
    #[error("eBPF map {name}: {source}")]
    Map {
        /// The map.
        name: &'static str,
        /// Why.
        source: aya::maps::MapError,
    },
    /// A link could not be pinned in bpffs.
    #[error("cannot pin the link of eBPF program {name}: {why}")]
    Pin {
        /// The program.
        name: &'static str,
        /// Why.
        why: String,
    },
    /// A map is not in the object.
    #[error("eBPF map {0} is missing from the object")]
    MissingMap(&'static str),
    /// Opening the cgroup to attach to failed.
    #[error("cannot open cgroup {path}: {source}")]
    Cgroup {
        /// The cgroup directory.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}
