//! The Python module `tailpy._native`: a thin binding of `tailpy-core`. See `python/tailpy/_native.pyi`.

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::IntoRawFd;
use std::time::Duration;
use tailpy_core::device::{parse_endpoint, parse_prefix};
use tailpy_core::keys::{self, KEY_LEN};
use tailpy_core::{Device, DropReason, Error, Path, PeerConfig, RuleSpec};

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

fn core_err(py: Python<'_>, e: Error) -> PyErr {
    let class = match e {
        Error::InvalidKey(_) => "InvalidKeyError",
        Error::PermissionDenied(_) => "PermissionDeniedError",
        Error::Device(_) => "DeviceError",
        Error::Config(_) => "ConfigError",
        Error::Dial(_) => "DialError",
    };
    tailpy_error(py, class, e.message())
}

fn key(py: Python<'_>, raw: &[u8], what: &str) -> PyResult<[u8; KEY_LEN]> {
    keys::key_from_slice(raw, what).map_err(|e| invalid_key(py, e))
}

fn config_err(py: Python<'_>, msg: String) -> PyErr {
    tailpy_error(py, "ConfigError", msg)
}

/// `tun_name` of a device made by `Device.userspace` (Tailscale's name for the mode).
const USERSPACE: &str = "userspace-networking";

/// One node's data plane: a TUN interface, one UDP socket (IPv4 and IPv6), and a table of peers.
#[pyclass(frozen, name = "Device", module = "tailpy._native")]
struct PyDevice {
    inner: Device,
    tun_name: String,
}

#[pymethods]
impl PyDevice {
    #[new]
    #[pyo3(signature = (private_key, *, tun_name = "tailpy0".to_string(), listen_port = 0, mtu = 1280))]
    fn new(
        py: Python<'_>,
        private_key: &[u8],
        tun_name: String,
        listen_port: i64,
        mtu: i64,
    ) -> PyResult<Self> {
        let k = key(py, private_key, "private key")?;
        let port = u16::try_from(listen_port).map_err(|_| {
            config_err(
                py,
                format!("listen_port must be between 0 and 65535, got {listen_port}"),
            )
        })?;
        let mtu = u32::try_from(mtu)
            .ok()
            .filter(|m| (576..=65535).contains(m))
            .ok_or_else(|| {
                config_err(py, format!("mtu must be between 576 and 65535, got {mtu}"))
            })?;
        let name = tun_name.clone();
        let inner = py
            .detach(move || Device::open(&k, &name, port, mtu))
            .map_err(|e| core_err(py, e))?;
        Ok(PyDevice { inner, tun_name })
    }

    /// A device without a TUN: a userspace TCP/IP stack for `addresses`, UDP on `listen_port`.
    #[staticmethod]
    #[pyo3(signature = (private_key, listen_port, addresses, mtu = 1280))]
    fn userspace(
        py: Python<'_>,
        private_key: &[u8],
        listen_port: i64,
        addresses: Vec<String>,
        mtu: i64,
    ) -> PyResult<Self> {
        let k = key(py, private_key, "private key")?;
        let port = u16::try_from(listen_port).map_err(|_| {
            config_err(
                py,
                format!("listen_port must be between 0 and 65535, got {listen_port}"),
            )
        })?;
        let mtu = u32::try_from(mtu)
            .ok()
            .filter(|m| (576..=65535).contains(m))
            .ok_or_else(|| {
                config_err(py, format!("mtu must be between 576 and 65535, got {mtu}"))
            })?;
        let inner = py
            .detach(|| Device::userspace(&k, port, &addresses, mtu))
            .map_err(|e| core_err(py, e))?;
        Ok(PyDevice {
            inner,
            tun_name: USERSPACE.to_string(),
        })
    }

    fn set_addresses(&self, py: Python<'_>, addresses: Vec<String>) -> PyResult<()> {
        py.detach(|| self.inner.netstack()?.set_addresses(&addresses))
            .map_err(|e| core_err(py, e))
    }

