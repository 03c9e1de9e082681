//! tailpy's data plane, without Python: keys, packet batches, TUN offloads, transports (TUN, UDP) and
//! the packet filter and the `Device`.

pub mod batch;
pub mod device;
pub mod error;
pub mod filter;
pub mod io;
pub mod keys;
pub mod memory;
pub mod netstack;
pub mod offload;

pub use device::{Device, DeviceStats, Path, PeerConfig, PeerStats};
pub use error::{Error, Result};
pub use filter::{DropReason, Filter, RuleSpec};
