//! `usage-worker healthcheck`: the container's HEALTHCHECK. It asks the
//! running process's HTTP API for `GET /healthz` and succeeds on a 200.
//!
//! Liveness, not readiness: `/readyz` fails while PostgreSQL is down or the
//! outbox backlog is high, and an orchestrator that restarts unhealthy
//! containers would then restart every worker at once for an outage the
//! worker rides out by itself. `/healthz` fails only when the process no
//! longer answers. The runtime image has no curl; this needs nothing but
//! the binary itself.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The path probed when no URL is given.
pub const PATH: &str = "/healthz";

/// `http://<addr>/healthz` for the listen address `HTTP_ADDR` (an
/// unspecified address, `0.0.0.0` or `::`, is probed on loopback).
pub fn default_url(listen: &str) -> anyhow::Result<String> {
    let addr: SocketAddr = listen
        .parse()
        .with_context(|| format!("http.addr {listen:?} is not an address and port"))?;
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    Ok(format!("http://{}{PATH}", SocketAddr::new(ip, addr.port())))
}

/// GETs `url` (plain `http://`) and returns the status; fails when nothing
/// answers within `timeout` or the answer is not HTTP.
pub async fn probe(url: &str, timeout: Duration) -> anyhow::Result<u16> {
    let parsed = url::Url::parse(url).with_context(|| format!("{url:?} is not a URL"))?;
    if parsed.scheme() != "http" {
        bail!("{url}: only http:// can be probed");
    }
    let host = parsed.host_str().context("the URL has no host")?.to_owned();
    let port = parsed.port_or_known_default().unwrap_or(80);
    let path = match parsed.query() {
        Some(query) => format!("{}?{query}", parsed.path()),
        None => parsed.path().to_owned(),
    };
    let exchange = async {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let mut stream = TcpStream::connect((host, port))
            .await
            .with_context(|| format!("connecting to {host}:{port}"))?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: usage-worker-healthcheck\r\nConnection: close\r\n\r\n",
            parsed.authority()
        );
        stream.write_all(request.as_bytes()).await?;
        let mut head = Vec::new();
        let mut buffer = [0_u8; 512];
        while !head.windows(2).any(|w| w == b"\r\n") {
            let n = stream.read(&mut buffer).await?;
            if n == 0 || head.len() > 4096 {
                break;
            }
            head.extend_from_slice(&buffer[..n]);
        }
        status_of(&head)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .with_context(|| format!("{url} did not answer within {timeout:?}"))?
}

/// The status code of an HTTP/1.x status line.
fn status_of(head: &[u8]) -> anyhow::Result<u16> {
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let line = std::str::from_utf8(line).context("the answer is not HTTP")?;
    let mut parts = line.split(' ');
    match (parts.next(), parts.next().and_then(|s| s.parse().ok())) {
        (Some(version), Some(status)) if version.starts_with("HTTP/1.") => Ok(status),
        _ => bail!("the answer is not HTTP: {line:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_loopback_for_an_unspecified_address() {
        assert_eq!(default_url("0.0.0.0:8080").unwrap(), "http://127.0.0.1:8080/healthz");
        assert_eq!(default_url("[::]:9000").unwrap(), "http://[::1]:9000/healthz");
        assert_eq!(default_url("10.1.2.3:80").unwrap(), "http://10.1.2.3:80/healthz");
        assert!(default_url("localhost").is_err());
    }

    #[test]
    fn reads_the_status_line() {
        assert_eq!(status_of(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n").unwrap(), 200);
        assert_eq!(status_of(b"HTTP/1.1 503 Service Unavailable\r\n").unwrap(), 503);
        assert!(status_of(b"SSH-2.0-OpenSSH\r\n").is_err());
        assert!(status_of(b"").is_err());
    }
}
