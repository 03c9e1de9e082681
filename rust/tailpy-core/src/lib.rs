//! tailpy's data plane, without Python: keys, and (to come) the `Device`.

pub mod keys;
