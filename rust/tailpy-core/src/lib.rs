//! tailpy's data plane, without Python: keys, transports (TUN, UDP) and the `Device`.

pub mod device;
pub mod error;
pub mod io;
pub mod keys;
pub mod memory;

pub use device::{Device, DeviceStats, Path, PeerConfig, PeerStats};
pub use error::{Error, Result};
