//! The Python module `tailpy._native`: a thin binding of `tailpy-core`. See `python/tailpy/_native.pyi`.

use pyo3::prelude::*;
use pyo3::types::PyBytes;
use tailpy_core::keys;

/// Instantiate one of `tailpy.errors`' classes with a one-sentence message.
fn tailpy_error(py: Python<'_>, class: &str, msg: impl Into<String>) -> PyErr {
    let msg: String = msg.into();
    match py
        .import("tailpy.errors")
        .and_then(|m| m.getattr(class))
        .and_then(|c| c.call1((msg.clone(),)))
    {
        Ok(obj) => PyErr::from_value(obj),
        Err(e) => e,
    }
}

fn invalid_key(py: Python<'_>, e: keys::KeyError) -> PyErr {
    tailpy_error(py, "InvalidKeyError", e.0)
}

/// A new random X25519 private key, clamped as WireGuard does (32 bytes).
#[pyfunction]
fn generate_private_key(py: Python<'_>) -> Bound<'_, PyBytes> {
    PyBytes::new(py, &keys::generate_private_key())
}

/// The 32-byte X25519 public key of a 32-byte private key. Raises InvalidKeyError.
#[pyfunction]
fn public_key<'py>(py: Python<'py>, private_key: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
    let k = keys::key_from_slice(private_key, "private key").map_err(|e| invalid_key(py, e))?;
    Ok(PyBytes::new(py, &keys::public_key(&k)))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(generate_private_key, m)?)?;
    m.add_function(wrap_pyfunction!(public_key, m)?)?;
    Ok(())
}