    fn tcp_dial(&self, py: Python<'_>, dst_ip: &str, dst_port: i64, timeout: f64) -> PyResult<i32> {
        let ip: IpAddr = dst_ip
            .trim()
            .parse()
            .map_err(|_| config_err(py, format!("malformed IP address {dst_ip:?}")))?;
        let port = u16::try_from(dst_port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| config_err(py, format!("dst_port must be 1-65535, got {dst_port}")))?;
        if !(timeout.is_finite() && timeout > 0.0) {
            return Err(config_err(
                py,
                format!("timeout must be a positive number of seconds, got {timeout}"),
            ));
        }
        let timeout = Duration::from_secs_f64(timeout.min(1e6));
        py.detach(|| self.inner.tcp_dial(SocketAddr::new(ip, port), timeout))
            .map(IntoRawFd::into_raw_fd)
            .map_err(|e| core_err(py, e))
    }

    #[pyo3(signature = (port, backlog = 128))]
    fn tcp_listen(&self, py: Python<'_>, port: i64, backlog: i64) -> PyResult<u32> {
        let port = u16::try_from(port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| config_err(py, format!("port must be 1-65535, got {port}")))?;
        let backlog = usize::try_from(backlog).unwrap_or(0);
        py.detach(|| self.inner.netstack()?.tcp_listen(port, backlog))
            .map_err(|e| core_err(py, e))
    }

    fn tcp_accept_fd(&self, py: Python<'_>, listener: u32) -> PyResult<i32> {
        self.inner
            .netstack()
            .and_then(|ns| ns.tcp_accept_fd(listener))
            .map_err(|e| core_err(py, e))
    }

    fn tcp_accept(&self, py: Python<'_>, listener: u32) -> PyResult<Option<(i32, String, u16)>> {
        let next = py
            .detach(|| self.inner.netstack()?.tcp_accept(listener))
            .map_err(|e| core_err(py, e))?;
        Ok(next.map(|(fd, remote)| (fd.into_raw_fd(), remote.ip().to_string(), remote.port())))
    }

    fn tcp_close_listener(&self, py: Python<'_>, listener: u32) -> PyResult<()> {
        py.detach(|| self.inner.netstack()?.tcp_close_listener(listener))
            .map_err(|e| core_err(py, e))
    }

    fn udp_bind(&self, py: Python<'_>, port: i64) -> PyResult<i32> {
        let port = u16::try_from(port)
            .map_err(|_| config_err(py, format!("port must be 0-65535, got {port}")))?;
        py.detach(|| self.inner.netstack()?.udp_bind(port))
            .map(|(fd, _)| fd.into_raw_fd())
            .map_err(|e| core_err(py, e))
    }

    fn netstack_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self
            .inner
            .netstack()
            .map(|ns| ns.stats())
            .map_err(|e| core_err(py, e))?;
        let d = PyDict::new(py);
        d.set_item("tcp_connections", s.tcp_connections)?;
        d.set_item("tcp_listeners", s.tcp_listeners)?;
        d.set_item("udp_sockets", s.udp_sockets)?;
        d.set_item("rx_packets", s.rx_packets)?;
        d.set_item("rx_bytes", s.rx_bytes)?;
        d.set_item("tx_packets", s.tx_packets)?;
        d.set_item("tx_bytes", s.tx_bytes)?;
        d.set_item("dropped_rx_queue_full", s.dropped_rx_queue_full)?;
        d.set_item("tcp_bytes_in", s.tcp_bytes_in)?;
        d.set_item("tcp_bytes_out", s.tcp_bytes_out)?;
        d.set_item("udp_datagrams_in", s.udp_datagrams_in)?;
        d.set_item("udp_datagrams_out", s.udp_datagrams_out)?;
        d.set_item("udp_dropped", s.udp_dropped)?;
        Ok(d)
    }

    #[getter]
    fn public_key<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.public_key())
    }

    #[getter]
    fn tun_name(&self) -> &str {
        &self.tun_name
    }

    #[getter]
    fn listen_port(&self) -> u16 {
        self.inner.listen_port()
    }

    fn set_fwmark(&self, py: Python<'_>, mark: i64) -> PyResult<()> {
        let m = u32::try_from(mark).map_err(|_| {
            config_err(
                py,
                format!("fwmark must be between 0 and 0xffffffff, got {mark}"),
            )
        })?;
        py.detach(|| self.inner.set_fwmark(m))
            .map_err(|e| core_err(py, e))
    }

    fn set_private_key(&self, py: Python<'_>, private_key: &[u8]) -> PyResult<()> {
        let k = key(py, private_key, "private key")?;
        py.detach(|| self.inner.set_private_key(&k))
            .map_err(|e| core_err(py, e))
    }

    #[pyo3(signature = (public_key, *, allowed_ips, endpoint = None, persistent_keepalive = None, preshared_key = None))]
    fn set_peer(
        &self,
        py: Python<'_>,
        public_key: &[u8],
        allowed_ips: Vec<String>,
        endpoint: Option<String>,
        persistent_keepalive: Option<i64>,
        preshared_key: Option<&[u8]>,
    ) -> PyResult<()> {
        let pk = key(py, public_key, "peer public key")?;
        let allowed_ips = allowed_ips
            .iter()
            .map(|s| parse_prefix(s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| core_err(py, e))?;
        let endpoint = endpoint
            .map(|e| parse_endpoint(&e))
            .transpose()
            .map_err(|e| core_err(py, e))?;
        let ka = persistent_keepalive.unwrap_or(0);
        let persistent_keepalive = u16::try_from(ka).map_err(|_| {
            config_err(
                py,
                format!("persistent_keepalive must be between 0 and 65535 seconds, got {ka}"),
            )
        })?;
        let preshared_key = preshared_key
            .map(|k| key(py, k, "preshared key"))
            .transpose()?;
        let cfg = PeerConfig {
            allowed_ips,
            endpoint,
            persistent_keepalive,
            preshared_key,
        };
        py.detach(|| self.inner.set_peer(&pk, cfg))
            .map_err(|e| core_err(py, e))
    }

    /// Rules as `(src_ips, [(dst_ip, first_port, last_port)], ip_protos)` tuples, or None.
    #[pyo3(signature = (rules))]
    #[allow(clippy::type_complexity)]
    fn set_filter(
        &self,
        py: Python<'_>,
        rules: Option<Vec<(Vec<String>, Vec<(String, u16, u16)>, Vec<u8>)>>,
    ) -> PyResult<()> {
        let specs: Option<Vec<RuleSpec>> = rules.map(|rs| {
            rs.into_iter()
                .map(|(src_ips, dst_ports, ip_proto)| RuleSpec {
                    src_ips,
                    dst_ports,
                    ip_proto,
                })
                .collect()
        });
        py.detach(|| self.inner.set_filter(specs.as_deref()))
            .map_err(|e| core_err(py, e))
    }

    fn remove_peer(&self, py: Python<'_>, public_key: &[u8]) -> PyResult<bool> {
        let pk = key(py, public_key, "peer public key")?;
        Ok(py.detach(|| self.inner.remove_peer(&pk)))
    }

    #[pyo3(signature = (public_key, path, *, confirmed = true))]
    fn set_path(
        &self,
        py: Python<'_>,
        public_key: &[u8],
        path: &str,
        confirmed: bool,
    ) -> PyResult<()> {
        let pk = key(py, public_key, "peer public key")?;
        let path: Path = path.parse().map_err(|e| core_err(py, e))?;
        self.inner
            .set_path(&pk, path, confirmed)
            .map_err(|e| core_err(py, e))
    }

    fn retry_handshake(&self, py: Python<'_>, public_key: &[u8]) -> PyResult<bool> {
        let pk = key(py, public_key, "peer public key")?;
        py.detach(|| self.inner.retry_handshake(&pk))
            .map_err(|e| core_err(py, e))
    }

    fn inject(&self, py: Python<'_>, public_key: &[u8], datagram: &[u8]) -> PyResult<()> {
        let pk = key(py, public_key, "peer public key")?;
        py.detach(|| self.inner.inject(&pk, datagram))
            .map_err(|e| core_err(py, e))
    }

    fn send_datagram(&self, py: Python<'_>, data: &[u8], endpoint: &str) -> PyResult<()> {
        let to: SocketAddr = parse_endpoint(endpoint).map_err(|e| core_err(py, e))?;
        py.detach(|| self.inner.send_datagram(data, to))
            .map_err(|e| core_err(py, e))
    }

    fn fileno(&self) -> i32 {
        self.inner.event_fd()
    }

    #[pyo3(signature = (max_items = 1024))]
    fn drain<'py>(&self, py: Python<'py>, max_items: usize) -> PyResult<Bound<'py, PyTuple>> {
        let (datagrams, relay) = self.inner.drain(max_items);
        let d = PyList::empty(py);
        for (payload, from) in datagrams {
            d.append((PyBytes::new(py, &payload), from.to_string()))?;
        }
        let r = PyList::empty(py);
        for (k, payload) in relay {
            r.append((PyBytes::new(py, &k), PyBytes::new(py, &payload)))?;
        }
        PyTuple::new(py, [d.into_any(), r.into_any()])
    }

    fn peers<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        for p in py.detach(|| self.inner.peers()) {
            let d = PyDict::new(py);
            d.set_item("public_key", PyBytes::new(py, &p.public_key))?;
            d.set_item(
                "allowed_ips",
                p.allowed_ips
                    .iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>(),
            )?;
            d.set_item("endpoint", p.endpoint.map(|e| e.to_string()))?;
            d.set_item("path", p.path.as_str())?;
            d.set_item("persistent_keepalive", p.persistent_keepalive)?;
            d.set_item("tx_bytes", p.tx_bytes)?;
            d.set_item("rx_bytes", p.rx_bytes)?;
            d.set_item("tx_packets", p.tx_packets)?;
            d.set_item("rx_packets", p.rx_packets)?;
            d.set_item("last_handshake", p.last_handshake)?;
            d.set_item("handshakes_sent", p.handshakes_sent)?;
            out.append(d)?;
        }
        Ok(out)
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let d = PyDict::new(py);
        d.set_item("rx_datagrams", s.rx_datagrams)?;
        d.set_item("tx_datagrams", s.tx_datagrams)?;
        d.set_item("to_python", s.to_python)?;
        d.set_item("dropped_malformed", s.dropped_malformed)?;
        d.set_item("dropped_unknown_peer", s.dropped_unknown_peer)?;
        d.set_item("dropped_decrypt", s.dropped_decrypt)?;
        d.set_item("dropped_no_route", s.dropped_no_route)?;
        d.set_item("dropped_queue_full", s.dropped_queue_full)?;
        d.set_item("dropped_not_allowed", s.dropped_not_allowed)?;
        d.set_item("dropped_no_endpoint", s.dropped_no_endpoint)?;
        d.set_item("dropped_send_error", s.dropped_send_error)?;
        d.set_item("handshakes_sent", s.handshakes_sent)?;
        d.set_item(
            "handshakes_for_unknown_index",
            s.handshakes_for_unknown_index,
        )?;
        let fd = PyDict::new(py);
        fd.set_item("rules", s.filter_rules)?;
        for r in DropReason::ALL {
            fd.set_item(
                format!("dropped_{}", r.as_str()),
                s.filter_dropped[r as usize],
            )?;
        }
        fd.set_item("udp_flows", s.filter_flows)?;
        d.set_item("filter", fd)?;
        d.set_item("handshakes_retried", s.handshakes_retried)?;
        let o = self.inner.offload_stats();
        let od = PyDict::new(py);
        od.set_item("tun_vnet_hdr", o.tun_vnet_hdr)?;
        od.set_item("tun_tso", o.tun_tso)?;
        od.set_item("tun_uso", o.tun_uso)?;
        od.set_item("tun_gro", o.tun_gro)?;
        od.set_item("udp_gso", o.udp_gso)?;
        od.set_item("udp_gro", o.udp_gro)?;
        od.set_item("fallbacks", PyList::new(py, &o.fallbacks)?)?;
        od.set_item("tun_super_packets_read", o.tun_super_packets_read)?;
        od.set_item("tun_split_packets", o.tun_split_packets)?;
        od.set_item("tun_split_errors", o.tun_split_errors)?;
        od.set_item("tun_super_packets_written", o.tun_super_packets_written)?;
        od.set_item("tun_coalesced_segments", o.tun_coalesced_segments)?;
        od.set_item("tun_write_errors", o.tun_write_errors)?;
        od.set_item("udp_gso_sends", o.udp_gso_sends)?;
        od.set_item("udp_gso_datagrams", o.udp_gso_datagrams)?;
        od.set_item("udp_gro_receives", o.udp_gro_receives)?;
        od.set_item("udp_gro_datagrams", o.udp_gro_datagrams)?;
        d.set_item("offload", od)?;
        Ok(d)
    }

    fn close(&self, py: Python<'_>) {
        py.detach(|| self.inner.close());
    }

    fn __repr__(&self) -> String {
        format!(
            "<tailpy._native.Device {} port {}>",
            self.tun_name,
            self.inner.listen_port()
        )
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(generate_private_key, m)?)?;
    m.add_function(wrap_pyfunction!(public_key, m)?)?;
    m.add_class::<PyDevice>()?;
    Ok(())
}
